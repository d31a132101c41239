"""What the chunked window costs in loss: a trained run scored on the val split with the contexts
each `--window` rule gives a generated token, side by side.

    python benchmarks/window_loss.py --ckpt runs/quick            # every 7th val token
    python benchmarks/window_loss.py --ckpt runs/quick --every 1  # all of them (slower)

- full: every token is predicted from the block_size tokens before it (the lecture's sampler
  past the block, and `--window full`);
- chunked: from block/2 .. block tokens, cycling as `--window chunked` does once it is past the
  first block: after a refill the context holds the last block/2 tokens and grows by one per
  token up to the block, then is cut back.

Both score the same tokens (every `--every`-th of the val split, from position block_size on).
Also printed: the whole-split figure `tinygpt eval` and training report (non-overlapping
windows, so contexts of 1..block tokens, ~block/2 on average). Char-level runs.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.inference_mode()
def mean_loss(model, val: torch.Tensor, targets: list[int], length_of, batch: int = 64) -> float:
    """Mean negative log-likelihood of val[t] for t in `targets`, each predicted from the
    `length_of(t)` tokens before it; equal lengths go through the model together."""
    by_length: dict[int, list[int]] = {}
    for t in targets:
        by_length.setdefault(length_of(t), []).append(t)
    total = 0.0
    for length, ts in by_length.items():
        for i in range(0, len(ts), batch):
            chunk = torch.tensor(ts[i : i + batch])
            idx = chunk[:, None] - length + torch.arange(length)[None, :]  # (n, length) positions
            logits = model(val[idx])[0][:, -1].float()
            total += F.cross_entropy(logits, val[chunk], reduction="sum").item()
    return total / len(targets)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the run directory")
    p.add_argument("--which", default="best", choices=("best", "latest"))
    p.add_argument("--every", type=int, default=7, help="score every N-th val token (default: 7)")
    p.add_argument("--json", default="window_loss.json", help="where to write the figures")
    args = p.parse_args()
    from tinygpt.checkpoint import load_run, read_run_meta
    from tinygpt.engine import chunk_keep
    from tinygpt.evaluate import evaluate_split

    model, tokenizer = load_run(args.ckpt, args.which)
    meta = read_run_meta(Path(args.ckpt))
    text = Path(meta["data_path"]).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    val = ids[int(0.9 * len(ids)) :]  # the char tokenizer: the last 10% of the characters
    block = model.config.block_size
    keep = chunk_keep(block)
    cycle = block - keep + 1  # contexts keep, keep + 1, ..., block, then back to keep
    targets = list(range(block, len(val), args.every))
    full = mean_loss(model, val, targets, lambda t: block)
    chunked = mean_loss(model, val, targets, lambda t: keep + (t - block) % cycle)
    whole = evaluate_split(model, val, block, torch.device("cpu"), torch.float32)["loss"]
    print(f"{args.ckpt}: block {block}, {len(targets):,} val tokens scored (every {args.every})")
    print("| contexts | val loss (nats/token) |")
    print("|---|---:|")
    print(f"| full: {block} tokens (`--window full`) | {full:.4f} |")
    print(f"| chunked: {keep}..{block} tokens (`--window chunked`) | {chunked:.4f} ({chunked - full:+.4f}) |")
    print(f"| whole split, non-overlapping windows (1..{block}; the training figure) | {whole:.4f} |")
    Path(args.json).write_text(json.dumps({"ckpt": str(args.ckpt), "block_size": block, "scored": len(targets),
                                           "full": full, "chunked": chunked, "whole_split": whole,
                                           "bits_per_char_full": full / math.log(2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
