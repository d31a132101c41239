"""Tokenizers: text <-> integer ids.

`CharTokenizer` is the lecture's: the vocabulary is the sorted set of characters of the
training text. `BPETokenizer` wraps a byte-level BPE from Hugging Face `tokenizers`, trained on
the training split. Both save to, and load from, one JSON file in the run directory.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tinygpt.errors import UserError


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` this tokenizer cannot encode, in order of appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.stoi))

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            raise UserError(
                f"text has {len(missing)} character(s) the tokenizer does not know: "
                f"{_show(missing)}; remove them (sample: --drop-unknown drops them)"
            )
        return [self.stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def extend(self, text: str) -> "CharTokenizer":
        """A tokenizer with the same ids plus new ids for the characters of `text` it lacks."""
        return CharTokenizer(self.chars + self.unknown(text))

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}


class BPETokenizer:
    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Train on `text`: a string, or its pieces in order (a corpus streamed from disk)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # Feed the text in groups of lines so the trainer does not hold one giant string.
        tok.train_from_iterator(line_groups([text] if isinstance(text, str) else text), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def unknown(self, text: str) -> list[str]:
        return []  # byte-level: every string can be encoded

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids) -> str:
        # Special tokens (GPT-2's <|endoftext|>) are text too: decode(encode(s)) == s, as transformers.
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> dict:
        return {"type": "bpe", "hf": json.loads(self.hf.to_str())}


Tokenizer = CharTokenizer | BPETokenizer


def line_groups(pieces: Iterable[str], n: int = 1000) -> Iterator[str]:
    """Groups of `n` lines of the text that `pieces` spell, the same for any cut into pieces
    (a line cut between two pieces, "\\r\\n" included, is joined first). The BPE trainer counts
    words per group, so the groups, and with them the trained tokenizer, must not depend on how
    the text was read."""
    group, carry = [], ""
    for piece in pieces:
        lines = (carry + piece).splitlines(keepends=True)
        carry = lines.pop() if lines else ""  # maybe unfinished: it may go on in the next piece
        for line in lines:
            group.append(line)
            if len(group) == n:
                yield "".join(group)
                group = []
    if carry:
        group.append(carry)
    if group:
        yield "".join(group)


def train_tokenizer(kind: str, text: str, vocab_size: int = 512) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(text)
    return BPETokenizer.train(text, vocab_size)


def tokenizer_from_json(data: dict) -> Tokenizer:
    if data.get("type") == "char" and isinstance(data.get("chars"), list):
        return CharTokenizer(data["chars"])
    if data.get("type") == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(data["hf"])))
    raise ValueError("not a tinygpt tokenizer")


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return tokenizer_from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable tokenizer file ({e}); the run directory is damaged") from None


def _show(chars: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")
