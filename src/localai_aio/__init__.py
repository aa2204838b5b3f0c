"""localai_aio: a local, offline, OpenAI-compatible AI server."""

__version__ = "0.1.0"
