"""What text generation means between the wire protocols and the engines: sampling parameters from
request fields, prompts and chat templates, tool calls and their formats, reasoning, and the text of
each choice from the engine's tokens."""
