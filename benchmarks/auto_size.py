"""Does `--preset auto` pick well? Its whole-val loss beside a grid of hand-picked shapes and the
shipped recipes, every run under the same --max-time, on corpora of different kinds and sizes.

    python benchmarks/auto_size.py --make-corpora corpora/      # build the three corpora below
    python benchmarks/auto_size.py --corpus licenses=corpora/licenses --corpus code=corpora/code.jsonl \\
        --corpus shakespeare=PATH/input.txt --budget 120 --budget 600

The corpora it builds from what a Debian machine with Python has (named, so anyone can rebuild them):
- licenses: five of /usr/share/common-licenses (GPL-3, GPL-2, LGPL-2.1, MPL-2.0, Apache-2.0),
  a folder of five documents, about 110 KB of legal English prose;
- code: the running Python's standard library, its .py files in sorted path order until 20 MB,
  one file a record of a .jsonl (thousands of documents: the val split holds out whole files);
- shakespeare: Tiny Shakespeare (give its path), 1.1 MB, one text.

Rows, each one `tinygpt train` process under --max-time BUDGET, one after the other (time this
on a quiet machine):
- auto: `--preset auto`;
- grid SHAPE: each shape of auto's ladder with the settings auto's rule would give it (its
  dropout, steps and schedule), so the rows differ in the shape alone;
- cpu-quick, cpu-10min: the shipped presets; lecture: python gpt.py's defaults, but with
  --eval-iters 20 (its 200-batch loss reports took 8 minutes of a 15-second budget on a Xeon).
Prints a markdown table per corpus and budget, and writes every figure to --json.
"""

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

LICENSES = ("GPL-3", "GPL-2", "LGPL-2.1", "MPL-2.0", "Apache-2.0")
CODE_BYTES = 20_000_000


def make_corpora(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "licenses"
    folder.mkdir(exist_ok=True)
    for name in LICENSES:
        shutil.copy(Path("/usr/share/common-licenses") / name, folder / f"{name}.txt")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    size = 0
    with open(out / "code.jsonl", "w", encoding="utf-8") as f:
        for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).parts):
            if "site-packages" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            f.write(json.dumps({"path": str(path.relative_to(stdlib)), "text": text}) + "\n")
            size += len(text.encode())
            if size >= CODE_BYTES:
                break
    print(f"{folder}: {sum(p.stat().st_size for p in folder.iterdir()):,} bytes; {out / 'code.jsonl'}: "
          f"{size:,} bytes of Python from {stdlib}")


def grid_config(data: str, budget: float, shape_name: str, workdir: Path) -> Path:
    """A config file with the settings auto's rule gives `shape_name` on this text and budget."""
    from tinygpt import sizing as S

    flags = {"data": data}
    text = S.text_figures(flags)
    shape = next(s for s in S.LADDER if s.name == shape_name)
    tps = {s.name: S.probe(s, text.vocab_size, flags) for s in S.LADDER if s.name == shape_name}
    plan = S.plan(text, tps, budget, force=shape_name)
    settings = {**plan.settings, "max_iters": S.max_iters(plan, text)}
    path = workdir / f"grid-{shape.name}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()), encoding="utf-8")
    return path


def run(name: str, args: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tinygpt", "train", *args, "--out", str(out), "--overwrite",
                        "--no-plot", "--sample-chars", "0", "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        return {"row": name, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}
    meta = json.loads((out / "run.json").read_text())
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "final_val_loss" in line]
    m = meta["model"]
    plan = next((line for line in r.stderr.splitlines() if line.startswith("--preset auto:")), None)
    return {"row": name, "shape": f"{m['n_layer']}x{m['n_head']}x{m['n_embd']} b{m['block_size']}",
            "val_loss": final[-1]["final_val_loss"] if final else None, "steps": final[-1]["step"] if final else None,
            "seconds": seconds, "dropout": m["dropout"], "plan": plan}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-corpora", metavar="DIR", help="build the licenses and code corpora in DIR, then exit")
    p.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH", help="a corpus (repeat)")
    p.add_argument("--budget", action="append", type=float, default=[], help="--max-time of every row, s (repeat)")
    p.add_argument("--rows", default="auto,grid,cpu-quick,cpu-10min,lecture",
                   help="which rows: auto, grid (or grid:SHAPE,SHAPE...), cpu-quick, cpu-10min, lecture")
    p.add_argument("--workdir", default="auto_size_runs", help="where the runs go (default: auto_size_runs)")
    p.add_argument("--json", default="auto_size.json", help="where the figures go (default: auto_size.json)")
    args = p.parse_args()
    if args.make_corpora:
        make_corpora(Path(args.make_corpora))
        return
    from tinygpt import sizing as S

    rows = args.rows.split(",")
    grid = [s.name for s in S.LADDER]
    for r in rows:
        if r.startswith("grid:"):
            grid = r[5:].split("+")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else []
    for corpus in args.corpus:
        name, _, data = corpus.partition("=")
        for budget in args.budget or [120.0]:
            table = []
            for row in rows:
                out = work / f"{name}-{budget:g}-{row.replace(':', '_')}"
                common = ["--data", data, "--max-time", f"{budget:g}"]
                if row == "auto":
                    table.append(run("auto", [*common, "--preset", "auto"], out))
                elif row.startswith("grid"):
                    for shape in grid:
                        config = grid_config(data, budget, shape, work)
                        table.append(run(f"grid {shape}", [*common, "--config", str(config)],
                                         work / f"{out.name}-{shape}"))
                elif row in ("cpu-quick", "cpu-10min"):
                    table.append(run(row, [*common, "--preset", row], out))
                elif row == "lecture":  # its 200-batch reports alone would take minutes: 20, as the presets
                    table.append(run("lecture", [*common, "--eval-iters", "20"], out))
                print(json.dumps(table[-1]), file=sys.stderr, flush=True)
            results.append({"corpus": name, "data": data, "budget": budget, "rows": table})
            Path(args.json).write_text(json.dumps(results, indent=1))
            print_table(name, budget, table)


def print_table(name: str, budget: float, table: list[dict]) -> None:
    grid = [r["val_loss"] for r in table if r["row"].startswith("grid") and r.get("val_loss") is not None]
    best = min(grid) if grid else None
    print(f"\n{name}, --max-time {budget:g}\n")
    print("| row | shape | val loss (whole split) | vs best grid | steps | dropout | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in table:
        if "error" in r:
            print(f"| {r['row']} | error: {r['error']} | | | | | |")
            continue
        loss = r["val_loss"]
        delta = f"{loss - best:+.3f}" if best is not None and loss is not None else ""
        print(f"| {r['row']} | {r['shape']} | {loss:.4f} | {delta} | {r['steps']} | {r['dropout']:g} | "
              f"{r['seconds']:.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
