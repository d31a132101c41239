"""Tokenizers: characters and byte-level BPE round-trip any text, keep their ids through JSON and
growth, name unknown characters, and a BPE run reports bits per character end to end."""

import json
import math

import pytest
from conftest import TINY_TEXT, cli, tiny_configs
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt.checkpoint import load_run
from tinygpt.data import split
from tinygpt.errors import UserError
from tinygpt.runs import read_metrics
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, tokenizer_from_json
from tinygpt.train import train


def test_char_round_trip_and_sorted_vocab():
    tok = CharTokenizer.train("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8
    assert tok.decode(tok.encode("hold low")) == "hold low"
    assert tok.encode("de") == [tok.stoi["d"], tok.stoi["e"]]


def test_unknown_characters_named_in_error():
    tok = CharTokenizer.train("abc")
    with pytest.raises(UserError, match=r"2 character\(s\).*'x', 'é'"):
        tok.encode("abxcéx")


def test_json_round_trip_keeps_ids():
    tok = CharTokenizer.train("the quick brown fox")
    again = tokenizer_from_json(tok.to_json())
    assert again.chars == tok.chars
    assert again.encode("quick") == tok.encode("quick")


def test_extend_keeps_old_ids():
    tok = CharTokenizer.train("abc")
    grown = tok.extend("abcxy")
    assert grown.encode("abc") == tok.encode("abc")
    assert grown.vocab_size == 5 and grown.unknown("xy") == []


@given(st.text(min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_char_round_trip_property(text):
    tok = CharTokenizer.train(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=20))
@settings(max_examples=100, deadline=None)
def test_unknown_is_exactly_the_missing_characters(corpus, prompt):
    tok = CharTokenizer.train(corpus)
    assert set(tok.unknown(prompt)) == set(prompt) - set(corpus)


def test_bpe_round_trip_and_compression():
    text = ("To be, or not to be, that is the question:\n" * 50) + "Whether 'tis nobler in the mind\n" * 30
    tok = BPETokenizer.train(text, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    sample = "To be, or not to be: nobler still. Ünïcødé ✓"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample  # byte-level: anything round-trips
    assert len(tok.encode("To be, or not to be, that is the question:\n")) < 20  # merges learned
    again = tokenizer_from_json(tok.to_json())
    assert again.encode(sample) == ids


def test_bpe_train_sample_eval_report_bits_per_char(tiny_text_file, tmp_path):
    out = tmp_path / "bpe"
    m, t = tiny_configs(tiny_text_file, out, tokenizer="bpe", vocab_size=300, max_iters=30, eval_interval=15,
                        final_eval=True)
    result = train(m, t, log=lambda *_: None)
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.kind == "bpe" and tok.vocab_size <= 300
    val_text = split(TINY_TEXT)[1]
    val_ids = tok.encode(val_text)
    assert len(val_ids) < len(val_text) / 2  # BPE merges: fewer tokens than characters
    chars_per_token = (len(val_text) - 1) / (len(val_ids) - 1)
    rows = read_metrics(out, reports_only=False)
    for row in rows[:-1]:
        assert row["val_bpc"] == pytest.approx(row["val_loss"] / chars_per_token / math.log(2), rel=1e-12)
    assert rows[-1]["final_val_bpc"] == pytest.approx(result.final["bits_per_char"])

    e = cli("eval", "--ckpt", out, "--json", "--split", "val", "--dtype", "float32")
    assert e.code == 0, e.err
    val = json.loads(e.out)["val"]
    assert val["tokens"] == len(val_ids) - 1 and val["chars"] == len(val_text) - 1
    assert val["bits_per_char"] == pytest.approx(val["loss"] * val["tokens"] / val["chars"] / math.log(2))
    assert val["bits_per_char"] == pytest.approx(result.final["bits_per_char"], rel=1e-5)
    text = cli("eval", "--ckpt", out, "--split", "val").out
    assert "nats/token" in text and "bits/char" in text

    s = cli("sample", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", 20, "--seed", 3)
    assert s.code == 0, s.err
    assert s.out.startswith("All:") and len(s.out) > len("All:") + 20  # 20 tokens, several chars each
    model, tok2 = load_run(out)
    assert tok2.decode(tok2.encode("Speak, speak.\n")) == "Speak, speak.\n"
