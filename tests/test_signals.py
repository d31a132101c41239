"""Ctrl-C and SIGTERM: honoured at once wherever the run is (in a step, in a loss estimate, in
the final evaluation), and the run resumes as if never stopped."""

import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import TINY_TEXT, cli, losses_by_step, tiny_args, tiny_configs, weights

from tinygpt import progress, stopping
from tinygpt.checkpoint import load_run
from tinygpt.train import Stopped

train = importlib.import_module("tinygpt.train")  # the module (its hook is patched below)


def configs(data, out, **kw):
    return tiny_configs(data, out, dropout=0.1, max_iters=8, eval_interval=3, **kw)


def run_to_the_end(data, out):
    m, t = configs(data, out)
    train.train(m, t, log=lambda *_: None)


def signal_self_on(monkeypatch, target, attr, nth: int, sig=signal.SIGINT):
    """Wrap `target.attr` so that its `nth` call sends `sig` to this process: a Ctrl-C that
    lands exactly there."""
    original = getattr(target, attr)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attr, wrapped)
    return calls


@pytest.mark.parametrize("where, nth", [("backward", 30), ("estimate", 5)])
def test_stop_inside_a_phase_resumes_exactly(monkeypatch, tiny_text_file, tmp_path, where, nth):
    """A Ctrl-C inside a backward pass (a gradient hook is where Python runs) or inside a loss
    estimate stops there: the half-done work is dropped, and the resumed run equals one never
    stopped, losses and weights."""
    run_to_the_end(tiny_text_file, tmp_path / "a")
    if where == "backward":
        signal_self_on(monkeypatch, stopping, "signal_hook", nth)
    else:
        signal_self_on(monkeypatch, progress.Phase, "tick", nth)
    lines = []
    m, t = configs(tiny_text_file, tmp_path / "b")
    with pytest.raises(Stopped) as stopped:
        train.train(m, t, log=lines.append, note=lines.append)
    assert stopped.value.exit_code == 130
    assert lines[-1].startswith("stopped at step ")
    monkeypatch.undo()
    m, t = configs(tiny_text_file, tmp_path / "b", resume=str(tmp_path / "b"))
    train.train(m, t, log=lambda *_: None)
    assert losses_by_step(tmp_path / "b") == losses_by_step(tmp_path / "a")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_in_the_final_eval_keeps_the_finished_run(monkeypatch, tiny_text_file, tmp_path):
    original = progress.Phase.__init__

    def init(self, parent, name, total, hint):
        original(self, parent, name, total, hint)
        if name.startswith("whole-val"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(progress.Phase, "__init__", init)
    lines = []
    m, t = configs(tiny_text_file, tmp_path / "run", final_eval=True)
    with pytest.raises(Stopped) as stopped:
        train.train(m, t, log=lines.append, note=lines.append)
    assert stopped.value.exit_code == 143
    assert lines[-1].startswith("stopped during the final evaluation; the run is complete")
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 8


def start(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tinygpt", "train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_file(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# A model whose training step takes several seconds here, so a stop that waited for the step to
# end would show.
SLOW_STEP = ["--n-layer", 2, "--n-head", 2, "--n-embd", 128, "--block-size", 64, "--batch-size", 1024,
             "--eval-iters", 1, "--max-iters", 100, "--eval-interval", 50, "--device", "cpu", "--dtype", "float32",
             "--sample-chars", 0, "--no-final-eval", "--no-plot"]


@pytest.fixture
def slow_run(tmp_path):
    """A real training process of SLOW_STEP, once step 0 is reported and saved (its training under
    way), and its run directory."""
    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT * 4, encoding="utf-8")
    out = tmp_path / "run"
    proc = start("--data", data, "--out", out, *SLOW_STEP)
    wait_for_file(out / "latest.json", proc)
    yield proc, out
    if proc.poll() is None:
        proc.kill()


@pytest.mark.slow
def test_ctrl_c_in_a_long_step_stops_within_seconds(slow_run):
    proc, out = slow_run
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    waited = time.monotonic() - t0
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == f"stopped at step 0; checkpoint saved in {out}. " \
                                      f"Resume with: tinygpt train --resume {out}"
    assert waited < 5, f"took {waited:.1f} s to stop"  # one step here takes longer (check: `tinygpt bench`)
    load_run(out)


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(slow_run):
    proc, out = slow_run
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert json.loads((out / "latest.json").read_text())["step"] == 0
    load_run(out)  # whatever moment the second signal hit, the run loads


class Training:
    """`python -m tinygpt train ARGS` in a subprocess whose output lines we can wait for."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tinygpt", "train", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, None), daemon=True).start()

    @staticmethod
    def _read(stream, into, lines):
        for line in stream:
            into.append(line)
            if lines is not None:
                lines.put(line)
        if lines is not None:
            lines.put(None)

    def wait_for(self, prefix: str = "", timeout: float = 60) -> str | None:
        """The first output line starting with `prefix`; None if the process ended first."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None or line.startswith(prefix):
                return line

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        time.sleep(0.05)  # let the reader threads drain the pipes
        return code, "".join(self.stdout), "".join(self.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_stops(tiny_text_file, tmp_path, sig, status):
    out = tmp_path / "run"
    run = Training(*tiny_args(tiny_text_file, out, dropout=0.1, batch_size=8, eval_iters=2, max_iters=10**6,
                              eval_interval=50))
    assert run.wait_for("step 0:") is not None, run.finish()
    time.sleep(0.2)
    run.proc.send_signal(sig)
    code, stdout, stderr = run.finish()
    assert code == status, stderr
    assert "Traceback" not in stderr
    last = stderr.splitlines()[-1]
    step = int(last.split()[3].rstrip(";"))
    assert last == f"stopped at step {step}; checkpoint saved in {out}. Resume with: tinygpt train --resume {out}"
    assert json.loads((out / "latest.json").read_text()) == {"checkpoint": f"checkpoints/step_{step:06d}",
                                                               "step": step}
    r = cli("train", "--resume", out, "--max-iters", step + 2)
    assert r.code == 0, r.err
    assert f"resuming {out} at step {step}" in r.err and f"step {step + 2}: train loss" in r.out
