"""The text: finding and downloading the corpus, reading it exactly (bad files refused in one
line), the 90/10 split, and batches that are the same for any split of the work."""

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, assert_one_line_error, cli, tiny_args, tiny_configs

from tinygpt import data
from tinygpt.checkpoint import load_run
from tinygpt.errors import UserError

BODY = b"a small corpus served over HTTP\n" * 100


@pytest.fixture
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/input.txt"
    httpd.shutdown()


def test_download_good_checksum(server, tmp_path):
    dest = tmp_path / "d" / "input.txt"
    data.download(server, dest, hashlib.sha256(BODY).hexdigest())
    assert dest.read_bytes() == BODY
    assert list(dest.parent.iterdir()) == [dest]


def test_download_bad_checksum_refused_nothing_left(server, tmp_path):
    dest = tmp_path / "input.txt"
    with pytest.raises(UserError, match="sha256"):
        data.download(server, dest, "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_find_corpus_downloads_into_data_dir(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINYGPT_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TINYGPT_DATA_URL", server)
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(BODY).hexdigest())
    path = data.find_corpus()
    assert path == tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == BODY


def test_find_corpus_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINYGPT_DATA_DIR", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("cached")
    assert data.find_corpus() == cached
    Path("input.txt").write_text("local")
    assert data.find_corpus() == Path("input.txt")
    assert data.find_corpus("other.txt") == Path("other.txt")


def test_offline_message_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINYGPT_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TINYGPT_DATA_URL", "http://127.0.0.1:9/nothing")  # port 9: connection refused
    with pytest.raises(UserError, match=r"put input.txt at .*cache/tinyshakespeare/input.txt"):
        data.find_corpus()
    assert not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists()


def test_split_is_first_90_last_10():
    ids = torch.arange(100)
    train, val = data.split(ids)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_windows_predict_every_token_once():
    d = torch.arange(23)
    pairs = [(int(a), int(b)) for x, y in data.windows(d, 5, 2) for a, b in zip(x.flatten(), y.flatten())]
    assert pairs == [(i, i + 1) for i in range(22)]


def test_batch_sampler_same_global_batch_for_any_split_of_work():
    d = torch.arange(1000)
    one = data.BatchSampler(d, 8, 4, seed=3, grad_accum=2)
    ranks = [data.BatchSampler(d, 8, 4, seed=3, grad_accum=1, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        micro = one.next_step()
        a = torch.cat([x for x, _ in micro])
        b = torch.cat([s.next_step()[0][0] for s in ranks])
        assert torch.equal(a, b)
        x, y = micro[0]
        assert torch.equal(x[:, 1:], y[:, :-1])


# --- reading the text exactly ----------------------------------------------------------------------

DATA = {
    "missing": (None, "does not exist; give a UTF-8 text file with --data PATH"),
    "a directory": ("dir", "is a directory; give a text file inside it"),
    "empty": (b"", "is empty; give a file with text in it"),
    "shorter than 2 x (block_size + 1)": (b"To be, or not to be", "has 19 characters, too few"),
    "a split shorter than block_size + 1": (b"To be, or not to be, that is the question:\n",
                                            "too short: its smaller split has 5 tokens, fewer than "
                                            "block_size + 1 = 17"),
    "not UTF-8": ("Caf\xe9 au lait\n".encode("latin-1") * 20, "is not valid UTF-8 (byte 3); convert it"),
}


@pytest.mark.parametrize("case", DATA)
def test_bad_data_file(tmp_path, case):
    content, message = DATA[case]
    path = tmp_path / "data.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    r = cli("train", *tiny_args(path, tmp_path / "run", max_iters=2))
    assert_one_line_error(r, "tinygpt train: error: data", message)
    assert not (tmp_path / "run").exists()


def test_crlf_corpus_is_read_exactly(tmp_path):
    """A file's bytes are the user's data: "\r\n" stays two characters, in training, in the
    run's tokenizer and in eval (no newline translation anywhere)."""
    path = tmp_path / "crlf.txt"
    path.write_bytes(TINY_TEXT.replace("\n", "\r\n").encode("utf-8"))
    text = path.read_bytes().decode("utf-8")
    assert data.read_text(path) == text

    from tinygpt.train import train

    m, t = tiny_configs(path, tmp_path / "run", max_iters=2, eval_interval=2, final_eval=True)
    result = train(m, t, log=lambda *_: None)
    _, tok = load_run(result.run_dir)
    assert "\r" in tok.chars and "\n" in tok.chars
    assert tok.decode(tok.encode(text)) == text  # the file encodes with the run's own tokenizer

    val_chars = len(text) - int(0.9 * len(text)) - 1  # the last 10%, each character predicted once
    assert result.final["tokens"] == val_chars
    r = cli("eval", "--ckpt", result.run_dir, "--json", "--split", "val")
    assert r.code == 0, r.err
    assert json.loads(r.out)["val"]["tokens"] == val_chars


def test_training_on_the_real_corpus_writes_nothing_into_the_data_directory(tmp_path):
    """Tests (and CI, whose data directory is a read-only shared copy) keep the encoded corpus
    under their own temporary directory: TINYGPT_CACHE_DIR, set for every test and fixture."""
    from conftest import listing, shakespeare_path

    from tinygpt.corpus import cache_dir
    from tinygpt.data import data_dir

    assert Path(os.environ["TINYGPT_CACHE_DIR"]) == cache_dir()
    assert data_dir() not in cache_dir().parents and cache_dir() != data_dir() / "encoded"
    corpus = shakespeare_path()
    if corpus is None:
        pytest.skip("Tiny Shakespeare is not in the data directory (TINYGPT_DATA_DIR)")
    before = listing(data_dir())
    r = cli("train", *tiny_args(None, tmp_path / "run", max_iters=1, eval_interval=1))
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data_path"] == str(corpus.resolve())
    assert listing(data_dir()) == before
    assert list(cache_dir().glob("*.tokens"))  # the encoded corpus went here instead
