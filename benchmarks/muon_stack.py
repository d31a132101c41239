"""Muon's Newton-Schulz iteration on a CPU: the matrices one by one beside the same-shape ones
stacked into one batched call (`optim.orthogonalize_all`, what Muon does), for the blocks'
matrices of `cpu-quick` and `cpu-10min`, in float32 and bfloat16, and how far the two results are
apart; and stacked with each fused query/key/value projection cut into its three square blocks
(`--muon-split-qkv`, what both presets do since 0.12).

    python benchmarks/muon_stack.py
"""

import argparse
import time

import torch

from tinygpt import config as C
from tinygpt.model import build_model
from tinygpt.optim import FUSED_QKV, orthogonalize, orthogonalize_all


def ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| preset | matrices | dtype | one by one | stacked | max difference | stacked, q/k/v apart |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for preset in ("cpu-quick", "cpu-10min"):
        model = build_model(C.build(C.ModelConfig, {**C.load_preset(preset), "vocab_size": 65}))
        torch.manual_seed(0)
        named = [(n, torch.randn_like(p)) for n, p in model.named_parameters()
                 if n.startswith("blocks.") and p.dim() == 2]
        gs = [g for _, g in named]
        apart = [m for n, g in named for m in (g.chunk(3) if n.endswith(FUSED_QKV) else [g])]
        for dtype in (torch.float32, torch.bfloat16):
            single = ms(lambda dtype=dtype, gs=gs: [orthogonalize(g, dtype) for g in gs])
            stacked = ms(lambda dtype=dtype, gs=gs: orthogonalize_all(gs, dtype))
            diff = max((a.float() - b.float()).abs().max().item()
                       for a, b in zip([orthogonalize(g, dtype) for g in gs], orthogonalize_all(gs, dtype)))
            split = ms(lambda dtype=dtype, apart=apart: orthogonalize_all(apart, dtype))
            print(f"| {preset} | {len(gs)} | {str(dtype).removeprefix('torch.')} | {single:.2f} ms | {stacked:.2f} ms "
                  f"| {diff:.1e} | {split:.2f} ms |")


if __name__ == "__main__":
    main()
