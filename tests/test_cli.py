"""The command line: train, sample and eval end to end, the lecture's scripts, help text, flags,
one-line errors in a real process, output off a terminal and progress."""

import io
import json
import math

import pytest
import torch
from conftest import assert_one_line_error, cli, tiny_args

from tinygpt.progress import Progress

# --- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_end_to_end(tiny_text_file, tmp_path):
    out = tmp_path / "run"
    r = cli("train", *tiny_args(tiny_text_file, out, max_iters=30, eval_interval=10, sample_chars=40, quiet=False,
                                final_eval=True, plot=True), process=True)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step ")] == [f"step {s}" for s in (0, 10, 20, 30)]
    assert "val loss over the whole val split" in r.out
    for f in ("run.json", "tokenizer.json", "metrics.jsonl", "latest.json", "loss.png"):
        assert (out / f).is_file()

    a = cli("sample", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", 50, "--seed", 5, process=True)
    b = cli("sample", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", 50, "--seed", 5, "--no-kv-cache")
    assert a.code == 0, a.err
    assert a.out.startswith("All:") and len(a.out) == len("All:") + 50 + 1
    assert a.out == b.out

    e = cli("eval", "--ckpt", out, "--json")
    assert e.code == 0, e.err
    figures = json.loads(e.out)
    text = tiny_text_file.read_text()
    assert figures["val"]["tokens"] == len(text) - int(0.9 * len(text)) - 1
    assert abs(figures["val"]["bits_per_char"] * math.log(2) - figures["val"]["loss"]) < 1e-9


@pytest.mark.slow
def test_scripts_are_thin_entry_points(tiny_text_file, tmp_path):
    r = cli("--data", tiny_text_file, "--out", tmp_path / "b", "--max-iters", 20, "--eval-interval", 10,
            "--eval-iters", 2, "--no-plot", script="bigram.py", timeout=120)
    assert r.code == 0, r.err
    assert "step 20: train loss" in r.out
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["model"]["model"] == "bigram" and run["model"]["block_size"] == 8
    assert run["train"]["batch_size"] == 32 and run["train"]["learning_rate"] == 0.01
    text = r.out.split("bits/char")[-1]
    assert len(text.strip("\n")) >= 400  # 500 generated characters printed at the end


# --- sample and eval -----------------------------------------------------------------------------------


def test_prompt_with_unknown_characters(trained_run):
    r = cli("sample", "--ckpt", trained_run, "--prompt", "Speak€, speakø€")
    assert_one_line_error(r, "2 character(s) the tokenizer does not know: '€', 'ø'", "--drop-unknown")
    assert r.out == ""
    r = cli("sample", "--ckpt", trained_run, "--prompt", "Speak€, speakø€", "--drop-unknown",
            "--max-new-tokens", 5)
    assert r.code == 0, r.err
    assert r.out.startswith("Speak, speak") and len(r.out) == len("Speak, speak") + 5 + 1
    assert r.err.splitlines()[0] == "dropped unknown character(s) from the prompt: '€', 'ø'"
    assert r.err.splitlines()[1].startswith("using the best checkpoint: ")


# --- flags and help -------------------------------------------------------------------------------------


def test_help_documents_every_flag_with_default():
    r = cli("train", "--help")
    assert r.code == 0
    for flag in ("--max-iters", "--n-embd", "--learning-rate", "--dtype", "--preset", "--resume", "--data"):
        assert flag in r.out
    assert "default: 5000; bigram: 3000" in r.out
    for command in ("sample", "eval"):
        assert "--ckpt" in cli(command, "--help").out


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_gpu(tiny_text_file, trained_run, tmp_path):
    message = "--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto"
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "run", max_iters=2), "--device", "cuda")
    assert_one_line_error(r, message)
    assert not (tmp_path / "run").exists()
    assert_one_line_error(cli("sample", "--ckpt", trained_run, "--device", "cuda"), message)


@pytest.mark.slow
def test_errors_are_one_line_without_traceback_in_a_real_process(tmp_path):
    """The in-process tests see what main() writes; this checks a real process exits 2 with no
    traceback from anywhere (imports, argparse, torch)."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9\n".encode("latin-1") * 50)
    r = cli("train", "--data", bad, "--out", tmp_path / "run", process=True, timeout=120)
    assert r.code == 2 and r.out == ""
    assert r.err == (f"tinygpt train: error: data file {bad} is not valid UTF-8 (byte 3); "
                     "convert it, e.g. with iconv -t UTF-8\n")
    r = cli("sample", "--ckpt", tmp_path / "nowhere", "--top-p", "0.9", process=True, timeout=120)
    assert r.code == 2
    assert r.err == (f"tinygpt sample: error: run directory {tmp_path / 'nowhere'} does not exist; "
                     "give the --out of a `tinygpt train` run\n")


# --- output and progress ----------------------------------------------------------------------------------


def test_cli_output_off_a_terminal_has_no_control_characters(tiny_text_file, tmp_path):
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "a", max_iters=10, eval_interval=5, quiet=False))
    assert r.code == 0, r.err
    assert "\r" not in r.out + r.err and "\x1b" not in r.out + r.err
    q = cli("train", *tiny_args(tiny_text_file, tmp_path / "q", max_iters=10, eval_interval=5, final_eval=True))
    assert q.code == 0, q.err
    lines = q.out.splitlines()
    assert [ln.split(":")[0] for ln in lines[:-1]] == ["step 0", "step 5", "step 10"]
    assert lines[-1].startswith("val loss over the whole val split") and q.err == ""


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


