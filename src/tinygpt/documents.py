"""Your data as documents: the formats tinygpt reads, and what one document is in each.

    a text file (.txt, .md, or any extension not refused below, read as UTF-8)   one document
    a folder                 every .txt, .md, .jsonl, .csv, .tsv and .parquet file below it, in
                             sorted path order (hidden files and folders skipped)
    .jsonl                   one JSON object a line; its --text-field (default "text") a document
    .csv / .tsv              a header row; the --text-field column of each row a document
    .parquet                 the --text-field column of each row a document (needs pyarrow)
    hf:NAME[:SPLIT]          a Hugging Face dataset (load_dataset, or a folder written by
                             save_to_disk); its --text-field of each row a document (needs datasets)

Everything is streamed: a text file in 16 MB pieces, records one at a time, so a corpus of
gigabytes is read in constant memory. `pieces` yields a document's text in one or more pieces,
then `END`; documents with no text are skipped (and counted). What a document boundary becomes
in the token ids (an end-of-document token) is `tinygpt.corpus`'s business.
"""

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tinygpt.errors import UserError

END = None  # in a stream of pieces: the end of a document
CHUNK_BYTES = 1 << 24  # 16 MB read at a time: large enough to keep numpy busy, small next to RAM
RECORD_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
FOLDER_SUFFIXES = (".txt", ".md", *RECORD_SUFFIXES)
# Files that are not text, whose bytes would train a model on garbage (or fail as "not UTF-8" at
# some byte offset that says nothing); any other extension is read as UTF-8 text.
REFUSED = {".xlsx", ".xls", ".ods", ".pdf", ".docx", ".doc", ".odt", ".rtf", ".pptx", ".ppt", ".epub", ".zip",
           ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tar", ".png", ".jpg", ".jpeg", ".gif", ".webp",
           ".mp3", ".wav", ".mp4", ".pkl", ".pickle", ".npy", ".npz", ".pt", ".safetensors", ".arrow", ".feather",
           ".sqlite", ".db", ".exe", ".so", ".bin"}
READS = ("text files (.txt, .md, or any other text, read as UTF-8), .jsonl, .csv, .tsv, .parquet, a folder "
         "of these, or hf:NAME[:SPLIT]")


@dataclass(frozen=True)
class Source:
    """What `--data` names, checked: its files (none for a Hugging Face dataset) and the field
    or column that holds each record's text."""

    spec: str  # as given: a path, or hf:NAME[:SPLIT]
    files: tuple[Path, ...]
    text_field: str = "text"

    @property
    def is_hf(self) -> bool:
        return is_hf(self.spec)

    @property
    def what(self) -> str:
        """'data file X' / 'data directory X' / 'dataset hf:X', for messages."""
        if self.is_hf:
            return f"dataset {self.spec}"
        return f"data {'directory' if Path(self.spec).is_dir() else 'file'} {self.spec}"

    def key(self) -> str:
        """What the data is, for the token file's name and run.json: a resolved path, or hf:NAME."""
        return self.spec if self.is_hf else str(Path(self.spec).resolve())


def is_hf(spec) -> bool:
    return str(spec).startswith("hf:")


def open_source(data, text_field: str = "text") -> Source:
    """Check that `data` (a path or hf:NAME[:SPLIT]) is something tinygpt reads: one line if not."""
    spec = str(data)
    if is_hf(spec):
        if not spec[3:].split(":")[0]:
            raise UserError(f"--data {spec} names no dataset; give hf:NAME or hf:NAME:SPLIT")
        return Source(spec, (), text_field)
    path = Path(spec)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).parts)
        if not files:
            raise UserError(f"data path {path} is a directory; give a text file inside it with --data PATH, or put "
                            ".txt, .md, .jsonl, .csv, .tsv or .parquet files below it (--data DIR reads them all)")
        return Source(spec, tuple(files), text_field)
    if not path.exists():
        raise UserError(f"data file {path} does not exist; give a UTF-8 text file with --data PATH")
    if path.suffix.lower() in REFUSED:
        raise UserError(f"data file {path} is a {path.suffix.lower()} file, which tinygpt does not read; it reads "
                        f"{READS}: export or convert your text to one of these")
    return Source(spec, (path,), text_field)


def pieces(source: Source, digest=None, counts: dict | None = None) -> Iterator[str | None]:
    """The text of every document of `source`, in order: its pieces, then END. Documents with
    no text are skipped; `counts` (if given) gets "documents" and "empty" as they are read.
    `digest` (a hashlib object) sees every byte of the source files."""
    counts = counts if counts is not None else {}
    counts.update(documents=0, empty=0)
    for doc in _documents(source, digest):
        has_text = False
        for piece in doc:
            if piece:
                has_text = True
                yield piece
        if has_text:
            counts["documents"] += 1
            yield END
        else:
            counts["empty"] += 1


def _documents(source: Source, digest) -> Iterator[Iterator[str]]:
    """Each document as an iterator of its pieces (consumed before the next is asked for)."""
    if source.is_hf:
        yield from _hf_records(source)
        return
    for path in source.files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_records(path, source.text_field, digest)
        elif suffix in (".csv", ".tsv"):
            yield from _csv_records(path, source.text_field, "\t" if suffix == ".tsv" else ",", digest)
        elif suffix == ".parquet":
            yield from _parquet_records(path, source.text_field, digest)
        else:
            yield read_pieces(path, digest)


def read_pieces(path: Path, digest=None) -> Iterator[str]:
    """The text of the file at `path` in pieces: read CHUNK_BYTES at a time, never whole, and
    decoded as UTF-8 incrementally (a character cut between two chunks comes out whole). Bytes
    are kept as they are ("\\r\\n" stays). `digest` (a hashlib object) sees every byte."""
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


def _lines(path: Path, digest) -> Iterator[str]:
    """The lines of a text file, each with its "\\n" (split on "\\n" only: JSON strings may hold
    other line separators such as U+2028)."""
    carry = ""
    for piece in read_pieces(path, digest):
        parts = (carry + piece).split("\n")
        carry = parts.pop()
        for part in parts:
            yield part + "\n"
    if carry:
        yield carry


def _jsonl_records(path: Path, field: str, digest) -> Iterator[Iterator[str]]:
    for n, line in enumerate(_lines(path, digest), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {n} is not JSON ({e.msg}); each line of a .jsonl file must be one JSON "
                            "object") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {n} is a JSON {type(record).__name__}, not an object; each line of a "
                            f'.jsonl file must be an object such as {{"{field}": "..."}}')
        yield iter([_text_of(record, field, f"{path} line {n}", "field", "--text-field")])


def _csv_records(path: Path, field: str, delimiter: str, digest) -> Iterator[Iterator[str]]:
    rows = csv.reader(_lines(path, digest), delimiter=delimiter, strict=True)
    try:
        header = next(rows, None)
        if header is None:
            return
        if field not in header:
            raise UserError(f"{path} has no column {field!r} (its columns: {_names(header)}); name the one with "
                            "the text with --text-field COLUMN")
        col = header.index(field)
        for row in rows:
            if row:  # a blank line
                yield iter([row[col] if col < len(row) else ""])
    except csv.Error as e:
        raise UserError(f"{path} line {rows.line_num} is not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({e})"
                        ) from None


def _parquet_records(path: Path, field: str, digest) -> Iterator[Iterator[str]]:
    pq = _optional("pyarrow.parquet", "pyarrow", "parquet", ".parquet files")
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
        raise UserError(f"data file {path} is not a readable Parquet file ({e})") from None
    names = table.schema_arrow.names
    if field not in names:
        raise UserError(f"{path} has no column {field!r} (its columns: {_names(names)}); name the one with the "
                        "text with --text-field COLUMN")
    if digest is not None:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    for n, batch in enumerate(table.iter_batches(columns=[field], batch_size=4096)):
        for i, value in enumerate(batch.column(0).to_pylist()):
            yield iter([_text_of({field: value}, field, f"{path} row {n * 4096 + i + 1}", "column", "--text-field")])


def _hf_records(source: Source) -> Iterator[Iterator[str]]:
    dataset = load_hf(source.spec)
    field = source.text_field
    if field not in dataset.column_names:
        raise UserError(f"dataset {source.spec} has no column {field!r} (its columns: "
                        f"{_names(dataset.column_names)}); name the one with the text with --text-field COLUMN")
    for n, batch in enumerate(dataset.iter(batch_size=1024)):
        for i, value in enumerate(batch[field]):
            yield iter([_text_of({field: value}, field, f"dataset {source.spec} row {n * 1024 + i + 1}", "column",
                                 "--text-field")])


def load_hf(spec: str):
    """The dataset `hf:NAME[:SPLIT]` names (split default: train): a folder written by
    `save_to_disk`, or anything `datasets.load_dataset` finds (the local cache, then the hub)."""
    datasets = _optional("datasets", "datasets", "datasets", "hf: datasets")
    name, _, split = spec[3:].partition(":")
    try:
        if Path(name).is_dir() and ((Path(name) / "state.json").exists() or
                                    (Path(name) / "dataset_dict.json").exists()):
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                if (split or "train") not in data:
                    raise UserError(f"dataset {spec} has no split {split or 'train'!r} (its splits: "
                                    f"{_names(list(data))}); give hf:{name}:SPLIT")
                data = data[split or "train"]
            return data
        return datasets.load_dataset(name, split=split or "train")
    except UserError:
        raise
    except Exception as e:  # not found, offline, a bad split: datasets' own exceptions, many kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load dataset {spec}: {reason[:300]}; check the name and split (hf:NAME:SPLIT), "
                        "or save it locally and give hf:FOLDER") from None


def _text_of(record: dict, field: str, where: str, kind: str, flag: str) -> str:
    if field not in record:
        raise UserError(f"{where} has no {kind} {field!r} (it has: {_names(record)}); name the one with the text "
                        f"with {flag} NAME")
    value = record[field]
    if value is None:
        return ""  # an empty document: skipped and counted
    if not isinstance(value, str):
        raise UserError(f"{where}: {kind} {field!r} is a {type(value).__name__}, not text; name the {kind} with the "
                        f"text with {flag} NAME")
    return value


def _names(names) -> str:
    names = [repr(n) for n in names]
    return ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "") if names else "none"


def _optional(module: str, package: str, extra: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"reading {what} needs the {package} package: pip install 'tinygpt[{extra}]'") from None
