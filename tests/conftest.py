"""What every test file shares: the tiny model, the tiny text, one way to run the CLI, one way to
check an error, and a finished tiny run for the tests that only read one.

    TINY                    the tiny model and its training settings, written out once
    tiny_configs(data, out) ... as (ModelConfig, TrainConfig), for `tinygpt.train.train`
    tiny_flags(data, out)   ... as the flags dict `runs.settings_from_flags` takes
    tiny_args(data, out)    ... as `tinygpt train` command-line arguments
    cli(*args)              `tinygpt ARGS` in this process (or a real one): .code, .out, .err
    assert_one_line_error   one line on stderr, no traceback, the given fragments, the status
    trained_run             a finished tiny run (session-wide; read it, never change it)
    damaged_run             a private copy of it that a test may break
    serving(run)            `tinygpt serve` on a free port in a real process, until the block ends
    losses_by_step, weights, assert_same_weights, snapshot: reading runs back
"""

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`-n 2`, the default in pyproject.toml) two workers share the cores: each
# computes on one thread, and so do the processes its tests start (OpenMP threads that wait for
# a core another process holds make torch many times slower: one thread per worker avoids it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The browser tests drive the OS's chromium through Playwright; without it they skip and say so.
CHROMIUM = os.environ.get("TINYGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason=f"no chromium at {CHROMIUM} (.ci/run installs it; TINYGPT_CHROMIUM names "
                                    "another)")

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40  # 34 distinct characters

# A GPT small enough to train in a second or two on CPU, in float32 so that runs repeat exactly.
# Tests override what they are about (dropout > 0 where restoring random state must matter).
TINY = dict(
    n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0,
    batch_size=16, max_iters=60, eval_interval=20, eval_iters=4, learning_rate=3e-3,
    dtype="float32", device="cpu", quiet=True, sample_chars=0, final_eval=False, plot=False,
    threads="1",  # not "auto": runs that tests compare bit for bit must not differ in thread count
)


def tiny_flags(data: Path | None = None, out: Path | None = None, **overrides) -> dict:
    """TINY as the flags dict `tinygpt.runs.settings_from_flags` takes (paths as strings)."""
    paths = {k: str(v) for k, v in (("data", data), ("out", out)) if v is not None}
    return {**TINY, **paths, **overrides}


def tiny_configs(data: Path | None = None, out: Path | None = None, **overrides):
    """TINY as (ModelConfig, TrainConfig), what `tinygpt.train.train` takes."""
    from tinygpt.config import ModelConfig, TrainConfig, build

    values = tiny_flags(data, out, **overrides)
    return build(ModelConfig, values), build(TrainConfig, values)


def tiny_args(data: Path | None = None, out: Path | None = None, **overrides) -> list[str]:
    """TINY as `tinygpt train` arguments: `--n-layer 2 ... --no-final-eval --quiet`."""
    from tinygpt.config import as_flags

    return as_flags(tiny_flags(data, out, **overrides))


@pytest.fixture
def tiny_text_file(tmp_path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


# --- the command line -----------------------------------------------------------------------------


@dataclass
class Result:
    """What a `tinygpt` command did: its exit status and what it wrote."""

    code: int
    out: str
    err: str


def cli(*args, process: bool = False, script: str | None = None, cwd=None, env: dict | None = None,
        timeout: float = 300) -> Result:
    """`tinygpt ARGS`. By default in this process, through `tinygpt.cli.main` with stdout and
    stderr captured (the CLI's own code path, without an interpreter start-up); with
    `process=True` in a real `python -m tinygpt` process, for what only a process shows (exit
    status from the interpreter, no traceback from anywhere, imports); `script="gpt.py"` runs
    `python gpt.py ARGS` from the repository instead."""
    args = [str(a) for a in args]
    if process or script:
        command = [str(REPO / script)] if script else ["-m", "tinygpt"]
        r = subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, cwd=cwd,
                           env={**os.environ, **(env or {})}, timeout=timeout)
        return Result(r.returncode, r.stdout, r.stderr)
    assert cwd is None and env is None, "cwd and env need process=True"
    from tinygpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse: --help, and its one-line errors
            code = e.code
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: Result, *fragments: str, status: int = 2, notices: tuple[str, ...] = ()) -> None:
    """The command failed with `status`, saying so in exactly one line on stderr that holds
    every fragment, and no traceback. `notices`: the exact lines the command said on stderr
    before it failed (a resume says "resuming RUN at step N")."""
    assert result.code == status, result.err
    lines = result.err.split("\n")
    assert lines[:len(notices)] == list(notices), result.err
    error = "\n".join(lines[len(notices):])
    assert error.count("\n") == 1 and error.endswith("\n"), result.err  # exactly one line
    assert "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in error, f"{fragment!r} not in {error!r}"


# --- a server ---------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


@contextmanager
def serving(run_dir: Path, *flags, timeout: float = 60):
    """`tinygpt serve --port 0` in a subprocess; ready once it has printed its URL and /health answers."""
    with server_process(["serve", "--ckpt", str(run_dir), "--port", "0", *flags],
                        run_dir.parent / f"serve-{time.monotonic_ns()}.log", r"API (http://127\.0\.0\.1:\d+)/v1",
                        timeout) as server:
        yield server


@contextmanager
def server_process(args: list[str], log: Path, url_pattern: str, timeout: float = 60):
    """`tinygpt ARGS` in a subprocess, its output in `log`; ready once it has printed a URL that
    `url_pattern`'s group finds and /health answers there. Stopped (SIGTERM, then SIGKILL) at the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tinygpt", *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        url, deadline = None, time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server not ready after {timeout} s:\n{log.read_text()}"
            if url is None:
                found = re.search(url_pattern, log.read_text())
                url = found and found.group(1)
            if url:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.05)  # polling interval, not a guess at how long start-up takes
        yield Server(url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- runs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One finished tiny run, shared by every test that only reads a run (copy it to change it:
    `damaged_run`). 4 steps with dropout, reports at 0, 2 and 4, the whole val split scored."""
    from tinygpt.train import train

    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    torch.manual_seed(0)
    model_cfg, train_cfg = tiny_configs(data, tmp / "run", max_iters=4, eval_interval=2, batch_size=8,
                                        eval_iters=2, dropout=0.1, final_eval=True)
    return train(model_cfg, train_cfg, log=lambda *_: None).run_dir


@pytest.fixture
def damaged_run(trained_run, tmp_path) -> Path:
    """A private copy of `trained_run` that a test may break."""
    return Path(shutil.copytree(trained_run, tmp_path / "copy"))


def shakespeare_path() -> Path | None:
    from tinygpt.data import SHAKESPEARE_RELPATH, data_dir

    path = data_dir() / SHAKESPEARE_RELPATH
    return path if path.is_file() else None


def losses_by_step(run: Path) -> dict[int, tuple[float, float]]:
    """{step: (train loss, val loss)} of a run's loss reports."""
    from tinygpt.runs import read_metrics

    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in read_metrics(run)}


def weights(run: Path, which: str = "latest") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tinygpt.checkpoint import checkpoint_dir

    return load_file(str(checkpoint_dir(run, which) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """The latest checkpoints of runs `a` and `b` hold the same weights and optimizer state, bit for bit."""
    from tinygpt.checkpoint import checkpoint_dir

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    oa, ob = (torch.load(checkpoint_dir(r) / "optimizer.pt", weights_only=True) for r in (a, b))
    parts = ("muon", "adamw") if "muon" in oa else (None,)  # --optimizer muon saves both optimizers' states
    for part in parts:
        sa_all, sb_all = (oa, ob) if part is None else (oa[part], ob[part])
        assert sa_all["state"].keys() == sb_all["state"].keys()
        for pid, sa in sa_all["state"].items():
            for key, t in sa.items():
                assert torch.equal(t, sb_all["state"][pid][key]), (part, pid, key)


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself): to show that nothing was written."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


class RunsCode:
    """Unpickling this runs a shell command: what a malicious optimizer.pt or pytorch_model.bin
    would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Encoded corpora go to a fresh directory per test, never into the shared data directory."""
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path_factory.mktemp("encoded")))


@pytest.fixture(scope="session", autouse=True)
def _session_token_cache(tmp_path_factory):
    """... and so do those of the session-wide fixtures (`trained_run`), made before any test's."""
    saved = os.environ.get("TINYGPT_CACHE_DIR")
    os.environ["TINYGPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("session-encoded"))
    yield
    if saved is None:
        os.environ.pop("TINYGPT_CACHE_DIR", None)
    else:
        os.environ["TINYGPT_CACHE_DIR"] = saved


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and folder under `root`: what a write into it would change."""
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _data_dir() -> Path:
    from tinygpt.data import data_dir

    return data_dir()


def pytest_sessionstart(session):
    session.config._data_dir_before = listing(_data_dir())


def pytest_sessionfinish(session, exitstatus):
    """The suite writes only under its own temporary directories: the data directory (the
    user's, or CI's read-only shared copy) must be exactly as it was."""
    before, after = getattr(session.config, "_data_dir_before", None), listing(_data_dir())
    if before is not None and after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        sys.stderr.write(f"\nthe test suite wrote into the data directory {_data_dir()}: {changed[:5]}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
