"""Data at scale: what encoding a corpus once and memory-mapping it costs, from 1 MB to 1 GB.

    OMP_NUM_THREADS=1 python benchmarks/data_scale.py                 # 1 MB, 100 MB and 1 GB
    OMP_NUM_THREADS=1 python benchmarks/data_scale.py --sizes 1,100   # sizes in MB

For each size it writes a corpus of shuffled Tiny Shakespeare lines (made now, in a temporary
directory, deleted at the end), then runs, each in its own process:

- `tinygpt prepare --data CORPUS`: wall time and peak RSS;
- `tinygpt train --data CORPUS` with a small GPT for one step, on the prepared corpus: the time
  from launch until the report after the first optimizer step is printed (torch's import, the
  corpus check and mapping, the step-0 report, the step; eval_iters = 1, so the reports cost
  milliseconds), and the process's peak RSS.

Peak RSS is the child's own (`os.wait4`). Prints a markdown table and writes the figures as JSON.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "16",
         "--max-iters", "1", "--eval-interval", "1", "--eval-iters", "1", "--dropout", "0", "--no-final-eval",
         "--sample-chars", "0", "--no-plot", "--quiet", "--device", "cpu", "--dtype", "float32"]


def make_corpus(path: Path, size: int, lines: list[str], seed: int = 0) -> None:
    """`size` bytes of Tiny Shakespeare's lines in random order (whole lines, cut at the end)."""
    rng = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        while written < size:
            rng.shuffle(lines)
            block = "".join(lines).encode("utf-8")[: size - written]
            f.write(block)
            written += len(block)


def child(cmd: list[str], env: dict, until: str | None = None) -> dict:
    """Run `cmd`; its wall seconds, peak RSS in MB and, with `until`, the seconds until the first
    stdout line starting with `until`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mark = None
    for line in proc.stdout:
        if until and mark is None and line.startswith(until):
            mark = time.perf_counter() - t0
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read()}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "until": mark}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,100,1000", help="corpus sizes in MB, comma-separated (default: 1,100,1000)")
    p.add_argument("--tmp", default=None, help="where to write the corpora (default: the system's temp directory)")
    p.add_argument("--json", default="data_scale.json", help="where to write the figures (default: data_scale.json)")
    args = p.parse_args()
    sizes = [int(float(s) * 1_000_000) for s in args.sizes.split(",")]

    from tinygpt.data import find_corpus, read_text

    lines = read_text(find_corpus()).splitlines(keepends=True)
    work = Path(tempfile.mkdtemp(prefix="data-scale-", dir=args.tmp))
    env = {**os.environ, "TINYGPT_CACHE_DIR": str(work / "encoded"), "OMP_NUM_THREADS": "1"}
    tinygpt = [sys.executable, "-m", "tinygpt"]
    rows = []
    try:
        for size in sizes:
            corpus = work / f"corpus-{size // 1_000_000}MB.txt"
            make_corpus(corpus, size, lines)
            prep = child([*tinygpt, "prepare", "--data", str(corpus)], env)
            run = child([*tinygpt, "train", "--data", str(corpus), "--out", str(work / f"run-{size}"), *TRAIN], env,
                        until="step 1:")
            rows.append({"mb": size / 1e6, "prepare_s": prep["seconds"], "prepare_rss_mb": prep["peak_rss_mb"],
                         "first_step_s": run["until"], "train_rss_mb": run["peak_rss_mb"]})
            r = rows[-1]
            print(f"{r['mb']:,.0f} MB: prepare {r['prepare_s']:.1f} s, {r['prepare_rss_mb']:.0f} MB peak; "
                  f"first step {r['first_step_s']:.2f} s, {r['train_rss_mb']:.0f} MB peak", flush=True)
            corpus.unlink()
            shutil.rmtree(work / "encoded")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| corpus | prepare | prepare peak RSS | time to first step (prepared) | train peak RSS |")
    print("|-------:|--------:|-----------------:|------------------------------:|---------------:|")
    for r in rows:
        print(f"| {r['mb']:,.0f} MB | {r['prepare_s']:.1f} s | {r['prepare_rss_mb']:,.0f} MB "
              f"| {r['first_step_s']:.2f} s | {r['train_rss_mb']:,.0f} MB |")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
