import json
import math
from collections import Counter

import pytest
import torch
from conftest import TINY_TEXT, shakespeare_path, tiny_configs

from tinygpt.checkpoint import load_run
from tinygpt.config import ModelConfig, build
from tinygpt.data import split
from tinygpt.evaluate import evaluate_split
from tinygpt.train import train


def count_bigram_optimum(text: str) -> float:
    """The lowest mean loss any bigram model can have on `text`: the empirical conditional entropy."""
    pairs = Counter(zip(text, text[1:]))
    firsts = Counter(text[:-1])
    return -sum(n * math.log(n / firsts[a]) for (a, _), n in pairs.items()) / (len(text) - 1)


def test_tiny_gpt_overfits_tiny_text(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "run", max_iters=150, final_eval=True)
    result = train(m, t, log=lambda *_: None)
    assert result.losses["train"] < 0.5  # from ln(vocab) ~ 3.3; the text repeats
    assert result.final["loss"] < 0.5


def test_bigram_reaches_count_based_optimum(tmp_path):
    text = TINY_TEXT[:3000] + "zebra quiz, jovial wax.\n" * 20
    path = tmp_path / "t.txt"
    path.write_text(text)
    m, t = tiny_configs(path, tmp_path / "run", model="bigram", block_size=32, batch_size=64,
                        learning_rate=0.1, max_iters=600, eval_interval=600, weight_decay=0.0)
    train(m, t, log=lambda *_: None)
    model, tok = load_run(tmp_path / "run")
    train_ids = torch.tensor(tok.encode(split(text)[0]))
    got = evaluate_split(model, train_ids, 32, torch.device("cpu"), torch.float32)["loss"]
    assert abs(got - count_bigram_optimum(split(text)[0])) < 0.01


def test_run_directory_round_trip_identical_logits(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "run", max_iters=20, dropout=0.1,
                        pos_emb="rope", tie_embeddings=True)
    result = train(m, t, log=lambda *_: None)
    loaded, tok = load_run(result.run_dir)
    assert tok.decode(tok.encode("Speak")) == "Speak"
    assert loaded.config == build(ModelConfig, {**m.__dict__, "vocab_size": tok.vocab_size})
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    again, _ = load_run(result.run_dir)
    torch.testing.assert_close(loaded(idx)[0], again(idx)[0], rtol=0, atol=0)
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["format_version"] == 1 and meta["train"]["max_iters"] == 20


def test_same_seed_same_run(tiny_text_file, tmp_path):
    losses = []
    for name in ("a", "b"):
        m, t = tiny_configs(tiny_text_file, tmp_path / name, max_iters=20, dropout=0.1)
        losses.append(train(m, t, log=lambda *_: None).losses)
    assert losses[0] == losses[1]


def test_metrics_and_checkpoints_written(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "run", max_iters=40, eval_interval=20)
    result = train(m, t, log=lambda *_: None)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert abs(rows[0]["val_bpc"] - rows[0]["val_loss"] / math.log(2)) < 1e-9
    latest = json.loads((result.run_dir / "latest.json").read_text())
    assert latest == {"checkpoint": "checkpoints/step_000040", "step": 40}
    assert (result.run_dir / latest["checkpoint"] / "model.safetensors").is_file()


@pytest.mark.slow
def test_shakespeare_bigram_defaults(tmp_path):
    path = shakespeare_path()
    if path is None:
        pytest.skip("Tiny Shakespeare not found: set TINYGPT_DATA_DIR to a folder holding tinyshakespeare/input.txt")
    from tinygpt.config import resolve_train_settings

    m, t = resolve_train_settings({"model": "bigram", "out": str(tmp_path / "run"), "quiet": True,
                                   "sample_chars": 0, "data": str(path)})
    assert (m.block_size, t.batch_size, t.learning_rate, t.max_iters) == (8, 32, 1e-2, 3000)
    result = train(m, t, log=lambda *_: None)
    assert result.final["loss"] <= 2.50
    assert result.final["tokens"] == 111539  # the whole val split, each character once
