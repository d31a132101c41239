"""The command line: train, sample and eval end to end, the lecture's scripts, help text, flags,
one-line errors in a real process, output off a terminal, progress and `tinygpt runs`."""

import io
import json
import math
import shutil
import time

import pytest
import torch
from conftest import REPO, assert_one_line_error, cli, tiny_args

import tinygpt
from tinygpt.checkpoint import checkpoint_dir, load_run
from tinygpt.progress import Progress
from tinygpt.runs import read_metrics

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

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

    a = cli("sample", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", 50, "--seed", 5)
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


def test_num_samples_is_one_batch_of_reproducible_samples(trained_run):
    def samples(seed):
        r = cli("sample", "--ckpt", trained_run, "--prompt", "All:", "--max-new-tokens", 30, "--num-samples", 3,
                "--seed", seed)
        assert r.code == 0, r.err
        return r.out.split("\n---------------\n")

    first = samples(7)
    assert len(first) == 3
    assert all(s.startswith("All:") and s.endswith("\n") and len(s) == len("All:") + 30 + 1 for s in first)
    assert len(set(first)) == 3  # three samples, not one printed three times
    assert samples(7) == first
    assert samples(8) != first


def test_sample_window_chooses_the_rule_past_the_block(trained_run):
    """`--window chunked` prints what the engine's chunked rule generates, `full` (the default)
    the lecture's; past the block (16 here) they differ."""
    from tinygpt.sampling import generate_stream

    model, tok = load_run(trained_run, "best")
    out = {}
    for window in ("full", "chunked"):
        r = cli("sample", "--ckpt", trained_run, "--prompt", "All:", "--max-new-tokens", 60, "--seed", 3,
                "--dtype", "float32", "--window", window)
        assert r.code == 0, r.err
        gen = torch.Generator().manual_seed(3)
        ids = torch.tensor([tok.encode("All:")])
        want = tok.decode([int(t) for t in generate_stream(model, ids, 60, generator=gen, window=window)])
        assert r.out == "All:" + want + "\n"
        out[window] = r.out
    assert out["full"] != out["chunked"]
    assert cli("sample", "--ckpt", trained_run, "--prompt", "All:", "--max-new-tokens", 60, "--seed", 3,
               "--dtype", "float32").out == out["full"]  # full is the default


def test_sample_and_eval_say_which_checkpoint_they_use(trained_run):
    best, latest = checkpoint_dir(trained_run, "best"), checkpoint_dir(trained_run, "latest")
    for command in (["sample", "--max-new-tokens", 3], ["eval", "--split", "val"]):
        r = cli(*command, "--ckpt", trained_run)
        assert r.code == 0, r.err
        assert r.err.splitlines()[-1] == f"using the best checkpoint: {best}"  # the default
        assert str(best) not in r.out  # stdout is the text (or the figures) alone
        r = cli(*command, "--ckpt", trained_run, "--which", "latest")
        assert r.code == 0, r.err
        assert r.err.splitlines()[-1] == f"using the latest checkpoint: {latest}"


def test_runs_lists_runs_as_a_table(trained_run, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(trained_run, root / "good")
    shutil.copytree(trained_run, root / "broken")
    (root / "broken" / "run.json").write_text("{")
    (root / "notes").mkdir()  # not a run: not listed
    r = cli("runs", root)
    assert r.code == 0, r.err
    header, rule, *rows = r.out.splitlines()
    assert header == "| run | model | steps | val loss (whole split) | bits/char | date |"
    assert [row.split(" | ")[0] for row in rows] == ["| broken", "| good"]
    assert rows[0].startswith("| broken | damaged: ") and "run.json is garbled" in rows[0]

    name, size, steps, best_loss, bpc, date = (c.strip() for c in rows[1].strip("|").split("|"))
    model, _ = load_run(trained_run)
    params = sum(p.numel() for p in model.parameters())
    assert size == f"2x2x32, {params / 1e3:.0f}k"
    # The figure train printed at its end (whole val split, best checkpoint), not the estimate.
    final = next(m for m in read_metrics(trained_run, reports_only=False) if "final_val_loss" in m)
    estimate = min(read_metrics(trained_run), key=lambda m: m["val_loss"])
    assert (steps, best_loss, bpc) == ("4", f"{final['final_val_loss']:.4f}", f"{final['final_val_bpc']:.4f}")
    assert best_loss != f"{estimate['val_loss']:.4f}"
    assert time.strptime(date, "%Y-%m-%d %H:%M")

    # A run without the whole-split figure shows none, and says how to get it.
    shutil.copytree(trained_run, root / "stopped")
    metrics = root / "stopped" / "metrics.jsonl"
    metrics.write_text("".join(ln + "\n" for ln in metrics.read_text().splitlines() if "final_val_loss" not in ln))
    out = cli("runs", root).out
    assert "| stopped | 2x2x32" in out and "| 4 | — | — |" in out
    assert out.splitlines()[-1].startswith("—: the run has no whole-split figure yet")

    assert cli("runs", tmp_path / "empty-but-there").code == 2
    (tmp_path / "empty").mkdir()
    assert cli("runs", tmp_path / "empty").out.startswith("no runs in ")


# --- flags and help -------------------------------------------------------------------------------------


def test_version():
    r = cli("--version")
    assert r.code == 0 and r.err == ""
    assert r.out == f"tinygpt {tinygpt.version()}\n"
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tinygpt.version() in (declared, "unknown")  # "unknown" when run from a source tree not installed


@pytest.mark.parametrize("flag", ["--max-iter", "--n-lay"])
def test_abbreviated_flags_are_refused(tiny_text_file, tmp_path, flag):
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "run"), flag, 2)
    assert_one_line_error(r, flag, "--help")  # not taken as --max-iters / --n-layer
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, near", [("--n-layers", "--n-layer"), ("--max-iter", "--max-iters"),
                                        ("--n-lay", "--n-layer")])
def test_unknown_flag_suggests_the_nearest_and_the_subcommands_help(flag, near):
    r = cli("train", flag, 2)
    assert_one_line_error(r, f"unknown flag {flag}; did you mean {near}", "see tinygpt train --help")


def test_help_documents_every_flag_with_default():
    r = cli("train", "--help")
    assert r.code == 0
    for flag in ("--max-iters", "--n-embd", "--learning-rate", "--dtype", "--preset", "--resume", "--data"):
        assert flag in r.out
    assert "default: 5000; bigram: 3000" in r.out
    for command in ("sample", "eval"):
        assert "--ckpt" in cli(command, "--help").out


@pytest.mark.slow
def test_script_help_names_the_script():
    r = cli("--help", script="gpt.py", timeout=120)
    assert r.code == 0, r.err
    assert r.out.startswith("usage: python gpt.py")
    text = " ".join(r.out.split())
    assert "(default: Tiny Shakespeare" in text and "(default: Tiny Shakespeare) (default: None)" not in text
    for block in text.split(" --")[1:]:
        assert block.count("(default:") <= 1, block  # each default shown once


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


def test_the_scripts_errors_name_the_command_the_user_typed(tmp_path):
    """`python gpt.py` says `python gpt.py:` in every error, its flags' and its input's alike."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9\n".encode("latin-1") * 50)
    for script in ("gpt.py", "bigram.py"):
        r = cli("--data", bad, "--out", tmp_path / "run", script=script, timeout=120)
        assert_one_line_error(r, f"python {script}: error: data file {bad} is not valid UTF-8")
        assert r.err.startswith(f"python {script}: error: ")
        r = cli("--n-layers", "2", script=script, timeout=120)
        assert r.err.startswith(f"python {script}: error: unknown flag --n-layers")


@pytest.fixture
def busy_machine(monkeypatch):
    """Every core looks busy with other work, as on a loaded machine (the threads notice)."""
    import tinygpt.runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(tinygpt.runtime, "cpu_busy_cores", lambda *a, **k: 64.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the threads the machine had


def test_notices_go_to_stderr_and_stdout_is_the_product(busy_machine, tiny_text_file, tmp_path):
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "run", max_iters=4, eval_interval=2, final_eval=True,
                                threads="auto", sample_chars=30))
    assert r.code == 0, r.err
    assert r.err == ("other work is using this machine's cores: training on 1 thread(s) instead of 2 "
                     "(--threads 2 to insist)\n")
    lines = r.out.splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == ["step 0", "step 2", "step 4"]
    assert lines[3].startswith("val loss over the whole val split: ")
    assert len("\n".join(lines[4:])) == 30  # then the sample, and nothing else


def test_an_input_error_on_a_busy_machine_is_still_one_line(busy_machine, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9\n".encode("latin-1") * 50)
    r = cli("train", "--data", bad, "--out", tmp_path / "run", "--threads", "auto")
    assert r.out == ""
    assert r.err == (f"tinygpt train: error: data file {bad} is not valid UTF-8 (byte 3); "
                     "convert it, e.g. with iconv -t UTF-8\n")


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
    plain = Progress(total=4, log=logged.append, note=logged.append, interval_s=0.0, stream=FakeStream(tty=False))
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
    quiet = Progress(total=4, quiet=True, log=quiet_log.append, note=quiet_log.append, interval_s=0.0,
                     stream=FakeStream(tty=True))
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


def test_eta_honours_max_time():
    """10 of 1000 steps took 10 s: 990 s to go at that pace, unless --max-time ends the run first
    (counted from the run's start, here 40 s before the loop's)."""
    steps = Progress(total=1000, quiet=True, stream=FakeStream(tty=False))
    for _ in range(10):
        steps.step(1.0, 1.0)
    assert steps.eta(now=steps.started + 10) == pytest.approx(990)

    capped = Progress(total=1000, quiet=True, stream=FakeStream(tty=False), max_time=60.0,
                      started=time.perf_counter() - 40)
    assert capped.eta(now=capped.started) == pytest.approx(20, abs=0.5)  # no step yet: what --max-time leaves
    for _ in range(10):
        capped.step(1.0, 1.0)
    assert capped.eta(now=capped.started + 10) == pytest.approx(10, abs=0.5)  # 60 - 40 - 10
    assert capped.eta(now=capped.started + 30) == 0.0  # past --max-time: nothing left, never negative
