import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinygpt.config import ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40


@pytest.fixture
def tiny_text_file(tmp_path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def tiny_configs(data: Path, out: Path, **overrides):
    """A GPT small enough to train in a second or two on CPU."""
    values = dict(
        n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0,
        data=str(data), out=str(out), batch_size=16, max_iters=60, eval_interval=20,
        eval_iters=4, learning_rate=3e-3, quiet=True, sample_chars=0, final_eval=False,
        dtype="float32", device="cpu",
    )
    values.update(overrides)
    from tinygpt.config import build

    return build(ModelConfig, values), build(TrainConfig, values)


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run `python -m tinygpt ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tinygpt", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=timeout)


def shakespeare_path() -> Path | None:
    from tinygpt.data import SHAKESPEARE_RELPATH, data_dir

    path = data_dir() / SHAKESPEARE_RELPATH
    return path if path.is_file() else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Encoded corpora go to a fresh directory per test, never into the shared data directory."""
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path_factory.mktemp("encoded")))
