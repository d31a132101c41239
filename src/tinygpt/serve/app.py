"""The web server: the OpenAI-style API and the playground, over one generation worker.

    GET  /                the playground (static files shipped in the package)
    GET  /health          loaded, device, and how busy the worker is
    GET  /v1/models       the served run: parameters, vocabulary, block_size, val loss
    POST /v1/completions  OpenAI's completions, streamed as server-sent events or not

Every error leaves as OpenAI's error body with a 4xx status (a 500 only for a server fault,
still in that shape, never a traceback).
"""

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinygpt.serve.api import MAX_BODY_BYTES, ApiError, CompletionRequest, parse_completion_request
from tinygpt.serve.worker import Busy, Event, Sequence, Worker

STATIC = Path(__file__).parent / "static"
DRAIN_LIMIT = 16 * MAX_BODY_BYTES  # read (and drop) this much of an oversized body so the 413 arrives


@dataclass
class Served:
    """A loaded run, ready to serve: the model, its tokenizer, and its card for /v1/models."""

    model: torch.nn.Module
    tokenizer: object
    card: dict
    device: torch.device
    dtype: torch.dtype


def create_app(served: Served, api_key: str | None = None, max_batch: int = 16) -> FastAPI:
    """The FastAPI app for `served`; its lifespan starts and stops the generation worker."""
    worker = Worker(served.model, served.tokenizer.decode, max_batch, served.device, served.dtype)
    model_id = served.card["id"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="tinygpt serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                           "key given to tinygpt serve --api-key", None, "invalid_api_key")

    auth = [Depends(check_key)]

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "device": str(served.device), "auth": api_key is not None,
                **worker.load()}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [served.card]}

    @app.get("/v1/models/{name}", dependencies=auth)
    async def model(name: str):
        if name != model_id:
            raise _unknown_model(name, model_id)
        return served.card

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        req = parse_completion_request(await read_body(request))
        if req.model is not None and req.model != model_id:
            raise _unknown_model(req.model, model_id)
        prompts = req.prompts()
        ids = [encode_prompt(served.tokenizer, p) for p in prompts]
        seqs = make_sequences(req, ids, asyncio.get_running_loop())
        try:
            worker.submit(seqs)
        except Busy as e:
            raise ApiError(429, f"the server is busy ({e}); retry in a moment", None, "server_busy",
                           "rate_limit_error") from None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        prefixes = [prompts[s.index // (req.n or 1)] if req.echo else "" for s in seqs]
        prompt_tokens = sum(len(served.tokenizer.encode(p)) for p in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(worker, seqs, head, prefixes, prompt_tokens, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(worker.cancel, seqs))  # if never started
        return await collect(request, worker, seqs, head, prefixes, prompt_tokens)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        routes = "GET /, GET /health, GET /v1/models, POST /v1/completions"
        message = {404: f"no such path {request.url.path}; the server answers {routes}",
                   405: f"{request.method} is not allowed on {request.url.path}; the server answers {routes}"}
        return JSONResponse(ApiError(e.status_code, message.get(e.status_code, str(e.detail)), None,
                                     "not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # a bug: logged by uvicorn, answered briefly
        return JSONResponse(ApiError(500, "internal error; see the server's log", None, "server_error",
                                     "server_error").body(), status_code=500)

    return app


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 past MAX_BODY_BYTES (checked while reading)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break
    if size > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES:,} bytes; send a shorter prompt", None,
                       "body_too_large")
    return b"".join(chunks)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt`; 400 naming the characters the tokenizer does not know."""
    unknown = tokenizer.unknown(prompt)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10
                                                              else "")
        raise ApiError(400, f"prompt has {len(unknown)} character(s) the model's tokenizer does not know: {shown}; "
                       "remove them", "prompt", "unknown_characters")
    return tokenizer.encode(prompt) or [0]  # an empty prompt starts from token 0, as tinygpt sample


def make_sequences(req: CompletionRequest, ids: list[list[int]], loop) -> list[Sequence]:
    """One Sequence per choice, numbered as OpenAI does: prompt i's choice j is index i * n + j."""
    n = req.n or 1
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    queue: asyncio.Queue = asyncio.Queue()
    temperature = 1.0 if req.temperature is None else req.temperature
    return [Sequence(i * n + j, prompt_ids, req.max_tokens or 16, temperature, req.top_k, req.top_p, seed + j,
                     req.stops(), loop, queue)
            for i, prompt_ids in enumerate(ids) for j in range(n)]


def _choice(event: Event) -> dict:
    return {"text": event.text, "index": event.index, "logprobs": None, "finish_reason": event.finish}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _server_error(message: str, status: int = 500) -> dict:
    kind = "server_overloaded" if status == 503 else "server_error"
    return ApiError(status, message, None, kind, kind).body()


async def stream(worker: Worker, seqs: list[Sequence], head: dict, prefixes: list[str], prompt_tokens: int,
                 include_usage: bool):
    """Server-sent events in OpenAI's chunk format: one chunk per piece of text, then [DONE]."""

    def sse(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    queue = seqs[0].queue
    try:
        for i, prefix in enumerate(prefixes):
            if prefix:
                yield sse({**head, "choices": [_choice(Event(i, prefix))]})
        remaining, completion_tokens = len(seqs), 0
        while remaining:
            events = await take_all(queue)
            if any(e.error for e in events):
                yield sse(_server_error(next(e.error for e in events if e.error)))
                return
            yield "".join(sse({**head, "choices": [_choice(e)]}) for e in events)
            for e in events:
                if e.finish:
                    remaining -= 1
                    completion_tokens += e.tokens
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: the response task is cancelled here
        worker.cancel(seqs)


async def take_all(queue: asyncio.Queue) -> list[Event]:
    """The next event and every one already waiting, merged to one per choice.

    A client that reads slower than the worker writes gets its backlog as one chunk per choice
    instead of one per token.
    """
    merged: dict[int, Event] = {}
    events = [await queue.get()]
    while not queue.empty():
        events.append(queue.get_nowait())
    for e in events:
        if e.index in merged:
            m = merged[e.index]
            e = Event(e.index, m.text + e.text, e.finish, e.tokens, e.error, e.status)
        merged[e.index] = e
    return list(merged.values())


async def collect(request: Request, worker: Worker, seqs: list[Sequence], head: dict, prefixes: list[str],
                  prompt_tokens: int):
    """The whole completion as one JSON answer, with usage counts."""
    queue = seqs[0].queue
    texts, finishes = list(prefixes), [None] * len(seqs)
    remaining, completion_tokens = len(seqs), 0
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while remaining:
            events = asyncio.ensure_future(take_all(queue))
            await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():  # nobody to answer: stop generating for them
                events.cancel()
                return JSONResponse(_server_error("client disconnected"), status_code=499)
            for e in events.result():
                if e.error:
                    return JSONResponse(_server_error(e.error, e.status), status_code=e.status)
                texts[e.index] += e.text
                if e.finish:
                    finishes[e.index] = e.finish
                    remaining -= 1
                    completion_tokens += e.tokens
    finally:
        gone.cancel()
        worker.cancel(seqs)
    choices = [_choice(Event(i, t, f)) for i, (t, f) in enumerate(zip(texts, finishes))]
    return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


async def disconnected(request: Request) -> None:
    """Returns when the client hangs up (the ASGI message "http.disconnect"). A short pause
    between receives that bring no disconnect, in case the server answers an exhausted body with
    empty "http.request" messages at once: the generation thread needs the GIL more."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def _unknown_model(name: str, model_id: str) -> ApiError:
    return ApiError(404, f"model {name!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
                    "model", "model_not_found")
