"""What keeps other web pages and other machines out of a local server (`serve` and `studio`).

A page the user visits in the same browser can send requests to 127.0.0.1; these rules stop it
from using the server, as Jupyter's do:

- the Host header must name this server (a DNS-rebinding page calls it evil.example);
- a cross-site request is refused (its Origin is another site's, or Sec-Fetch-Site says so);
- a body must be application/json (multipart only where files are uploaded): a browser sends
  text/plain and form bodies from any page without asking the server first;
- with a token (the studio's), every request under the guarded paths carries it: a header, or the
  cookie the tokenized URL set (SameSite=Strict, so no other site's request carries it).

Each refusal is OpenAI's error body with a 4xx status, before the application sees the request.
"""

import ipaddress
import json
import secrets
from collections.abc import Iterable
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
COOKIE = "tinygpt_studio"
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
SAFE_HEADERS = [(b"x-frame-options", b"SAMEORIGIN"), (b"x-content-type-options", b"nosniff"),
                (b"referrer-policy", b"no-referrer")]


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: reachable from outside unless proven otherwise
        return False


def allowed_hosts(host: str) -> frozenset[str] | None:
    """The Host names a server listening on `host` answers to: on loopback, loopback names (and
    `host`); elsewhere any (None), since other machines name it as they know it."""
    return LOOPBACK_NAMES | {host.lower()} if is_loopback(host) else None


def host_name(value: str) -> str:
    """"127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1", "Example.com" -> "example.com"."""
    try:
        return (urlsplit(f"//{value}").hostname or "").lower()
    except ValueError:  # "[bad" and the like
        return ""


def refusal(status: int, message: str, code: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def check(method: str, path: str, headers: dict[str, str], hosts: frozenset[str] | None, token: str | None,
          token_prefix: str, upload_paths: Iterable[str]) -> tuple[int, dict] | None:
    """The refusal of a request (status, body), or None to let it in. `headers`: lower-case names."""
    host = headers.get("host", "")
    if hosts is not None and host_name(host) not in hosts:
        return refusal(400, f"the Host header {host!r} does not name this server; open it as http://127.0.0.1:PORT/ "
                       "(requests through other names are refused, against DNS rebinding)", "bad_host")
    origin = headers.get("origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
        return refusal(403, f"a request from the web page at {origin} is refused: only this server's own pages "
                       "may use it", "cross_origin")
    if headers.get("sec-fetch-site") == "cross-site":
        return refusal(403, "a cross-site request is refused: only this server's own pages may use it", "cross_site")
    if token is not None and path.startswith(token_prefix) and not has_token(headers, token):
        return refusal(401, "missing or wrong studio token: open the URL tinygpt studio printed (it sets a cookie), "
                       "or send 'Authorization: Bearer TOKEN'", "invalid_token")
    if method in BODY_METHODS:
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        empty = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers
        upload = kind == "multipart/form-data" and any(path == p for p in upload_paths)
        if not (kind == "application/json" or upload or (not kind and empty)):
            return refusal(415, f"the body must be JSON: send the header 'Content-Type: application/json' "
                           f"(got {kind or 'none'!r})", "unsupported_media_type")
    return None


def has_token(headers: dict[str, str], token: str) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode()):
        return True
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header carries no token
        return False
    return COOKIE in cookie and secrets.compare_digest(cookie[COOKIE].value.encode(), token.encode())


class Guard:
    """ASGI middleware applying `check` to every HTTP request before `app` sees it."""

    def __init__(self, app, hosts: frozenset[str] | None, token: str | None = None, token_prefix: str = "/api",
                 upload_paths: Iterable[str] = ()):
        self.app, self.hosts, self.token, self.token_prefix = app, hosts, token, token_prefix
        self.upload_paths = tuple(upload_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refused = check(scope["method"], scope["path"], headers, self.hosts, self.token, self.token_prefix,
                            self.upload_paths)
            if refused:
                status, body = refused
                data = json.dumps(body).encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(data)).encode())]})
                await send({"type": "http.response.body", "body": data})
                return
        async def send_framed(message):  # no other site may frame the pages (clickjacking)
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SAFE_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_framed if scope["type"] == "http" else send)
