"""Issue 25, your own text: documents from .jsonl, .csv, .tsv, .parquet, folders and hf: datasets,
joined by an end-of-document token; the val split by tail or by whole documents; evaluation that
never crosses a document; and a one-line error for each kind of bad input."""

import csv
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, assert_same_weights, cli, losses_by_step, serving, tiny_args, tiny_configs

from tinygpt import corpus as K
from tinygpt import data
from tinygpt.errors import UserError
from tinygpt.tokenizer import END_OF_DOCUMENT, CharTokenizer, tokenizer_from_json
from tinygpt.train import train

# Thirty short documents, one with characters no other has, one with the token's name as text.
DOCS = [f"Letter {i}: dear friend, the weather is {'fine' if i % 3 else 'grey'} today.\n" * (1 + i % 4)
        for i in range(28)] + ["Ça va? naïve — 🙂\n", f"a literal {END_OF_DOCUMENT} in the text\n"]


def write_jsonl(path: Path, docs, field="text", extra=None) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": 1, field: d, **(extra or {})}) + "\n")
    return path


def write_csv(path: Path, docs, delimiter=",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["title", "text"])
        for i, d in enumerate(docs):
            w.writerow([f"t{i}", d])
    return path


def ids_of(token_file: Path) -> tuple[dict, list[int]]:
    header, ids = K.open_tokens(token_file)
    return header, ids.tolist()


def expected_ids(tok, docs, val_docs=None) -> list[int]:
    """The documents each followed by the end-of-document token: train's, then val's."""
    parts = [[], []]
    for i, d in enumerate(docs):
        parts[int(val_docs[i]) if val_docs is not None else 0] += tok.encode(d) + [tok.eot_id]
    return parts[0] + parts[1]


def test_every_format_gives_the_ids_of_its_documents_each_followed_by_the_end_of_document_token(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    for i, d in enumerate(DOCS):
        (folder / f"{i:03d}.txt").parent.mkdir(exist_ok=True)
        (folder / f"{i:03d}.txt").write_text(d, encoding="utf-8", newline="")
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "d.parquet")
    sources = [write_jsonl(tmp_path / "d.jsonl", DOCS), write_csv(tmp_path / "d.csv", DOCS),
               write_csv(tmp_path / "d.tsv", DOCS, "\t"), tmp_path / "d.parquet", folder]
    results = [ids_of(K.prepare(s, layout=K.Layout(val_split="documents"))) for s in sources]
    header, ids = results[0]
    tok = tokenizer_from_json(header["tokenizer"])
    assert isinstance(tok, CharTokenizer) and tok.eot_id == 0 and tok.chars[1:] == sorted(set("".join(DOCS)))
    val_docs = K.choose_val_docs(len(DOCS), 0.1)
    assert ids == expected_ids(tok, DOCS, val_docs)
    assert (header["documents"], header["val_documents"], header["val_split"]) == (30, 3, "documents")
    for other_header, other_ids in results[1:]:
        assert other_ids == ids and other_header["tokenizer"] == header["tokenizer"]
    # The token's name written in a text is text: seven characters' ids, never the token.
    assert ids.count(tok.eot_id) == len(DOCS)
    assert header["train_chars"] + header["val_chars"] == sum(map(len, DOCS))


def test_hf_dataset_saved_locally_reads_like_the_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"body": DOCS[:5]})}).save_to_disk(
        str(tmp_path / "dict"))
    layout = K.Layout(text_field="body")
    hf = ids_of(K.prepare(f"hf:{tmp_path / 'saved'}", layout=layout))
    jsonl = ids_of(K.prepare(write_jsonl(tmp_path / "d.jsonl", DOCS, field="body"), layout=layout))
    assert hf[1] == jsonl[1] and hf[0]["data"] == f"hf:{tmp_path / 'saved'}"
    header, ids = ids_of(K.prepare(f"hf:{tmp_path / 'dict'}:validation", layout=layout))
    assert header["documents"] == 5 and header["val_split"] == "tail"  # under 20 documents: the tail
    with pytest.raises(UserError, match=r"has no split 'train' \(its splits: 'validation'\); give hf:"):
        K.prepare(f"hf:{tmp_path / 'dict'}", layout=layout)


def test_bpe_gets_the_token_too_and_no_text_encodes_to_it(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", DOCS)
    header, ids = ids_of(K.prepare(source, kind="bpe", vocab_size=300))
    tok = tokenizer_from_json(header["tokenizer"])
    assert tok.vocab_size == 300 and tok.eot_id == 0 and ids.count(0) == len(DOCS)
    assert tok.eot_id not in tok.encode(f"x{END_OF_DOCUMENT}y")
    reloaded = tokenizer_from_json(json.loads(json.dumps(tok.to_json())))  # through run.json's tokenizer file
    assert reloaded.encode(f"x{END_OF_DOCUMENT}y") == tok.encode(f"x{END_OF_DOCUMENT}y")
    assert tok.decode(ids[: ids.index(0) + 1]) == next(d for i, d in enumerate(DOCS)
                                                       if not K.choose_val_docs(30, 0.1)[i]) + END_OF_DOCUMENT


def test_one_text_has_no_token_and_the_lecture_split(tmp_path, tiny_text_file):
    header, ids = ids_of(K.prepare(tiny_text_file))
    tok = tokenizer_from_json(header["tokenizer"])
    text = tiny_text_file.read_text()
    assert tok.eot_id is None and tok.vocab_size == len(set(text))
    cut = int(0.9 * len(text))
    assert ids == tok.encode(text[:cut]) + tok.encode(text[cut:])
    assert (header["documents"], header["val_split"]) == (1, "tail")
    with pytest.raises(UserError, match="is one document, so no whole document can be held out; use --val-split tail"):
        K.prepare(tiny_text_file, layout=K.Layout(val_split="documents"))


def test_tail_split_of_documents_cuts_the_text_as_the_lecture(tmp_path):
    header, ids = ids_of(K.prepare(write_jsonl(tmp_path / "d.jsonl", DOCS), layout=K.Layout(val_split="tail",
                                                                                                val_fraction=0.25)))
    tok = tokenizer_from_json(header["tokenizer"])
    stream = [i for d in DOCS for i in tok.encode(d) + [tok.eot_id]]
    assert ids == stream and header["val_split"] == "tail"
    total = sum(map(len, DOCS))
    assert header["train_chars"] == int(0.75 * total)
    train_text = tok.encode("".join(DOCS))[: int(0.75 * total)]
    assert [i for i in ids[: header["train_tokens"]] if i != tok.eot_id] == train_text


def test_the_documents_split_is_fixed_holds_out_whole_documents_and_follows_the_fraction():
    a, b = K.choose_val_docs(1000, 0.1), K.choose_val_docs(1000, 0.1)
    assert np.array_equal(a, b) and a.sum() == 100
    assert K.choose_val_docs(1000, 0.2).sum() == 200 and K.choose_val_docs(5, 0.01).sum() == 1
    assert not np.array_equal(a[:100], np.arange(100) >= 90)  # drawn, not the last ones


def test_whole_split_windows_never_cross_a_document_and_predict_every_token_once():
    eot = 9
    ids = torch.tensor([1, 2, 3, eot, 4, 5, 6, 7, 8, 1, 2, eot, 3, eot, 5, 6])
    rows = []
    for x, y in data.windows(ids, 4, 3, eot=eot):
        for xr, yr in zip(x.tolist(), y.tolist()):
            rows.append([(a, b) for a, b in zip(xr, yr) if b != data.IGNORE])
    # Each document's windows start at the token before it and stop at its end-of-document token.
    assert rows == [[(1, 2), (2, 3), (3, eot)],
                    [(eot, 4), (4, 5), (5, 6), (6, 7)], [(7, 8), (8, 1), (1, 2), (2, eot)],
                    [(eot, 3), (3, eot)],
                    [(eot, 5), (5, 6)]]
    assert sum(map(len, rows)) == len(ids) - 1
    assert data.count_windows(len(ids), 4, 3, ids, eot) == 2
    for row in rows:  # no input after an end-of-document token inside a row
        assert all(a != eot for a, _ in row[1:])


def test_a_model_trained_on_documents_learns_where_they_end_and_sample_stops_there(tmp_path):
    docs = ["abc" * (3 + i % 3) + "\n" for i in range(60)]
    source = write_jsonl(tmp_path / "d.jsonl", docs)
    m, t = tiny_configs(source, tmp_path / "run", max_iters=150, eval_interval=150, final_eval=True)
    result = train(m, t, log=lambda *a: None)
    assert result.final["loss"] < 0.5  # a newline is always followed by the end of the document
    r = cli("sample", "--ckpt", tmp_path / "run", "--prompt", "abcabc", "--max-new-tokens", 50, "--temperature", 0)
    assert r.code == 0 and r.out.endswith("\n\n") and END_OF_DOCUMENT not in r.out, r.out
    r = cli("sample", "--ckpt", tmp_path / "run", "--prompt", "abcabc", "--max-new-tokens", 50, "--temperature", 0,
            "--no-stop-at-end")
    assert END_OF_DOCUMENT in r.out
    with serving(tmp_path / "run", "--dtype", "float32") as server:  # a completion ends where its document does
        answer = httpx.post(server.url + "/v1/completions", json={"prompt": "abcabc", "max_tokens": 50,
                                                                   "temperature": 0}, timeout=30).json()
        assert answer["choices"][0]["finish_reason"] == "stop" and answer["choices"][0]["text"].endswith("\n")
        assert httpx.get(server.url + "/tokenizer_info", timeout=10).json()["eos_token"] == END_OF_DOCUMENT
    r = cli("eval", "--ckpt", tmp_path / "run", "--json", "--dtype", "float32")
    figures = json.loads(r.out)
    assert figures["val"]["loss"] == pytest.approx(result.final["loss"], abs=1e-6)
    header = K.read_header(next(K.cache_dir().glob("d-*")))[0]
    assert figures["val"]["tokens"] == header["val_tokens"] - 1  # every val token but the first predicted
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train"]["val_split"] == "auto" and run["data_path"] == str(source.resolve())


def test_resume_with_documents_is_bit_exact(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", DOCS)
    over = dict(dropout=0.1, max_iters=40, eval_interval=10)
    m, t = tiny_configs(source, tmp_path / "whole", **over)
    train(m, t, log=lambda *a: None)
    m, t = tiny_configs(source, tmp_path / "split", **{**over, "max_iters": 20})
    train(m, t, log=lambda *a: None)
    m, t = tiny_configs(source, tmp_path / "split", **over, resume=str(tmp_path / "split"))
    train(m, t, log=lambda *a: None)
    assert losses_by_step(tmp_path / "whole") == losses_by_step(tmp_path / "split")
    assert_same_weights(tmp_path / "whole", tmp_path / "split")


def test_a_run_resumed_or_evaluated_keeps_its_split(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert cli("train", *tiny_args(source, tmp_path / "run", max_iters=2), "--val-split", "tail",
               "--val-fraction", "0.3").code == 0
    r = cli("train", "--resume", tmp_path / "run", "--max-iters", 4, "--val-split", "documents")
    assert_one_line_error(r, "--val-split documents conflicts with the run being resumed (val_split='tail')")
    r = cli("eval", "--ckpt", tmp_path / "run", "--json")
    header = K.read_header(next(K.cache_dir().glob("d-*")))[0]
    assert header["val_split"] == "tail" and header["layout"]["val_fraction"] == 0.3
    assert json.loads(r.out)["val"]["tokens"] == header["val_tokens"] - 1


def test_fine_tuning_a_one_text_run_on_documents_grows_the_token(tmp_path, tiny_text_file):
    assert cli("train", *tiny_args(tiny_text_file, tmp_path / "base", max_iters=2)).code == 0
    docs = write_jsonl(tmp_path / "d.jsonl", [d for d in DOCS if d.isascii()] * 2)
    r = cli("train", *tiny_args(docs, tmp_path / "ft", max_iters=2), "--init-from", tmp_path / "base",
            "--grow-vocab")
    assert r.code == 0, r.err
    base = tokenizer_from_json(json.loads((tmp_path / "base" / "tokenizer.json").read_text()))
    tuned = tokenizer_from_json(json.loads((tmp_path / "ft" / "tokenizer.json").read_text()))
    assert tuned.chars[: base.vocab_size] == base.chars and tuned.eot_id == base.vocab_size  # old ids kept


@pytest.mark.parametrize("case", ["xlsx", "gz", "bad json", "not an object", "no field", "no column",
                                  "not text", "bad utf8", "all empty", "too small for auto", "folder", "bad csv"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    args = ("--out", tmp_path / "run")
    if case in ("xlsx", "gz"):
        path = tmp_path / f"book.{case}"
        path.write_bytes(b"PK\x03\x04 not text")
        fragments = (f"is a .{case} file, which tinygpt does not read; it reads text files (.txt, .md",
                     ".jsonl, .csv, .tsv, .parquet")
    elif case == "bad json":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a"}\n{"text": oops}\n')
        fragments = (f"{path} line 2 is not JSON", "each line of a .jsonl file must be one JSON object")
    elif case == "not an object":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a"}\n\n["a list"]\n')
        fragments = (f"{path} line 3 is a JSON list, not an object",)
    elif case == "no field":
        path = write_jsonl(tmp_path / "d.jsonl", DOCS, field="body")
        fragments = (f"{path} line 1 has no field 'text' (it has: 'id', 'body'); name the one with the text with "
                     "--text-field NAME",)
    elif case == "no column":
        path = write_csv(tmp_path / "d.csv", DOCS)
        args += ("--text-field", "content")
        fragments = (f"{path} has no column 'content' (its columns: 'title', 'text'); name the one with the text "
                     "with --text-field COLUMN",)
    elif case == "not text":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a"}\n{"text": 3}\n')
        fragments = (f"{path} line 2: field 'text' is a int, not text",)
    elif case == "bad utf8":
        path = tmp_path / "d.jsonl"
        path.write_bytes(b'{"text": "abc"}\n{"text": "\xff"}\n')
        fragments = (f"data file {path} is not valid UTF-8 (byte 26)", "iconv -t UTF-8")
    elif case == "all empty":
        path = write_jsonl(tmp_path / "d.jsonl", ["", ""])
        fragments = (f"data file {path} has no text: its 2 documents are all empty; check --text-field",)
    elif case == "too small for auto":
        path = write_jsonl(tmp_path / "d.jsonl", ["a short letter\n"] * 30)
        args += ("--preset", "auto")
        fragments = ("too small for any model --preset auto sizes", "give more text, or choose the model yourself")
    elif case == "folder":
        path = tmp_path / "empty"
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "a.pdf").write_bytes(b"%PDF")
        fragments = (f"data path {path} is a directory; give a text file inside it",)
    else:
        path = tmp_path / "d.csv"
        path.write_text('text\n"unclosed\n', encoding="utf-8")
        fragments = ("is not valid CSV",)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = cli("train", "--data", path, *args)
    assert_one_line_error(r, *fragments)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "run").exists()
    if case != "too small for auto":  # auto has to encode the text to count it: the cache keeps the file
        assert list(K.cache_dir().iterdir()) == []


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", "some text\n", "", "more text\n", ""])
    with open(path, "a") as f:
        f.write('{"text": null}\n')
    r = cli("prepare", "--data", path)
    assert r.code == 0 and "2 documents (4 empty, skipped), joined by an end-of-document token" in r.err
    header, ids = ids_of(next(K.cache_dir().iterdir()))
    tok = tokenizer_from_json(header["tokenizer"])
    assert ids == tok.encode("some text\n") + [0] + tok.encode("more text\n") + [0]


def test_another_extension_is_read_as_text(tmp_path):
    path = tmp_path / "script.py"
    path.write_text("def f(x):\n    return x + 1\n" * 40)
    header, ids = ids_of(K.prepare(path))
    assert header["documents"] == 1 and len(ids) == len(path.read_text())


def test_a_documents_run_exports_its_token_as_eos_and_imports_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tinygpt.hf import load_gpt2

    docs = [d for d in DOCS if d.isascii() and END_OF_DOCUMENT not in d]
    m, t = tiny_configs(write_jsonl(tmp_path / "d.jsonl", docs), tmp_path / "run", n_embd=64, max_iters=4)
    train(m, t, log=lambda *a: None)
    assert cli("export", tmp_path / "run", "--out", tmp_path / "hf").code == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_tok.eos_token == END_OF_DOCUMENT and hf_tok.eos_token_id == 0 == config["eos_token_id"]
    assert hf_tok.encode(docs[0]) == CharTokenizer.train("".join(docs), True).encode(docs[0])
    assert hf_tok.decode([5, 0, 6], skip_special_tokens=True) == hf_tok.decode([5, 6])
    _, back = load_gpt2(tmp_path / "hf")
    assert back.eot_id == 0 and back.chars == tokenizer_from_json(
        json.loads((tmp_path / "run" / "tokenizer.json").read_text())).chars
