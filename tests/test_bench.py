"""`tinygpt bench`: it runs, checks that the fast sampling paths give the plain path's text, and
never times what the hardware can only emulate."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli

from tinygpt.bench import peak_matmul_flops

# The tiny model as a settings file, which `bench --preset` takes.
TINY_BENCH = "".join(f"{k} = {TINY[k]}\n" for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                    "dropout"))


def test_bench_runs_and_reports_identical_sampling(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_BENCH)
    out = tmp_path / "bench.json"
    r = cli("bench", "--preset", cfg, "--iters", 1, "--vocab-size", 65, "--json", out)
    assert r.code == 0, r.err
    assert "| plain | float32 | reference | no |" in r.out
    figures = json.loads(out.read_text())
    assert set(figures["train"]) == {"plain", "fast"}
    assert all(s["identical"] for s in figures["sample"].values())
    assert figures["train"]["fast"]["tokens_per_sec"] > 0


def test_bench_skips_bf16_peak_without_native_bf16_units(tmp_path, monkeypatch):
    # An AMD CPU without AVX512-BF16/AMX: bf16 is emulated (~300x slower), so the bench must not
    # time it (that took 27 minutes there) and the fast path runs in float32.
    import tinygpt.runtime as rt

    monkeypatch.setattr(rt, "cpu_flags", lambda: set())
    monkeypatch.setattr(rt, "cpu_bf16_speedup", lambda: 0.0)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_BENCH)
    out = tmp_path / "bench.json"
    r = cli("bench", "--preset", cfg, "--iters", 1, "--device", "cpu", "--vocab-size", 65, "--json", out)
    assert r.code == 0, r.err
    figures = json.loads(out.read_text())
    assert set(figures["peak_flops"]) == {"float32"}
    assert figures["train"]["fast"]["dtype"] == "float32"
    assert "bf16 not measured" in r.out


def test_peak_probe_shrinks_to_its_time_budget():
    # A budget far below one 2048^3 matmul still gives a positive figure (from a smaller size).
    assert peak_matmul_flops(torch.float32, torch.device("cpu"), budget_s=1e-4, trials=1) > 0


def test_bench_times_each_dtype_asked_for_and_says_what_auto_picks(tmp_path, monkeypatch):
    """What benchmarks/gpu_check.sh runs on a GPU (float16 against bfloat16 and float32), here on
    CPU: every dtype's fast path is timed, float16 with its loss scaler, and auto's pick is named."""
    import tinygpt.runtime as rt

    monkeypatch.setattr(rt, "cpu_bf16_speedup", lambda: 0.0)  # as on a CPU without bf16 units
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_BENCH)
    out = tmp_path / "bench.json"
    r = cli("bench", "--preset", cfg, "--iters", 1, "--device", "cpu", "--vocab-size", 65, "--skip-plain",
            "--dtypes", "float32,bfloat16,float16", "--json", out)
    assert r.code == 0, r.err
    figures = json.loads(out.read_text())
    assert set(figures["train"]) == {"fast", "fast float32", "fast bfloat16", "fast float16"}
    assert [figures["train"][f"fast {d}"]["dtype"] for d in ("float32", "bfloat16", "float16")] == \
        ["float32", "bfloat16", "float16"]
    assert figures["auto_dtype"] == "float32"
    assert "--dtype auto: float32 (this CPU has no bf16 units" in r.out
    bad = cli("bench", "--preset", cfg, "--dtypes", "fp8")
    assert bad.code == 2 and "--dtypes takes float32, bfloat16, float16" in bad.err


def test_window_loss_scores_each_rule_and_the_whole_split(trained_run, tmp_path):
    """benchmarks/window_loss.py on a tiny run: its full-window figure is the model's own
    sliding-window log-likelihood of the same tokens, and its whole-split figure `tinygpt eval`'s."""
    import subprocess
    import sys

    from conftest import REPO

    from tinygpt.checkpoint import load_run, read_run_meta
    from tinygpt.scoring import token_logprobs

    out = tmp_path / "wl.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "window_loss.py"), "--ckpt", str(trained_run),
                        "--every", "3", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    model, tok = load_run(trained_run, "best")
    ids = tok.encode(Path(read_run_meta(trained_run)["data_path"]).read_text(encoding="utf-8"))
    val = ids[int(0.9 * len(ids)):]
    block = model.config.block_size
    lp = token_logprobs(model, val).chosen  # each token from the block_size before it (sliding window)
    targets = range(block, len(val), 3)
    assert got["full"] == pytest.approx(-sum(lp[t] for t in targets) / len(targets), abs=1e-4)
    e = cli("eval", "--ckpt", trained_run, "--json")
    assert got["whole_split"] == pytest.approx(json.loads(e.out)["val"]["loss"], abs=1e-4)
    assert got["chunked"] != got["full"]


def test_weight_average_benchmark_scores_what_ema_decay_trains(tiny_text_file, tmp_path):
    """benchmarks/weight_average.py keeps its averages beside a run; from step 0 its row for a
    decay is the model a run with --ema-decay of that decay ends with, to the printed digit."""
    import subprocess
    import sys

    from conftest import REPO, tiny_args

    flags = dict(max_iters=6, eval_interval=3, batch_size=8, eval_iters=2, final_eval=True)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "weight_average.py"), "--decays", "0.5,0.9",
                        "--start", "0", *tiny_args(tiny_text_file, tmp_path / "plain", **flags)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = dict(re.findall(r"^\| (.+?) \| ([\d.]+) \|", r.stdout, re.M))
    assert "6 steps; averages of the weights after steps 1-6" in r.stdout
    plain = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows["the run's last model"] == f"{plain['last_val_loss']:.4f}"
    for decay in ("0.5", "0.9"):
        assert cli("train", *tiny_args(tiny_text_file, tmp_path / decay, **flags, ema_decay=float(decay))).code == 0
        averaged = json.loads((tmp_path / decay / "metrics.jsonl").read_text().splitlines()[-1])
        assert rows[f"average, decay {decay}"] == f"{averaged['last_val_loss']:.4f}"
    assert rows["average, decay 0.5"] != rows["the run's last model"]
