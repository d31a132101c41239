"""The encoded corpus: a text encoded once into a file of token ids that every run memory-maps.

A corpus of gigabytes cannot be a Python string plus a list of ids in every process (15.6 bytes
a character, measured). So the text is streamed from disk once, in chunks, and its ids are
written to a token file; training, eval and every torchrun process map that file, and memory
stays flat whatever its size. `tinygpt prepare` does it explicitly; `train` and `eval` do it on
first use and reuse the file while the text is unchanged.

Where: `$TINYGPT_CACHE_DIR`, else `encoded/` under the data directory (`$TINYGPT_DATA_DIR`,
default ~/.cache/tinygpt): one file per data path and tokenizer, `NAME-KEY-RECIPE.tokens`, KEY a
hash of the data's absolute path. RECIPE is `char` or `bpe512` (a tokenizer trained on the data
itself) or `tok` + a hash of a given tokenizer (a resumed, evaluated or fine-tuned run's, where no
file of the data was encoded with it already).

Layout: MAGIC, the header's length (4 bytes, little-endian), the header (JSON), zeros up to a
multiple of 4096 bytes, then the ids as uint8 / uint16 / uint32 (the smallest that holds the
vocabulary): the train split's, then the val split's. The header holds the whole tokenizer, the
source files (path, size, mtime), the sha256 of their bytes, the number of characters, the split
point and the tokens of each split.

The split is the lecture's: the first 90% of the *characters* is train, the rest val, and each
side is encoded on its own, exactly as `data.encode_corpus` does in memory (the ids are equal).

A file is reused while every source file keeps the size and mtime it had when encoded (and, for
corpora under 64 MB, cheap to hash, the same sha256); otherwise it is encoded again. A file that
is not a token file or is cut short is an error that says how to re-encode: it is never silently
replaced, since it might not be ours.
"""

import codecs
import hashlib
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, takewhile
from pathlib import Path

import numpy as np

from tinygpt.errors import UserError
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_json

MAGIC = b"tinygpt tokens\n\0"  # 16 bytes
FORMAT = 1
ALIGN = 4096  # ids start on a page boundary
CHUNK_BYTES = 1 << 24  # 16 MB read at a time: large enough to keep numpy busy, small next to RAM
HASH_CHECK_BELOW = 64 << 20  # below this, reuse also checks the sha256 (about 60 ms at 64 MB)
ANNOUNCE_FROM = 16 << 20  # encoding a smaller text takes well under a second: no progress lines
PIECE_CHARS = 1 << 16  # BPE: characters per piece handed to the batch encoder
TRAIN_FRAC = 0.9


def cache_dir() -> Path:
    """Where token files live: $TINYGPT_CACHE_DIR, else `encoded/` in the data directory."""
    env = os.environ.get("TINYGPT_CACHE_DIR")
    if env:
        return Path(env)
    from tinygpt.data import data_dir

    return data_dir() / "encoded"


def cache_path(data: Path, recipe: str) -> Path:
    """The token file of `data` (as its absolute path) encoded by `recipe` ("*": any recipe)."""
    where = Path(data).resolve()
    key = hashlib.sha256(str(where).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", where.stem)[:40] or "corpus"
    return cache_dir() / f"{name}-{key}-{recipe}.tokens"


def source_files(data: Path) -> list[Path]:
    """The files of a corpus: `data` itself, or every `*.txt` below a directory, in sorted path
    order (compared folder by folder), read one after the other with nothing in between."""
    data = Path(data)
    if data.is_dir():
        files = sorted((p for p in data.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(data).parts)
        if not files:
            raise UserError(f"data path {data} is a directory; give a text file inside it, or put *.txt "
                            "files below it (--data DIR reads them all)")
        return files
    if not data.exists():
        raise UserError(f"data file {data} does not exist; give a UTF-8 text file with --data PATH")
    return [data]


def read_pieces(files: Iterable[Path], digest=None) -> Iterator[str]:
    """The text of `files`, one after the other, in pieces: read CHUNK_BYTES at a time, never whole,
    and decoded as UTF-8 incrementally (a character cut between two chunks comes out whole).
    Bytes are kept as they are ("\\r\\n" stays). `digest` (a hashlib object) sees every byte."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        done = 0  # bytes read from this file so far
        try:
            f = open(path, "rb")
        except OSError as e:
            raise UserError(f"cannot read data file {path}: {e.strerror}") from None
        with f:
            while True:
                raw = f.read(CHUNK_BYTES)
                pending = len(decoder.getstate()[0])  # bytes of a character begun in the last chunk
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise UserError(f"data file {path} is not valid UTF-8 (byte {done - pending + e.start}); "
                                    "convert it, e.g. with iconv -t UTF-8") from None
                if digest is not None:
                    digest.update(raw)
                done += len(raw)
                if text:
                    yield text
                if not raw:
                    break


@dataclass
class Scan:
    chars: int  # how many characters the text has
    alphabet: str  # its distinct characters, in order of first appearance


def scan(files: list[Path]) -> Scan:
    """One pass over the text: its length in characters and its alphabet."""
    n, alphabet, known_ascii = 0, {}, b""
    for text in read_pieces(files):
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
    return Scan(n, "".join(alphabet))


def text_alphabet(data: Path) -> str:
    """The distinct characters of the corpus at `data`, in order of first appearance."""
    return scan(source_files(data)).alphabet


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
        self.table[[ord(c) for c in tokenizer.chars]] = np.arange(tokenizer.vocab_size)
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


def split_pieces(pieces: Iterable[str], at: int) -> Iterator[tuple[int, str]]:
    """(0, text) for the first `at` characters (train), then (1, text) for the rest (val)."""
    seen = 0
    for text in pieces:
        cut = min(max(at - seen, 0), len(text))
        if cut:
            yield 0, text[:cut]
        if cut < len(text):
            yield 1, text[cut:]
        seen += len(text)


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


def prepare(data: Path, tokenizer: Tokenizer | None = None, kind: str = "char", vocab_size: int = 512,
            force: bool = False, log: Callable = lambda *a: None) -> Path:
    """The token file of `data` (a text file, or a directory of *.txt files), encoded with
    `tokenizer` (a run's) or, without one, with a new `kind` tokenizer trained on the data:
    reused when fresh, else (or when `force`d) encoded now. Returns its path."""
    data = Path(data)
    files = source_files(data)
    recipe = "char" if kind == "char" else f"bpe{vocab_size}"
    if tokenizer is not None:
        wanted = tokenizer.to_json()
        # Usually the data was encoded with this tokenizer already (the run was trained on it):
        # any fresh file of the data with the very same tokenizer will do.
        pattern = cache_path(data, "*")
        for path in [] if force else sorted(pattern.parent.glob(pattern.name)):
            if _fresh(path, files, _redo(data, path.stem.rsplit("-", 1)[-1])) and \
                    read_header(path)[0]["tokenizer"] == wanted:
                return path
        recipe = "tok" + hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_path(data, recipe)
    if force or not _fresh(path, files, _redo(data, recipe)):
        encode(data, files, path, tokenizer, recipe, vocab_size, log)
    return path


def _redo(data: Path, recipe: str) -> str:
    if recipe == "char":
        return f", or run: tinygpt prepare --data {data} --force"
    if recipe.startswith("bpe"):
        return f", or run: tinygpt prepare --data {data} --tokenizer bpe --vocab-size {recipe[3:]} --force"
    return ""


def _sources(files: list[Path]) -> list[dict]:
    stats = [(p, p.stat()) for p in files]
    return [{"path": str(p.resolve()), "size": s.st_size, "mtime_ns": s.st_mtime_ns} for p, s in stats]


def _fresh(path: Path, files: list[Path], redo: str) -> bool:
    """Does the token file at `path` hold the current text of `files`?"""
    if not path.exists():
        return False
    header, _ = read_header(path, redo)
    sources = _sources(files)
    if header["sources"] != sources:
        return False
    if sum(s["size"] for s in sources) < HASH_CHECK_BELOW:  # cheap: catch an edit that kept size and mtime
        digest = hashlib.sha256()
        for _ in read_pieces(files, digest):
            pass
        return digest.hexdigest() == header["sha256"]
    return True


def encode(data: Path, files: list[Path], dest: Path, tokenizer: Tokenizer | None, recipe: str,
           vocab_size: int = 512, log: Callable = lambda *a: None) -> None:
    """Stream the text of `files` into the token file `dest`: a first pass counts characters
    and finds the alphabet; a new BPE tokenizer is trained on the train split; then the text is
    encoded split by split. A file changed meanwhile is an error, never a mixed encoding."""
    t0 = time.perf_counter()
    before = _sources(files)
    size = sum(s["size"] for s in before)
    log = log if size >= ANNOUNCE_FROM else (lambda *a: None)
    log(f"encoding {data} ({size / 1e6:,.0f} MB) once into {dest}; later runs reuse it")
    found = scan(files)
    what = "directory" if Path(data).is_dir() else "file"
    if found.chars == 0:
        raise UserError(f"data {what} {data} is empty; give a file with text in it")
    split_at = int(TRAIN_FRAC * found.chars)
    if tokenizer is None and recipe == "char":
        tokenizer = CharTokenizer(sorted(found.alphabet))
    elif tokenizer is None:
        train_text = (text for _, text in takewhile(lambda p: p[0] == 0, split_pieces(read_pieces(files), split_at)))
        tokenizer = BPETokenizer.train(train_text, vocab_size)
    elif tokenizer.unknown(found.alphabet):
        unknown = tokenizer.unknown(found.alphabet)
        shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise UserError(f"data {what} {data} has {len(unknown)} character(s) the run's tokenizer does not know: "
                        f"{shown}; remove them, or train a new run on this text")
    encoder = make_encoder(tokenizer)
    header = {"format": FORMAT, "dtype": encoder.dtype.name, "recipe": recipe, "data": str(Path(data).resolve()),
              "sources": before, "sha256": "0" * 64, "chars": found.chars, "split_char": split_at,
              "train_tokens": 0, "val_tokens": 0, "tokenizer": tokenizer.to_json()}
    digest = hashlib.sha256()
    with TokenWriter(dest, header_room=len(json.dumps(header)) + 256) as out:
        train_tokens = None
        for part, text in split_pieces(read_pieces(files, digest), split_at):
            if part == 1 and train_tokens is None:  # the train split ends: encode what it held back
                out.write(encoder.flush())
                train_tokens = out.count
            out.write(encoder.encode(text))
        out.write(encoder.flush())
        train_tokens = out.count if train_tokens is None else train_tokens
        if _sources(files) != before:
            raise UserError(f"data {what} {data} changed while it was being encoded; run the command again")
        header.update(sha256=digest.hexdigest(), train_tokens=train_tokens, val_tokens=out.count - train_tokens)
        out.commit(header)
    log(f"encoded {found.chars:,} characters into {out.count:,} tokens ({tokenizer.kind} tokenizer) "
        f"in {time.perf_counter() - t0:.1f} s")


def load_corpus(path: Path, block_size: int):
    """The `data.Corpus` of a token file: its splits memory-mapped, checked long enough for
    `block_size` (each split at least block_size + 1 tokens)."""
    from tinygpt.data import Corpus  # here, not at the top: `tinygpt prepare` needs no torch

    header, ids = open_tokens(path)
    data, n_chars, split_at = header["data"], header["chars"], header["split_char"]
    what = "directory" if Path(data).is_dir() else "file"
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
    return Corpus(Path(data), train, val, n_chars - split_at - 1, split_at - 1, tokens=Path(path))
