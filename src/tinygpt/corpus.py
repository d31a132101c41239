"""The encoded corpus: a text encoded once into a file of token ids that every run memory-maps.

A corpus of gigabytes cannot be a Python string plus a list of ids in every process (15.6 bytes
a character, measured). So the text is streamed from disk once, in chunks, and its ids are
written to a token file; training, eval and every torchrun process map that file, and memory
stays flat whatever its size. `tinygpt prepare` does it explicitly; `train` and `eval` do it on
first use and reuse the file while the text is unchanged.

Where: `$TINYGPT_CACHE_DIR`, else `encoded/` under the data directory (`$TINYGPT_DATA_DIR`,
default ~/.cache/tinygpt): one file per data path and tokenizer, `NAME-KEY-RECIPE[-LAYOUT].tokens`,
KEY a hash of the data's absolute path (or hf:NAME). RECIPE is `char` or `bpe512` (a tokenizer
trained on the data itself) or `tok` + a hash of a given tokenizer (a resumed, evaluated or
fine-tuned run's, where no file of the data was encoded with it already); LAYOUT a hash of the
split's settings (`Layout`) when they are not the defaults.

Layout: MAGIC, the header's length (4 bytes, little-endian), the header (JSON), zeros up to a
multiple of 4096 bytes, then the ids as uint8 / uint16 / uint32 (the smallest that holds the
vocabulary): the train split's, then the val split's. The header holds the whole tokenizer, the
source files (path, size, mtime; or a dataset's fingerprint), the sha256 of their bytes, the
number of characters and documents, the layout and the split it resolved to, the
end-of-document token's id (or null) and the tokens and characters of each split.

The documents (see `tinygpt.documents`) are encoded one by one, each followed by the
end-of-document token when there are several. The split is `Layout.val_split`'s: `tail` is the
lecture's, the first 90% of the *characters* train and the rest val, each side encoded on its
own exactly as `data.encode_corpus` does in memory for one text (the ids are equal); `documents`
holds out a fixed, seeded share of whole documents.

A file is reused while every source file keeps the size and mtime it had when encoded (and, for
corpora under 64 MB, cheap to hash, the same sha256); otherwise it is encoded again. A file that
is not a token file or is cut short is an error that says how to re-encode: it is never silently
replaced, since it might not be ours.
"""

import dataclasses
import hashlib
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from tinygpt.documents import END, Source, is_hf, load_hf, open_source, pieces
from tinygpt.errors import UserError
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_json

MAGIC = b"tinygpt tokens\n\0"  # 16 bytes
FORMAT = 2  # 2: documents, their end-of-document token and the split's layout in the header
ALIGN = 4096  # ids start on a page boundary
HASH_CHECK_BELOW = 64 << 20  # below this, reuse also checks the sha256 (about 60 ms at 64 MB)
ANNOUNCE_FROM = 16 << 20  # encoding a smaller text takes well under a second: no progress lines
PIECE_CHARS = 1 << 16  # BPE: characters per piece handed to the batch encoder
AUTO_DOCUMENTS = 20  # --val-split auto holds out whole documents from this many on (else the tail)
SPLIT_SEED = 0  # the documents split's own seed: runs with any --seed share one val split


def cache_dir() -> Path:
    """Where token files live: $TINYGPT_CACHE_DIR, else `encoded/` in the data directory."""
    env = os.environ.get("TINYGPT_CACHE_DIR")
    if env:
        return Path(env)
    from tinygpt.data import data_dir

    return data_dir() / "encoded"


def cache_path(data, recipe: str, layout: "Layout | None" = None) -> Path:
    """The token file of `data` (its absolute path, or hf:NAME) encoded by `recipe` ("*": any
    recipe) into the splits `layout` asks for."""
    where = data if is_hf(data) else str(Path(data).resolve())
    key = hashlib.sha256(where.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(where).stem if not is_hf(data) else where[3:])[:40] or "corpus"
    return cache_dir() / f"{name}-{key}-{recipe}{(layout or Layout()).tag()}.tokens"


@dataclass(frozen=True)
class Layout:
    """How a corpus's documents become its two splits: the train flags --text-field,
    --val-split and --val-fraction, which a run records and its resume and eval reuse."""

    text_field: str = "text"
    val_split: str = "auto"  # tail | documents | auto: documents from AUTO_DOCUMENTS documents on
    val_fraction: float = 0.1

    @classmethod
    def of(cls, cfg) -> "Layout":
        """The layout a TrainConfig asks for."""
        return cls(cfg.text_field, cfg.val_split, cfg.val_fraction)

    def tag(self) -> str:
        """"" for the defaults (token files keep their old names), else a short hash."""
        if self == Layout():
            return ""
        return "-" + hashlib.sha256(json.dumps(dataclasses.astuple(self)).encode()).hexdigest()[:8]


@dataclass
class Scan:
    chars: int  # how many characters the text has
    alphabet: str  # its distinct characters, in order of first appearance
    documents: int = 1  # documents with text
    empty: int = 0  # documents without, skipped


def scan(source: Source) -> Scan:
    """One pass over the text: its length in characters, its alphabet and its documents."""
    n, alphabet, known_ascii, counts = 0, {}, b"", {}
    for text in pieces(source, counts=counts):
        if text is END:
            continue
        n += len(text)
        for i in range(0, len(text), 1 << 16):  # small slices: the known ASCII set fills up at once
            # Dropping the ASCII bytes already seen (bytes.translate, hundreds of MB/s) leaves, for
            # most text, nothing; what is left is still valid UTF-8, since ASCII bytes never occur
            # inside a multi-byte character, and keeps the order of first appearance.
            rest = text[i : i + (1 << 16)].encode("utf-8").translate(None, known_ascii)
            for ch in dict.fromkeys(rest.decode("utf-8")):
                if ch not in alphabet:
                    alphabet[ch] = None
                    known_ascii += ch.encode("ascii") if ch.isascii() else b""
    return Scan(n, "".join(alphabet), counts["documents"], counts["empty"])


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} tokens is too large")


# --- encoders: text -> numpy array of ids ----------------------------------------------------------


class CharEncoder:
    """Characters to ids with a lookup table over code points (numpy, no Python loop per
    character); ASCII text with a vocabulary under 256 goes through `bytes.translate`."""

    def __init__(self, tokenizer: CharTokenizer):
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.table = np.zeros(0x110000, dtype=self.dtype)
        ids = [i for i, c in enumerate(tokenizer.chars) if len(c) == 1]  # not the end-of-document token
        self.table[[ord(tokenizer.chars[i]) for i in ids]] = ids
        self.ascii = self.table[:256].tobytes() if self.dtype == np.uint8 else None

    def encode(self, text: str) -> np.ndarray:
        if text.isascii():
            raw = text.encode("ascii")
            if self.ascii is not None:
                return np.frombuffer(raw.translate(self.ascii), dtype=np.uint8)
            return self.table[np.frombuffer(raw, dtype=np.uint8)]
        return self.table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]

    def flush(self) -> np.ndarray:
        return np.zeros(0, dtype=self.dtype)


# A place where the byte-level pre-tokenizer always starts a new word whatever follows or
# precedes it: between an ASCII letter and an ASCII punctuation mark (a letter run ends there, a
# punctuation run starts there). Encoding the pieces between such places, one by one, gives the
# ids of encoding the whole text; a cut next to whitespace would not (the GPT-2 pattern's
# `\s+(?!\S)` looks ahead), nor, for "\r\n" text, would a cut after a newline.
_SAFE_CUT = re.compile(r"[A-Za-z](?=[.,;:!?])")


class BPEEncoder:
    """Text to BPE ids, in pieces of about `piece_chars` cut where the ids cannot change, encoded
    by the tokenizers library's batch encoding (in parallel, in Rust). Text is held back until a
    safe cut; `flush` encodes what is held at the end of a split."""

    def __init__(self, tokenizer: BPETokenizer):
        self.hf, self.piece_chars = tokenizer.hf, PIECE_CHARS
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.held = ""

    def encode(self, text: str) -> np.ndarray:
        text, pieces, start = self.held + text, [], 0
        while start + self.piece_chars < len(text):
            cut = _SAFE_CUT.search(text, start + self.piece_chars)
            if cut is None:
                break
            pieces.append(text[start:cut.end()])
            start = cut.end()
        self.held = text[start:]
        if len(self.held) > 256 * self.piece_chars:
            # 16 M characters without a letter before a punctuation mark: cut anyway, so memory
            # stays bounded; the ids next to this one cut may differ from the whole text's.
            pieces.append(self.held)
            self.held = ""
        return self._ids(pieces)

    def flush(self) -> np.ndarray:
        pieces, self.held = [self.held] if self.held else [], ""
        return self._ids(pieces)

    def _ids(self, pieces: list[str]) -> np.ndarray:
        encodings = self.hf.encode_batch(pieces, add_special_tokens=False) if pieces else []
        return np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=self.dtype)


def make_encoder(tokenizer: Tokenizer) -> CharEncoder | BPEEncoder:
    return CharEncoder(tokenizer) if isinstance(tokenizer, CharTokenizer) else BPEEncoder(tokenizer)


def split_stream(stream: Iterable[str | None], split_at: int | None, val_docs: np.ndarray | None
                 ) -> Iterator[tuple[int, str | None]]:
    """(part, piece) for every piece and END of `stream`, part 0 for train and 1 for val: the
    tail split puts the first `split_at` characters in train (a piece across it is cut), the
    documents split puts document i in val where `val_docs[i]`."""
    seen, doc = 0, 0
    for text in stream:
        if val_docs is not None:
            yield int(val_docs[doc]), text
            doc += text is END
            continue
        if text is END:
            yield int(seen > split_at), END  # with the part its document's last character went to
            continue
        cut = min(max(split_at - seen, 0), len(text))
        if cut:
            yield 0, text[:cut]
        if cut < len(text):
            yield 1, text[cut:]
        seen += len(text)


def choose_val_docs(n: int, fraction: float) -> np.ndarray:
    """Which of `n` documents are val: a share `fraction` of them (at least one), drawn by a fixed
    seed, so the split is the same for every run and machine."""
    k = max(1, round(fraction * n))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(SPLIT_SEED).permutation(n)[:k]] = True
    return mask


# --- the token file ----------------------------------------------------------------------------------


class TokenWriter:
    """Ids appended to a temporary file beside `dest`; `commit` writes the header in the room
    kept for it, fsyncs and renames the file into place. `dest` is always the old file or the
    complete new one: an interrupted prepare leaves nothing there, and its temporary file is
    removed (unless the process is killed outright)."""

    def __init__(self, dest: Path, header_room: int):
        self.dest = Path(dest)
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".part")
        except OSError as e:
            raise self._error(e) from None
        os.chmod(self.tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        self.file = os.fdopen(fd, "wb")
        self.offset = -(-(len(MAGIC) + 4 + header_room) // ALIGN) * ALIGN
        self.file.seek(self.offset)
        self.count = 0

    def write(self, ids: np.ndarray) -> None:
        try:
            self.file.write(ids.tobytes())
        except OSError as e:  # a full disk, most likely
            raise self._error(e) from None
        self.count += len(ids)

    def commit(self, header: dict) -> None:
        blob = json.dumps(header).encode("utf-8")
        if len(MAGIC) + 4 + len(blob) > self.offset:
            raise RuntimeError("the token file's header outgrew the room kept for it")
        try:
            self.file.seek(0)
            self.file.write(MAGIC + struct.pack("<I", len(blob)) + blob)
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.dest)
        except OSError as e:
            raise self._error(e) from None
        from tinygpt.checkpoint import fsync_dir

        fsync_dir(self.dest.parent)

    def _error(self, e: OSError) -> UserError:
        return UserError(f"cannot write the encoded corpus in {self.dest.parent}: {e.strerror}; free some space "
                         "or set TINYGPT_CACHE_DIR to a writable directory with room for it")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def read_header(path: Path, redo: str = "") -> tuple[dict, int]:
    """The header of the token file at `path` and where its ids start; a file that is not one,
    or is cut short, is a UserError (`redo` says how to encode it again)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
                raise _damaged(path, "is not a tinygpt token file", redo)
            (length,) = struct.unpack("<I", head[len(MAGIC):])
            blob = f.read(length)
    except OSError as e:
        raise UserError(f"cannot read token file {path}: {e.strerror}") from None
    try:
        header = json.loads(blob)
        offset = -(-(len(MAGIC) + 4 + length) // ALIGN) * ALIGN
        n = header["train_tokens"] + header["val_tokens"]
        expected = offset + n * np.dtype(header["dtype"]).itemsize
    except (ValueError, KeyError, TypeError):
        raise _damaged(path, "has a damaged header", redo) from None
    if header.get("format") != FORMAT:
        raise _damaged(path, f"is format {header.get('format')!r}, not {FORMAT}", redo)
    if size != expected:
        raise _damaged(path, f"is cut short or damaged ({size:,} bytes, expected {expected:,})", redo)
    return header, offset


def open_tokens(path: Path, redo: str = "") -> tuple[dict, np.ndarray]:
    """The header and the ids of a token file, memory-mapped read-only: nothing is read until used."""
    header, offset = read_header(path, redo)
    n = header["train_tokens"] + header["val_tokens"]
    if n == 0:
        return header, np.zeros(0, dtype=header["dtype"])
    return header, np.memmap(path, dtype=header["dtype"], mode="r", offset=offset, shape=(n,))


def read_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer a token file was encoded with."""
    return tokenizer_from_json(read_header(path)[0]["tokenizer"])


def _damaged(path: Path, what: str, redo: str) -> UserError:
    return UserError(f"token file {path} {what}; delete it and tinygpt encodes the text again{redo}")


# --- prepare: encode if missing or stale -------------------------------------------------------------


def prepare(data, tokenizer: Tokenizer | None = None, kind: str = "char", vocab_size: int = 512,
            force: bool = False, log: Callable = lambda *a: None, layout: Layout | None = None) -> Path:
    """The token file of `data` (anything `tinygpt.documents` reads), split as `layout` says,
    encoded with `tokenizer` (a run's) or, without one, with a new `kind` tokenizer trained on the
    data: reused when fresh, else (or when `force`d) encoded now. Returns its path."""
    layout = layout or Layout()
    source = open_source(data, layout.text_field)
    recipe = "char" if kind == "char" else f"bpe{vocab_size}"
    if tokenizer is not None:
        wanted = tokenizer.to_json()
        # Usually the data was encoded with this tokenizer already (the run was trained on it):
        # any fresh file of the data with the very same tokenizer and layout will do.
        pattern = cache_path(source.key(), "*", layout)
        for path in [] if force else sorted(pattern.parent.glob(pattern.name)):
            if _fresh(path, source, layout, _redo(data, "")) and read_header(path)[0]["tokenizer"] == wanted:
                return path
        recipe = "tok" + hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_path(source.key(), recipe, layout)
    if force or not _fresh(path, source, layout, _redo(data, recipe)):
        encode(source, path, tokenizer, recipe, vocab_size, log, layout)
    return path


def _redo(data, recipe: str) -> str:
    if recipe == "char":
        return f", or run: tinygpt prepare --data {data} --force"
    if recipe.startswith("bpe"):
        return f", or run: tinygpt prepare --data {data} --tokenizer bpe --vocab-size {recipe[3:]} --force"
    return ""


def _sources(source: Source) -> list[dict]:
    """What the token file was made from, to tell when it is stale: each file's size and mtime,
    or a Hugging Face dataset's fingerprint."""
    if source.is_hf:
        return [{"hf": source.spec, "fingerprint": load_hf(source.spec)._fingerprint}]
    stats = [(p, p.stat()) for p in source.files]
    return [{"path": str(p.resolve()), "size": s.st_size, "mtime_ns": s.st_mtime_ns} for p, s in stats]


def _fresh(path: Path, source: Source, layout: Layout, redo: str) -> bool:
    """Does the token file at `path` hold the current text of `source`, split as `layout` says?"""
    if not path.exists():
        return False
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4 + 64)
    if head.startswith(MAGIC) and b'"format": 1,' in head:  # ours, from tinygpt 0.5 or before: encode again
        return False
    header, _ = read_header(path, redo)
    sources = _sources(source)
    if header["sources"] != sources or header.get("layout") != dataclasses.asdict(layout):
        return False
    if not source.is_hf and sum(s["size"] for s in sources) < HASH_CHECK_BELOW:  # catch an edit that kept size, mtime
        digest = hashlib.sha256()
        for _ in pieces(source, digest):
            pass
        return digest.hexdigest() == header["sha256"]
    return True


def encode(source: Source, dest: Path, tokenizer: Tokenizer | None, recipe: str, vocab_size: int = 512,
           log: Callable = lambda *a: None, layout: Layout | None = None) -> None:
    """Stream the documents of `source` into the token file `dest`: a first pass counts
    characters and documents and finds the alphabet; a new tokenizer is trained (BPE: on the
    train split); then every document is encoded into its split, followed by the end-of-document
    token where there are several. A file changed meanwhile is an error, never a mixed encoding."""
    layout = layout or Layout()
    t0 = time.perf_counter()
    before = _sources(source)
    size = sum(s.get("size", 0) for s in before)
    log = log if size >= ANNOUNCE_FROM or source.is_hf else (lambda *a: None)
    log(f"encoding {source.spec} ({size / 1e6:,.0f} MB) once into {dest}; later runs reuse it")
    found = scan(source)
    if found.chars == 0:
        if found.empty > 1:
            raise UserError(f"{source.what} has no text: its {found.empty:,} documents are all empty; check "
                            "--text-field, or give data with text in it")
        raise UserError(f"{source.what} is empty; give a file with text in it")
    split = layout.val_split
    if split == "auto":
        split = "documents" if found.documents >= AUTO_DOCUMENTS else "tail"
    if split == "documents":
        if found.documents < 2:
            raise UserError(f"{source.what} is one document, so no whole document can be held out; use "
                            "--val-split tail (the last part of the text is val)")
        val_docs, split_at = choose_val_docs(found.documents, layout.val_fraction), None
    else:
        val_docs, split_at = None, int(round(1 - layout.val_fraction, 12) * found.chars)
    documents = found.documents > 1
    if tokenizer is None and recipe == "char":
        tokenizer = CharTokenizer.train(found.alphabet, documents)
    elif tokenizer is None:
        train_text = (t for part, t in split_stream(pieces(source), split_at, val_docs) if part == 0 and t is not END)
        tokenizer = BPETokenizer.train(train_text, vocab_size, documents)
    elif tokenizer.unknown(found.alphabet):
        unknown = tokenizer.unknown(found.alphabet)
        shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise UserError(f"{source.what} has {len(unknown)} character(s) the run's tokenizer does not know: "
                        f"{shown}; remove them, or train a new run on this text")
    # A run's tokenizer without the token (trained by tinygpt 0.5, or on one text) joins documents
    # with nothing between them, as tinygpt 0.5 did.
    eot = tokenizer.eot_id if documents else None
    encoders = [make_encoder(tokenizer), make_encoder(tokenizer)]  # train, val: each holds back its own text
    eot_ids = np.array([eot if eot is not None else 0], dtype=encoders[0].dtype)
    header = {"format": FORMAT, "dtype": encoders[0].dtype.name, "recipe": recipe, "data": source.key(),
              "sources": before, "sha256": "0" * 64, "chars": found.chars, "split_char": split_at,
              "train_tokens": 0, "val_tokens": 0, "train_chars": 0, "val_chars": 0, "tokenizer": tokenizer.to_json(),
              "layout": dataclasses.asdict(layout), "val_split": split, "eot": eot,
              "documents": found.documents, "empty_documents": found.empty, "val_documents": None}
    digest = hashlib.sha256()
    chars, docs = [0, 0], [0, 0]
    with TokenWriter(dest, header_room=len(json.dumps(header)) + 256) as out, \
            tempfile.TemporaryFile(dir=out.dest.parent) as val_file:
        outs = [out.write, lambda ids: val_file.write(ids.tobytes())]
        for part, text in split_stream(pieces(source, digest), split_at, val_docs):
            if text is END:
                docs[part] += 1
                if eot is not None:  # a document ends: its held-back text, then the token
                    outs[part](encoders[part].flush())
                    outs[part](eot_ids)
                continue
            chars[part] += len(text)
            outs[part](encoders[part].encode(text))
        for part in (0, 1):
            outs[part](encoders[part].flush())
        train_tokens = out.count
        val_file.seek(0)
        while block := val_file.read(COPY_BYTES):
            out.write(np.frombuffer(block, dtype=encoders[0].dtype))
        if _sources(source) != before:
            raise UserError(f"{source.what} changed while it was being encoded; run the command again")
        header.update(sha256=digest.hexdigest(), train_tokens=train_tokens, val_tokens=out.count - train_tokens,
                      train_chars=chars[0], val_chars=chars[1], val_documents=docs[1] if split == "documents" else None)
        out.commit(header)
    log(f"encoded {found.chars:,} characters into {out.count:,} tokens ({tokenizer.kind} tokenizer) "
        f"in {time.perf_counter() - t0:.1f} s")


def describe(header: dict) -> str:
    """One line on a token file's documents and split, for a corpus of more than one document."""
    n, empty = header["documents"], header["empty_documents"]
    if header["val_split"] == "documents":
        split = f"val: {header['val_documents']:,} whole documents (--val-split documents)"
    else:
        split = f"val: the last {header['layout']['val_fraction']:.0%} of the text (--val-split tail)"
    eot = "joined by an end-of-document token" if header["eot"] is not None else \
        "joined with nothing between them (the run's tokenizer has no end-of-document token)"
    return f"{header['data']}: {n:,} documents{_skipped(empty)}, {eot}; {split}"


def _skipped(empty: int) -> str:
    return f" ({empty:,} empty, skipped)" if empty else ""


COPY_BYTES = 1 << 24  # the val split's ids are copied 16 MB at a time (a multiple of every id's size)


def load_corpus(path: Path, block_size: int):
    """The `data.Corpus` of a token file: its splits memory-mapped, checked long enough for
    `block_size` (each split at least block_size + 1 tokens)."""
    from tinygpt.data import Corpus  # here, not at the top: `tinygpt prepare` needs no torch

    header, ids = open_tokens(path)
    data, n_chars = header["data"], header["chars"]
    what = "dataset" if is_hf(data) else "directory" if Path(data).is_dir() else "file"
    min_chars = 2 * (block_size + 1)
    if n_chars < min_chars:
        raise UserError(
            f"data {what} {data} has {n_chars} characters, too few: training needs more than {min_chars} "
            "(block_size + 1 in each split); use a longer text or a smaller --block-size"
        )
    train, val = ids[: header["train_tokens"]], ids[header["train_tokens"]:]
    shortest = min(len(train), len(val))
    if shortest < block_size + 1:
        raise UserError(
            f"data {what} {data} is too short: its smaller split has {shortest} tokens, fewer than "
            f"block_size + 1 = {block_size + 1}; use a longer text or a smaller --block-size"
        )
    return Corpus(Path(data), train, val, header["val_chars"] - 1, header["train_chars"] - 1, tokens=Path(path),
                  eot=header["eot"])
