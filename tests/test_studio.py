"""`tinygpt studio` (issue 27): a real studio process on 127.0.0.1, driven through its JSON API as
the page and scripts drive it: texts and their figures, a tiny model trained for real by the
supervised job, the event stream and its replay, stop / resume / extend, the playground routes of
a chosen run, exports, a restart that finds its jobs again, every security rule as a refused
request, and schemathesis on the schema. The browser test is in test_studio_browser.py.
"""

import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import TINY_TEXT, assert_one_line_error, cli, server_process, shakespeare_path

from tinygpt.cli import main

TOKEN = "studio-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
# A model that trains in seconds on one core; reports every 50 steps, each with a sample.
TINY_SETTINGS = {"n_layer": 1, "n_head": 2, "n_embd": 48, "block_size": 16, "batch_size": 8, "eval_iters": 2,
                 "eval_interval": 50, "max_iters": 200, "dtype": "float32", "device": "cpu", "sample_chars": 0,
                 "plot": False, "dropout": 0.0}


@dataclass
class Studio:
    url: str
    proc: subprocess.Popen
    runs: Path
    log: Path

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=60, **kw)

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        headers = {**AUTH, **(JSON if body is not None else {}), **kw.pop("headers", {})}
        return httpx.post(self.url + path, content=None if body is None else json.dumps(body), headers=headers,
                          timeout=120, **kw)

    def wait(self, run: str, until, timeout: float = 90) -> dict:
        """The run's view once `until(view)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.get(f"/api/runs/{run}").json()
            if until(view):
                return view
            assert time.monotonic() < deadline, f"run {run} never got there: {view}\n{self.job_log(run)}"
            time.sleep(0.2)  # polling interval

    def job_log(self, run: str) -> str:
        path = self.runs / ".studio" / "jobs" / f"{run}.log"
        return path.read_text() if path.exists() else "(no job log)"


@contextmanager
def studio(runs: Path, *flags, timeout: float = 60):
    """`tinygpt studio --port 0` in a subprocess; ready once it printed its URL and /health answers."""
    with server_process(["studio", "--runs", str(runs), "--port", "0", "--no-open", "--token", TOKEN, *flags],
                        runs.parent / f"studio-{time.monotonic_ns()}.log", r"open (http://127\.0\.0\.1:\d+)/\?token=",
                        timeout) as s:
        yield Studio(s.url, s.proc, runs, s.log)


def stop_jobs(runs: Path) -> None:
    """End any job the studio left running (jobs outlive the studio by design)."""
    for record in (runs / ".studio" / "jobs").glob("*.json"):
        pid = json.loads(record.read_text()).get("pid")
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("studio") / "runs"
    with studio(runs, "--max-params", "2000000", "--max-upload-mb", "1") as s:
        yield s
    stop_jobs(runs)


@pytest.fixture(scope="module")
def text_id(server) -> str:
    r = server.post("/api/texts", {"text": TINY_TEXT, "name": "tiny"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def events(server, run: str, headers: dict | None = None, stop_after: int | None = None, timeout: float = 120):
    """The event stream's events as (event, id, data) until `end` (or `stop_after` metrics)."""
    out, current = [], {}
    with httpx.stream("GET", f"{server.url}/api/runs/{run}/events", headers={**AUTH, **(headers or {})},
                      timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(("event:", "id:", "data:")):
                key, _, value = line.partition(":")
                current[key] = value.strip()
            elif line == "" and "event" in current:
                out.append((current["event"], current.get("id"), json.loads(current["data"])))
                current = {}
                if out[-1][0] == "end":
                    break
                if stop_after is not None and sum(e[0] == "metrics" for e in out) >= stop_after:
                    break
    return out


# --- 1. text -------------------------------------------------------------------------------------


def test_a_text_is_described_at_once(server):
    """Sizes, vocabulary, rare and odd characters, and the two reference losses, checked against
    a count made here: ln(V), and the add-one bigram of the train 90% scored on the val 10%."""
    text = TINY_TEXT + "Zq\u200bé\x07\n"
    r = server.post("/api/texts", {"text": text, "name": "../../etc/odd.txt"})
    assert r.status_code == 201, r.text
    t = r.json()
    vocab = sorted(set(text))
    assert (t["chars"], t["vocab_size"]) == (len(text), len(vocab))
    n_val = int(len(text) * 0.1)
    train, val = text[:-n_val], text[-n_val:]
    assert (t["train_chars"], t["val_chars"]) == (len(train), len(val))
    assert t["uniform_loss"] == pytest.approx(math.log(len(vocab)))
    pairs = Counter(zip(train, train[1:]))
    firsts = Counter(train[:-1])
    expected = -sum(math.log((pairs[(a, b)] + 1) / (firsts[a] + len(vocab)))
                    for a, b in zip(val, val[1:])) / (len(val) - 1)
    assert t["bigram_loss"] == pytest.approx(expected, rel=1e-6)
    assert {r["char"] for r in t["rare"]} >= {"Z", "q", "é"} and t["rare_count"] == 5
    assert sorted(o["name"] for o in t["odd"]) == ["U+0007", "ZERO WIDTH SPACE"]
    assert set(t["val_only"]) == {"Z", "q", "\u200b", "é", "\x07"}  # the model never sees them in train
    assert t["name"] == "odd.txt"  # a name is only shown: its path parts are dropped
    stored = list((server.runs / ".studio" / "texts").glob("*.txt"))
    assert all(p.parent == server.runs / ".studio" / "texts" and re.fullmatch(r"[0-9a-f]{16}\.txt", p.name)
               for p in stored)
    assert server.post("/api/texts", {"text": text}).json()["id"] == t["id"]  # the same text is one text


def test_an_uploaded_file_is_the_same_text_and_bad_bytes_are_named(server):
    data = TINY_TEXT.encode()
    r = httpx.post(server.url + "/api/texts", headers=AUTH, files={"file": ("../../../tmp/x.txt", data, "text/plain")})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == server.post("/api/texts", {"text": TINY_TEXT}).json()["id"]
    assert r.json()["name"] == "x.txt"
    bad = data[:1234] + b"\xff" + data[1234:]
    r = httpx.post(server.url + "/api/texts", headers=AUTH, files={"file": ("bad.txt", bad, "text/plain")})
    assert r.status_code == 400 and "byte 1,234 (0xff)" in r.json()["error"]["message"]
    r = server.post("/api/texts", {"text": "too short"})
    assert r.status_code == 400 and "at least 100" in r.json()["error"]["message"]
    r = server.post("/api/texts", {"text": TINY_TEXT, "builtin": "tinyshakespeare"})
    assert r.status_code == 400 and "either text" in r.json()["error"]["message"]


def test_tiny_shakespeare_is_one_click(server):
    if shakespeare_path() is None:
        pytest.skip("Tiny Shakespeare is not in the data directory (set TINYGPT_DATA_DIR)")
    t = server.post("/api/texts", {"builtin": "tinyshakespeare"}).json()
    assert (t["chars"], t["vocab_size"], t["val_chars"]) == (1_115_394, 65, 111_539)
    assert round(t["bigram_loss"], 3) == 2.482  # the reference every model is held against


# --- 2. model: settings checked by the config code, limits by the server ---------------------------


@pytest.mark.parametrize("settings,status,param,words", [
    ({"n_embd": 30, "n_head": 4}, 400, "settings.n_embd", "must be divisible by n_head"),
    ({"dropout": 1.5}, 400, "settings.dropout", "dropout must be in [0, 1)"),
    ({"lr_schedule": "zigzag"}, 400, "settings.lr_schedule", "must be one of constant, cosine, wsd"),
    ({"max_iters": "ten"}, 400, "settings.max_iters", "max_iters must be int"),
    ({"no_such": 1}, 400, "settings.no_such", "unknown setting"),
    ({"data": "/etc/passwd"}, 400, "settings.data", "the studio sets this itself"),
    ({"out": "../elsewhere"}, 400, "settings.out", "the studio sets this itself"),
    ({"resume": "/tmp"}, 400, "settings.resume", "the studio sets this itself"),
    ({"init_from": "hf:/tmp"}, 400, "settings.init_from", "the studio sets this itself"),
    ({"n_layer": 12, "n_embd": 768, "n_head": 12}, 422, None, "at most 2,000,000"),
    ({"max_iters": 2_000_000}, 422, "settings.max_iters", "over this studio's limit of 1,000,000 steps"),
    ({"max_time": 10 * 86400.0}, 422, "settings.max_time", "over this studio's limit of 86400 s"),
])
def test_settings_are_checked_by_the_server(server, text_id, settings, status, param, words):
    for path in ("/api/estimate", "/api/runs"):
        r = server.post(path, {"text": text_id, "settings": {**TINY_SETTINGS, **settings}})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"] and "\n" not in error["message"]
    assert not any(p.name.startswith("gpt-") for p in server.runs.iterdir())  # nothing was started


def test_the_estimate_is_timed_here(server, text_id):
    from tinygpt.config import ModelConfig, build, load_preset
    from tinygpt.resources import param_count

    e = server.post("/api/estimate", {"text": text_id, "preset": "cpu-quick", "settings": {"max_iters": 100}}).json()
    assert e["parameters"] == param_count(build(ModelConfig, {**load_preset("cpu-quick"), "vocab_size": 34}))
    assert e["steps"] == 100 and e["seconds_per_step"] > 0
    assert e["seconds"] == pytest.approx(100 * e["seconds_per_step"] + e["seconds_per_step"] * 2 * 5 / 3, rel=1e-6)
    listed = {p["name"] for p in server.get("/api/presets").json()["data"]}
    assert listed == {"cpu-quick", "cpu-10min", "gpu-fast", "auto"}
    names = {f["name"] for f in server.get("/api/settings").json()["data"]}
    assert {"n_layer", "learning_rate", "max_time", "optimizer"} <= names and not names & {"data", "out", "resume"}


# --- 3. train: the job, its events, stop and resume --------------------------------------------------


def test_train_watch_stop_resume_extend(server, text_id):
    """The loop of the Train step: start; a second start is a 409 naming the job; reports arrive
    as events whose id is the step, each with a sample; stop saves (resumable); resume runs to the
    end; extend adds steps; the best checkpoint is marked."""
    r = server.post("/api/runs", {"text": text_id, "settings": {**TINY_SETTINGS, "max_iters": 2000},
                                  "name": "loop"})
    assert r.status_code == 201, r.text
    assert r.json()["state"] in ("running", "starting")
    second = server.post("/api/runs", {"text": text_id, "settings": TINY_SETTINGS})
    assert second.status_code == 409 and "run loop is training" in second.json()["error"]["message"]
    got = events(server, "loop", stop_after=2)
    reports = [e for e in got if e[0] == "metrics"]
    assert [int(e[1]) for e in reports] == [e[2]["step"] for e in reports] == [0, 50]
    assert all(len(e[2]["sample"]) == 200 for e in reports)
    r = server.post("/api/runs/loop/stop")
    assert r.status_code == 200, r.text
    view = server.wait("loop", lambda v: v["state"] == "stopped")
    assert view["job"]["exit_code"] == 143 and "resume" in view["message"]
    assert 50 <= view["step"] < 2000
    assert server.post("/api/runs/loop/stop").status_code == 409  # nothing to stop
    assert server.post("/api/runs/loop/resume").status_code == 200
    done = server.wait("loop", lambda v: v["state"] == "finished", timeout=180)
    steps = [m["step"] for m in done["metrics"]]
    assert steps == list(range(0, 2001, 50))  # every report once, across the stop
    assert done["job"]["runs"][-1]["from_step"] == view["step"]  # resumed where it stopped
    assert done["best_step"] == min(done["metrics"], key=lambda m: m["val_loss"])["step"]
    assert done["final_val_loss"] is not None
    r = server.post("/api/runs/loop/resume")
    assert r.status_code == 409 and "extend it" in r.json()["error"]["message"]
    assert server.post("/api/runs/loop/resume", {"steps": 100}).status_code == 200  # extend
    extended = server.wait("loop", lambda v: v["state"] == "finished", timeout=120)
    assert (extended["max_iters"], extended["step"], extended["metrics"][-1]["step"]) == (2100, 2100, 2100)


def test_events_replay_after_a_dropped_connection(server, text_id):
    r = server.post("/api/runs", {"text": text_id, "settings": {**TINY_SETTINGS, "max_iters": 400}, "name": "replay"})
    assert r.status_code == 201, r.text
    first = [e for e in events(server, "replay", stop_after=2) if e[0] == "metrics"]  # then the line drops
    last = first[-1][1]
    rest = events(server, "replay", headers={"Last-Event-ID": last})
    replayed = [e for e in rest if e[0] == "metrics"]
    assert [int(e[1]) for e in first + replayed] == list(range(0, 401, 50))  # every report once, in order
    assert rest[-1] == ("end", None, {"state": "finished"})
    assert any(e[0] == "final" for e in rest) and any(e[0] == "state" for e in rest)
    whole = [e[2]["step"] for e in events(server, "replay") if e[0] == "metrics"]  # from the start
    assert whole == list(range(0, 401, 50))


# --- 4. compare, sample, inspect, export ---------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(server, text_id) -> str:
    r = server.post("/api/runs", {"text": text_id, "settings": TINY_SETTINGS, "name": "done"})
    assert r.status_code == 201, r.text
    server.wait("done", lambda v: v["state"] == "finished")
    return "done"


def test_a_run_is_served_from_its_best_checkpoint(server, finished_run):
    base = f"/api/runs/{finished_run}/serve"
    page = server.get(base + "/")
    assert page.status_code == 200 and "tinygpt playground" in page.text
    card = server.get(base + "/v1/models").json()["data"][0]
    view = server.get(f"/api/runs/{finished_run}").json()
    assert (card["checkpoint"], card["step"]) == ("best", view["best_step"])
    r = server.post(base + "/v1/completions", {"prompt": "All:", "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 20
    found = server.post(base + "/v1/inspect", {"text": "All:\nSpeak", "top": 5}).json()
    assert (found["n_layer"], found["n_head"]) == (1, 2) and len(found["tokens"]) == 10
    assert all(len(t["top"]) == 5 for t in found["tokens"])
    assert server.get("/api/runs/nope/serve/v1/models").status_code == 404
    assert httpx.get(server.url + base + "/v1/models").status_code == 401  # the token guards it too


def test_exports(server, finished_run):
    r = server.get(f"/api/runs/{finished_run}/export.zip")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert "done/run.json" in names and "done/metrics.jsonl" in names
    assert any(n.endswith("model.safetensors") for n in names)
    csv_text = server.get(f"/api/runs/{finished_run}/metrics.csv").text
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("step,train_loss,val_loss") and "sample" not in lines[0] and len(lines) == 1 + 5
    r = server.get(f"/api/runs/{finished_run}/hf.zip")
    assert r.status_code == 200, r.text
    hf = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert {"done-hf/config.json", "done-hf/model.safetensors"} <= set(hf)


def test_runs_list_shows_the_cli_s_runs_and_what_differs(server, finished_run, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(TINY_TEXT)
    from conftest import tiny_args

    assert main(["train", *tiny_args(data, server.runs / "from-cli", max_iters=20, eval_interval=10)]) == 0
    listed = {r["id"]: r for r in server.get("/api/runs").json()["data"]}
    assert listed["from-cli"]["state"] == "finished" and listed["from-cli"]["job"] is None
    assert listed["from-cli"]["step"] == 20 and listed[finished_run]["state"] == "finished"
    a, b = listed["from-cli"]["settings"], listed[finished_run]["settings"]
    assert {k for k in a if a[k] != b.get(k)} >= {"n_layer", "max_iters"}


# --- restarts ----------------------------------------------------------------------------------------


def test_a_restart_finds_a_dead_job_and_adopts_a_live_one(tmp_path):
    runs = tmp_path / "runs"
    with studio(runs) as s:
        tid = s.post("/api/texts", {"text": TINY_TEXT}).json()["id"]
        assert s.post("/api/runs", {"text": tid, "settings": {**TINY_SETTINGS, "max_iters": 100_000},
                                    "name": "dies"}).status_code == 201
        events(s, "dies", stop_after=1)
        pid = s.get("/api/runs/dies").json()["job"]["pid"]
        s.proc.kill()  # the studio dies, and then its job (a reboot, an OOM kill ...)
        s.proc.wait()
        os.killpg(pid, signal.SIGKILL)
    with studio(runs) as s:
        view = s.get("/api/runs/dies").json()
        assert view["state"] == "stopped" and "while the studio was not running" in view["message"]
        assert s.post("/api/runs/dies/resume", {"steps": 1}).status_code == 200  # resumable
        s.wait("dies", lambda v: v["state"] == "running")
        events(s, "dies", stop_after=1)
        s.proc.kill()  # the studio dies; its job trains on
        s.proc.wait()
    with studio(runs) as s:
        assert "still training (adopted)" in s.log.read_text()
        assert s.get("/api/runs/dies").json()["state"] == "running"
        assert s.post("/api/runs", {"text": tid, "settings": TINY_SETTINGS}).status_code == 409
        assert s.post("/api/runs/dies/stop").status_code == 200
        view = s.wait("dies", lambda v: v["state"] == "stopped")
        assert view["step"] > 0
    stop_jobs(runs)


# --- nobody else gets in ---------------------------------------------------------------------------

REFUSED = [
    # (method, path, headers, content, status, code)
    ("GET", "/api/runs", {}, None, 401, "invalid_token"),
    ("GET", "/api/runs", {"Authorization": "Bearer wrong-token-wrong-token"}, None, 401, "invalid_token"),
    ("GET", "/api/runs", {"Cookie": "tinygpt_studio=wrong"}, None, 401, "invalid_token"),
    ("GET", "/api/runs", {**AUTH, "Host": "evil.example"}, None, 400, "bad_host"),
    ("GET", "/api/runs", {**AUTH, "Host": "evil.example:8500", "Origin": "http://evil.example:8500"}, None, 400,
     "bad_host"),
    ("GET", "/", {"Host": "rebound.attacker.test"}, None, 400, "bad_host"),
    ("POST", "/api/runs", {**AUTH, **JSON, "Origin": "http://evil.example"}, b"{}", 403, "cross_origin"),
    ("POST", "/api/runs", {**AUTH, **JSON, "Sec-Fetch-Site": "cross-site"}, b"{}", 403, "cross_site"),
    ("POST", "/api/runs", {**AUTH, "Content-Type": "text/plain"}, b'{"text": "0123456789abcdef"}', 415,
     "unsupported_media_type"),
    ("POST", "/api/texts", {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, b"text=hello", 415,
     "unsupported_media_type"),
    ("POST", "/api/runs", {**AUTH, "Content-Type": "multipart/form-data; boundary=x"}, b"--x--", 415,
     "unsupported_media_type"),
    ("POST", "/api/runs/x/stop", {**AUTH, "Content-Type": "text/plain"}, b"{}", 415, "unsupported_media_type"),
    ("POST", "/api/runs", {**AUTH, **JSON}, b'{"text": "../../etc/passwd"}', 400, "invalid_value"),
    ("POST", "/api/runs", {**AUTH, **JSON}, b'{"text": "0123456789abcdef", "name": "../escape"}', 400,
     "invalid_value"),
    ("POST", "/api/runs", {**AUTH, **JSON}, b'{"text": "0123456789abcdef"}', 400, "invalid_value"),  # no such text
    ("GET", "/api/runs/..%2F..%2Fetc/export.zip", AUTH, None, 404, "not_found"),
    ("GET", "/api/runs/.studio/metrics.csv", AUTH, None, 404, "not_found"),
    ("POST", "/api/runs/..%2Fx/resume", {**AUTH, **JSON}, b"{}", 404, "not_found"),
]


@pytest.mark.parametrize("method,path,headers,content,status,code", REFUSED,
                         ids=[f"{r[5]}-{i}" for i, r in enumerate(REFUSED)])
def test_refused(server, method, path, headers, content, status, code):
    r = httpx.request(method, server.url + path, headers=headers, content=content, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and "\n" not in error["message"], error


def test_the_launch_url_sets_a_strict_cookie_and_drops_the_token(server):
    r = httpx.get(server.url + f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert f"tinygpt_studio={TOKEN}" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "HttpOnly" in cookie
    assert httpx.get(server.url + "/api/runs", headers={"Cookie": f"tinygpt_studio={TOKEN}"}).status_code == 200
    wrong = httpx.get(server.url + "/?token=guess", follow_redirects=False)
    assert wrong.status_code == 200 and "set-cookie" not in wrong.headers
    assert r.headers.get("x-frame-options") == "SAMEORIGIN"


def test_an_oversized_upload_is_refused_before_it_is_read(server):
    big = b"a" * (2 * 2**20)  # the module's studio takes 1 MB
    r = httpx.post(server.url + "/api/texts", headers=AUTH, files={"file": ("big.txt", big, "text/plain")})
    assert r.status_code == 413 and "over 1,048,576 bytes" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/api/texts", headers={**AUTH, **JSON},
                   content=json.dumps({"text": "b" * (2 * 2**20)}))
    assert r.status_code == 413
    # a body that says its size: refused from the header alone, before the rest is sent
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /api/texts HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {50 * 2**20}\r\n\r\n{{".encode())
        assert sock.recv(200).startswith(b"HTTP/1.1 413")
    assert not list((server.runs / ".studio" / "texts").glob("*big*"))


def test_off_loopback_needs_a_token_of_the_user_s(tmp_path):
    result = cli("studio", "--runs", str(tmp_path / "r"), "--host", "0.0.0.0", "--port", "0", "--no-open",
                 "--token", "")
    assert_one_line_error(result, "listening on 0.0.0.0", "give a token of your own with --token")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, text_id, tmp_path):
    checks = "not_a_server_error,status_code_conformance,content_type_conformance"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
                        "--checks", checks, "--max-examples", "25", "--seed", "3",
                        "-H", f"Authorization: Bearer {TOKEN}", "--exclude-path-regex", "/events$"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "failure" not in r.stdout.lower(), r.stdout[-4000:]
    assert "generated" in r.stdout
