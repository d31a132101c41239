import json

from conftest import REPO, run_cli


def test_cli_end_to_end(tiny_text_file, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--data", tiny_text_file, "--out", out, "--n-layer", 1, "--n-head", 2, "--n-embd", 16,
                "--block-size", 16, "--batch-size", 8, "--max-iters", 30, "--eval-interval", 10,
                "--eval-iters", 2, "--sample-chars", 40, "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step ")] == [f"step {s}" for s in (0, 10, 20, 30)]
    assert "val loss over the whole val split" in r.stdout
    for f in ("run.json", "tokenizer.json", "metrics.jsonl", "latest.json"):
        assert (out / f).is_file()

    a = run_cli("sample", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", 50, "--seed", 5)
    b = run_cli("sample", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", 50, "--seed", 5, "--no-kv-cache")
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("All:") and len(a.stdout) == len("All:") + 50 + 1
    assert a.stdout == b.stdout

    e = run_cli("eval", "--ckpt", out, "--json")
    assert e.returncode == 0, e.stderr
    figures = json.loads(e.stdout)
    assert figures["val"]["tokens"] == len(tiny_text_file.read_text()) - int(0.9 * len(tiny_text_file.read_text())) - 1
    assert abs(figures["val"]["bits_per_char"] * 0.6931471805599453 - figures["val"]["loss"]) < 1e-9


def test_unknown_prompt_character_is_one_line_error(tiny_text_file, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--model", "bigram", "--data", tiny_text_file, "--out", out, "--max-iters", 5,
                "--sample-chars", 0, "--eval-iters", 1)
    assert r.returncode == 0, r.stderr
    r = run_cli("sample", "--ckpt", out, "--prompt", "Speak€ø")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "'€', 'ø'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("sample", "--ckpt", out, "--prompt", "Speak€", "--drop-unknown", "--max-new-tokens", 5)
    assert r.returncode == 0 and r.stdout.startswith("Speak")


def test_help_documents_every_flag_with_default():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for flag in ("--max-iters", "--n-embd", "--learning-rate", "--dtype", "--preset", "--resume", "--data"):
        assert flag in r.stdout
    assert "default: 5000; bigram: 3000" in r.stdout
    for cmd in ("sample", "eval"):
        assert "--ckpt" in run_cli(cmd, "--help").stdout


def test_scripts_are_thin_entry_points(tiny_text_file, tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, str(REPO / "bigram.py"), "--data", str(tiny_text_file), "--out", str(tmp_path / "b"),
         "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2"], capture_output=True, text=True,
        timeout=120)
    assert r.returncode == 0, r.stderr
    assert "step 20: train loss" in r.stdout
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["model"]["model"] == "bigram" and run["model"]["block_size"] == 8
    assert run["train"]["batch_size"] == 32 and run["train"]["learning_rate"] == 0.01
    text = r.stdout.split("bits/char")[-1]
    assert len(text.strip("\n")) >= 400  # 500 generated characters printed at the end
