"""The web server: the OpenAI-style API and the playground, over one generation worker.

    GET  /                the playground (static files shipped in the package)
    GET  /health          loaded, device, and how busy the worker is
    GET  /v1/models       the served run: parameters, vocabulary, block_size, val loss
    POST /v1/completions  OpenAI's completions, streamed as server-sent events or not
    POST /v1/chat/completions  OpenAI's chat completions, for runs fine-tuned on conversations

Every error leaves as OpenAI's error body with a 4xx status (a 500 only for a server fault,
still in that shape, never a traceback).
"""

import asyncio
import json
import math
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinygpt import version as tinygpt_version
from tinygpt.chat import CHAT_TEMPLATE, END_OF_TURN, has_chat, reply_room, stop_ids
from tinygpt.chat import prompt_ids as chat_prompt
from tinygpt.resources import is_out_of_memory
from tinygpt.scoring import inspect, token_logprobs
from tinygpt.serve.api import (
    MAX_BODY_BYTES,
    REQUEST_MODELS,
    ApiError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    InspectRequest,
    InspectResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    parse_body,
    parse_chat_request,
    parse_completion_request,
)
from tinygpt.serve.guard import LOOPBACK_NAMES, Guard
from tinygpt.serve.worker import Busy, Event, Sequence, Worker
from tinygpt.tokenizer import END_OF_DOCUMENT

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


def create_app(served: Served, api_key: str | None = None, max_batch: int = 16, window: str = "full",
               hosts: frozenset[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """The FastAPI app for `served`; its lifespan starts and stops the generation worker. `hosts`:
    the Host names it answers to (None: any), see guard.py."""
    worker = Worker(served.model, served.tokenizer.decode, max_batch, served.device, served.dtype)
    model_id = served.card["id"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="tinygpt serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.add_middleware(Guard, hosts=hosts)  # other web pages and DNS rebinding kept out
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                           "key given to tinygpt serve --api-key", None, "invalid_api_key")

    auth = [Depends(check_key)]

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise _unknown_model(name, model_id)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "device": str(served.device), "auth": api_key is not None,
                **worker.load()}

    @app.get("/v1/models", dependencies=auth, responses=errors(401))
    async def models():
        return {"object": "list", "data": [served.card]}

    @app.get("/v1/models/{name}", dependencies=auth, responses=errors(401, 404))
    async def model(name: str):
        if name != model_id:
            raise _unknown_model(name, model_id)
        return served.card

    @app.get("/tokenizer_info", dependencies=auth, response_model=TokenizerInfo, responses=errors(401))
    async def tokenizer_info():
        return tokenizer_card(served.tokenizer, served.model.config.block_size)

    @app.post("/tokenize", dependencies=auth, response_model=TokenizeResponse, responses=errors(400, 401, 404, 413),
              openapi_extra=body(TokenizeRequest))
    async def tokenize(request: Request):
        req = parse_body(TokenizeRequest, await read_body(request))
        check_model(req.model)
        tokens = encode_prompt(served.tokenizer, req.prompt) if req.prompt else []
        return {"count": len(tokens), "max_model_len": served.model.config.block_size, "tokens": tokens,
                "token_strs": [served.tokenizer.decode([t]) for t in tokens]}

    @app.post("/detokenize", dependencies=auth, response_model=DetokenizeResponse,
              responses=errors(400, 401, 404, 413), openapi_extra=body(DetokenizeRequest))
    async def detokenize(request: Request):
        req = parse_body(DetokenizeRequest, await read_body(request))
        check_model(req.model)
        return {"prompt": prompt_ids(served.tokenizer, req.tokens)[1] if req.tokens else ""}

    @app.post("/v1/inspect", dependencies=auth, response_model=InspectResponse,
              responses=errors(400, 401, 404, 413, 503), openapi_extra=body(InspectRequest))
    async def inspect_text(request: Request):
        req = parse_body(InspectRequest, await read_body(request))
        check_model(req.model)
        ids = encode_prompt(served.tokenizer, req.text)
        block = served.model.config.block_size
        if len(ids) > block:
            raise ApiError(400, f"text is {len(ids)} tokens; /v1/inspect reads at most block_size = {block} "
                           "(the most one forward pass sees): send a shorter text", "text", "text_too_long")
        found = await run_on_worker(worker, asyncio.get_running_loop(), lambda: inspect_ids(served, ids, req))
        decode = served.tokenizer.decode
        positions = [{"token": decode([t]), "id": t,
                      "next_logprob": lp, "next_prob": None if lp is None else math.exp(lp),
                      "top": [{"token": decode([i]), "id": i, "logprob": v, "prob": math.exp(v)} for i, v in tops]}
                     for t, lp, tops in zip(found["ids"], found["logprobs"], found["top"])]
        layers = found.get("attention")
        return {"object": "inspection", "model": model_id, "text": decode(ids), "tokens": positions,
                "attention": layers, "n_layer": len(layers or []),
                "n_head": len(layers[0]) if layers else 0}

    @app.post("/v1/completions", dependencies=auth, responses={
        200: {"model": CompletionResponse, "description": "the completion; with stream: server-sent events",
              "content": {"text/event-stream": {"schema": {  # each event: a chunk as JSON, or [DONE]
                  "type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}}}},
        **errors(400, 401, 404, 413, 429, 503)}, openapi_extra=body(CompletionRequest))
    async def completions(request: Request):
        req = parse_completion_request(await read_body(request))
        check_model(req.model)
        loop = asyncio.get_running_loop()
        prompts = [prompt_ids(served.tokenizer, p) for p in req.prompts()]  # (ids, text) each
        n, max_tokens = req.n or 1, 16 if req.max_tokens is None else req.max_tokens
        choices = [Choice(i * n + j, text if req.echo else "", 0 if req.echo else len(text), served.tokenizer,
                          req.logprobs) for i, (_, text) in enumerate(prompts) for j in range(n)]
        if req.echo and req.logprobs is not None:  # the prompt scored, on the worker's thread
            scored = await run_on_worker(worker, loop, lambda: [
                score_prompt(served.model, served.device, ids, req.logprobs) if text else [] for ids, text in prompts])
            for c in choices:
                c.prompt_entries = scored[c.index // n]
        ends = (END_OF_DOCUMENT,) if served.tokenizer.eot_id is not None else ()  # a document's end stops a choice
        seqs = make_sequences(req, [ids for ids, _ in prompts], max_tokens, loop, window, ends) if max_tokens else []
        try:
            worker.submit(seqs)
        except Busy as e:
            raise ApiError(429, f"the server is busy ({e}); retry in a moment", None, "server_busy",
                           "rate_limit_error") from None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(worker, seqs, head, choices, prompt_tokens, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(worker.cancel, seqs))  # if never started
        return await collect(request, worker, seqs, head, choices, prompt_tokens)

    @app.post("/v1/chat/completions", dependencies=auth, responses={
        200: {"model": ChatCompletionResponse, "description": "the reply; with stream: server-sent events",
              "content": {"text/event-stream": {"schema": {
                  "type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}}}},
        **errors(400, 401, 404, 413, 429, 503)}, openapi_extra=body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = parse_chat_request(await read_body(request))
        check_model(req.model)
        if not has_chat(served.tokenizer):
            raise ApiError(400, "this run has no chat template (it was not fine-tuned on conversations): make one "
                           "with tinygpt train --init-from RUN --data chats.jsonl, or use /v1/completions",
                           "messages", "no_chat_template")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        for k, m in enumerate(messages):
            unknown = served.tokenizer.unknown(m["content"])
            if unknown:
                raise ApiError(400, f"messages[{k}].content has {len(unknown)} character(s) the model's tokenizer "
                               f"does not know: {', '.join(map(repr, unknown[:10]))}; remove them",
                               f"messages.{k}.content", "unknown_characters")
        block = served.model.config.block_size
        max_tokens = req.max_completion_tokens or req.max_tokens or block
        ids = chat_prompt(messages, served.tokenizer, reply_room(block, max_tokens))
        loop = asyncio.get_running_loop()
        ends = tuple(served.tokenizer.decode([i]) for i in sorted(stop_ids(served.tokenizer)))
        seqs = make_sequences(req, [ids], max_tokens, loop, window, ends, req.want_logprobs())
        try:
            worker.submit(seqs)
        except Busy as e:
            raise ApiError(429, f"the server is busy ({e}); retry in a moment", None, "server_busy",
                           "rate_limit_error") from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(chat_stream(worker, seqs, head, served.tokenizer, len(ids), include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(worker.cancel, seqs))
        got = await gather(request, worker, seqs, len(seqs))
        if isinstance(got, JSONResponse):
            return got
        texts, finishes, entries, completion_tokens = got
        out = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": chat_logprobs(served.tokenizer, entries[i]) if req.logprobs else None,
                "finish_reason": finishes[i]} for i in range(len(seqs))]
        return JSONResponse({**head, "object": "chat.completion", "choices": out,
                             "usage": _usage(len(ids), completion_tokens)})

    with_request_schemas(app, "tinygpt serve: OpenAI-style completions, scoring and inspection", REQUEST_MODELS)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        routes = ("GET /, GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, "
                  "POST /v1/inspect, GET /tokenizer_info, POST /tokenize, POST /detokenize")
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


ERROR_WHEN = {400: "a bad request: invalid JSON, a wrong type or value, unknown characters",
              401: "a missing or wrong API key", 404: "another model than the one served",
              413: "a body over 1 MB", 429: "too many sequences waiting", 503: "the server ran out of memory"}


def errors(*statuses: int, when: dict = ERROR_WHEN) -> dict:
    """OpenAPI responses for these error statuses (`when`: what each means), each with OpenAI's
    error body."""
    return {s: {"model": ErrorResponse, "description": when[s]} for s in statuses}


def with_request_schemas(app: FastAPI, description: str, models) -> None:
    """`app`'s /openapi.json: FastAPI's schema, plus the request bodies of `models` (the handlers
    parse them by hand, for OpenAI's error shape, so FastAPI does not see them)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=tinygpt_version(), routes=app.routes,
                                 description=description)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                components[model.__name__] = found
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def body(model) -> dict:
    """An OpenAPI request body of `model` (the handler parses it itself, for its own errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def tokenizer_card(tokenizer, block_size: int) -> dict:
    """GET /tokenizer_info, in vLLM's shape. A character vocabulary has no special tokens, so the
    end of a text is said to be a newline (where there is one): what the harness conditions a
    rolling perplexity's first token on, and adds to a generation's stop sequences."""
    from tinygpt.hf import END_OF_TEXT

    if has_chat(tokenizer):  # a run fine-tuned on conversations: a reply ends at its end of turn
        eos = END_OF_TURN
    elif tokenizer.eot_id is not None:  # a run trained on documents, or a GPT-2 tokenizer
        eos = END_OF_TEXT
    else:
        eos = "\n" if not tokenizer.unknown("\n") else tokenizer.decode([0])
    return {"tokenizer_class": f"tinygpt.{type(tokenizer).__name__}", "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "model_max_length": block_size, "eos_token": eos,
            "bos_token": None, "pad_token": None, "unk_token": None,
            "chat_template": CHAT_TEMPLATE if has_chat(tokenizer) else None}


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt`; 400 naming the characters the tokenizer does not know."""
    unknown = tokenizer.unknown(prompt)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10
                                                              else "")
        raise ApiError(400, f"prompt has {len(unknown)} character(s) the model's tokenizer does not know: {shown}; "
                       "remove them", "prompt", "unknown_characters")
    return tokenizer.encode(prompt) or [0]  # an empty prompt starts from token 0, as tinygpt sample


def prompt_ids(tokenizer, prompt: str | list[int]) -> tuple[list[int], str]:
    """(token ids, text) of a prompt given as text or as token ids (400 for an id out of range)."""
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt), prompt
    bad = [i for i in prompt if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise ApiError(400, f"prompt: token id {bad[0]} is not in the model's vocabulary (0 to "
                       f"{tokenizer.vocab_size - 1}); GET /tokenizer_info describes it, POST /tokenize encodes text",
                       "prompt", "invalid_token_id")
    return list(prompt), tokenizer.decode(prompt)


def inspect_ids(served: Served, ids: list[int], req: InspectRequest) -> dict:
    with torch.autocast(served.device.type, enabled=False):  # float32: the model's own numbers
        return inspect(served.model, ids, req.top, req.attention)


def score_prompt(model, device, ids: list[int], top: int) -> list[tuple]:
    """(id, log-prob, top alternatives) of every prompt token, in float32 (None for the first)."""
    with torch.autocast(device.type, enabled=False):
        lp = token_logprobs(model, ids, top)
    return [(i, c, (lp.top[k] if top else {}) if k else None) for k, (i, c) in enumerate(zip(lp.ids, lp.chosen))]


async def run_on_worker(worker: Worker, loop, fn):
    """`fn()` on the worker's thread; running out of memory there is a 503, as in generation."""
    try:
        return await worker.call(fn, loop)
    except Exception as e:
        if is_out_of_memory(e):
            raise ApiError(503, "the server ran out of memory scoring the prompt; retry, or send a shorter one",
                           None, "server_overloaded", "server_overloaded") from None
        raise


class Choice:
    """One choice of the answer: its text so far, and its OpenAI `logprobs` object, whose
    `text_offset` counts from the start of the prompt (as OpenAI's legacy completions do)."""

    def __init__(self, index: int, prefix: str, offset: int, tokenizer, logprobs: int | None):
        self.index, self.text, self.offset = index, prefix, offset
        self.tokenizer, self.want = tokenizer, logprobs
        self.prompt_entries: list = []
        self.finish: str | None = None

    def logprobs(self, entries: list | None) -> dict | None:
        """The `logprobs` object of `entries` (id, log-prob, top), continuing this choice's offsets."""
        if self.want is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in entries or []:
            piece = self.tokenizer.decode([token])
            out["tokens"].append(piece)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self.tokenizer.decode([i]): v
                                                                 for i, v in top.items()})
            out["text_offset"].append(self.offset)
            self.offset += len(piece)
        return out


def make_sequences(req, ids: list[list[int]], max_tokens: int, loop, window: str = "full",
                   ends: tuple[str, ...] = (), logprobs: int | None = -1) -> list[Sequence]:
    """One Sequence per choice, numbered as OpenAI does: prompt i's choice j is index i * n + j.
    `ends`: stop sequences beyond the request's (the end-of-document token's text); `logprobs`:
    alternatives to keep per position (-1: the request's own `logprobs`)."""
    logprobs = req.logprobs if logprobs == -1 else logprobs
    n = req.n or 1
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    queue: asyncio.Queue = asyncio.Queue()
    temperature = 1.0 if req.temperature is None else req.temperature
    return [Sequence(i * n + j, prompt_ids, max_tokens, temperature, req.top_k, req.top_p, seed + j,
                     req.stops() + ends, loop, queue, logprobs=logprobs, window=req.window or window)
            for i, prompt_ids in enumerate(ids) for j in range(n)]


def _choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _server_error(message: str, status: int = 500) -> dict:
    kind = "server_overloaded" if status == 503 else "server_error"
    return ApiError(status, message, None, kind, kind).body()


def sse(body: dict) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body)}\n\n"


def stream(worker: Worker, seqs: list[Sequence], head: dict, choices: list[Choice], prompt_tokens: int,
           include_usage: bool):
    """Server-sent events in OpenAI's chunk format: one chunk per piece of text, then [DONE]."""
    first = "".join(  # the echoed prompt (or, with max_tokens 0, the whole answer)
        sse({**head, "choices": [_choice(c.index, c.text, None if seqs else "length", c.logprobs(c.prompt_entries))]})
        for c in choices if c.text or c.prompt_entries or not seqs)
    chunk = lambda e: _choice(e.index, e.text, e.finish, choices[e.index].logprobs(e.logprobs))
    return events_as_sse(worker, seqs, head, prompt_tokens, include_usage, chunk, first)


async def events_as_sse(worker: Worker, seqs: list[Sequence], head: dict, prompt_tokens: int, include_usage: bool,
                        chunk, first: str = ""):
    """The worker's events for `seqs` as server-sent events: `first`, then a chunk (`chunk(event)`,
    a choice) per event until every choice has finished, the usage if asked, then [DONE]."""
    try:
        if first:
            yield first
        remaining, completion_tokens = len(seqs), 0
        while remaining:
            events = await take_all(seqs[0].queue)
            if any(e.error for e in events):
                yield sse(_server_error(next(e.error for e in events if e.error)))
                return
            yield "".join(sse({**head, "choices": [chunk(e)]}) for e in events)
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
            logprobs = None if m.logprobs is None and e.logprobs is None else (m.logprobs or []) + (e.logprobs or [])
            e = Event(e.index, m.text + e.text, e.finish, e.tokens, e.error, e.status, logprobs)
        merged[e.index] = e
    return list(merged.values())


async def gather(request: Request, worker: Worker, seqs: list[Sequence], n: int):
    """Every choice's generation, whole: (texts, finish reasons, log-prob entries, completion
    tokens), or the JSONResponse to answer instead (an error, or the client gone)."""
    texts, finishes, entries = [""] * n, [None] * n, [[] for _ in range(n)]
    remaining, completion_tokens = len(seqs), 0
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while remaining:
            events = asyncio.ensure_future(take_all(seqs[0].queue))
            await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():  # nobody to answer: stop generating for them
                events.cancel()
                return JSONResponse(_server_error("client disconnected"), status_code=499)
            for e in events.result():
                if e.error:
                    return JSONResponse(_server_error(e.error, e.status), status_code=e.status)
                texts[e.index] += e.text
                entries[e.index] += e.logprobs or []
                if e.finish:
                    finishes[e.index] = e.finish
                    remaining -= 1
                    completion_tokens += e.tokens
    finally:
        gone.cancel()
        worker.cancel(seqs)
    return texts, finishes, entries, completion_tokens


async def collect(request: Request, worker: Worker, seqs: list[Sequence], head: dict, choices: list[Choice],
                  prompt_tokens: int):
    """The whole completion as one JSON answer, with usage counts."""
    got = await gather(request, worker, seqs, len(choices))
    if isinstance(got, JSONResponse):
        return got
    texts, finishes, new_entries, completion_tokens = got
    entries = [list(c.prompt_entries) + e for c, e in zip(choices, new_entries)]
    for c, text, finish in zip(choices, texts, finishes):
        c.text += text
        c.finish = finish if seqs else "length"  # max_tokens 0: the prompt (scored) is the answer
    out = [_choice(c.index, c.text, c.finish, c.logprobs(e)) for c, e in zip(choices, entries)]
    # Plain JSON already: FastAPI's encoder would walk every log-prob again (a millisecond for 64 tokens)
    return JSONResponse({**head, "choices": out, "usage": _usage(prompt_tokens, completion_tokens)})


def chat_stream(worker: Worker, seqs: list[Sequence], head: dict, tokenizer, prompt_tokens: int,
                include_usage: bool):
    """Server-sent events in OpenAI's chat chunk format: a first chunk with the role, then one
    `delta` of content per piece of text, the finish reason in each choice's last, then [DONE]."""
    head = {**head, "object": "chat.completion.chunk"}
    first = "".join(sse({**head, "choices": [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]}) for s in seqs)
    chunk = lambda e: {"index": e.index, "delta": {"content": e.text}, "finish_reason": e.finish,
                       "logprobs": chat_logprobs(tokenizer, e.logprobs) if e.logprobs is not None else None}
    return events_as_sse(worker, seqs, head, prompt_tokens, include_usage, chunk, first)


def chat_logprobs(tokenizer, entries: list) -> dict:
    """OpenAI's chat `logprobs` object of (id, log-prob, top alternatives) entries: the reply's
    tokens (not the end of turn that ended it)."""
    def item(token: int, lp: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    ends = stop_ids(tokenizer)
    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in (top or {}).items()]}
                        for t, lp, top in entries if t not in ends]}


async def disconnected(request: Request) -> None:
    """Returns when the client hangs up (the ASGI message "http.disconnect"). A short pause
    between receives that bring no disconnect, in case the server answers an exhausted body with
    empty "http.request" messages at once: the generation thread needs the GIL more."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def _unknown_model(name: str, model_id: str) -> ApiError:
    return ApiError(404, f"model {name!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
                    "model", "model_not_found")
