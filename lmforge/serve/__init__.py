"""lmforge.serve: an OpenAI-compatible HTTP server (``server.ModelServer``) over the continuous-batching engine, its
request checks and response bodies (``protocol``), and a web chat page (``static/index.html``)."""
