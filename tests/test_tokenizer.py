import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt.errors import UserError
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_json


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
