"""Time to loss: run a training command several times, report the median wall time from the
command's start until the whole-val-split loss is printed, and that loss.

    python benchmarks/time_to_loss.py --runs 3 -- tinygpt train --preset cpu-quick
    python benchmarks/time_to_loss.py --runs 3 -- python bigram.py

Each run gets its own fresh --out directory (appended to the command). Prints a markdown row per
command and writes the raw figures as JSON.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINAL = re.compile(r"val loss over the whole val split: ([0-9.]+) nats/token")


def one_run(cmd: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ttl-")) / "run"
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    loss, t_loss = None, None
    for line in proc.stdout:
        m = FINAL.search(line)
        if m and loss is None:
            loss, t_loss = float(m.group(1)), time.perf_counter() - t0
    proc.wait()
    total = time.perf_counter() - t0
    if proc.returncode != 0 or loss is None:
        raise SystemExit(f"command failed (exit {proc.returncode}) or printed no final val loss: {' '.join(cmd)}")
    return {"val_loss": loss, "seconds_to_loss": t_loss, "seconds_total": total}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="repeats; the median is reported (default: 3)")
    p.add_argument("--json", default="time_to_loss.json", help="where to write the raw figures")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the training command, after --")
    args = p.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the training command after --")
    runs = [one_run(cmd) for _ in range(args.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("| command | runs | val loss (whole split) | s to that loss | s in all |")
    print("|---|---:|---:|---:|---:|")
    print(f"| `{' '.join(cmd)}` | {len(runs)} | {med['val_loss']:.4f} | {med['seconds_to_loss']:.1f} "
          f"| {med['seconds_total']:.1f} |")
    Path(args.json).write_text(json.dumps({"command": cmd, "runs": runs, "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
