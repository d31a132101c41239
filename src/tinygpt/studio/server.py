"""Start `tinygpt studio`: make the launch token, bind the port, print the URL, run uvicorn."""

import secrets
import sys
import webbrowser
from pathlib import Path

from tinygpt.errors import UserError
from tinygpt.serve.guard import allowed_hosts, is_loopback


def studio(runs: str = "runs", host: str = "127.0.0.1", port: int = 8500, open_browser: bool | None = None,
           token: str | None = None, max_upload_mb: float = 100.0, max_params: int = 50_000_000,
           max_steps: int = 1_000_000, max_time: float = 24 * 3600.0) -> int:
    """Serve the studio for the runs in `runs` until interrupted. Off loopback a token must be
    given (anyone who can reach the machine would otherwise only need to guess nothing)."""
    import uvicorn

    from tinygpt.serve.server import bind
    from tinygpt.studio.app import create_app
    from tinygpt.studio.jobs import Jobs, Limits

    if not is_loopback(host):
        if not token:
            raise UserError(f"listening on {host} makes the studio reachable from other machines: give a token "
                            "of your own with --token (or TINYGPT_STUDIO_TOKEN), or listen on 127.0.0.1")
        sys.stderr.write(f"tinygpt studio: warning: listening on {host}: anyone who can reach this machine and has "
                         "the token can train models and write files in the runs directory\n")
    if token is not None and len(token) < 16:
        raise UserError("--token must be at least 16 characters (it is all that guards the studio)")
    if max_upload_mb <= 0 or max_params <= 0 or max_steps <= 0 or max_time <= 0:
        raise UserError("--max-upload-mb, --max-params, --max-steps and --max-time must be positive")
    root = Path(runs)
    if root.exists() and not root.is_dir():
        raise UserError(f"--runs {runs} is a file; give a directory for the runs")
    try:
        root.mkdir(parents=True, exist_ok=True)
        jobs = Jobs(root.resolve(), Limits(max_params, max_steps, max_time))
    except OSError as e:
        raise UserError(f"cannot write the runs directory {runs} ({e.strerror}); choose another --runs") from None
    token = token or secrets.token_urlsafe(24)
    sock = bind(host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{sock.getsockname()[1]}/?token={token}"
    print(f"tinygpt studio: runs in {root.resolve()}; open {url}", flush=True)
    if jobs.current:
        print(f"tinygpt studio: run {jobs.current} is still training (adopted)", flush=True)
    if open_browser if open_browser is not None else sys.stdout.isatty():
        webbrowser.open(url)
    app = create_app(root.resolve(), token, allowed_hosts(host), jobs, int(max_upload_mb * 2**20))
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)).run(sockets=[sock])
    return 0
