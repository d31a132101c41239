"""The README's headline table, re-measured on this machine in one run, anchors beside it.

    python benchmarks/report.py                  # every row: about 15-20 minutes on 2 CPU cores
    python benchmarks/report.py --skip cpu-10min # the rest: about 5 minutes
    python benchmarks/report.py --smoke          # tiny settings: checks the plumbing in seconds

Rows, each timed from the command's start until its loss over the whole val split is known
(Python and torch start-up included; `benchmarks/time_to_loss.py` does the timing):
- bigram:      `python bigram.py` (the lecture's settings)
- cpu-quick:   `tinygpt train --preset cpu-quick`, beside nanoGPT's CPU recipe (its README's
               flags, `--eval_iters=200 --eval_interval=2000`), whose checkpoint is then scored
               on the same whole-val windows tinygpt uses
- cpu-10min:   `tinygpt train --preset cpu-10min`
- lecture:     the lecture's GPT (6x6x384, block 256, batch 64): seconds per training step of
               `python gpt.py` beside the lecture's own gpt.py (5000 steps take hours on a CPU,
               so the full run is estimated from the step time, not run)

The anchors (nanoGPT, the lecture's scripts) run from scratch copies of `--anchors` (default
`../shared/anchors` beside the repository) when it is there; their rows are skipped otherwise.
The lecture's gpt.py is copied with only its run length changed (max_iters, eval_iters,
max_new_tokens), so its step is its own. Prints a markdown table and the machine it ran on,
and writes the figures as JSON (`--json`).
"""

import argparse
import contextlib
import json
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_loss import one_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = ("bigram", "cpu-quick", "nanogpt", "cpu-10min", "lecture", "lecture-anchor")
NANOGPT_CPU = ["--device=cpu", "--compile=False", "--eval_iters=200", "--eval_interval=2000", "--log_interval=1",
               "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
               "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
# What --smoke shrinks: every row runs a few steps of a tiny model (numbers meaningless).
SMOKE_TINYGPT = ["--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1"]
SMOKE_NANOGPT = ["--eval_iters=2", "--eval_interval=4", "--max_iters=4", "--lr_decay_iters=4", "--n_layer=1",
                 "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=4"]
SMOKE_LECTURE = {"n_embd": 32, "n_head": 2, "n_layer": 1, "block_size": 16, "batch_size": 4}


def tinygpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinygpt", *args]


def machine() -> dict:
    """What the figures were measured on: CPU model, cores, bf16 units, torch."""
    import torch

    from tinygpt.runtime import cpu_bf16_speedup, native_bf16

    model = platform.processor() or platform.machine()
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "native_bf16": native_bf16(torch.device("cpu")),
            "bf16_matmul_speedup": round(cpu_bf16_speedup(), 2), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def corpus_path() -> Path:
    from tinygpt.data import find_corpus

    return find_corpus().resolve()


# --- nanoGPT's CPU recipe ---------------------------------------------------------------------------


def nanogpt(anchors: Path, corpus: Path, smoke: bool) -> dict:
    """nanoGPT's CPU recipe from a scratch copy, its data prepared as its prepare.py does (sorted
    characters, uint16 ids, first 90% / last 10%); then its checkpoint scored on the whole val split."""
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="report-nanogpt-"))
    for name in ("model.py", "train.py", "configurator.py", "config"):
        src = anchors / "nanoGPT" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    n = int(len(ids) * 0.9)
    ids[:n].tofile(data / "train.bin")
    ids[n:].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    flags = NANOGPT_CPU + (SMOKE_NANOGPT if smoke else [])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", *flags], cwd=work,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    estimates = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", proc.stdout)
    return {"val_loss": _score_nanogpt(work, ids[n:]), "seconds_total": seconds,
            "val_estimate": float(estimates[-1][2]), "flags": flags}


def _score_nanogpt(work: Path, val_ids) -> float:
    """nanoGPT's saved model on consecutive non-overlapping windows of its block size over the
    val split: the windows `tinygpt eval` scores, each token predicted once."""
    import torch

    from tinygpt.data import windows

    sys.path.insert(0, str(work))
    try:
        from model import GPT, GPTConfig
    finally:
        sys.path.remove(str(work))
    ckpt = torch.load(work / "out-shakespeare-char" / "ckpt.pt", map_location="cpu", weights_only=False)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count: stdout is the table
        model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in windows(torch.from_numpy(val_ids.astype("int64")), model.config.block_size, 64):
            _, loss = model(x.contiguous(), y.contiguous())
            total, count = total + loss.item() * y.numel(), count + y.numel()
    return total / count


# --- the lecture's GPT: seconds per step ----------------------------------------------------------


def lecture_step_tinygpt(smoke: bool) -> float:
    """Seconds per training step of `python gpt.py` (its training clock: steps only)."""
    out = Path(tempfile.mkdtemp(prefix="report-lecture-")) / "run"
    steps = 2 if smoke else 4
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in SMOKE_LECTURE.items()] if smoke else []
    subprocess.run([sys.executable, str(REPO / "gpt.py"), "--max-iters", str(steps), "--eval-interval",
                    str(steps), "--eval-iters", "1", "--no-final-eval", "--sample-chars", "0", "--no-plot",
                    "--quiet", "--out", str(out), *extra], check=True, stdout=subprocess.DEVNULL)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return last["train_seconds"] / steps


def lecture_step_anchor(anchors: Path, corpus: Path, smoke: bool) -> float:
    """Seconds per step of the lecture's gpt.py: two runs of different length, the difference
    of their wall times over the difference of their steps (start-up and evaluation cancel)."""
    source = (anchors / "ngvl" / "gpt.py").read_text()
    changes = {"max_iters": None, "eval_iters": 1, "eval_interval": 10**9, **(SMOKE_LECTURE if smoke else {})}
    walls = {}
    for steps in (1, 3) if smoke else (1, 4):
        work = Path(tempfile.mkdtemp(prefix="report-ngvl-"))
        shutil.copy(corpus, work / "input.txt")
        patched = source.replace("max_new_tokens=500", "max_new_tokens=1")
        for name, value in {**changes, "max_iters": steps}.items():
            patched, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", patched, count=1, flags=re.M)
            if n != 1:
                raise SystemExit(f"the lecture's gpt.py has no line '{name} = ...' to set the run length")
        (work / "gpt.py").write_text(patched)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "gpt.py"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        walls[steps] = time.perf_counter() - t0
    (a, ta), (b, tb) = sorted(walls.items())
    return (tb - ta) / (b - a)


# --- the table ------------------------------------------------------------------------------------------


def _time(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def table(r: dict) -> str:
    m = r["machine"]
    bf16 = (f"bf16 units (a bf16 matmul {m['bf16_matmul_speedup']:.1f}x float32's)" if m["native_bf16"]
            else "no bf16 units (float32)")
    lines = [f"Measured by `python benchmarks/report.py` on {m['cpu']}, {m['cores']} cores, {bf16}, "
             f"torch {m['torch']}" + (" (--smoke: tiny settings, not real figures)" if r["smoke"] else "") + ":",
             "", "| model | command | val loss (whole split) | time to that loss | beside it, in the same run |",
             "|---|---|---:|---:|---|"]
    def row(model: str, command: str, result: dict, ref: str = "") -> str:
        return (f"| {model} | `{command}` | {result['val_loss']:.3f} | {_time(result['seconds_to_loss'])} "
                f"| {ref} |")

    if "bigram" in r:
        lines.append(row("Bigram", "python bigram.py", r["bigram"], "lecture: 2.49; count-based optimum 2.482"))
    if "cpu-quick" in r:
        q, ref = r["cpu-quick"], ""
        if "nanogpt" in r:
            n = r["nanogpt"]
            ref = (f"nanoGPT's CPU recipe: {n['val_loss']:.3f} in {_time(n['seconds_total'])} "
                   f"(**{n['seconds_total'] / q['seconds_to_loss']:.1f}x** the time)")
        lines.append(row("GPT 2x128", "tinygpt train --preset cpu-quick", q, ref))
    if "cpu-10min" in r:
        lines.append(row("GPT 4x256", "tinygpt train --preset cpu-10min", r["cpu-10min"]))
    if "lecture" in r:
        s = r["lecture"]
        ref = "lecture: 1.48 (on a GPU)"
        if "lecture-anchor" in r:
            a = r["lecture-anchor"]
            ref = f"the lecture's gpt.py: {a:.2f} s/step (**{a / s:.2f}x** tinygpt's step time); " + ref
        lines.append(f"| GPT 6x6x384 (the lecture's) | `python gpt.py` | not run: 5000 steps x {s:.2f} s = "
                     f"{5000 * s / 3600:.1f} h | | {ref} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", default="", help=f"rows to leave out, comma-separated: {', '.join(ROWS)}")
    p.add_argument("--anchors", default=str(REPO.parent / "shared" / "anchors"),
                   help="folder with nanoGPT/ and ngvl/ (default: ../shared/anchors beside the repository)")
    p.add_argument("--smoke", action="store_true", help="tiny settings everywhere: checks that every row runs")
    p.add_argument("--json", default="report.json", help="where to write the figures (default: report.json)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(ROWS):
        p.error(f"unknown row(s) {', '.join(sorted(skip - set(ROWS)))}; the rows are {', '.join(ROWS)}")
    anchors = Path(args.anchors)
    if not (anchors / "nanoGPT").is_dir() or not (anchors / "ngvl").is_dir():
        print(f"no anchors in {anchors}: their rows are skipped (--anchors DIR)", file=sys.stderr)
        skip |= {"nanogpt", "lecture-anchor"}
    smoke = SMOKE_TINYGPT if args.smoke else []
    corpus = corpus_path()
    r = {"machine": machine(), "smoke": args.smoke, "corpus": str(corpus)}
    steps = {
        "bigram": lambda: one_run([sys.executable, str(REPO / "bigram.py"), *smoke]),
        "cpu-quick": lambda: one_run(tinygpt("train", "--preset", "cpu-quick", *smoke)),
        "nanogpt": lambda: nanogpt(anchors, corpus, args.smoke),
        "cpu-10min": lambda: one_run(tinygpt("train", "--preset", "cpu-10min", *smoke)),
        "lecture": lambda: lecture_step_tinygpt(args.smoke),
        "lecture-anchor": lambda: lecture_step_anchor(anchors, corpus, args.smoke),
    }
    for name in ROWS:  # one after the other: two at once on 2 cores would time each other
        if name not in skip:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            r[name] = steps[name]()
    print(table(r))
    Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
