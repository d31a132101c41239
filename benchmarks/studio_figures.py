"""What the studio's first two steps cost on this machine: describing a text (POST /api/texts) and
timing the presets before Start (POST /api/estimate), each beside a baseline measured in the
same run.

    python benchmarks/studio_figures.py

Describe: `tinygpt.studio.texts.describe` on Tiny Shakespeare and on 5 copies of it (5.6 MB),
beside the time to decode the same bytes as UTF-8 (the least any reader pays). Estimate: the
studio's probe of each preset (two timed steps at a part of the batch, scaled to it, on the job's
thread count) beside the probe of the whole batch (what it would cost unscaled) and the step time a
real training run of that preset measures (cpu-quick only: the others train for minutes).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import torch

    from tinygpt import config as C
    from tinygpt.data import find_corpus
    from tinygpt.sizing import seconds_per_step
    from tinygpt.studio.app import PROBE_TOKENS
    from tinygpt.studio.texts import describe

    data = find_corpus(None).read_bytes()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores\n")
    print("| text | characters | decode UTF-8 | describe |")
    print("|---|---:|---:|---:|")
    for name, raw in (("Tiny Shakespeare", data), ("5 x Tiny Shakespeare", data * 5)):
        decode = best_of(lambda raw=raw: raw.decode("utf-8"))
        text = raw.decode("utf-8")
        took = best_of(lambda text=text: describe(text))
        print(f"| {name} | {len(text):,} | {decode * 1000:.1f} ms | {took * 1000:.0f} ms |")

    threads = max(1, (os.cpu_count() or 2) - 1)  # the studio's job threads
    torch.set_num_threads(threads)
    print(f"\nprobe on {threads} thread(s) (a studio job's), seconds per training step:\n")
    print("| preset | parameters | batch | probe (part, scaled) | probe (whole batch) | probe time (part) |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in ("cpu-quick", "cpu-10min", "gpu-fast"):
        values = {**C.load_preset(preset), "vocab_size": 65}
        model_cfg, cfg = C.build(C.ModelConfig, values), C.build(C.TrainConfig, values)
        part = max(1, min(cfg.batch_size, PROBE_TOKENS // model_cfg.block_size))
        probed = C.build(C.TrainConfig, {**C.to_dict(cfg), "batch_size": part})
        t0 = time.perf_counter()
        scaled = seconds_per_step(model_cfg, probed) * cfg.batch_size / part
        cost = time.perf_counter() - t0
        whole = seconds_per_step(model_cfg, cfg)
        from tinygpt.resources import param_count

        print(f"| {preset} | {param_count(model_cfg):,} | {cfg.batch_size} | {scaled:.3f} | {whole:.3f} | "
              f"{cost:.1f} s |")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-m", "tinygpt", "train", "--preset", "cpu-quick", "--out", str(out),
                        "--threads", str(threads), "--quiet", "--no-final-eval", "--sample-chars", "0"],
                       check=True, env=env, capture_output=True)
        last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        print(f"\ncpu-quick trained for real on {threads} thread(s): {last['train_seconds'] / last['step']:.3f} s "
              f"a step over {last['step']} steps")


if __name__ == "__main__":
    main()
