"""Fine-tuning (`--init-from RUN`): the base run's weights, tokenizer and architecture carry over,
new characters are refused unless the vocabulary is told to grow, and a damaged base is a
one-line error. (`--init-from hf:DIR` is in test_hf.py.)"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, assert_one_line_error, cli, tiny_args, tiny_configs, weights

from tinygpt.checkpoint import checkpoint_dir, load_run
from tinygpt.tokenizer import load_tokenizer
from tinygpt.train import train

QUIET = dict(log=lambda *_: None)


@pytest.fixture
def base_run(tiny_text_file, tmp_path) -> Path:
    m, t = tiny_configs(tiny_text_file, tmp_path / "base", max_iters=20, tie_embeddings=True)
    return train(m, t, **QUIET).run_dir


@pytest.fixture
def new_text(tmp_path) -> Path:
    path = tmp_path / "new.txt"
    path.write_text("All:\nSpeak, speak. Resolved, rather to die.\n\n" * 60)
    return path


def test_init_from_keeps_tokenizer_and_weights_and_records_origin(base_run, new_text, tmp_path):
    out = tmp_path / "ft"
    r = cli("train", "--init-from", base_run, "--data", new_text, "--out", out, "--max-iters", 0,
            "--eval-iters", 2, "--sample-chars", 0, "--dtype", "float32", "--learning-rate", 1e-3, "--no-plot")
    assert r.code == 0, r.err
    assert (out / "tokenizer.json").read_text() == (base_run / "tokenizer.json").read_text()
    meta = json.loads((out / "run.json").read_text())
    assert meta["init_from"] == str(base_run.resolve())
    assert meta["model"] == json.loads((base_run / "run.json").read_text())["model"]
    assert meta["train"]["learning_rate"] == 1e-3 and meta["train"]["init_from"] == str(base_run)
    base_w, ft_w = weights(base_run), weights(out)
    assert base_w.keys() == ft_w.keys()
    for name in base_w:
        assert torch.equal(base_w[name], ft_w[name]), name

    r = cli("train", "--init-from", base_run, "--data", new_text, "--out", tmp_path / "x", "--n-layer", 5)
    assert_one_line_error(r, "--n-layer 5 conflicts", "n_layer=2")


def test_init_from_refuses_unknown_characters_unless_told_to_grow(base_run, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text(TINY_TEXT.replace("e", "é") + "Zq€\n" * 30)
    r = cli("train", "--init-from", base_run, "--data", new, "--out", tmp_path / "refused")
    assert_one_line_error(r, "4 character(s)", "'é'", "'€'", "--grow-vocab")
    assert not (tmp_path / "refused").exists()

    m, t = tiny_configs(new, tmp_path / "grown", max_iters=0, init_from=str(base_run), grow_vocab=True)
    train(m, t, **QUIET)
    old_tok = load_tokenizer(base_run / "tokenizer.json")
    new_tok = load_tokenizer(tmp_path / "grown" / "tokenizer.json")
    n = old_tok.vocab_size
    assert new_tok.chars[:n] == old_tok.chars and sorted(new_tok.chars[n:]) == sorted("éZq€")
    model, _ = load_run(tmp_path / "grown")
    assert model.config.vocab_size == n + 4 and model.config.tie_embeddings
    assert model.lm_head.weight is model.token_embedding_table.weight
    old, grown = weights(base_run), weights(tmp_path / "grown")
    assert torch.equal(grown["token_embedding_table.weight"][:n], old["token_embedding_table.weight"])
    assert torch.equal(grown["lm_head.bias"][:n], old["lm_head.bias"])
    # new characters start as the average one (checkpoint.grow_rows)
    assert torch.equal(grown["lm_head.bias"][n:], old["lm_head.bias"].mean().expand(4))
    assert torch.allclose(grown["token_embedding_table.weight"][n:],
                          old["token_embedding_table.weight"].mean(0, keepdim=True).expand(4, -1))
    assert torch.equal(grown["blocks.0.attn.c_attn.weight"], old["blocks.0.attn.c_attn.weight"])


def test_bigram_grows_its_table_in_both_dimensions(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "base", model="bigram", max_iters=10)
    train(m, t, **QUIET)
    new = tmp_path / "new.txt"
    new.write_text(TINY_TEXT + "Zq\n" * 30)
    m2, t2 = tiny_configs(new, tmp_path / "grown", model="bigram", max_iters=0,
                          init_from=str(tmp_path / "base"), grow_vocab=True)
    train(m2, t2, **QUIET)
    old = weights(tmp_path / "base")["token_embedding_table.weight"]
    grown = weights(tmp_path / "grown")["token_embedding_table.weight"]
    n = old.shape[0]
    assert grown.shape == (n + 2, n + 2) and torch.equal(grown[:n, :n], old)


def test_a_bigram_input_keeps_each_pairs_vector_when_the_vocabulary_grows(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "base", bigram_embed=True, max_iters=10)
    train(m, t, **QUIET)
    new = tmp_path / "new.txt"
    new.write_text(TINY_TEXT + "Zq\n" * 30)
    m2, t2 = tiny_configs(new, tmp_path / "grown", max_iters=0, init_from=str(tmp_path / "base"), grow_vocab=True)
    train(m2, t2, **QUIET)
    old = weights(tmp_path / "base")["bigram_embedding_table.weight"]
    grown = weights(tmp_path / "grown")["bigram_embedding_table.weight"]
    n = load_tokenizer(tmp_path / "base" / "tokenizer.json").vocab_size
    assert old.any() and old.shape[0] == (n + 1) * n and grown.shape[0] == (n + 3) * (n + 2)
    torch.testing.assert_close(grown.view(n + 3, n + 2, -1)[: n + 1, :n], old.view(n + 1, n, -1), rtol=0, atol=0)
    assert not grown.view(n + 3, n + 2, -1)[:, n:].any()  # pairs ending in a new character start at zero


def test_fine_tuning_runs_record_their_tokenizer_kind(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "base", tokenizer="bpe", vocab_size=280, max_iters=5)
    train(m, t, **QUIET)
    m2, t2 = tiny_configs(tiny_text_file, tmp_path / "ft", max_iters=5, init_from=str(tmp_path / "base"))
    assert t2.tokenizer == "char"  # the default, which fine-tuning does not use
    train(m2, t2, **QUIET)
    meta = json.loads((tmp_path / "ft" / "run.json").read_text())
    vocab = load_tokenizer(tmp_path / "base" / "tokenizer.json").vocab_size
    assert meta["train"]["tokenizer"] == "bpe" and meta["model"]["vocab_size"] == vocab > 256
    assert dataclasses.asdict(load_run(tmp_path / "ft")[0].config)["vocab_size"] == vocab


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:500]), "is truncated or corrupted"),
    (lambda path: path.write_bytes(b"\xff" * 16 + path.read_bytes()[16:]), "is truncated or corrupted"),
], ids=["truncated", "corrupted"])
def test_init_from_damaged_weights_is_the_one_line_error_sample_gives(damaged_run, new_text, tmp_path, damage,
                                                                      message):
    damage(checkpoint_dir(damaged_run) / "model.safetensors")
    sample = cli("sample", "--ckpt", damaged_run, "--which", "latest")
    assert_one_line_error(sample, message)
    r = cli("train", "--init-from", damaged_run, *tiny_args(new_text, tmp_path / "ft", max_iters=2))
    assert_one_line_error(r, message)
    assert not (tmp_path / "ft").exists()
    assert r.err.split(": error: ", 1)[1] == sample.err.split(": error: ", 1)[1]  # the same words
