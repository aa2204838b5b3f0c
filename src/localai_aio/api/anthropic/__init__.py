"""Anthropic's Messages API, on the same chat turn as OpenAI's chat (``api.chat_jobs``)."""
