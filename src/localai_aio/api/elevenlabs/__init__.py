"""ElevenLabs' text-to-speech and voices routes, on the same speaking as OpenAI's (``api.speech_jobs``)."""
