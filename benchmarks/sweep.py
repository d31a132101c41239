"""An ablation sweep: one training command, one change per row, each run once in turn (nothing
else should run), with its whole-val-split loss and the wall time from the command's start until
that loss is known. Prints a markdown table and writes the raw figures as JSON.

    python benchmarks/sweep.py --base "tinygpt train --preset cpu-quick" \\
        --row "preset=" --row "muon, 450 steps=--optimizer muon --max-iters 450"

A row is NAME=EXTRA FLAGS (appended to --base; later flags win). Every run gets a fresh --out,
`--quiet --sample-chars 0 --no-plot` (nothing printed is timed).
"""

import argparse
import json
import shlex
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
    args = p.parse_args()
    base = shlex.split(args.base)
    rows = []
    print("| change | val loss (whole split) | s to that loss |")
    print("|---|---:|---:|")
    for spec in args.row:
        name, _, extra = spec.partition("=")
        r = one_run([*base, *QUIET, *shlex.split(extra)])
        rows.append({"name": name, "flags": extra, **r})
        print(f"| {name} | {r['val_loss']:.4f} | {r['seconds_to_loss']:.1f} |", flush=True)
    Path(args.json).write_text(json.dumps({"base": base, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
