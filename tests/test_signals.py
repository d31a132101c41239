"""Ctrl-C and SIGTERM: honoured at once wherever the run is (in a step, in a loss estimate, in
the final evaluation), and the run resumes as if never stopped."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_TEXT, tiny_configs
from safetensors.torch import load_file

from tinygpt import progress
from tinygpt.checkpoint import checkpoint_dir, load_run
from tinygpt.runs import read_metrics
from tinygpt.train import Stopped

train = importlib.import_module("tinygpt.train")  # the module (its hook is patched below)


def reports(run):
    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in read_metrics(run)}


def weights(run):
    return load_file(str(checkpoint_dir(run) / "model.safetensors"))


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
        signal_self_on(monkeypatch, train, "_let_signals_in", nth)
    else:
        signal_self_on(monkeypatch, progress.Phase, "tick", nth)
    lines = []
    m, t = configs(tiny_text_file, tmp_path / "b")
    with pytest.raises(Stopped) as stopped:
        train.train(m, t, log=lines.append)
    assert stopped.value.exit_code == 130
    assert lines[-1].startswith("stopped at step ")
    monkeypatch.undo()
    m, t = configs(tiny_text_file, tmp_path / "b", resume=str(tmp_path / "b"))
    train.train(m, t, log=lambda *_: None)
    assert reports(tmp_path / "b") == reports(tmp_path / "a")
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
        train.train(m, t, log=lines.append)
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


def test_ctrl_c_in_a_long_step_stops_within_seconds(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT * 4, encoding="utf-8")
    out = tmp_path / "run"
    proc = start("--data", data, "--out", out, *SLOW_STEP)
    wait_for_file(out / "latest.json", proc)  # step 0 reported and saved: step 0's training is under way
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    waited = time.monotonic() - t0
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stdout.splitlines()[-1] == f"stopped at step 0; checkpoint saved in {out}. " \
                                      f"Resume with: tinygpt train --resume {out}"
    assert waited < 5, f"took {waited:.1f} s to stop"  # one step here takes longer (check: `tinygpt bench`)
    load_run(out)


def test_second_ctrl_c_exits_at_once(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT * 4, encoding="utf-8")
    out = tmp_path / "run"
    proc = start("--data", data, "--out", out, *SLOW_STEP)
    wait_for_file(out / "latest.json", proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert json.loads((out / "latest.json").read_text())["step"] == 0
    load_run(out)  # whatever moment the second signal hit, the run loads
