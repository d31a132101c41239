"""Issue 5: torchrun/DDP, config files and presets, BPE end to end, metrics and plots, progress
output, fine-tuning from a run."""

import dataclasses
import io
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_TEXT, tiny_configs
from safetensors.torch import load_file

from tinygpt import config as C
from tinygpt.checkpoint import checkpoint_dir, load_run
from tinygpt.cli import main
from tinygpt.data import split
from tinygpt.progress import Progress
from tinygpt.tokenizer import load_tokenizer
from tinygpt.train import train

QUIET = dict(log=lambda *_: None)
TINY_FLAGS = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--block-size", 16, "--dropout", 0,
              "--batch-size", 8, "--eval-iters", 2, "--sample-chars", 0, "--dtype", "float32", "--device", "cpu"]


def run_cli(*args) -> SimpleNamespace:
    """`tinygpt ARGS` in this process (no interpreter start-up): exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # --help
        code = e.code
    finally:
        sys.stdout, sys.stderr = saved
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict:
    return load_file(str(checkpoint_dir(run) / "model.safetensors"))


def one_line_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, r.stderr


# --- more than one process -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "tinygpt", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_grad_accum_and_resume(tiny_text_file, tmp_path):
    common = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0, batch_size=8,
                  eval_interval=5, eval_iters=4, learning_rate=3e-3)
    flags = [x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", v)]
    flags += ["--data", tiny_text_file, "--sample-chars", 0, "--no-final-eval", "--dtype", "float32",
              "--device", "cpu", "--quiet"]
    ddp = tmp_path / "ddp"

    # Two processes, stopped at step 10 and resumed to 20 under torchrun again.
    first = torchrun("train", *flags, "--max-iters", 10, "--out", ddp, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun("train", "--resume", ddp, "--max-iters", 20, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Rank 0 alone prints: each report once.
    reports = [ln.split(":")[0] for ln in (first.stdout + resumed.stdout).splitlines() if ln.startswith("step ")]
    assert reports == [f"step {s}" for s in (0, 5, 10, 15, 20)]
    assert resumed.stdout.count("resuming") == 1
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "tiny.txt"]  # no stray run dirs

    # One process accumulating 2 micro-batches per step sees the same global batches.
    m, t = tiny_configs(tiny_text_file, tmp_path / "single", max_iters=20, grad_accum=2, **common)
    train(m, t, **QUIET)
    got, want = metrics(ddp), metrics(tmp_path / "single")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 5, 10, 15, 20]
    for a, b in zip(got, want):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert got[-1]["val_loss"] < got[0]["val_loss"] - 0.5  # it did learn
    for name, w in weights(tmp_path / "single").items():
        torch.testing.assert_close(weights(ddp)[name], w, rtol=0, atol=1e-5)

    # A run of two processes resumed by one would see other batches: refused.
    r = run_cli("train", "--resume", ddp, "--max-iters", 25)
    one_line_error(r, "trained by 2 process(es)", "--nproc_per_node 2")


# --- config files and presets ---------------------------------------------------------------------


def test_config_file_layers_under_flags_over_preset(tmp_path):
    presets = C.list_presets()
    assert presets, "tinygpt ships presets in tinygpt/presets/*.toml"
    name = next(iter(presets))
    cfg = tmp_path / "my.toml"
    cfg.write_text('n-layer = 3\nn_head = 3\nn_embd = 48\nlearning_rate = 2e-3\nseed = 4242\nmax_iters = 11\n'
                   'tokenizer = "bpe"\n')
    m, t = C.resolve_train_settings({"preset": name, "config": str(cfg), "max_iters": 7})
    assert (m.n_layer, m.n_head, m.n_embd, t.learning_rate, t.seed, t.tokenizer) == (3, 3, 48, 2e-3, 4242, "bpe")
    assert t.max_iters == 7  # the flag beats the file
    preset = C.load_preset(name)
    resolved = {**C.to_dict(m), **C.to_dict(t)}
    for key, value in preset.items():
        if key not in {"n_layer", "n_head", "n_embd", "learning_rate", "seed", "max_iters", "tokenizer"}:
            assert resolved[key] == value, key  # the file did not touch what it does not name


def test_every_preset_is_listed_and_valid():
    presets = C.list_presets()
    r = run_cli("presets")
    assert r.returncode == 0, r.stderr
    assert [ln.split()[0] for ln in r.stdout.splitlines()] == list(presets)
    for name, description in presets.items():
        assert description, f"preset {name} has no description"
        m, t = C.resolve_train_settings({"preset": name})
        values = {**C.to_dict(m), **C.to_dict(t)}
        assert all(values[k] == v for k, v in C.load_preset(name).items())


def test_config_file_applies_in_a_real_run_and_bad_files_are_one_line_errors(tiny_text_file, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\nbatch_size = 8\nmax_iters = 6\n"
                    "eval_interval = 3\neval_iters = 2\nsample_chars = 0\ndtype = 'float32'\nlearning_rate = 0.002\n")
    r = run_cli("train", "--config", good, "--data", tiny_text_file, "--out", tmp_path / "run", "--max-iters", 3)
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["model"]["n_layer"], run["model"]["n_embd"], run["train"]["learning_rate"]) == (1, 16, 0.002)
    assert run["train"]["max_iters"] == 3 and [x["step"] for x in metrics(tmp_path / "run")][-2:] == [3, 3]

    typo = tmp_path / "typo.toml"
    typo.write_text("n_layer = 2\nlearning_rat = 0.1\n")
    one_line_error(run_cli("train", "--config", typo), "unknown key 'learning_rat'", str(typo))
    broken = tmp_path / "broken.toml"
    broken.write_text("n_layer = = 2\n")
    one_line_error(run_cli("train", "--config", broken), "not valid TOML", str(broken))
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("n_layer = 'two'\n")
    one_line_error(run_cli("train", "--config", wrong_type), "n_layer must be int")
    one_line_error(run_cli("train", "--config", tmp_path / "missing.toml"), "does not exist")


def test_help_shows_every_field_with_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = run_cli("train", "--help").stdout
    blocks = {}
    for block in ("\n" + text).split("\n  --")[1:]:
        blocks[block.split()[0].rstrip(",")] = " ".join(block.split())
    for cls in (C.ModelConfig, C.TrainConfig):
        for f in C.cli_fields(cls):
            flag = f.name.replace("_", "-")
            assert flag in blocks, f"--{flag} missing from train --help"
            assert f.metadata["help"].split()[0] in blocks[flag]
            shown = "(default:" if "(default:" in f.metadata["help"] else f"(default: {f.default!r}"
            assert shown in blocks[flag], blocks[flag]
            assert blocks[flag].count("(default:") == 1, blocks[flag]
    assert "config" in blocks and "preset" in blocks


# --- BPE end to end ---------------------------------------------------------------------------------


def test_bpe_train_sample_eval_report_bits_per_char(tiny_text_file, tmp_path):
    out = tmp_path / "bpe"
    m, t = tiny_configs(tiny_text_file, out, tokenizer="bpe", vocab_size=300, max_iters=30, eval_interval=15,
                        final_eval=True)
    result = train(m, t, **QUIET)
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.kind == "bpe" and tok.vocab_size <= 300
    val_text = split(TINY_TEXT)[1]
    val_ids = tok.encode(val_text)
    assert len(val_ids) < len(val_text) / 2  # BPE merges: fewer tokens than characters
    chars_per_token = (len(val_text) - 1) / (len(val_ids) - 1)
    rows = metrics(out)
    for row in rows[:-1]:
        assert row["val_bpc"] == pytest.approx(row["val_loss"] / chars_per_token / math.log(2), rel=1e-12)
    assert rows[-1]["final_val_bpc"] == pytest.approx(result.final["bits_per_char"])

    e = run_cli("eval", "--ckpt", out, "--json", "--split", "val", "--dtype", "float32")
    assert e.returncode == 0, e.stderr
    val = json.loads(e.stdout)["val"]
    assert val["tokens"] == len(val_ids) - 1 and val["chars"] == len(val_text) - 1
    assert val["bits_per_char"] == pytest.approx(val["loss"] * val["tokens"] / val["chars"] / math.log(2))
    assert val["bits_per_char"] == pytest.approx(result.final["bits_per_char"], rel=1e-5)
    text = run_cli("eval", "--ckpt", out, "--split", "val").stdout
    assert "nats/token" in text and "bits/char" in text

    s = run_cli("sample", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", 20, "--seed", 3)
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("All:") and len(s.stdout) > len("All:") + 20  # 20 tokens, several chars each
    model, tok2 = load_run(out)
    assert tok2.decode(tok2.encode("Speak, speak.\n")) == "Speak, speak.\n"


# --- metrics, run records and plots ---------------------------------------------------------------


def test_run_records_config_command_versions_and_plots_several_runs(tiny_text_file, tmp_path):
    runs = []
    for name, lr in (("slow", 3e-4), ("fast", 3e-3)):
        m, t = tiny_configs(tiny_text_file, tmp_path / name, max_iters=20, eval_interval=10, learning_rate=lr)
        runs.append(train(m, t, **QUIET).run_dir)
    meta = json.loads((runs[0] / "run.json").read_text())
    assert meta["train"]["learning_rate"] == 3e-4 and meta["model"]["n_embd"] == 32
    assert meta["command"] == sys.argv
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["python"]
    row = metrics(runs[1])[1]
    assert set(row) >= {"step", "train_loss", "val_loss", "train_bpc", "val_bpc", "lr", "tokens_per_sec",
                        "train_seconds"}

    from tinygpt.plot import loss_figure

    fig = loss_figure(runs, bpc=True)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["slow train", "slow val", "fast train", "fast val"]
    assert list(lines[3].get_xdata()) == [0, 10, 20]
    assert list(lines[3].get_ydata()) == [r["val_bpc"] for r in metrics(runs[1])]

    png = tmp_path / "both.png"
    r = run_cli("plot", *runs, "--out", png, "--time")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    one_line_error(run_cli("plot", tmp_path), "no metrics.jsonl")


# --- progress ---------------------------------------------------------------------------------------


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_plain_periodic_lines_off_a_terminal_bar_on_one():
    logged = []
    plain = Progress(total=4, log=logged.append, interval_s=0.0, stream=FakeStream(tty=False))
    plain.report("step 0: train loss 4.0000, val loss 4.0000")
    for loss in (3.0, 2.5, 2.0, 1.5):
        plain.step(loss, 1234.0)
    plain.close()
    assert logged[0] == "step 0: train loss 4.0000, val loss 4.0000"
    assert [ln.split()[:4] for ln in logged[1:]] == [["step", f"{i}/4", "loss", f"{x:.4f}"]
                                                     for i, x in zip(range(1, 5), (3.0, 2.5, 2.0, 1.5))]
    assert all("1,234 tok/s" in ln and "eta" in ln for ln in logged[1:])
    assert not any("\r" in ln or "\x1b" in ln for ln in logged)

    quiet_log = []
    quiet = Progress(total=4, quiet=True, log=quiet_log.append, interval_s=0.0, stream=FakeStream(tty=True))
    quiet.report("step 0: report")
    for _ in range(4):
        quiet.step(1.0, 10.0)
    quiet.close()
    assert quiet_log == ["step 0: report"]

    tty = FakeStream(tty=True)
    bar = Progress(total=4, log=logged.append, interval_s=0.0, stream=tty)
    bar.step(1.0, 10.0)
    bar.close()
    assert "\r" in tty.getvalue() and "| 0/4 [" in tty.getvalue()  # a tqdm bar, drawn in place


def test_cli_output_off_a_terminal_has_no_control_characters(tiny_text_file, tmp_path):
    r = run_cli("train", *TINY_FLAGS, "--data", tiny_text_file, "--out", tmp_path / "a", "--max-iters", 10,
                "--eval-interval", 5)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout + r.stderr and "\x1b" not in r.stdout + r.stderr
    q = run_cli("train", *TINY_FLAGS, "--data", tiny_text_file, "--out", tmp_path / "q", "--max-iters", 10,
                "--eval-interval", 5, "--quiet")
    assert q.returncode == 0, q.stderr
    lines = q.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:-1]] == ["step 0", "step 5", "step 10"]
    assert lines[-1].startswith("val loss over the whole val split") and q.stderr == ""


# --- fine-tuning ------------------------------------------------------------------------------------


@pytest.fixture
def base_run(tiny_text_file, tmp_path) -> Path:
    m, t = tiny_configs(tiny_text_file, tmp_path / "base", max_iters=20, tie_embeddings=True)
    return train(m, t, **QUIET).run_dir


def test_init_from_keeps_tokenizer_and_weights_and_records_origin(base_run, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text("All:\nSpeak, speak. Resolved, rather to die.\n\n" * 60)
    out = tmp_path / "ft"
    r = run_cli("train", "--init-from", base_run, "--data", new, "--out", out, "--max-iters", 0,
                "--eval-iters", 2, "--sample-chars", 0, "--dtype", "float32", "--learning-rate", 1e-3)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.json").read_text() == (base_run / "tokenizer.json").read_text()
    meta = json.loads((out / "run.json").read_text())
    assert meta["init_from"] == str(base_run.resolve())
    assert meta["model"] == json.loads((base_run / "run.json").read_text())["model"]
    assert meta["train"]["learning_rate"] == 1e-3 and meta["train"]["init_from"] == str(base_run)
    base_w, ft_w = weights(base_run), weights(out)
    assert base_w.keys() == ft_w.keys()
    for name in base_w:
        assert torch.equal(base_w[name], ft_w[name]), name

    one_line_error(run_cli("train", "--init-from", base_run, "--data", new, "--out", tmp_path / "x",
                           "--n-layer", 5), "--n-layer 5 conflicts", "n_layer=2")


def test_init_from_refuses_unknown_characters_unless_told_to_grow(base_run, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text(TINY_TEXT.replace("e", "é") + "Zq€\n" * 30)
    r = run_cli("train", "--init-from", base_run, "--data", new, "--out", tmp_path / "refused")
    one_line_error(r, "4 character(s)", "'é'", "'€'", "--grow-vocab")
    assert not (tmp_path / "refused").exists()

    m, t = tiny_configs(new, tmp_path / "grown", max_iters=0, init_from=str(base_run), grow_vocab=True)
    train(m, t, **QUIET)
    old_tok = load_tokenizer(base_run / "tokenizer.json")
    new_tok = load_tokenizer(tmp_path / "grown" / "tokenizer.json")
    n = old_tok.vocab_size
    assert new_tok.chars[:n] == old_tok.chars and sorted(new_tok.chars[n:]) == sorted("éZq€")
    model, _ = load_run(tmp_path / "grown")
    assert model.config.vocab_size == n + 4 and model.config.tie_embeddings
    assert model.lm_head.weight is model.token_embedding_table.weight
    old, grown = weights(base_run), weights(tmp_path / "grown")
    assert torch.equal(grown["token_embedding_table.weight"][:n], old["token_embedding_table.weight"])
    assert torch.equal(grown["lm_head.bias"][:n], old["lm_head.bias"])
    assert torch.equal(grown["lm_head.bias"][n:], torch.zeros(4))  # new characters: fresh init
    assert torch.equal(grown["blocks.0.attn.c_attn.weight"], old["blocks.0.attn.c_attn.weight"])


def test_bigram_grows_its_table_in_both_dimensions(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "base", model="bigram", max_iters=10)
    train(m, t, **QUIET)
    new = tmp_path / "new.txt"
    new.write_text(TINY_TEXT + "Zq\n" * 30)
    m2, t2 = tiny_configs(new, tmp_path / "grown", model="bigram", max_iters=0,
                          init_from=str(tmp_path / "base"), grow_vocab=True)
    train(m2, t2, **QUIET)
    old = weights(tmp_path / "base")["token_embedding_table.weight"]
    grown = weights(tmp_path / "grown")["token_embedding_table.weight"]
    n = old.shape[0]
    assert grown.shape == (n + 2, n + 2) and torch.equal(grown[:n, :n], old)


def test_fine_tuning_runs_record_their_tokenizer_kind(tiny_text_file, tmp_path):
    m, t = tiny_configs(tiny_text_file, tmp_path / "base", tokenizer="bpe", vocab_size=280, max_iters=5)
    train(m, t, **QUIET)
    m2, t2 = tiny_configs(tiny_text_file, tmp_path / "ft", max_iters=5, init_from=str(tmp_path / "base"))
    assert t2.tokenizer == "char"  # the default, which fine-tuning does not use
    train(m2, t2, **QUIET)
    meta = json.loads((tmp_path / "ft" / "run.json").read_text())
    vocab = load_tokenizer(tmp_path / "base" / "tokenizer.json").vocab_size
    assert meta["train"]["tokenizer"] == "bpe" and meta["model"]["vocab_size"] == vocab > 256
    assert dataclasses.asdict(load_run(tmp_path / "ft")[0].config)["vocab_size"] == vocab
