"""The CPU training step, three ways, in one run: as 0.9 computed it (autograd's composite
squared ReLU, rotary embedding and QK-norm; glibc's default malloc), with the hand-written
gradients of `kernels.py` (the same numbers, fewer passes), and with `keep_freed_memory`
too (what `tinygpt train` does now). Each is a real `tinygpt train --preset P` run, its
steady-state tokens per second read from its reports; rounds interleave the variants and the
median is printed.

    python benchmarks/cpu_step.py                      # cpu-quick and cpu-10min, 3 rounds
    python benchmarks/cpu_step.py --presets cpu-quick --rounds 5

Nothing else should run meanwhile.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Run inside each child: put autograd's composites back where asked, then train as the CLI does.
CHILD = """
import sys
import torch.nn.functional as F
import tinygpt.model as M
from tinygpt.kernels import swap_halves

def composite_norm_rotate(x, cos, sin):
    n = F.rms_norm(x, (x.shape[-1],))
    return n * cos.to(n.dtype) + swap_halves(n) * sin.to(n.dtype)

if sys.argv[1] == "composite":
    M.relu2 = lambda x: F.relu(x).square()
    M.rotate = lambda x, cos, sin: x * cos + swap_halves(x) * sin
    M.norm_rotate = composite_norm_rotate
from tinygpt.cli import main
sys.exit(main(sys.argv[2:]))
"""

VARIANTS = {  # name: (ops, TINYGPT_KEEP_FREED_MEMORY)
    "0.9: composite ops, default malloc": ("composite", "0"),
    "hand-written gradients": ("hand-written", "0"),
    "hand-written + keep_freed_memory (now)": ("hand-written", "1"),
}
STEPS = {"cpu-quick": 120, "cpu-10min": 40}


def tokens_per_sec(preset: str, ops: str, keep: str) -> float:
    steps = STEPS[preset]
    out = Path(tempfile.mkdtemp(prefix="cpu-step-")) / "run"
    cmd = [sys.executable, "-c", CHILD, ops, "train", "--preset", preset, "--max-iters", str(steps), "--max-time", "0",
           "--eval-interval", str(steps // 4), "--eval-iters", "1", "--no-final-eval", "--sample-chars", "0",
           "--no-plot", "--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TINYGPT_KEEP_FREED_MEMORY": keep})
    rates = [r["tokens_per_sec"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r.get("tokens_per_sec")]
    return statistics.median(rates[1:])  # the first interval pays the one-off costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="cpu-quick,cpu-10min")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print("| preset | step | tokens/s (median) | ms a step | vs 0.9 |")
    print("|---|---|---:|---:|---:|")
    for preset in args.presets.split(","):
        rates = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, (ops, keep) in VARIANTS.items():
                rates[name].append(tokens_per_sec(preset, ops, keep))
        base = statistics.median(rates[next(iter(VARIANTS))])
        from tinygpt import config as C
        cfg = C.load_preset(preset)
        tokens = cfg["batch_size"] * cfg["block_size"]
        for name, r in rates.items():
            m = statistics.median(r)
            print(f"| {preset} | {name} | {m:,.0f} | {tokens / m * 1000:.1f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
