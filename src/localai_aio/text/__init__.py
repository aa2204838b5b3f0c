"""What text generation means between the wire protocols and the engines: prompts and chat templates,
tool calls and their formats, reasoning, the text of each choice from the engine's tokens, and whether a
request fits its engine. It knows no protocol and no HTTP; engines know nothing of it."""
