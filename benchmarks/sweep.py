"""An ablation sweep: one training command, one change per row, each run once in turn (nothing
else should run), with its whole-val-split loss and the wall time from the command's start until
that loss is known. Prints a markdown table and writes the raw figures as JSON.

    python benchmarks/sweep.py --base "tinygpt train --preset cpu-quick" \\
        --row "preset=" --row "muon, 450 steps=--optimizer muon --max-iters 450"

A row is NAME=EXTRA FLAGS (appended to --base; later flags win). Every run gets a fresh --out,
`--quiet --sample-chars 0 --no-plot` (nothing printed is timed). With `--seeds 1337,1,2` each row
runs once per seed (`--seed S`), and the table gives the mean loss with its lowest and highest:
on a small model one seed's noise is often larger than a trick's gain.
"""

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from time_to_loss import one_run  # noqa: E402

QUIET = ["--quiet", "--sample-chars", "0", "--no-plot"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the training command every row starts from")
    p.add_argument("--row", action="append", required=True, help="NAME=EXTRA FLAGS; repeat for each row")
    p.add_argument("--json", default="sweep.json", help="where to write the raw figures (default: sweep.json)")
    p.add_argument("--seeds", default=None, metavar="LIST", help="run each row once per seed, e.g. 1337,1,2 "
                   "(default: once, the command's own seed)")
    args = p.parse_args()
    base = shlex.split(args.base)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    rows = []
    print("| change | val loss (whole split) | lowest - highest | s to that loss |")
    print("|---|---:|---:|---:|")
    for spec in args.row:
        name, _, extra = spec.partition("=")
        runs = [one_run([*base, *QUIET, *shlex.split(extra), *([] if seed is None else ["--seed", str(seed)])])
                for seed in seeds]
        losses = [r["val_loss"] for r in runs]
        seconds = statistics.mean(r["seconds_to_loss"] for r in runs)
        rows.append({"name": name, "flags": extra, "seeds": seeds, "runs": runs})
        print(f"| {name} | {statistics.mean(losses):.4f} | {min(losses):.4f} - {max(losses):.4f} | {seconds:.1f} |",
              flush=True)
    Path(args.json).write_text(json.dumps({"base": base, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
