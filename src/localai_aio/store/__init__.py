"""Persistent state: assistants, files and their links."""
