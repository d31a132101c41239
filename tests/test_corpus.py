"""Issue 12, data at scale: the encoded corpus (`tinygpt.corpus`).

The token file must give exactly the ids of encoding the text in memory (`data.encode_corpus`,
which is what runs used before it), however the text is cut while streamed; be reused only while
the text is unchanged; never be left half-written; and be refused, with the way to re-encode it,
when it is not a token file or is cut short.
"""

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, shakespeare_path, tiny_configs

from tinygpt import corpus as K
from tinygpt import data, documents
from tinygpt.cli import main
from tinygpt.errors import UserError
from tinygpt.tokenizer import BPETokenizer, line_groups, load_tokenizer, train_tokenizer
from tinygpt.tokenizer import tokenizer_from_json as load_tokenizer_json
from tinygpt.train import train

# Multi-byte characters (2, 3 and 4 bytes in UTF-8), CRLF and LF line ends, runs of spaces.
MIXED = ("Ça va? Æsir — naïve 日本語のテキスト. 🙂 ok!\r\nHe said: 'x'; yes!\n\n  spaced   out\r\n"
         "Wait, what?! Ünïcödé... fine.\n") * 40


@pytest.fixture
def small_chunks(monkeypatch):
    """Read 7 bytes at a time and hand BPE pieces of ~40 characters: every multi-byte character
    and many words are cut somewhere."""
    monkeypatch.setattr(documents, "CHUNK_BYTES", 7)
    monkeypatch.setattr(K, "PIECE_CHARS", 40)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def assert_same_as_in_memory(token_file: Path, text: str, tokenizer, block_size: int = 8) -> None:
    """The memory-mapped corpus equals `data.encode_corpus` of the whole text: ids and characters."""
    mapped = K.load_corpus(token_file, block_size)
    ref = data.encode_corpus(Path("x"), text, tokenizer, block_size)
    assert isinstance(mapped.train, np.memmap)
    assert np.array_equal(mapped.train, ref.train.numpy()) and np.array_equal(mapped.val, ref.val.numpy())
    assert (mapped.train_chars, mapped.val_chars) == (ref.train_chars, ref.val_chars)
    assert K.read_tokenizer(token_file).to_json() == tokenizer.to_json()


def test_char_ids_equal_the_in_memory_encoding(tmp_path, small_chunks):
    path = write(tmp_path / "mixed.txt", MIXED)
    token_file = K.prepare(path)
    assert_same_as_in_memory(token_file, MIXED, train_tokenizer("char", MIXED))
    assert K.read_header(token_file)[0]["dtype"] == "uint8"


def test_bpe_ids_equal_the_in_memory_encoding(tmp_path, small_chunks):
    path = write(tmp_path / "mixed.txt", MIXED)
    token_file = K.prepare(path, kind="bpe", vocab_size=300)
    reference = train_tokenizer("bpe", MIXED[: int(0.9 * len(MIXED))], 300)  # as runs trained it in memory
    assert_same_as_in_memory(token_file, MIXED, reference)
    assert K.read_header(token_file)[0]["dtype"] == "uint16"


def test_tiny_shakespeare_ids_do_not_move():
    path = shakespeare_path()
    if path is None:
        pytest.skip("Tiny Shakespeare is not in $TINYGPT_DATA_DIR")
    text = data.read_text(path)
    assert_same_as_in_memory(K.prepare(path), text, train_tokenizer("char", text), block_size=256)


@pytest.mark.slow
def test_tiny_shakespeare_bpe_ids_do_not_move():
    path = shakespeare_path()
    if path is None:
        pytest.skip("Tiny Shakespeare is not in $TINYGPT_DATA_DIR")
    text = data.read_text(path)
    reference = train_tokenizer("bpe", text[: int(0.9 * len(text))], 512)
    assert_same_as_in_memory(K.prepare(path, kind="bpe", vocab_size=512), text, reference, block_size=256)


def test_bpe_training_does_not_depend_on_how_the_text_is_cut():
    lines = MIXED.splitlines(keepends=True)
    whole = ["".join(lines[i : i + 7]) for i in range(0, len(lines), 7)]
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(MIXED)), 30))
        pieces = [MIXED[a:b] for a, b in zip([0, *cuts], [*cuts, len(MIXED)])]
        assert list(line_groups(pieces, n=7)) == whole
    assert list(line_groups(["a\r", "\nb\r", "\r\n"], n=1)) == ["a\r\n", "b\r", "\r\n"]


def test_token_type_fits_the_vocabulary(tmp_path):
    assert [K.token_dtype(v).name for v in (65, 256, 257, 65536, 65537)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint32"]
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 5  # 300 distinct characters
    token_file = K.prepare(write(tmp_path / "cjk.txt", text))
    assert K.read_header(token_file)[0]["dtype"] == "uint16"
    assert_same_as_in_memory(token_file, text, train_tokenizer("char", text))


def test_directory_is_every_text_file_below_it_in_sorted_path_order_a_document_each(tmp_path, small_chunks):
    root = tmp_path / "books"
    parts = {"b.txt": "BBBB\n" * 20, "a/z.txt": "zzz\n" * 20, "a/b/c.txt": "Ça ccc\r\n" * 20,
             "a-b.txt": "dash\n" * 20, "notes.md": "more text\n", "data.bin": "not read", ".hidden/x.txt": "no"}
    for name, text in parts.items():
        write(root / name, text)
    order = ["a/b/c.txt", "a/z.txt", "a-b.txt", "b.txt", "notes.md"]
    token_file = K.prepare(root, layout=K.Layout(val_split="tail"))
    header = K.read_header(token_file)[0]
    assert [Path(s["path"]).relative_to(root.resolve()).as_posix() for s in header["sources"]] == order
    tok = load_tokenizer_json(header["tokenizer"])
    alphabet = sorted(set("".join(parts[n] for n in order)))
    assert header["documents"] == 5 and tok.eot_id == 0 and tok.chars[1:] == alphabet
    _, ids = K.open_tokens(token_file)
    expected = [i for n in order for i in tok.encode(parts[n]) + [tok.eot_id]]  # each file, then the token
    assert ids.tolist() == expected


def test_reused_while_unchanged_and_encoded_again_when_changed(tmp_path):
    path = write(tmp_path / "t.txt", TINY_TEXT)
    token_file = K.prepare(path)
    stamp = token_file.stat()
    assert K.prepare(path) == token_file
    assert (token_file.stat().st_ino, token_file.stat().st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)

    # The same size and mtime, other text: caught by the hash (small corpora are hashed on reuse).
    old = path.stat()
    edited = TINY_TEXT.replace("Citizen", "Senator")
    write(path, edited)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert path.stat().st_size == old.st_size
    assert K.prepare(path) == token_file
    assert token_file.stat().st_ino != stamp.st_ino
    assert_same_as_in_memory(token_file, edited, train_tokenizer("char", edited))

    longer = edited + "Zebra!\n" * 10  # new characters, a new vocabulary
    write(path, longer)
    K.prepare(path)
    assert_same_as_in_memory(token_file, longer, train_tokenizer("char", longer))


def test_no_partial_file_when_prepare_is_interrupted(tmp_path, small_chunks, monkeypatch):
    path = write(tmp_path / "t.txt", TINY_TEXT)
    calls = 0

    def interrupted(self, text):
        nonlocal calls
        calls += 1
        if calls == 50:
            raise KeyboardInterrupt
        return original(self, text)

    original = K.CharEncoder.encode
    monkeypatch.setattr(K.CharEncoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        K.prepare(path)
    assert list(K.cache_dir().iterdir()) == []  # neither the file nor its temporary

    monkeypatch.setattr(K.CharEncoder, "encode", original)
    token_file = K.prepare(path)
    before = token_file.read_bytes()
    write(path, TINY_TEXT + "more\n")
    calls = 0
    monkeypatch.setattr(K.CharEncoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        K.prepare(path)
    assert list(K.cache_dir().iterdir()) == [token_file] and token_file.read_bytes() == before  # the old one


def test_full_disk_is_a_user_error_and_leaves_nothing(tmp_path, monkeypatch):
    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

    path = write(tmp_path / "t.txt", TINY_TEXT)
    fdopen = os.fdopen
    monkeypatch.setattr(K.os, "fdopen", lambda fd, mode: FullDisk(fdopen(fd, mode)))
    with pytest.raises(UserError, match="cannot write the encoded corpus in .*: No space left on device; free"):
        K.prepare(path)
    assert list(K.cache_dir().iterdir()) == []


def one_line_error(capsys, *args) -> str:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


TINY = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--block-size", 8, "--batch-size", 4, "--max-iters", 2,
        "--eval-iters", 1, "--sample-chars", 0, "--no-final-eval", "--quiet", "--no-plot", "--device", "cpu"]


def test_truncated_or_foreign_token_file_is_refused_with_the_way_to_encode_again(tmp_path, capsys):
    path = write(tmp_path / "t.txt", TINY_TEXT)
    token_file = K.prepare(path)
    good = token_file.read_bytes()
    token_file.write_bytes(good[:-1])
    err = one_line_error(capsys, "train", "--data", path, "--out", tmp_path / "run", *TINY)
    assert f"token file {token_file} is cut short or damaged" in err
    assert f"tinygpt prepare --data {path} --force" in err and "delete it" in err
    assert not (tmp_path / "run").exists()

    token_file.write_bytes(b"PK\x03\x04 somebody's zip file" * 100)
    err = one_line_error(capsys, "prepare", "--data", path)
    assert "is not a tinygpt token file" in err

    assert main(["prepare", "--data", str(path), "--force"]) == 0
    assert token_file.read_bytes() == good
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run"), *map(str, TINY)]) == 0


def test_bad_utf8_is_found_at_its_byte_across_chunks(tmp_path, small_chunks):
    raw = MIXED.encode("utf-8")
    path = tmp_path / "bad.txt"
    path.write_bytes(raw[:1000] + b"\xff" + raw[1000:])
    with pytest.raises(UserError, match=r"is not valid UTF-8 \(byte 1000\)"):
        K.prepare(path)
    cut = raw.index("🙂".encode()) + 2
    path.write_bytes(raw[:cut])  # ends inside a 4-byte character
    with pytest.raises(UserError, match=rf"is not valid UTF-8 \(byte {cut - 2}\)"):
        K.prepare(path)
    assert list(K.cache_dir().iterdir()) == []


def test_batches_from_the_memory_map_equal_batches_from_a_tensor(tmp_path):
    corpus = K.load_corpus(K.prepare(write(tmp_path / "t.txt", MIXED)), 8)
    tensor = torch.from_numpy(np.array(corpus.train, dtype=np.int64))
    mapped = data.BatchSampler(corpus.train, 8, 4, seed=3, grad_accum=2)
    in_memory = data.BatchSampler(tensor, 8, 4, seed=3, grad_accum=2)
    for _ in range(3):
        for (x, y), (x2, y2) in zip(mapped.next_step(), in_memory.next_step()):
            assert x.dtype == torch.long and torch.equal(x, x2) and torch.equal(y, y2)
    val = torch.from_numpy(np.array(corpus.val, dtype=np.int64))
    for (x, y), (x2, y2) in zip(data.windows(corpus.val, 8, 5), data.windows(val, 8, 5), strict=True):
        assert x.dtype == torch.long and torch.equal(x, x2) and torch.equal(y, y2)


def test_train_resume_and_eval_read_one_token_file(tmp_path, capsys):
    path = write(tmp_path / "t.txt", TINY_TEXT)
    m, t = tiny_configs(path, tmp_path / "run", max_iters=4, eval_interval=2)
    train(m, t, log=lambda *a: None)
    files = list(K.cache_dir().iterdir())
    assert len(files) == 1 and files[0].name.endswith("-char.tokens")
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").to_json() == K.read_header(files[0])[0]["tokenizer"]
    m, t = tiny_configs(path, tmp_path / "run", max_iters=6, resume=str(tmp_path / "run"))
    train(m, t, log=lambda *a: None)
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["val"]["tokens"] == len(TINY_TEXT) - int(0.9 * len(TINY_TEXT)) - 1
    assert list(K.cache_dir().iterdir()) == files

    # Other text, whose own alphabet is not the run's: encoded with the run's tokenizer.
    other = write(tmp_path / "other.txt", TINY_TEXT.replace("A", "") * 2)
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--data", str(other), "--json"]) == 0
    (new,) = set(K.cache_dir().iterdir()) - set(files)
    assert new.name.startswith("other-") and "-tok" in new.name
    text = other.read_text()
    assert_same_as_in_memory(new, text, load_tokenizer(tmp_path / "run" / "tokenizer.json"))


def test_prepare_once_then_train_reuses_it(tmp_path, capsys):
    path = write(tmp_path / "t.txt", TINY_TEXT)
    assert main(["prepare", "--data", str(path), "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
    (token_file,) = K.cache_dir().iterdir()
    assert token_file.name.endswith("-bpe300.tokens") and str(token_file) in capsys.readouterr().out
    stamp = token_file.stat().st_mtime_ns
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run"), "--tokenizer", "bpe",
                 "--vocab-size", "300", *map(str, TINY)]) == 0
    assert list(K.cache_dir().iterdir()) == [token_file] and token_file.stat().st_mtime_ns == stamp
    run_tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert isinstance(run_tokenizer, BPETokenizer)
    assert run_tokenizer.to_json() == K.read_header(token_file)[0]["tokenizer"]


def test_prepare_help_does_not_import_torch():
    code = ("import sys\nfrom tinygpt.cli import main\ntry:\n    main(['prepare', '--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--force" in r.stdout


@pytest.mark.slow
def test_100_mb_corpus_is_encoded_fast_and_trains_in_flat_memory(tmp_path):
    """100 MB: prepare runs at tens of MB/s, and a training process's peak memory is that of a
    tiny corpus's, give or take a few MB (the ids are mapped, not loaded)."""
    line = TINY_TEXT.encode()
    small = tmp_path / "small.txt"
    small.write_bytes(line * 4)
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        for _ in range(100_000_000 // len(line)):
            f.write(line)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def child(*args) -> tuple[float, float]:
        """Wall seconds and peak RSS (MB) of `python -m tinygpt ARGS`."""
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "tinygpt", *map(str, args)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(p.pid, 0)
        assert status == 0, p.stderr.read().decode()
        return time.perf_counter() - t0, usage.ru_maxrss / 1024

    seconds, _ = child("prepare", "--data", big)
    assert seconds < 30  # about 4 s on a 2-core Xeon, torch's import included (>= 50 MB/s encoding)
    header = K.read_header(next(K.cache_dir().glob("big-*")))[0]
    assert header["chars"] == big.stat().st_size and header["split_char"] == int(0.9 * header["chars"])
    peaks = {}
    for name, path in (("small", small), ("big", big)):
        _, peaks[name] = child("train", "--data", path, "--out", tmp_path / name, *TINY)
    assert peaks["big"] < peaks["small"] + 50, peaks
