"""Ollama's API (``/api/...``), translated to the same chat, text and embedding jobs as OpenAI's routes."""
