"""Training: tiny models learn for real, runs repeat exactly, every run records itself and its
metrics, a diverging run stops without touching its last good checkpoint, and the losses of the
tiny config's first steps are pinned to a golden file."""

import json
import math
import os
import sys
from collections import Counter

import pytest
import torch
from conftest import (
    REPO,
    TINY_TEXT,
    assert_one_line_error,
    cli,
    shakespeare_path,
    snapshot,
    tiny_args,
    tiny_configs,
    tiny_flags,
)

from tinygpt.checkpoint import checkpoint_dir, load_run
from tinygpt.data import split
from tinygpt.evaluate import evaluate_split
from tinygpt.progress import Progress
from tinygpt.runs import read_metrics
from tinygpt.sampling import sample_text
from tinygpt.train import train

QUIET = dict(log=lambda *_: None)


def count_bigram_optimum(text: str) -> float:
    """The lowest mean loss any bigram model can have on `text`: the empirical conditional entropy."""
    pairs = Counter(zip(text, text[1:]))
    firsts = Counter(text[:-1])
    return -sum(n * math.log(n / firsts[a]) for (a, _), n in pairs.items()) / (len(text) - 1)


# --- learning ---------------------------------------------------------------------------------------


def test_tiny_gpt_overfits_tiny_text(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "run", max_iters=150, final_eval=True)
    result = train(m, t, **QUIET)
    assert result.losses["train"] < 0.5  # from ln(vocab) ~ 3.5; the text repeats
    assert result.final["loss"] < 0.5


def test_bigram_reaches_count_based_optimum(tmp_path):
    text = TINY_TEXT[:3000] + "zebra quiz, jovial wax.\n" * 20
    path = tmp_path / "t.txt"
    path.write_text(text)
    m, t = tiny_configs(path, tmp_path / "run", model="bigram", block_size=32, batch_size=64,
                        learning_rate=0.1, max_iters=600, eval_interval=600, weight_decay=0.0)
    train(m, t, **QUIET)
    model, tok = load_run(tmp_path / "run")
    train_ids = torch.tensor(tok.encode(split(text)[0]))
    got = evaluate_split(model, train_ids, 32, torch.device("cpu"), torch.float32)["loss"]
    assert abs(got - count_bigram_optimum(split(text)[0])) < 0.01


def test_same_seed_same_run(tiny_text_file, tmp_path):
    losses = []
    for name in ("a", "b"):
        m, t = tiny_configs(tiny_text_file, tmp_path / name, max_iters=20, dropout=0.1)
        losses.append(train(m, t, **QUIET).losses)
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_shakespeare_bigram_defaults(tmp_path):
    path = shakespeare_path()
    if path is None:
        pytest.skip("Tiny Shakespeare not found: set TINYGPT_DATA_DIR to a folder holding tinyshakespeare/input.txt")
    from tinygpt.config import resolve_train_settings

    m, t = resolve_train_settings({"model": "bigram", "out": str(tmp_path / "run"), "quiet": True,
                                   "sample_chars": 0, "data": str(path)})
    assert (m.block_size, t.batch_size, t.learning_rate, t.max_iters) == (8, 32, 1e-2, 3000)
    result = train(m, t, **QUIET)
    assert result.final["loss"] <= 2.50
    assert result.final["tokens"] == 111539  # the whole val split, each character once


# --- golden losses ------------------------------------------------------------------------------------

GOLDEN = REPO / "tests" / "golden" / "tiny_losses.json"
GOLDEN_STEPS = 20


def test_golden_losses(tiny_text_file, tmp_path, monkeypatch):
    """The training loss of each of the tiny config's first 20 steps (CPU, float32, seed 1337,
    dropout 0), pinned to tests/golden/tiny_losses.json, as torchtitan's golden-loss tests do: a
    change to the model, the optimizer, the data order or the loop that moves any loss shows here.

    After a deliberate change, regenerate the file and commit it with the change that explains it:
        TINYGPT_UPDATE_GOLDEN=1 pytest tests/test_training.py -k golden
    """
    settings = tiny_flags(max_iters=GOLDEN_STEPS, eval_interval=GOLDEN_STEPS, attention="manual")
    losses = []
    step = Progress.step

    def record(self, loss, tokens_per_sec):  # the loop reports each step's loss here
        losses.append(loss)
        step(self, loss, tokens_per_sec)

    monkeypatch.setattr(Progress, "step", record)
    m, t = tiny_configs(tiny_text_file, tmp_path / "run", **settings)
    assert t.seed == 1337 and m.dropout == 0.0 and t.dtype == "float32" and t.device == "cpu"
    train(m, t, **QUIET)
    assert len(losses) == GOLDEN_STEPS

    if os.environ.get("TINYGPT_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "about": "training loss of the first steps of tests/conftest.py's TINY on tests' TINY_TEXT; "
                     "regenerate: TINYGPT_UPDATE_GOLDEN=1 pytest tests/test_training.py -k golden",
            "settings": settings, "torch": torch.__version__, "losses": losses}, indent=2) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["settings"] == settings, "the tiny config changed: regenerate the golden file (see above)"
    # Not bit-exact: float32 sums are ordered differently by other CPUs' vector units, other BLAS
    # builds and thread counts (and by other torch versions), which moves the last bits of a loss;
    # 1e-5 of a loss near 3 is far below what any change to the model or the optimizer moves.
    assert losses == pytest.approx(golden["losses"], rel=1e-5, abs=0)
    assert losses[-1] < losses[0] - 0.5  # the pinned run does learn


# --- what a run records ----------------------------------------------------------------------------------


def test_metrics_and_checkpoints_written(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "run", max_iters=40, eval_interval=20)
    result = train(m, t, **QUIET)
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert abs(rows[0]["val_bpc"] - rows[0]["val_loss"] / math.log(2)) < 1e-9
    assert set(rows[1]) >= {"step", "train_loss", "val_loss", "train_bpc", "val_bpc", "lr", "tokens_per_sec",
                            "train_seconds"}
    latest = json.loads((result.run_dir / "latest.json").read_text())
    assert latest == {"checkpoint": "checkpoints/step_000040", "step": 40}
    assert (result.run_dir / latest["checkpoint"] / "model.safetensors").is_file()


def test_report_samples_show_the_model_learning_without_changing_the_run(tiny_text_file, tmp_path):
    """--report-sample-chars: a sample at every report, in metrics.jsonl, that the model at that
    step writes (the last one equals a sample from the saved checkpoint); the losses and weights
    are those of the same run without samples, bit for bit."""
    plain = train(*tiny_configs(tiny_text_file, tmp_path / "plain", max_iters=200, eval_interval=100, dropout=0.1),
                  **QUIET)
    m, t = tiny_configs(tiny_text_file, tmp_path / "sampled", max_iters=200, eval_interval=100, dropout=0.1,
                        report_sample_chars=80)
    sampled = train(m, t, **QUIET)
    rows, plain_rows = read_metrics(sampled.run_dir), read_metrics(plain.run_dir)
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in plain_rows]
    assert all("sample" not in r for r in plain_rows)
    assert [len(r["sample"]) for r in rows] == [80] * 3
    model, tokenizer = load_run(sampled.run_dir, "latest")
    assert rows[-1]["sample"] == sample_text(model, tokenizer, 80, t.seed, torch.device("cpu"), torch.float32)
    # what it wrote at step 0 is noise; at step 200 mostly the tiny text's words
    words = set(TINY_TEXT.split())
    known = [sum(w in words for w in r["sample"].split()) / max(1, len(r["sample"].split()))
             for r in (rows[0], rows[-1])]
    assert known[0] < 0.1 and known[1] > 0.5, known


def test_run_records_config_command_and_versions(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "run", max_iters=0, learning_rate=3e-4)
    run = train(m, t, **QUIET).run_dir
    meta = json.loads((run / "run.json").read_text())
    assert meta["train"]["learning_rate"] == 3e-4 and meta["model"]["n_embd"] == 32
    assert meta["command"] == sys.argv
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["python"]


# --- the non-finite guard ----------------------------------------------------------------------------


@pytest.mark.parametrize("eval_interval", [1, 4])  # caught by the loss report / by the training step
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(monkeypatch, tiny_text_file, tmp_path,
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
    r = cli("train", *tiny_args(tiny_text_file, out, learning_rate=1e30, max_iters=20, eval_interval=eval_interval))
    assert_one_line_error(r, "step 1: ", "training diverged", "lower --learning-rate (now 1e+30)",
                          "--dtype float32", f"last good checkpoint in {out} is untouched", status=3)
    assert len(saves) == 1  # step 0's; nothing written after it
    files, latest, best = saves[0]
    assert (out / "latest.json").read_bytes() == latest and (out / "best.json").read_bytes() == best
    assert snapshot(checkpoint_dir(out)) == files
    model, _ = load_run(out)
    assert all(p.isfinite().all() for p in model.parameters())
