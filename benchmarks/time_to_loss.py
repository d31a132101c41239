"""Time to loss: run a training command several times, report the median wall time from the
command's start until its whole-val-split loss is known, and that loss (read from the run's
metrics.jsonl, the final record, which also gives the seconds since the run started).

    python benchmarks/time_to_loss.py --runs 3 -- tinygpt train --preset cpu-quick
    python benchmarks/time_to_loss.py --runs 3 -- python bigram.py

Each run gets its own fresh --out directory (appended to the command). Prints a markdown row per
command and writes the raw figures as JSON.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(cmd: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ttl-")) / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    total = time.perf_counter() - t0
    finals = []
    if (out / "metrics.jsonl").is_file():
        finals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "final_val_loss" in r]
    if proc.returncode != 0 or not finals:
        raise SystemExit(f"command failed (exit {proc.returncode}) or wrote no final val loss: {' '.join(cmd)}\n"
                         + proc.stderr[-2000:])
    # since_start: seconds from the process's start (before torch is imported) to the final loss
    return {"val_loss": finals[-1]["final_val_loss"], "best_step": finals[-1].get("best_step"),
            "seconds_to_loss": finals[-1]["since_start"], "seconds_total": total}


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
    med = {k: statistics.median(r[k] for r in runs) for k in ("val_loss", "seconds_to_loss", "seconds_total")}
    print("| command | runs | val loss (whole split) | s to that loss | s in all |")
    print("|---|---:|---:|---:|---:|")
    print(f"| `{' '.join(cmd)}` | {len(runs)} | {med['val_loss']:.4f} | {med['seconds_to_loss']:.1f} "
          f"| {med['seconds_total']:.1f} |")
    Path(args.json).write_text(json.dumps({"command": cmd, "runs": runs, "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
