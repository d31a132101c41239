"""Run directories and checkpoints: what is saved loads back as the model that was trained; a
damaged or crafted file is refused in one line and never executed; a process killed at any
moment leaves a run that loads and resumes; nothing the user has is overwritten."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    RunsCode,
    assert_one_line_error,
    assert_same_weights,
    cli,
    losses_by_step,
    snapshot,
    tiny_args,
    tiny_configs,
)
from safetensors.torch import load_file, save_file

from tinygpt.checkpoint import checkpoint_dir, load_run
from tinygpt.config import ModelConfig, build
from tinygpt.errors import UserError
from tinygpt.train import train

# --- round trip ---------------------------------------------------------------------------------------


def test_loaded_model_is_the_trained_model(tiny_text_file, tmp_path):
    """`load_run` gives back the model `train` ended with: the same config and, in eval mode,
    identical logits (atol=0)."""
    m, t = tiny_configs(tiny_text_file, tmp_path / "run", max_iters=20, eval_interval=10, dropout=0.1,
                        pos_emb="rope", tie_embeddings=True, final_eval=True)
    result = train(m, t, log=lambda *_: None)
    assert result.best_step == result.step == 20  # best is last: `result.model` holds the trained weights
    trained = result.model.eval()

    idx = torch.randint(0, trained.config.vocab_size, (2, 16))
    for which in ("best", "latest"):  # one checkpoint here, named by both pointers
        loaded, tok = load_run(result.run_dir, which=which)
        assert tok.decode(tok.encode("Speak")) == "Speak"
        assert loaded.config == build(ModelConfig, {**m.__dict__, "vocab_size": tok.vocab_size})
        assert loaded.lm_head.weight is loaded.token_embedding_table.weight  # tied again after loading
        with torch.no_grad():
            torch.testing.assert_close(loaded(idx)[0], trained(idx)[0], rtol=0, atol=0)
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["format_version"] == 1 and meta["train"]["max_iters"] == 20


# --- damaged run directories ------------------------------------------------------------------------------


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _reshape_weights(path: Path) -> None:
    state = load_file(str(path))
    name = next(k for k in state if k.endswith("token_embedding_table.weight"))
    state[name] = torch.zeros(state[name].shape[0], 8)
    save_file(state, str(path))


def _weights(run: Path) -> Path:
    return checkpoint_dir(run) / "model.safetensors"


DAMAGE = {
    "missing": (lambda run: shutil.rmtree(run), "does not exist"),
    "a file": (lambda run: (shutil.rmtree(run), run.write_text("x")), "is a file, not a run directory"),
    "no run.json": (lambda run: (run / "run.json").unlink(), "is not a tinygpt run directory (no run.json)"),
    "garbled run.json": (lambda run: (run / "run.json").write_text('{"model": {"n_'), "run.json is garbled"),
    "run.json not an object": (lambda run: (run / "run.json").write_text("[1, 2]"), "run.json is garbled"),
    "other format": (lambda run: _rewrite_json(run / "run.json", lambda m: m.update(format_version=99)),
                     "written in checkpoint format 99; this tinygpt reads format 1"),
    "no latest.json": (lambda run: (run / "latest.json").unlink(), "holds no checkpoint yet"),
    "garbled latest.json": (lambda run: (run / "latest.json").write_text("{"), "holds no checkpoint yet"),
    "truncated weights": (lambda run: _weights(run).write_bytes(_weights(run).read_bytes()[:500]),
                          "is truncated or corrupted"),
    "corrupted weights": (lambda run: _weights(run).write_bytes(b"\xff" * 16 + _weights(run).read_bytes()[16:]),
                          "is truncated or corrupted"),
    "weights of another shape": (lambda run: _reshape_weights(_weights(run)), "do not fit the model in run.json"),
    "tokenizer of another vocab": (lambda run: _rewrite_json(run / "tokenizer.json",
                                                             lambda t: t["chars"].append("@")),
                                   "tokenizer has 35 tokens but the model expects 34"),
    "garbled tokenizer": (lambda run: (run / "tokenizer.json").write_text("{"), "not a readable tokenizer file"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_run_directory_is_a_one_line_error(damaged_run, case):
    damage, message = DAMAGE[case]
    damage(damaged_run)
    before = snapshot(damaged_run) if damaged_run.is_dir() else None
    for command in (["sample", "--ckpt", damaged_run, "--which", "latest"],
                    ["eval", "--ckpt", damaged_run, "--which", "latest"],
                    ["train", "--resume", damaged_run, "--max-iters", 6]):
        r = cli(*command)
        assert_one_line_error(r, message)
        assert r.out == ""
    if before is not None:
        assert snapshot(damaged_run) == before  # a failed resume wrote nothing


def test_run_json_given_for_the_run_names_the_run(trained_run):
    r = cli("sample", "--ckpt", trained_run / "run.json")
    assert_one_line_error(r, f"{trained_run / 'run.json'} is a file, not a run directory",
                          f"the directory that holds run.json ({trained_run})")


def test_damaged_optimizer_and_state_refuse_resume(damaged_run):
    ckpt_dir = checkpoint_dir(damaged_run)
    (ckpt_dir / "state.json").write_text("{")
    r = cli("train", "--resume", damaged_run)
    assert_one_line_error(r, "state.json is unreadable", "the checkpoint is damaged")
    torch.save({"state": {}, "param_groups": [{"params": [0]}]}, ckpt_dir / "optimizer.pt")
    assert_one_line_error(cli("train", "--resume", damaged_run), "optimizer.pt does not fit the model")


def test_crafted_pickle_is_refused_and_never_runs(damaged_run, tmp_path):
    marker = tmp_path / "code-ran"
    evil = checkpoint_dir(damaged_run) / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [RunsCode(marker)]}, evil)
    torch.load(evil, weights_only=False)  # the file is what it claims: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    before = snapshot(damaged_run)

    r = cli("train", "--resume", damaged_run, "--max-iters", 6)
    assert_one_line_error(r, f"optimizer state {evil} is unreadable or unsafe", "it was not loaded")
    assert not marker.exists()
    assert snapshot(damaged_run) == before


# --- --out: never overwrite what is there -----------------------------------------------------------------


def test_out_not_writable(tiny_text_file, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me")
    r = cli("train", *tiny_args(tiny_text_file, blocker / "run"))
    assert_one_line_error(r, f"cannot write run directory {blocker / 'run'}", "choose a writable --out")
    assert_one_line_error(cli("train", *tiny_args(tiny_text_file, blocker)), f"--out {blocker} is a file")
    assert blocker.read_text() == "keep me"


def test_existing_run_directory_is_not_overwritten(tiny_text_file, damaged_run, tmp_path):
    before = snapshot(damaged_run)
    r = cli("train", *tiny_args(tiny_text_file, damaged_run, max_iters=2))
    assert_one_line_error(r, f"run directory {damaged_run} already exists; continue it with --resume",
                          "--overwrite")
    assert snapshot(damaged_run) == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    r = cli("train", *tiny_args(tiny_text_file, other, max_iters=2))
    assert_one_line_error(r, f"--out {other} exists and is not a tinygpt run directory")
    assert [p.name for p in other.iterdir()] == ["todo.txt"] and (other / "todo.txt").read_text() == "mine"

    r = cli("train", *tiny_args(tiny_text_file, damaged_run, max_iters=2, eval_interval=1, overwrite=True))
    assert r.code == 0, r.err
    assert sorted(losses_by_step(damaged_run)) == [0, 1, 2]  # replaced, not appended to


# --- SIGKILL at random moments -------------------------------------------------------------------------

# Starts one process per request by fork(), so each victim is a real process running the real CLI
# without paying torch's import again (the driver itself only imports, never computes).
FORK_DRIVER = """
import json, os, sys, traceback
import torch._dynamo  # what torch.optim imports on first use: 1-2 s
import tinygpt.train  # torch and all of tinygpt, imported once; nothing computed before fork
from tinygpt.cli import main
for request in sys.stdin:
    argv, log = json.loads(request)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def temp_files(run_dir: Path) -> list[str]:
    """Names a save leaves behind when it is cut short (temporary files and directories)."""
    places = [run_dir, run_dir / "checkpoints"]
    return [p.name for d in places if d.is_dir() for p in d.iterdir() if p.name.startswith(".")]


def first_line(log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if "\n" in text:
            return text.split("\n")[0]
        time.sleep(0.005)
    raise AssertionError(f"no output from the training process in {timeout} s")


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_broken_run(tiny_text_file, tmp_path):
    """SIGKILL a training process 16 times, at random moments or (every other time) as soon as a
    checkpoint is being written; each time the run directory loads and the next process resumes
    it. The run pieced together from 17 processes ends with the same losses and weights as one
    never interrupted."""
    out = tmp_path / "run"
    args = tiny_args(tiny_text_file, dropout=0.1, attention="manual", batch_size=8, eval_iters=2, eval_interval=1,
                     max_iters=10**6)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-c", FORK_DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    rng = random.Random(4)
    cut_mid_save, pid = 0, None
    try:
        for kill in range(16):
            resuming, log = (out / "latest.json").exists(), tmp_path / f"train{kill}.log"
            argv = ["train", "--resume", out] if resuming else ["train", *args, "--out", out, "--overwrite"]
            driver.stdin.write(json.dumps([[str(a) for a in argv], str(log)]) + "\n")
            driver.stdin.flush()
            pid = int(driver.stdout.readline())
            started = first_line(log)  # "step 0: ..." or "resuming ..."
            if resuming:
                assert started.startswith(f"resuming {out} at step "), log.read_text()
            deadline = time.monotonic() + (5 if kill % 2 else rng.uniform(0, 0.4))
            while time.monotonic() < deadline and not (kill % 2 and temp_files(out)):
                pass
            os.kill(pid, signal.SIGKILL)
            status, pid = int(driver.stdout.readline()), None
            assert status == -signal.SIGKILL, log.read_text()  # it was still running, not failing
            cut_mid_save += bool(temp_files(out))
            if (out / "latest.json").exists():
                for which in ("latest", "best"):
                    model, _ = load_run(out, which)
                    assert model(torch.zeros((1, 1), dtype=torch.long))[0].isfinite().all()
                state = json.loads((checkpoint_dir(out) / "state.json").read_text())
                assert state["step"] == json.loads((out / "latest.json").read_text())["step"]
            else:  # killed before the first save finished: a clear error, and a fresh start next time
                with pytest.raises(UserError, match="holds no checkpoint yet"):
                    load_run(out)
    finally:  # never leave a training process behind, whatever failed
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        driver.stdin.close()
        driver.wait(30)
    assert cut_mid_save >= 4  # kills did land in the middle of saves

    steps = json.loads((out / "latest.json").read_text())["step"] + 3
    r = cli("train", "--resume", out, "--max-iters", steps)
    assert r.code == 0, r.err
    assert temp_files(out) == []
    r = cli("train", *args, "--out", tmp_path / "ref", "--max-iters", steps)
    assert r.code == 0, r.err
    assert losses_by_step(out) == losses_by_step(tmp_path / "ref")
    assert_same_weights(out, tmp_path / "ref")
