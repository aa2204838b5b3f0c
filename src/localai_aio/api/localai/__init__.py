"""LocalAI's own routes and this server's extras: health and metrics, /tts, rerank, tokenize, gallery jobs
(``/models/apply``) and the web UI."""
