"""The studio's texts: stored under ids the server makes, and described the moment they arrive.

A text is kept as RUNS/.studio/texts/ID.txt (ID: the first 16 hex digits of its SHA-256, so the
same text pasted twice is one text) beside ID.json, its figures. No name or path a client sends
is ever used to open a file: the name is only shown.
"""

import hashlib
import json
import math
import re
import unicodedata
from pathlib import Path

import numpy as np

from tinygpt.checkpoint import atomic_write_text
from tinygpt.errors import UserError
from tinygpt.sizing import bigram_loss

TEXT_ID = re.compile(r"[0-9a-f]{16}")
VAL_FRACTION = 0.1  # the lecture's split: the last tenth is val (tinygpt train's default for one text)
MIN_CHARS = 100  # below this no model has anything to learn, nor a val split to score
RARE = 3  # a character seen this often or less is listed as rare
SHOWN = 20  # rare or odd characters listed, the most frequent first
NAME_CHARS = 80


def texts_dir(runs: Path) -> Path:
    return runs / ".studio" / "texts"


def decode(data: bytes) -> str:
    """`data` as UTF-8, strictly: a bad byte is a one-line error naming its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"the text is not UTF-8: byte {e.start:,} (0x{data[e.start]:02x}) cannot be decoded; save "
                        "the file as UTF-8 and upload it again") from None


def store(runs: Path, data: bytes, name: str) -> dict:
    """Keep `data` (strict UTF-8) as a text and return its figures, with its id."""
    text = decode(data)
    if len(text) < MIN_CHARS:
        raise UserError(f"the text has {len(text)} characters; give at least {MIN_CHARS} (a model learns from "
                        "the text and is scored on its last tenth)")
    text_id = hashlib.sha256(data).hexdigest()[:16]
    folder = texts_dir(runs)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{text_id}.txt"
    if not path.is_file():
        atomic_write_text(path, data)
    figures = {"id": text_id, "name": clean_name(name), **describe(text)}
    atomic_write_text(folder / f"{text_id}.json", json.dumps(figures))
    return figures


def clean_name(name: str) -> str:
    """A name to show: its last path part, printable characters, at most NAME_CHARS."""
    name = re.split(r"[\\/]", name or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:NAME_CHARS].strip()
    return name or "pasted text"


def describe(text: str) -> dict:
    """What the Text step shows at once: sizes, vocabulary, rare and odd characters, and the two
    reference losses the chart draws, ln(V) (a uniform guess) and the count-based bigram's val
    loss (the lecture's first model, at its best). About 0.3 s for Tiny Shakespeare."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, ids, counts = np.unique(codes, return_inverse=True, return_counts=True)
    n_val = int(len(codes) * VAL_FRACTION)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    vocab = len(alphabet)
    unseen = sorted(set(np.unique(val).tolist()) - set(np.unique(train).tolist()))
    order = np.argsort(-counts, kind="stable")
    chars = [chr(int(c)) for c in alphabet]
    rare = [{"char": chars[i], "count": int(counts[i])} for i in order if counts[i] <= RARE]
    odd = [{"char": chars[i], "name": char_name(chars[i]), "count": int(counts[i])}
           for i in order if is_odd(chars[i])]
    return {
        "chars": len(codes),
        "vocab_size": vocab,
        "train_chars": len(train),
        "val_chars": len(val),
        "lines": text.count("\n") + (not text.endswith("\n")),
        "rare": rare[-SHOWN:][::-1],  # the rarest first
        "rare_count": len(rare),
        "odd": odd[:SHOWN],
        "odd_count": len(odd),
        "val_only": [chars[i] for i in unseen][:SHOWN],  # in val but never in train: the model cannot know them
        "uniform_loss": math.log(vocab),
        "bigram_loss": bigram_loss(train, val, vocab) if len(val) > 1 else None,
        "preview": text[:300],
    }


def is_odd(ch: str) -> bool:
    """Control and invisible characters (not newline or tab), and the replacement character."""
    return ch not in "\n\t" and (unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Zl", "Zp")
                                 or ch in "\ufffd\u00a0")


def char_name(ch: str) -> str:
    return unicodedata.name(ch, f"U+{ord(ch):04X}")


def text_path(runs: Path, text_id: object) -> Path:
    """The stored text `text_id` names: an id this server made, or a one-line error."""
    if not isinstance(text_id, str) or not TEXT_ID.fullmatch(text_id):
        raise UserError(f"text must be an id returned by POST /api/texts (16 hex digits), got {text_id!r}")
    path = texts_dir(runs) / f"{text_id}.txt"
    if not path.is_file():
        raise UserError(f"no text {text_id} here; send it with POST /api/texts first")
    return path


def figures(runs: Path, text_id: str) -> dict:
    path = text_path(runs, text_id).with_suffix(".json")
    return json.loads(path.read_text(encoding="utf-8"))


def list_texts(runs: Path) -> list[dict]:
    folder = texts_dir(runs)
    found = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    return [json.loads(p.read_text(encoding="utf-8")) for p in found]
