"""The studio's web server: one page, and the JSON API it is a client of (see /openapi.json).

    GET  /                          the page (?token=... sets the cookie, then drops it from the URL)
    POST /api/texts                 paste (JSON) or upload (multipart): an id and the text's figures
    GET  /api/texts                 the texts kept, newest first
    GET  /api/presets               the presets, and auto
    GET  /api/settings              the train settings a run may be given (the CLI's flags)
    POST /api/estimate              parameters and time of a run's settings, timed on this machine
    GET  /api/runs                  every run in --runs (the CLI's too), newest first
    POST /api/runs                  start a job: a text id and settings (409 while one runs)
    GET  /api/runs/{id}             one run, with its metrics
    POST /api/runs/{id}/stop        save and stop (resumable exactly)
    POST /api/runs/{id}/resume      continue; with steps or seconds, extend
    GET  /api/runs/{id}/events      server-sent events: metrics (id: the step), state, end
    GET  /api/runs/{id}/metrics.csv, export.zip, hf.zip
    *    /api/runs/{id}/serve/...   `tinygpt serve` on the run's best checkpoint: the playground,
                                    /v1/completions, /v1/inspect ... (its own /openapi.json)

Everything under /api needs the launch token; guard.py refuses other pages and other Hosts.
"""

import asyncio
import csv
import io
import json
import math
import shutil
import tempfile
import threading
import time
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinygpt import config as C
from tinygpt import version as tinygpt_version
from tinygpt.errors import UserError
from tinygpt.serve.api import ApiError, parse_body
from tinygpt.serve.app import body, with_request_schemas
from tinygpt.serve.app import errors as serve_errors
from tinygpt.serve.guard import COOKIE, Guard, has_token
from tinygpt.studio import texts
from tinygpt.studio.jobs import ACTIVE, STUDIO_CHOOSES, Conflict, Jobs, NotFound, TooLarge, reports

STATIC = Path(__file__).parent / "static"
MAX_JSON_BYTES = 1_000_000  # every JSON body but a pasted text
POLL_SECONDS = 0.5  # how often the event stream looks at the run's files
HEARTBEAT_SECONDS = 15.0
SERVED_RUNS = 2  # runs kept loaded for the playground at once
PROBE_TOKENS = 4096  # tokens a timed probe step processes at most (its time is scaled to the batch)


# --- request bodies ---------------------------------------------------------------------------


class TextRequest(BaseModel):
    """POST /api/texts as JSON: a pasted text, or a text tinygpt knows."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(None, description="the text itself (pasted); or give builtin")
    name: str | None = Field(None, max_length=200, description="what to call it (shown only)")
    builtin: Literal["tinyshakespeare"] | None = Field(None, description="Tiny Shakespeare, downloaded once")


Setting = str | int | float | bool | None


class RunRequest(BaseModel):
    """POST /api/runs: train a model on a text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(..., pattern=r"^[0-9a-f]{16}$", description="an id from POST /api/texts")
    preset: str | None = Field(None, max_length=40, description="a preset (GET /api/presets), or auto")
    settings: dict[str, Setting] = Field(default_factory=dict, description="tinygpt train's flags, with "
                                         "underscores: {\"max_iters\": 500, \"n_layer\": 2} (over the preset)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$",
                             description="the run's directory name (default: MODEL-TIMESTAMP)")


class EstimateRequest(BaseModel):
    """POST /api/estimate: what a run of these settings would be here."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(..., pattern=r"^[0-9a-f]{16}$")
    preset: str | None = Field(None, max_length=40)
    settings: dict[str, Setting] = Field(default_factory=dict)


class ResumeRequest(BaseModel):
    """POST /api/runs/{id}/resume: continue, or extend by steps or time."""

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: int | None = Field(None, ge=1, le=10_000_000, description="steps to add to the run's max_iters")
    seconds: float | None = Field(None, gt=0, le=10 * 24 * 3600.0, allow_inf_nan=False,
                                  description="this session's time budget (its --max-time)")


# --- the app ------------------------------------------------------------------------------------


def create_app(runs: Path, token: str, hosts: frozenset[str] | None, jobs: Jobs | None = None,
               max_upload: int = 100 * 2**20) -> FastAPI:
    """The studio for the runs in `runs`, guarded by `token` and `hosts` (guard.py)."""
    jobs = jobs or Jobs(runs)
    served = RunServers(jobs, hosts)
    estimates = Estimates(jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        served.close()  # the playground's generation threads

    app = FastAPI(title="tinygpt studio", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.jobs = jobs
    app.add_middleware(Guard, hosts=hosts, token=token, upload_paths=("/api/texts",))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/api/runs/{run_id}/serve", served, name="serve")

    @app.get("/", include_in_schema=False)
    async def page(request: Request):
        given = request.query_params.get("token")
        if given is not None and has_token({"authorization": f"Bearer {given}"}, token):
            response = RedirectResponse("/", status_code=303)  # the token leaves the address bar
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        return HTMLResponse((STATIC / "studio.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": tinygpt_version(), "training": jobs.current}

    @app.post("/api/texts", status_code=201, responses=errors(400, 401, 413, 415),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/TextRequest"}},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}})
    async def add_text(request: Request):
        """Keep a text (pasted as JSON, or a file uploaded as multipart field `file`) and describe it."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            data, name = await read_upload(request, max_upload)
        else:
            req = parse_body(TextRequest, await read_capped(request, max_upload))
            if (req.text is None) == (req.builtin is None):
                raise ApiError(400, "give either text (the text itself) or builtin (\"tinyshakespeare\")", "text",
                               "invalid_value")
            if req.builtin:
                data, name = await run_in_threadpool(shakespeare), "Tiny Shakespeare"
            else:
                data, name = req.text.encode("utf-8", "surrogatepass"), req.name or "pasted text"
        return await run_in_threadpool(texts.store, runs, data, name)

    @app.get("/api/texts", responses=errors(401))
    async def list_texts():
        return {"data": texts.list_texts(runs)}

    @app.get("/api/presets", responses=errors(401))
    async def presets():
        out = [{"name": name, "description": text, "settings": C.load_preset(name)}
               for name, text in C.list_presets().items()]
        out.append({"name": "auto", "description": "a model sized for your text and your time on this machine "
                    "(a timed probe, in the job)", "settings": {}})
        return {"data": out}

    @app.get("/api/settings", responses=errors(401))
    async def settings():
        """The train settings a run may be given: tinygpt train's flags, as the config declares them."""
        return {"data": setting_fields()}

    @app.post("/api/estimate", responses=errors(400, 401, 413, 415, 422),
              openapi_extra=body(EstimateRequest))
    async def estimate(request: Request):
        req = parse_body(EstimateRequest, await read_capped(request, MAX_JSON_BYTES))
        return await run_in_threadpool(estimates.get, req.text, req.preset, req.settings)

    @app.get("/api/runs", responses=errors(401))
    async def list_runs():
        return {"data": await run_in_threadpool(lambda: [jobs.view(n) for n in jobs.names()]),
                "training": jobs.current}

    @app.post("/api/runs", status_code=201, responses=errors(400, 401, 409, 413, 415, 422, 507),
              openapi_extra=body(RunRequest))
    async def start(request: Request):
        req = parse_body(RunRequest, await read_capped(request, MAX_JSON_BYTES))
        rec = await run_in_threadpool(jobs.start, req.text, req.preset, req.settings, req.name)
        return jobs.view(rec["run"])

    @app.get("/api/runs/{run_id}", responses=errors(401, 404))
    async def run(run_id: str):
        return await run_in_threadpool(jobs.view, run_id, True)

    @app.post("/api/runs/{run_id}/stop", responses=errors(401, 404, 409, 415))
    async def stop(run_id: str):
        jobs.run_dir(run_id)
        jobs.stop(run_id)
        return jobs.view(run_id)

    @app.post("/api/runs/{run_id}/resume", responses=errors(400, 401, 404, 409, 413, 415, 422, 507),
              openapi_extra={**body(ResumeRequest), "requestBody": {**body(ResumeRequest)["requestBody"],
                                                                    "required": False}})
    async def resume(run_id: str, request: Request):
        raw = await read_capped(request, MAX_JSON_BYTES)
        req = parse_body(ResumeRequest, raw) if raw.strip() else ResumeRequest()
        jobs.run_dir(run_id)
        await run_in_threadpool(jobs.resume, run_id, req.steps, req.seconds)
        return jobs.view(run_id)

    @app.get("/api/runs/{run_id}/events", responses={
        200: {"description": "server-sent events: `metrics` (id: the step; a loss report and its sample), "
              "`final` (the whole-val figures), `state` (the run's view), `end`",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **errors(401, 404)})
    async def events(run_id: str, request: Request, after: int | None = None):
        """Replays the reports after `Last-Event-ID` (or ?after=STEP), then follows the run live."""
        jobs.run_dir(run_id)
        last = request.headers.get("last-event-id", "")
        start = int(last) if last.strip().lstrip("-").isdigit() else (after if after is not None else -1)
        return StreamingResponse(follow(jobs, run_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/api/runs/{run_id}/metrics.csv", responses={200: {"content": {"text/csv": {}}}, **errors(401, 404)})
    async def metrics_csv(run_id: str):
        rows = reports(jobs.run_dir(run_id))
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "sample"]
        out = io.StringIO()
        writer = csv.DictWriter(out, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return Response(out.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{run_id}-metrics.csv"'})

    @app.get("/api/runs/{run_id}/export.zip", responses={200: {"content": {"application/zip": {}}},
                                                         **errors(401, 404)})
    async def export_zip(run_id: str):
        path = await run_in_threadpool(zip_dir, jobs.run_dir(run_id), run_id)
        return zip_response(path, f"{run_id}.zip")

    @app.get("/api/runs/{run_id}/hf.zip", responses={200: {"content": {"application/zip": {}}},
                                                     **errors(400, 401, 404)})
    async def hf_zip(run_id: str):
        path = await run_in_threadpool(hf_export, jobs.run_dir(run_id), run_id)
        return zip_response(path, f"{run_id}-hf.zip")

    with_request_schemas(app, "tinygpt studio: texts, runs and their training jobs. A run's /api/runs/{id}/serve/ is "
                         "tinygpt serve on its best checkpoint (its own /openapi.json there). Every /api request "
                         "carries the launch token.", (TextRequest, RunRequest, EstimateRequest, ResumeRequest))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        status = 409 if isinstance(e, Conflict) else 404 if isinstance(e, NotFound) else \
            e.status if isinstance(e, TooLarge) else 400
        code = {409: "conflict", 404: "not_found", 422: "over_limit", 507: "out_of_disk"}.get(status, "invalid_value")
        return JSONResponse(ApiError(status, str(e), field_of(str(e)), code).body(), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no such path {request.url.path}; GET /openapi.json lists the studio's routes",
                   405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(ApiError(e.status_code, message.get(e.status_code, str(e.detail)), None,
                                     "not_found" if e.status_code == 404 else None).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # a bug: logged by uvicorn, answered briefly
        return JSONResponse(ApiError(500, "internal error; see the studio's log", None, "server_error",
                                     "server_error").body(), status_code=500)

    return app


def setting_fields() -> list[dict]:
    import dataclasses

    out = []
    for cls in (C.ModelConfig, C.TrainConfig):
        for f in C.cli_fields(cls):
            if f.name in STUDIO_CHOOSES or any(o["name"] == f.name for o in out):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append({"name": f.name, "type": C.field_base_type(f).__name__, "default": default,
                        "optional": C.field_base_type(f) is not f.type, "help": f.metadata["help"],
                        "choices": list(f.metadata.get("choices") or []) or None})
    return out


ERROR_WHEN = {400: "a bad request: invalid JSON, a wrong type or value (the config's one-line message)",
              401: "no launch token", 404: "no such run", 409: "a job runs already, or the run cannot do that now",
              413: "a body over the size limit", 415: "a body that is not JSON (multipart: uploads only)",
              422: "past one of the studio's limits (parameters, steps, time)", 507: "not enough disk space"}


def errors(*statuses: int) -> dict:
    return serve_errors(*statuses, when=ERROR_WHEN)


def field_of(message: str) -> str | None:
    """The setting a config error names ("n_embd (30) must be ..." -> "n_embd"), for the page."""
    head = message.split(" ", 1)[0].rstrip(":")
    if head.startswith("settings."):
        return head
    return f"settings.{head}" if head in C.TRAIN_KEYS else None


# --- bodies, uploads and downloads ----------------------------------------------------------------


async def read_capped(request: Request, cap: int, limit: int | None = None) -> bytes:
    """The body, refused with 413 before it is read when Content-Length is over `cap`, or as soon
    as a body without one passes it. `limit`: the limit to name, when `cap` adds room to it."""
    too_large = ApiError(413, f"the body is over {limit or cap:,} bytes, this studio's limit (tinygpt studio "
                         "--max-upload-mb)", None, "body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, cap: int) -> tuple[bytes, str]:
    """The `file` field of a multipart body (capped as `read_capped`) and its file name, shown only."""
    raw = await read_capped(request, cap + 64 * 1024, cap)  # room for the multipart framing

    async def replay():
        return {"type": "http.request", "body": raw, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "the upload has no file: send it as the multipart field 'file'", "file", "invalid_value")
    data = await upload.read()
    if len(data) > cap:
        raise ApiError(413, f"the file is over {cap:,} bytes, this studio's limit (tinygpt studio --max-upload-mb)",
                       "file", "body_too_large")
    return data, upload.filename or "uploaded file"


def shakespeare() -> bytes:
    from tinygpt.data import find_corpus

    return find_corpus(None).read_bytes()


def zip_dir(run_dir: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(suffix=".zip")
    with open(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(run_dir.rglob("*")):
            if path.is_file() and not path.name.startswith(".write-test"):
                z.write(path, f"{name}/{path.relative_to(run_dir)}")
    return Path(tmp)


def hf_export(run_dir: Path, name: str) -> Path:
    from tinygpt.hf import export_run

    folder = Path(tempfile.mkdtemp())
    try:
        out = export_run(str(run_dir), str(folder / f"{name}-hf"), "best")
        return zip_dir(out, f"{name}-hf")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def zip_response(path: Path, filename: str) -> FileResponse:
    return FileResponse(path, media_type="application/zip", filename=filename,
                        background=BackgroundTask(path.unlink, missing_ok=True))


# --- the event stream --------------------------------------------------------------------------


def sse(event: str, data, id: int | None = None) -> str:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, allow_nan=False, default=str)}\n\n"


async def follow(jobs: Jobs, run_id: str, after: int):
    """The run's reports after step `after`, then each new one as it is written, its state when
    it changes, and `end` once no job runs it and every report was sent."""
    yield "retry: 1000\n\n"
    sent, said, final_sent, beat = after, None, False, time.monotonic()
    while True:
        view = await asyncio.to_thread(jobs.view, run_id, True)
        for row in view.pop("metrics", []):
            if row["step"] > sent:
                yield sse("metrics", clean(row), row["step"])
                sent = row["step"]
        if view.get("final_val_loss") is not None and not final_sent:
            yield sse("final", {"final_val_loss": view["final_val_loss"], "step": view["step"]})
            final_sent = True
        state = (view["state"], view.get("step"), view.get("message"))
        if state != said:
            yield sse("state", clean(view))
            said = state
        if view["state"] not in ACTIVE:
            yield sse("end", {"state": view["state"]})
            return
        if time.monotonic() - beat > HEARTBEAT_SECONDS:
            yield ": still here\n\n"
            beat = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)


def clean(value):
    """JSON without NaN or infinity (a diverged report's loss): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


# --- estimates and the playground's servers ------------------------------------------------------


class Estimates:
    """POST /api/estimate: the parameters, and the time a run of these settings takes here, from
    a timed probe of two real training steps (`sizing.seconds_per_step`), cached per model."""

    def __init__(self, jobs: Jobs):
        self.jobs, self.cache, self.lock = jobs, {}, threading.Lock()

    def get(self, text_id: str, preset: str | None, settings: dict) -> dict:
        from tinygpt.resources import param_count
        from tinygpt.sizing import seconds_per_step

        model_cfg, cfg, figures = self.jobs.check_settings(text_id, preset, settings)
        if preset == "auto":
            return {"parameters": None, "seconds": cfg.max_time or 600.0, "bounded_by": "time", "steps": None,
                    "seconds_per_step": None, "note": "auto sizes the model in the job, for this time"}
        key = json.dumps([C.to_dict(model_cfg), cfg.batch_size, cfg.optimizer, cfg.dtype, cfg.device])
        with self.lock:
            if key not in self.cache:
                import torch

                threads = torch.get_num_threads()
                torch.set_num_threads(self.jobs.threads)  # the job's threads, not the studio's
                # A large batch is timed at a part of its size and scaled: the page asks for every
                # preset, and two steps of the lecture's model at batch 64 take 15 s on one core.
                part = max(1, min(cfg.batch_size, PROBE_TOKENS // model_cfg.block_size))
                probed = C.build(C.TrainConfig, {**C.to_dict(cfg), "batch_size": part})
                try:
                    self.cache[key] = seconds_per_step(model_cfg, probed) * cfg.batch_size / part * cfg.grad_accum
                finally:
                    torch.set_num_threads(threads)
        step = self.cache[key]
        reports = cfg.max_iters // cfg.eval_interval + 1
        report = 2 * cfg.eval_iters * step / 3 / cfg.grad_accum  # a forward is about a third of a step
        seconds = cfg.max_iters * step + reports * report
        bounded = "steps"
        if cfg.max_time and seconds > cfg.max_time:
            seconds, bounded = cfg.max_time, "time"
        return {"parameters": param_count(model_cfg), "seconds_per_step": step, "steps": cfg.max_iters,
                "seconds": seconds, "bounded_by": bounded,
                "steps_in_time": int(cfg.max_time / (step + report / cfg.eval_interval)) if cfg.max_time else None,
                "training_now": self.jobs.current, "text_chars": figures["chars"]}


class RunServers:
    """ASGI app at /api/runs/{run_id}/serve: `tinygpt serve`'s app for the run's best checkpoint,
    loaded from disk (never from a training process) and reloaded when a better one is saved."""

    def __init__(self, jobs: Jobs, hosts):
        self.jobs, self.hosts, self.loaded, self.lock = jobs, hosts, {}, threading.Lock()

    def app_for(self, run_id: str):
        from tinygpt.checkpoint import checkpoint_dir
        from tinygpt.serve.app import create_app
        from tinygpt.serve.server import load_served

        run_dir = self.jobs.run_dir(run_id)
        if not (run_dir / "latest.json").is_file():
            raise Conflict(f"run {run_id} has no checkpoint yet; wait for its first report")
        which = checkpoint_dir(run_dir, "best")
        with self.lock:
            key, app = self.loaded.get(run_id, (None, None))
            if key != str(which):
                app = create_app(load_served(str(run_dir), "best", "auto"), hosts=self.hosts)
                app.state.worker.start()  # a mounted app gets no lifespan events
                old = self.loaded.pop(run_id, (None, None))[1]
                if old is not None:
                    old.state.worker.stop()
                self.loaded[run_id] = (str(which), app)
                while len(self.loaded) > SERVED_RUNS:
                    first = next(iter(self.loaded))
                    self.loaded.pop(first)[1].state.worker.stop()
            return app

    def close(self) -> None:
        with self.lock:
            for _, app in self.loaded.values():
                app.state.worker.stop()
            self.loaded.clear()

    async def __call__(self, scope, receive, send):
        try:
            app = await run_in_threadpool(self.app_for, scope["path_params"]["run_id"])
        except UserError as e:
            status = 404 if isinstance(e, NotFound) else 409
            response = JSONResponse(ApiError(status, str(e), None, "not_found" if status == 404 else "conflict")
                                    .body(), status_code=status)
            await response(scope, receive, send)
            return
        await app(scope, receive, send)
