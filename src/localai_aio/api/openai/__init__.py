"""OpenAI's API: chat and completions, Responses, embeddings, audio, images, files, assistants, models."""
