"""`tinygpt studio`: the lecture's whole loop in a browser, on a server no other web page can use.

    server.py  the command: the launch token, the guard's host names, bind, uvicorn
    app.py     the JSON API (/openapi.json) and the page; each run's playground via serve's app
    jobs.py    the runs in --runs, and the one training job: a supervised `tinygpt train`
    texts.py   texts kept under server-made ids, and their figures (sizes, characters, reference losses)
    static/    the page (no build step, no CDN)
"""

from tinygpt.studio.server import studio

__all__ = ["studio"]
