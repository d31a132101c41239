"""Issue 4, "trustworthy": exact resume, crash-safe checkpoints, graceful stop, the non-finite
guard, safe loading, checkpoint versioning and one-line errors for bad input.

Most cases run in-process through `tinygpt.cli.main` (the CLI's own code path, minus argparse's
process); the ones that need a real process (signals, SIGKILL, "no traceback") use subprocesses.
"""

import hashlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TEXT, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tinygpt import config as C
from tinygpt.checkpoint import checkpoint_dir, load_run
from tinygpt.cli import main
from tinygpt.errors import UserError
from tinygpt.runs import settings_from_flags
from tinygpt.train import Stopped, train

# A GPT small enough that a step takes milliseconds; dropout > 0 so that restoring the RNG matters.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "2", "--dropout", "0.1", "--attention", "manual", "--device", "cpu",
        "--sample-chars", "0", "--no-final-eval", "--quiet", "--learning-rate", "3e-3"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `tinygpt ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str, status: int = 2) -> None:
    assert code == status, err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # exactly one line
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def losses_by_step(run_dir: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in rows if "val_loss" in r}


def latest_files(run_dir: Path) -> tuple[dict, dict]:
    """Weights and optimizer state of the run's latest checkpoint."""
    d = checkpoint_dir(run_dir, "latest")
    return load_file(str(d / "model.safetensors")), torch.load(d / "optimizer.pt", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    (wa, oa), (wb, ob) = latest_files(a), latest_files(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    for pid, sa in oa["state"].items():
        for key, t in sa.items():
            assert torch.equal(t, ob["state"][pid][key]), (pid, key)


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One finished tiny run, shared by the read-only tests (copy it before damaging it)."""
    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    code = main(["train", "--data", str(data), "--out", str(tmp / "run"), *TINY, "--max-iters", "4",
                 "--eval-interval", "2", "--dtype", "float32"])
    assert code == 0
    return tmp / "run"


@pytest.fixture
def damaged_run(trained_run, tmp_path) -> Path:
    """A private copy of `trained_run` that a test may break."""
    return Path(shutil.copytree(trained_run, tmp_path / "copy"))


# --- exact resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_after_max_iters_is_bit_exact(capsys, text_file, tmp_path, dtype):
    common = ["--data", text_file, *TINY, "--dtype", dtype, "--eval-interval", 4]
    code, out_a, err = cli(capsys, "train", *common, "--out", tmp_path / "a", "--max-iters", 12)
    assert code == 0, err
    code, _, err = cli(capsys, "train", *common, "--out", tmp_path / "b", "--max-iters", 6)
    assert code == 0, err
    code, out_b, err = cli(capsys, "train", "--resume", tmp_path / "b", "--max-iters", 12)
    assert code == 0, err
    assert f"resuming {tmp_path / 'b'} at step 6" in out_b

    a, b = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    assert sorted(a) == [0, 4, 8, 12] and sorted(b) == [0, 4, 6, 8, 12]
    assert {s: b[s] for s in a} == a  # every loss, to the last bit
    reports = [ln for ln in out_b.splitlines() if ln.startswith("step ")]
    assert reports == [ln for ln in out_a.splitlines() if ln.startswith(("step 8:", "step 12:"))]
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 12


# The signal arrives while step 3's (or 5's) report is printed: the stop saves that step unreported.
@pytest.mark.parametrize("eval_interval, stop_after_report", [(3, 3), (1, 5)])
def test_resume_after_signal_stop_is_bit_exact(text_file, tmp_path, eval_interval, stop_after_report):
    """A SIGTERM during training saves and stops; resuming gives the uninterrupted run's losses,
    weights and optimizer state, with a cosine schedule and warm-up in play."""
    base = {"data": str(text_file), "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16,
            "batch_size": 8, "eval_iters": 2, "dropout": 0.1, "attention": "manual", "device": "cpu",
            "dtype": "float32", "sample_chars": 0, "final_eval": False, "quiet": True,
            "learning_rate": 3e-3, "lr_schedule": "cosine", "warmup_iters": 3, "min_lr": 1e-4,
            "max_iters": 10, "eval_interval": eval_interval}

    def run(flags, log=lambda *_: None):
        model_cfg, train_cfg = settings_from_flags(flags)
        return train(model_cfg, train_cfg, log=log)

    run({**base, "out": str(tmp_path / "a")})

    lines = []

    def stop_soon(line):  # a signal that arrives while the report is being printed
        lines.append(line)
        if line.startswith(f"step {stop_after_report}:"):
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped:
        run({**base, "out": str(tmp_path / "b")}, log=stop_soon)
    assert stopped.value.exit_code == 143
    b = tmp_path / "b"
    assert lines[-1] == (f"stopped at step {stop_after_report}; checkpoint saved in {b}. "
                         f"Resume with: tinygpt train --resume {b}")
    assert json.loads((b / "latest.json").read_text())["step"] == stop_after_report
    assert not json.loads((checkpoint_dir(b) / "state.json").read_text())["reported"]  # the resume redoes it
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is put back

    run({"resume": str(b)})
    assert losses_by_step(b) == losses_by_step(tmp_path / "a")  # no report lost or doubled
    assert_same_weights(tmp_path / "a", b)
    assert (json.loads((b / "best.json").read_text())
            == json.loads((tmp_path / "a" / "best.json").read_text()))


def test_resume_refuses_conflicting_model_flags(capsys, trained_run, tmp_path):
    before = snapshot(trained_run)
    code, _, err = cli(capsys, "train", "--resume", trained_run, "--n-embd", 64)
    assert_one_line_error(code, err, "--n-embd 64 conflicts with the run being resumed", "n_embd=32")
    code, _, err = cli(capsys, "train", "--resume", trained_run, "--learning-rate", 0.1)
    assert_one_line_error(code, err, "--learning-rate 0.1 conflicts")
    assert snapshot(trained_run) == before


def test_resume_takes_unchanged_settings_from_the_run(capsys, damaged_run):
    """`--resume DIR --n-embd 32` repeats the run's own value: checked against the run, not the
    defaults (n_head 6 would not divide 32)."""
    code, out, err = cli(capsys, "train", "--resume", damaged_run, "--n-embd", 32, "--max-iters", 6)
    assert code == 0, err
    assert sorted(losses_by_step(damaged_run)) == [0, 2, 4, 6]


def test_resume_through_the_script(capsys, text_file, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--model", "gpt", "--data", text_file, "--out", out, *TINY,
                       "--dtype", "float32", "--max-iters", 3, "--eval-interval", 3)
    assert code == 0, err
    r = subprocess.run([sys.executable, str(REPO / "gpt.py"), "--resume", str(out), "--max-iters", "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} at step 3" in r.stdout and "step 5: train loss" in r.stdout
    assert sorted(losses_by_step(out)) == [0, 3, 5]
    code, _, err = cli(capsys, "train", "--model", "bigram", "--resume", out)  # what bigram.py passes
    assert_one_line_error(code, err, "--model bigram conflicts with the run being resumed")


# --- signals -------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_stops(capsys, text_file, tmp_path, sig, status):
    out = tmp_path / "run"
    run = Training("--data", text_file, "--out", out, *TINY, "--dtype", "float32", "--max-iters", 10**6,
                   "--eval-interval", 50)
    assert run.wait_for("step 0:") is not None, run.finish()
    time.sleep(0.2)
    run.proc.send_signal(sig)
    code, stdout, stderr = run.finish()
    assert code == status, stderr
    assert "Traceback" not in stderr
    last = stdout.splitlines()[-1]
    step = int(last.split()[3].rstrip(";"))
    assert last == f"stopped at step {step}; checkpoint saved in {out}. Resume with: tinygpt train --resume {out}"
    assert json.loads((out / "latest.json").read_text()) == {"checkpoint": f"checkpoints/step_{step:06d}",
                                                               "step": step}
    code, stdout, err = cli(capsys, "train", "--resume", out, "--max-iters", step + 2)
    assert code == 0, err
    assert f"resuming {out} at step {step}" in stdout and f"step {step + 2}: train loss" in stdout


# --- SIGKILL at random moments ---------------------------------------------------------------

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
def test_sigkill_at_random_moments_never_leaves_a_broken_run(capsys, text_file, tmp_path):
    """SIGKILL a training process 16 times, at random moments or (every other time) as soon as a
    checkpoint is being written; each time the run directory loads and the next process resumes
    it. The run pieced together from 17 processes ends with the same losses and weights as one
    never interrupted."""
    out = tmp_path / "run"
    args = ["--data", text_file, *TINY, "--dtype", "float32", "--eval-interval", 1, "--max-iters", 10**6]
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
    code, _, err = cli(capsys, "train", "--resume", out, "--max-iters", steps)
    assert code == 0, err
    assert temp_files(out) == []
    code, _, err = cli(capsys, "train", *args, "--out", tmp_path / "ref", "--max-iters", steps)
    assert code == 0, err
    assert losses_by_step(out) == losses_by_step(tmp_path / "ref")
    assert_same_weights(out, tmp_path / "ref")


# --- non-finite guard ----------------------------------------------------------------------------


@pytest.mark.parametrize("eval_interval", [1, 4])  # caught by the loss report / by the training step
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(capsys, monkeypatch, text_file, tmp_path,
                                                              eval_interval):
    import tinygpt.checkpoint as ckpt

    out = tmp_path / "run"
    saves = []
    real_save = ckpt.save_checkpoint

    def recording_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        saves.append((snapshot(path), (out / "latest.json").read_bytes(), (out / "best.json").read_bytes()))
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", recording_save)
    # Adam's first step moves every weight by about the learning rate: 1e30 overflows float32 next.
    code, _, err = cli(capsys, "train", "--data", text_file, "--out", out, *TINY, "--dtype", "float32",
                       "--learning-rate", 1e30, "--max-iters", 20, "--eval-interval", eval_interval)
    assert_one_line_error(code, err, "step 1: ", "training diverged", "lower --learning-rate (now 1e+30)",
                          "--dtype float32", f"last good checkpoint in {out} is untouched", status=3)
    assert len(saves) == 1  # step 0's; nothing written after it
    files, latest, best = saves[0]
    assert (out / "latest.json").read_bytes() == latest and (out / "best.json").read_bytes() == best
    assert snapshot(checkpoint_dir(out)) == files
    model, _ = load_run(out)
    assert all(p.isfinite().all() for p in model.parameters())


# --- safe loading --------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this runs a shell command: what a malicious optimizer.pt would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_and_never_runs(capsys, damaged_run, tmp_path):
    marker = tmp_path / "code-ran"
    evil = checkpoint_dir(damaged_run) / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [RunsCode(marker)]}, evil)
    torch.load(evil, weights_only=False)  # the file is what it claims: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    before = snapshot(damaged_run)

    code, _, err = cli(capsys, "train", "--resume", damaged_run, "--max-iters", 6)
    assert_one_line_error(code, err, f"optimizer state {evil} is unreadable or unsafe", "it was not loaded")
    assert not marker.exists()
    assert snapshot(damaged_run) == before


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _reshape_weights(path: Path) -> None:
    from safetensors.torch import save_file

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
def test_damaged_run_directory_is_a_one_line_error(capsys, damaged_run, case):
    damage, message = DAMAGE[case]
    damage(damaged_run)
    before = snapshot(damaged_run) if damaged_run.is_dir() else None
    for command in (["sample", "--ckpt", damaged_run, "--which", "latest"],
                    ["eval", "--ckpt", damaged_run, "--which", "latest"],
                    ["train", "--resume", damaged_run, "--max-iters", 6]):
        code, out, err = cli(capsys, *command)
        assert_one_line_error(code, err, message)
        assert out == ""
    if before is not None:
        assert snapshot(damaged_run) == before  # a failed resume wrote nothing


def test_damaged_optimizer_and_state_refuse_resume(capsys, damaged_run):
    ckpt_dir = checkpoint_dir(damaged_run)
    (ckpt_dir / "state.json").write_text("{")
    code, _, err = cli(capsys, "train", "--resume", damaged_run)
    assert_one_line_error(code, err, "state.json is unreadable", "the checkpoint is damaged")
    torch.save({"state": {}, "param_groups": [{"params": [0]}]}, ckpt_dir / "optimizer.pt")
    code, _, err = cli(capsys, "train", "--resume", damaged_run)
    assert_one_line_error(code, err, "optimizer.pt does not fit the model")


# --- bad input -----------------------------------------------------------------------------------


DATA = {
    "missing": (None, "does not exist; give a UTF-8 text file with --data PATH"),
    "a directory": ("dir", "is a directory; give a text file inside it"),
    "empty": (b"", "is empty; give a file with text in it"),
    "shorter than 2 x (block_size + 1)": (b"To be, or not to be", "has 19 characters, too few"),
    "a split shorter than block_size + 1": (b"To be, or not to be, that is the question:\n",
                                            "too short: its smaller split has 5 tokens, fewer than "
                                            "block_size + 1 = 17"),
    "not UTF-8": ("Caf\xe9 au lait\n".encode("latin-1") * 20, "is not valid UTF-8 (byte 3); convert it"),
}


@pytest.mark.parametrize("case", DATA)
def test_bad_data_file(capsys, tmp_path, case):
    content, message = DATA[case]
    data = tmp_path / "data.txt"
    if content == "dir":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    code, _, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", *TINY, "--max-iters", 2)
    assert_one_line_error(code, err, "tinygpt train: error: data", message)
    assert not (tmp_path / "run").exists()


BAD_TRAIN_FLAGS = [
    (["--n-embd", 30, "--n-head", 4], "n_embd (30) must be divisible by n_head (4)"),
    (["--n-layer", 0], "n_layer must be > 0, got 0"),
    (["--block-size", -8], "block_size must be > 0, got -8"),
    (["--n-head", 0], "n_head must be > 0, got 0"),
    (["--batch-size", 0], "batch_size must be > 0, got 0"),
    (["--max-iters", -1], "max_iters must be >= 0, got -1"),
    (["--learning-rate", 0], "learning_rate must be > 0, got 0.0"),
    (["--learning-rate", -3e-4], "learning_rate must be > 0, got -0.0003"),
    (["--learning-rate", "nan"], "learning_rate must be a finite number, got nan"),
    (["--dropout", 1], "dropout must be in [0, 1), got 1.0"),
    (["--dropout", -0.1], "dropout must be in [0, 1), got -0.1"),
    (["--attn-dropout", 1.5], "attn_dropout must be in [0, 1), got 1.5"),
    (["--n-embd", "x"], "argument --n-embd: invalid int value: 'x'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
]


@pytest.mark.parametrize("flags, message", BAD_TRAIN_FLAGS, ids=[m for _, m in BAD_TRAIN_FLAGS])
def test_bad_hyperparameter(capsys, text_file, tmp_path, flags, message):
    code, _, err = cli(capsys, "train", "--data", text_file, "--out", tmp_path / "run", *TINY, *flags)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


BAD_SAMPLE_FLAGS = [
    (["--top-p", 0], "top_p must be in (0, 1], got 0.0"),
    (["--top-p", 1.5], "top_p must be in (0, 1], got 1.5"),
    (["--temperature", -1], "temperature must be >= 0, got -1.0"),
    (["--temperature", "inf"], "temperature must be a finite number, got inf"),
    (["--top-k", 0], "top_k must be >= 1, got 0"),
    (["--max-new-tokens", -5], "max_new_tokens must be >= 0, got -5"),
]


@pytest.mark.parametrize("flags, message", BAD_SAMPLE_FLAGS, ids=[m for _, m in BAD_SAMPLE_FLAGS])
def test_bad_sampling_argument(capsys, trained_run, flags, message):
    code, out, err = cli(capsys, "sample", "--ckpt", trained_run, *flags)
    assert_one_line_error(code, err, message)
    assert out == ""


def test_prompt_with_unknown_characters(capsys, trained_run):
    code, out, err = cli(capsys, "sample", "--ckpt", trained_run, "--prompt", "Speak€, speakø€")
    assert_one_line_error(code, err, "2 character(s) the tokenizer does not know: '€', 'ø'", "--drop-unknown")
    assert out == ""
    code, out, err = cli(capsys, "sample", "--ckpt", trained_run, "--prompt", "Speak€, speakø€",
                         "--drop-unknown", "--max-new-tokens", 5)
    assert code == 0
    assert out.startswith("Speak, speak") and len(out) == len("Speak, speak") + 5 + 1
    assert err.splitlines()[0] == "dropped unknown character(s) from the prompt: '€', 'ø'"
    assert err.splitlines()[1].startswith("using the best checkpoint: ")


def test_out_not_writable(capsys, text_file, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me")
    code, _, err = cli(capsys, "train", "--data", text_file, "--out", blocker / "run", *TINY)
    assert_one_line_error(code, err, f"cannot write run directory {blocker / 'run'}", "choose a writable --out")
    code, _, err = cli(capsys, "train", "--data", text_file, "--out", blocker, *TINY)
    assert_one_line_error(code, err, f"--out {blocker} is a file")
    assert blocker.read_text() == "keep me"


def test_existing_run_directory_is_not_overwritten(capsys, text_file, damaged_run, tmp_path):
    before = snapshot(damaged_run)
    code, _, err = cli(capsys, "train", "--data", text_file, "--out", damaged_run, *TINY, "--max-iters", 2)
    assert_one_line_error(code, err, f"run directory {damaged_run} already exists; continue it with --resume",
                          "--overwrite")
    assert snapshot(damaged_run) == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    code, _, err = cli(capsys, "train", "--data", text_file, "--out", other, *TINY, "--max-iters", 2)
    assert_one_line_error(code, err, f"--out {other} exists and is not a tinygpt run directory")
    assert [p.name for p in other.iterdir()] == ["todo.txt"] and (other / "todo.txt").read_text() == "mine"

    code, _, err = cli(capsys, "train", "--data", text_file, "--out", damaged_run, *TINY, "--max-iters", 2,
                       "--eval-interval", 1, "--overwrite")
    assert code == 0, err
    assert sorted(losses_by_step(damaged_run)) == [0, 1, 2]  # replaced, not appended to


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_gpu(capsys, text_file, trained_run, tmp_path):
    message = "--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto"
    code, _, err = cli(capsys, "train", "--data", text_file, "--out", tmp_path / "run", *TINY, "--device", "cuda",
                       "--max-iters", 2)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()
    code, _, err = cli(capsys, "sample", "--ckpt", trained_run, "--device", "cuda")
    assert_one_line_error(code, err, message)


def test_errors_are_one_line_without_traceback_in_a_real_process(tmp_path):
    """The in-process tests above see what main() writes; this checks a real process exits 2
    with no traceback from anywhere (imports, argparse, torch)."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9\n".encode("latin-1") * 50)
    r = run_cli("train", "--data", bad, "--out", tmp_path / "run", timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"tinygpt train: error: data file {bad} is not valid UTF-8 (byte 3); "
                        "convert it, e.g. with iconv -t UTF-8\n")
    r = run_cli("sample", "--ckpt", tmp_path / "nowhere", "--top-p", "0.9", timeout=120)
    assert r.returncode == 2
    assert r.stderr == (f"tinygpt sample: error: run directory {tmp_path / 'nowhere'} does not exist; "
                        "give the --out of a `tinygpt train` run\n")


# --- properties ----------------------------------------------------------------------------------


NUMBERS = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.none(), st.booleans(), st.text(max_size=2))
FIELDS = sorted({f.name for cls in (C.ModelConfig, C.TrainConfig, C.SampleConfig) for f in C.cli_fields(cls)}
                - {"data", "out", "resume", "init_from", "prompt"})


@given(st.dictionaries(st.sampled_from(FIELDS), NUMBERS, max_size=6))
@settings(max_examples=300, deadline=None)
def test_config_validation_only_ever_raises_user_error(values):
    """Any value for any setting is accepted as valid or refused with a UserError (a one-line
    message at the CLI), never another exception; what is accepted is finite and in range."""
    for cls in (C.ModelConfig, C.TrainConfig, C.SampleConfig):
        try:
            cfg = C.build(cls, values)
        except UserError as e:
            assert str(e) and "\n" not in str(e)
            continue
        for name, value in C.to_dict(cfg).items():
            if isinstance(value, float):
                assert value == value and abs(value) != float("inf"), name
        if cls is C.ModelConfig:
            assert cfg.n_embd % cfg.n_head == 0 and 0 <= cfg.dropout < 1
        if cls is C.TrainConfig:
            assert cfg.learning_rate > 0 and cfg.batch_size > 0
        if cls is C.SampleConfig:
            assert cfg.temperature >= 0 and (cfg.top_p is None or 0 < cfg.top_p <= 1)
