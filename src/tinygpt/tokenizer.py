"""Tokenizers: text <-> integer ids.

`CharTokenizer` is the lecture's: the vocabulary is the sorted set of characters of the
training text. `BPETokenizer` wraps a byte-level BPE from Hugging Face `tokenizers`, trained on
the training split. Both save to, and load from, one JSON file in the run directory.

A corpus of many documents adds one reserved token, END_OF_DOCUMENT ("<|endoftext|>", GPT-2's
name for it), put between documents by `tinygpt.corpus`. No text encodes to it: a char
tokenizer encodes one character at a time and the token is no single character; tinygpt's BPE
encodes the string "<|endoftext|>" in a text as ordinary bytes. It decodes to its name.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tinygpt.errors import UserError

END_OF_DOCUMENT = "<|endoftext|>"


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)  # id -> its text: one character, or END_OF_DOCUMENT
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str, documents: bool = False) -> "CharTokenizer":
        """The sorted characters of `text`; with `documents`, END_OF_DOCUMENT first (id 0, so that
        sampling from token 0, as the lecture does, starts a new document)."""
        return cls([END_OF_DOCUMENT] * documents + sorted(set(text)))

    @property
    def eot_id(self) -> int | None:
        """The end-of-document token's id, or None for a vocabulary without one."""
        return self.stoi.get(END_OF_DOCUMENT)

    def with_eot(self) -> "CharTokenizer":
        """This tokenizer with an end-of-document token (a new last id) if it has none."""
        return self if self.eot_id is not None else CharTokenizer(self.chars + [END_OF_DOCUMENT])

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

    def __init__(self, hf_tokenizer, literal_specials: bool = False):
        self.hf = hf_tokenizer
        # tinygpt's own BPE reads "<|endoftext|>" in a text as text (not the reserved id); a GPT-2
        # tokenizer brought from Hugging Face keeps its own rule (the special id), as transformers.
        self.literal_specials = literal_specials
        self.hf.encode_special_tokens = literal_specials

    @property
    def eot_id(self) -> int | None:
        return self.hf.token_to_id(END_OF_DOCUMENT)

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int, documents: bool = False) -> "BPETokenizer":
        """Train on `text`: a string, or its pieces in order (a corpus streamed from disk); with
        `documents`, END_OF_DOCUMENT is id 0 (and counts in `vocab_size`)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
            special_tokens=[END_OF_DOCUMENT] if documents else [],
        )
        # Feed the text in groups of lines so the trainer does not hold one giant string.
        tok.train_from_iterator(line_groups([text] if isinstance(text, str) else text), trainer=trainer)
        return cls(tok, literal_specials=True)

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
        return {"type": "bpe", "hf": json.loads(self.hf.to_str()), **({"literal_specials": True}
                                                                       if self.literal_specials else {})}


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

        return BPETokenizer(HFTokenizer.from_str(json.dumps(data["hf"])), bool(data.get("literal_specials")))
    raise ValueError("not a tinygpt tokenizer")


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return tokenizer_from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable tokenizer file ({e}); the run directory is damaged") from None


def _show(chars: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")
