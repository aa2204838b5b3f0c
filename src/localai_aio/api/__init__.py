"""The wire protocols: one package per API family (``openai``, ``anthropic``, ``elevenlabs``, ``localai``),
each a set of route modules exposing ``routes`` (a ``web.RouteTableDef``), over the request handling they
share here: model lookup and storage calls (``common``, ``stored``), sampling fields (``sampling``),
uploads (``multipart``) and the jobs the routes hand down (``text_jobs``, ``chat_jobs``, ``speech_jobs``).
A route parses its protocol's request, builds a job, and shapes the answer in its protocol's form."""
