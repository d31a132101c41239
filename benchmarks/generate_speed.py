"""Long generation, where users feel it: N new characters (default 500) from the lecture's model
(6 layers x 6 heads x 384, block 256, 65 characters) starting from one token, so most of them
come past the block. tinygpt's modes beside the lecture's own `generate` (its gpt.py, the model
class and `generate` unmodified, built without training), one after the other in this process.

    python benchmarks/generate_speed.py             # 500 characters
    python benchmarks/generate_speed.py --smoke     # a tiny model and 40 characters: checks it runs

Rows: the lecture's generate; tinygpt's exact mode (`--window full`) in float32, the lecture's
text; exact mode with its refills in bf16 where this CPU's bf16 matmul is faster (what
`--dtype auto` does); and the chunked window (`--window chunked`) in each. Weights are random:
speed does not depend on them. The FLOP bound of exact mode: each token past the block is one
forward over the whole block, 2 x (12 L C^2 + C V) x T + 4 L C T^2 FLOPs (~5.5 GFLOP at T 256),
at the machine's measured matmul rate. Prints a markdown table; `--json` writes the figures.
"""

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import REPO, corpus_path, machine  # noqa: E402

LECTURE = dict(block_size=256, n_layer=6, n_head=6, n_embd=384)
SMOKE = dict(block_size=16, n_layer=1, n_head=2, n_embd=32)


def lecture_model(anchors: Path, shape: dict):
    """The lecture's GPTLanguageModel from its gpt.py: the script up to its training loop, with
    only the sizes set (and the corpus read from a temporary copy's directory)."""
    import os
    import re

    source = (anchors / "ngvl" / "gpt.py").read_text()
    head = source[: source.index("model = GPTLanguageModel()")]
    for name, value in {**shape, "dropout": 0.0}.items():
        head, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", head, count=1, flags=re.M)
        if n != 1:
            raise SystemExit(f"the lecture's gpt.py has no line '{name} = ...'")
    work = Path(tempfile.mkdtemp(prefix="gen-ngvl-"))
    (work / "input.txt").symlink_to(corpus_path())
    cwd = os.getcwd()
    os.chdir(work)
    try:
        ns: dict = {"__name__": "lecture"}
        exec(compile(head, str(anchors / "ngvl" / "gpt.py"), "exec"), ns)
    finally:
        os.chdir(cwd)
    return ns["GPTLanguageModel"]().eval(), ns["vocab_size"]


def matmul_rate(dtype: torch.dtype, n: int = 1024) -> float:
    """GFLOP/s of an n x n matmul in `dtype` on this CPU (best of 5)."""
    a = torch.randn(n, n).to(dtype)
    a @ a
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def refill_flops(cfg) -> float:
    L, C, V, T = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size
    return 2 * (12 * L * C * C + C * V) * T + 4 * L * C * T * T


@torch.inference_mode()
def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=500, help="new characters per run (default: 500)")
    p.add_argument("--anchors", default=str(REPO.parent / "shared" / "anchors"),
                   help="directory holding the lecture's ngvl/gpt.py")
    p.add_argument("--smoke", action="store_true", help="a tiny model and 40 characters: checks that it runs")
    p.add_argument("--json", default="generate_speed.json", help="where to write the figures")
    args = p.parse_args()
    from tinygpt.config import ModelConfig
    from tinygpt.model import GPTLanguageModel
    from tinygpt.runtime import cpu_bf16_speedup
    from tinygpt.sampling import generate_stream

    shape = SMOKE if args.smoke else LECTURE
    n = 40 if args.smoke else args.tokens
    torch.manual_seed(0)
    lecture, vocab = lecture_model(Path(args.anchors), shape)
    cfg = ModelConfig(vocab_size=vocab, dropout=0.0, **shape)
    ours = GPTLanguageModel(cfg).eval()
    ours.set_attention("manual")
    start = torch.zeros((1, 1), dtype=torch.long)
    bf16 = cpu_bf16_speedup() > 1.5
    modes = [("full", None), *([("full", torch.bfloat16)] if bf16 else []), ("chunked", None),
             *([("chunked", torch.bfloat16)] if bf16 else [])]

    def run_ours(window, dtype):
        gen = torch.Generator().manual_seed(0)
        for _ in generate_stream(ours, start, n, generator=gen, window=window, prefill_dtype=dtype):
            pass

    run_ours("full", None)  # warm-up: first-call costs are not generation's
    lecture.generate(start, 2)
    seconds = {"lecture": timed(lambda: lecture.generate(start, n))}
    for window, dtype in modes:
        seconds[(window, dtype)] = timed(functools.partial(run_ours, window, dtype))
    past = max(0, n - cfg.block_size + 1)  # tokens whose context is a full window
    rates = {"float32": matmul_rate(torch.float32), **({"bfloat16": matmul_rate(torch.bfloat16)} if bf16 else {})}

    print(f"{n} new characters from one token, {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd} block {cfg.block_size}; "
          f"matmul peak here: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
    print("| generator | window | refills in | chars/s | vs the lecture's | exact mode's refills: GFLOP/s "
          "(of the matmul peak) |")
    print("|---|---|---|---:|---:|---|")
    base = seconds["lecture"]
    print(f"| the lecture's `generate` | full | float32 | {n / base:.1f} | 1.00x | |")
    rows = []
    for window, dtype in modes:
        s = seconds[(window, dtype)]
        name = "bfloat16" if dtype else "float32"
        bound = ""
        if window == "full" and past:
            achieved = past * refill_flops(cfg) / s / 1e9  # a lower bound: the cached steps are counted as free
            bound = f"{achieved:.0f} ({achieved / rates[name]:.0%})"
        print(f"| tinygpt | {window} | {name} | {n / s:.1f} | {base / s:.2f}x | {bound} |")
        rows.append({"window": window, "refill_dtype": name, "seconds": s, "chars_per_s": n / s,
                     "speedup": base / s})
    Path(args.json).write_text(json.dumps({"machine": machine(), "tokens": n, "model": shape,
                                           "lecture_seconds": base, "rows": rows, "matmul_gflops": rates}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
