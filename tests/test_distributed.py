"""More than one process: `torchrun --nproc_per_node 2` trains the run one process trains with
the same global batch, prints each report once, and resumes under torchrun again."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_line_error, cli, tiny_args, tiny_configs, weights

from tinygpt.runs import read_metrics
from tinygpt.train import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "tinygpt", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_grad_accum_and_resume(tiny_text_file, tmp_path):
    common = dict(batch_size=8, eval_interval=5)
    ddp = tmp_path / "ddp"

    # Two processes, stopped at step 10 and resumed to 20 under torchrun again.
    first = torchrun("train", *tiny_args(tiny_text_file, ddp, max_iters=10, **common), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun("train", "--resume", ddp, "--max-iters", 20, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Rank 0 alone prints: each report once.
    reports = [ln.split(":")[0] for ln in (first.stdout + resumed.stdout).splitlines() if ln.startswith("step ")]
    assert reports == [f"step {s}" for s in (0, 5, 10, 15, 20)]
    assert resumed.stderr.count("resuming") == 1  # a notice, on stderr
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "tiny.txt"]  # no stray run dirs

    # One process accumulating 2 micro-batches per step sees the same global batches.
    m, t = tiny_configs(tiny_text_file, tmp_path / "single", max_iters=20, grad_accum=2, **common)
    train(m, t, log=lambda *_: None)
    got, want = read_metrics(ddp), read_metrics(tmp_path / "single")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 5, 10, 15, 20]
    for a, b in zip(got, want):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert got[-1]["val_loss"] < got[0]["val_loss"] - 0.5  # it did learn
    for name, w in weights(tmp_path / "single").items():
        torch.testing.assert_close(weights(ddp)[name], w, rtol=0, atol=1e-5)

    # A run of two processes resumed by one would see other batches: refused.
    r = cli("train", "--resume", ddp, "--max-iters", 25)
    assert_one_line_error(r, "trained by 2 process(es)", "--nproc_per_node 2")
