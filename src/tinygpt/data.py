"""The text: where to find it, how to read it safely, how to cut it into batches.

Token ids come as a torch tensor (a text encoded in memory, `encode_corpus`) or as a numpy array
memory-mapped from an encoded corpus file (`tinygpt.corpus`); the batch sampler and the eval
windows read only the windows they need from either (`take`), as int64.

Tiny Shakespeare is looked up in this order: an explicit path (`--data`); `input.txt` in the
working directory (as in the lecture); `$TINYGPT_DATA_DIR/tinyshakespeare/input.txt` (default
`~/.cache/tinygpt`); else it is downloaded, checked against its sha256 and written atomically.
"""

import hashlib
import mmap
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygpt.errors import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_RELPATH = Path("tinyshakespeare") / "input.txt"


def data_dir() -> Path:
    """Where downloaded corpora live: $TINYGPT_DATA_DIR, else ~/.cache/tinygpt."""
    env = os.environ.get("TINYGPT_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tinygpt"


def find_corpus(path: str | None = None) -> Path:
    """The text file to train on: `path` if given, else Tiny Shakespeare (downloaded if needed)."""
    if path is not None:
        return Path(path)
    local = Path("input.txt")
    if local.is_file():
        return local
    cached = data_dir() / SHAKESPEARE_RELPATH
    if cached.is_file():
        return cached
    url = os.environ.get("TINYGPT_DATA_URL", SHAKESPEARE_URL)
    try:
        download(url, cached, SHAKESPEARE_SHA256)
    except OSError as e:  # offline, DNS, refused, unwritable cache ...
        raise UserError(
            f"Tiny Shakespeare is not here and could not be downloaded ({e}); put input.txt at "
            f"{cached} (or set TINYGPT_DATA_DIR), or train on your own text with --data PATH"
        ) from None
    return cached


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` only if its sha256 matches; never leaves a partial file at `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != sha256:
            raise UserError(
                f"download from {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                f"the file was not saved — fetch it by hand into {dest}"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def read_text(path: Path, min_chars: int = 2) -> str:
    """Read a UTF-8 text file, or raise a UserError that says what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist; give a UTF-8 text file with --data PATH")
    if path.is_dir():
        raise UserError(f"data path {path} is a directory; give a text file inside it with --data PATH")
    try:
        # newline="": the file's bytes are the user's data, "\r\n" included (no translation).
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(
            f"data file {path} is not valid UTF-8 (byte {e.start}); convert it, e.g. with iconv -t UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from None
    if not text:
        raise UserError(f"data file {path} is empty; give a file with text in it")
    if len(text) < min_chars:
        raise UserError(
            f"data file {path} has {len(text)} characters, too few: training needs more than "
            f"{min_chars} (block_size + 1 in each split); use a longer text or a smaller --block-size"
        )
    return text


def split(ids: torch.Tensor, train_frac: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% train, last 10% val, as in the lecture."""
    n = int(train_frac * len(ids))
    return ids[:n], ids[n:]


class BatchSampler:
    """Random windows of `block_size + 1` tokens, drawn with its own seeded generator.

    At each step it draws the whole global batch (`world * grad_accum` micro-batches) and hands
    each rank its share, so 2 processes x 1 micro-batch and 1 process x 2 micro-batches see
    exactly the same data. Its generator state is saved in checkpoints for exact resume.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int,
                 grad_accum: int = 1, rank: int = 0, world: int = 1):
        if len(data) < block_size + 1:
            raise UserError(
                f"the split has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a longer text or a smaller --block-size"
            )
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.grad_accum, self.rank, self.world = grad_accum, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(block_size + 1)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches (x, y) for one optimizer step."""
        n = self.world * self.grad_accum * self.batch_size
        starts = torch.randint(len(self.data) - self.block_size, (n,), generator=self.generator)
        starts = starts.view(self.grad_accum, self.world, self.batch_size)[:, self.rank]
        chunks = take(self.data, starts[..., None] + self.offsets)  # (accum, B, T+1)
        return [(c[:, :-1], c[:, 1:]) for c in chunks]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def take(data, index: torch.Tensor) -> torch.Tensor:
    """`data[index]` as int64 token ids, for a tensor or a numpy array of ids. On a memory map
    this reads only the pages under `index`, so memory does not grow with the corpus."""
    if isinstance(data, torch.Tensor):
        return data[index]
    rows = data[index.numpy()].astype(np.int64)
    mapping = getattr(data, "_mmap", None)  # np.memmap's own mmap, shared by its slices
    if hasattr(mapping, "madvise"):
        # Unmap what was just read. On a fault the kernel maps a whole page-cache folio (up to
        # 2 MB, measured: 32 random windows of a 100 MB file put 45 MB in RSS), so a run's RSS
        # would creep toward the file's size. The pages stay in the page cache, shared by every
        # process; reading them again is a cheap minor fault. About 0.05 ms a batch.
        mapping.madvise(mmap.MADV_DONTNEED)
    return torch.from_numpy(rows)


def random_batches(data: torch.Tensor, block_size: int, batch_size: int, n: int, seed: int):
    """`n` random batches, the same ones for the same seed (the periodic loss estimate)."""
    if is_chat(data):
        from tinygpt import chat

        yield from chat.random_batches(data, batch_size, n, seed)
        return
    sampler = BatchSampler(data, block_size, batch_size, seed)
    for _ in range(n):
        yield sampler.next_step()[0]


IGNORE = -100  # a target that is not scored (cross_entropy's ignore_index)


def is_chat(data) -> bool:
    """Whether a split is conversations (`tinygpt.chat.ChatSplit`), one a row, not a stream of ids."""
    return hasattr(data, "targets")


def windows(data: torch.Tensor, block_size: int, batch_size: int, eot: int | None = None):
    """Consecutive non-overlapping windows covering `data`: every token but the first is predicted
    exactly once. Yields (x, y) batches; the last window may be shorter and comes alone.

    With `eot` (a corpus of documents), windows never cross a document boundary: each document's
    windows start at the end-of-document token before it (its first token is predicted from that
    alone) and end with its own, and rows shorter than the block are padded with IGNORE targets.
    A split of conversations gives each conversation once, a row each (`tinygpt.chat`)."""
    if is_chat(data):
        from tinygpt import chat

        yield from chat.windows(data, batch_size)
        return
    if eot is not None:
        yield from _document_windows(data, block_size, batch_size, eot)
        return
    n_full = (len(data) - 1) // block_size
    offsets = torch.arange(block_size + 1)
    for i in range(0, n_full, batch_size):
        starts = torch.arange(i, min(i + batch_size, n_full)) * block_size
        chunk = take(data, starts[:, None] + offsets)
        yield chunk[:, :-1], chunk[:, 1:]
    tail = take(data, torch.arange(n_full * block_size, len(data)))
    if len(tail) > 1:
        yield tail[None, :-1], tail[None, 1:]


@dataclass
class Corpus:
    """A text encoded and split: token ids of each split, and how many characters they spell
    (for bits per character; the first token of a split is never predicted). The ids are a
    tensor, or numpy memory maps of an encoded corpus file (`tokens`, see `tinygpt.corpus`)."""

    path: Path
    train: torch.Tensor | np.ndarray
    val: torch.Tensor | np.ndarray
    val_chars: int
    train_chars: int
    tokens: Path | None = None  # the encoded corpus file the ids are mapped from
    eot: int | None = None  # the end-of-document token between documents, if the corpus has several

    def chars_per_token(self) -> dict:
        return {name: chars / max(1, split.scored if is_chat(split) else len(split) - 1)
                for name, split, chars in (("train", self.train, self.train_chars), ("val", self.val, self.val_chars))}


def encode_corpus(path: Path, text: str, tokenizer, block_size: int) -> Corpus:
    """Encode each split of `text` (the lecture's 90/10 cut, on characters) with `tokenizer`, in
    memory. Runs use the encoded corpus file instead (`tinygpt.corpus`), whose ids are tested equal
    to these."""
    train_text, val_text = split(text)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    shortest = min(len(train_ids), len(val_ids))
    if shortest < block_size + 1:
        raise UserError(
            f"data file {path} is too short: its smaller split has {shortest} tokens, fewer than "
            f"block_size + 1 = {block_size + 1}; use a longer text or a smaller --block-size"
        )
    return Corpus(Path(path), train_ids, val_ids, len(val_text) - 1, len(train_text) - 1)


def document_window_starts(data, block_size: int, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each window of `_document_windows` starts and how many tokens it predicts: a
    document's windows (with the end-of-document token before it, if any) are its tokens cut
    every block_size, so no window holds two documents."""
    ends = []  # positions of the end-of-document tokens, found a chunk at a time (memory stays flat)
    for i in range(0, len(data), 1 << 22):
        ends.append(np.flatnonzero(np.asarray(data[i : i + (1 << 22)]) == eot) + i)
    ends = np.concatenate(ends + [np.zeros(0, dtype=np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends])  # a segment runs from one token to the next end, inclusive
    stops = np.concatenate([ends, [len(data) - 1]])
    keep = stops > starts  # segments that predict something
    starts, predicted = starts[keep], (stops - starts)[keep]
    per_segment = -(-predicted // block_size)
    first = np.repeat(starts, per_segment)
    k = np.arange(per_segment.sum()) - np.repeat(np.cumsum(per_segment) - per_segment, per_segment)
    lengths = np.minimum(block_size, np.repeat(predicted, per_segment) - k * block_size)
    return first + k * block_size, lengths


def _document_windows(data, block_size: int, batch_size: int, eot: int):
    starts, lengths = document_window_starts(data, block_size, eot)
    offsets = torch.arange(block_size + 1)
    for i in range(0, len(starts), batch_size):
        s, n = torch.from_numpy(starts[i : i + batch_size]), torch.from_numpy(lengths[i : i + batch_size])
        index = s[:, None] + offsets
        chunk = take(data, index.clamp(max=len(data) - 1))
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        y[offsets[None, :-1] >= n[:, None]] = IGNORE
        yield x, y


def count_windows(n_tokens: int, block_size: int, batch_size: int, data=None, eot: int | None = None) -> int:
    """How many batches `windows` yields for a split of `n_tokens` (`data` itself with `eot`)."""
    if is_chat(data):
        return -(-len(data) // batch_size)
    if eot is not None:
        return -(-len(document_window_starts(data, block_size, eot)[0]) // batch_size)
    n_full = (n_tokens - 1) // block_size
    tail = n_tokens - n_full * block_size
    return -(-n_full // batch_size) + (1 if tail > 1 else 0)
