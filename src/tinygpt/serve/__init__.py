"""`tinygpt serve`: a trained run behind an OpenAI-compatible completions API and a web playground.

    server.py  load the run, bind the port, run uvicorn (the command)
    app.py     the FastAPI routes: /, /health, /v1/models, /v1/completions
    api.py     the request's shape and limits, and OpenAI's error body
    worker.py  the one generation thread that batches every active request through the model
    static/    the playground page (no build step, no CDN)
"""

from tinygpt.serve.server import serve

__all__ = ["serve"]
