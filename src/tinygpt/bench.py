"""`tinygpt bench`: the fast paths side by side with the plain path, in one run.

For a named model config it measures, on the chosen device:
- the peak matmul rate of this machine in float32 and in bfloat16 (the yardstick for MFU);
- training: ms per iteration, tokens/s and model FLOPs utilisation, for the plain path (float32,
  the lecture's per-head reference attention, no compile) and the fast path (auto dtype, auto
  attention kernel, optionally compiled), with the speed-up ratio;
- sampling: characters/s without and with the KV cache, same seed, and whether both produced the
  identical text.
It prints a markdown table and writes the figures as JSON.
"""

import json
import platform
import statistics
import time

import torch

from tinygpt import config as C
from tinygpt import runtime
from tinygpt.checkpoint import atomic_write_text
from tinygpt.errors import UserError
from tinygpt.model import GPTLanguageModel
from tinygpt.optim import make_optimizer
from tinygpt.resources import disk_guard, memory_guard, what_failed
from tinygpt.runtime import (
    DTYPES,
    autocast,
    choose_dtype,
    grad_scaler,
    inference_dtype,
    resolve_attention,
    resolve_device,
)


def bench_settings(name: str, vocab_size: int | None = None) -> tuple[C.ModelConfig, int]:
    """The model and batch size to measure: "lecture" is `python gpt.py`'s defaults."""
    if name == "lecture":
        values = {}
    elif name.endswith(".toml"):
        values = C.load_config_file(name)
    else:
        values = C.load_preset(name)
    model_cfg = C.build(C.ModelConfig, {**values, "vocab_size": vocab_size or shakespeare_vocab_size()})
    return model_cfg, values.get("batch_size", C.TrainConfig.batch_size)


def shakespeare_vocab_size() -> int:
    """The character vocabulary of Tiny Shakespeare (found or downloaded as `train` would)."""
    from tinygpt.data import find_corpus, read_text

    return len(set(read_text(find_corpus())))


def peak_matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, budget_s: float = 2.0,
                      trials: int = 5) -> float:
    """The best of `trials` timings of square matmuls: a peak, so noise only lowers it.

    The whole probe is capped at about `budget_s` seconds: the first matmul is timed and the
    repetitions (and, on a slow machine, the size) are cut to fit, so a dtype the hardware only
    emulates can never stall the bench for minutes.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    _sync(device)
    t0 = time.perf_counter()
    a @ b
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-9)
    while one > budget_s / 4 and n > 256:  # far too slow at this size: measure a smaller one
        n //= 2
        a, b = a[:n, :n].contiguous(), b[:n, :n].contiguous()
        one /= 8
    reps = max(1, min(5, int(budget_s / trials / one)))
    best = 0.0
    for _ in range(trials):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def peak_dtypes(device: torch.device) -> list[torch.dtype]:
    """float32, plus bfloat16 where the hardware has native bf16 units (emulated bf16 is slow and
    no path of tinygpt uses it)."""
    return [torch.float32, torch.bfloat16] if runtime.native_bf16(device) else [torch.float32]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(model_cfg: C.ModelConfig, batch: int, device, dtype, kernel: str, compile_: bool,
                  iters: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = GPTLanguageModel(model_cfg).to(device)
    model.set_attention(kernel)
    model.train()
    optimizer = make_optimizer(model, C.TrainConfig())
    runner = torch.compile(model) if compile_ else model
    x = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.block_size), device=device)
    y = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.block_size), device=device)

    scaler = grad_scaler(dtype, device)  # float16 trains with its loss scaler, as `train` does

    def step():
        with autocast(device, dtype):
            _, loss = runner(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warm-up (and compilation)
    step()
    _sync(device)
    warmup = time.perf_counter() - t0
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        samples.append((time.perf_counter() - t0) / iters)
    sec = statistics.median(samples)
    tokens = batch * model_cfg.block_size
    return {"ms_per_iter": sec * 1000, "tokens_per_sec": tokens / sec,
            "flops_per_iter": model.flops_per_token() * tokens, "warmup_s": warmup}


@torch.no_grad()
def time_sampling(model_cfg: C.ModelConfig, device, dtype, kernel: str, n_tokens: int, batch: int) -> dict:
    """chars/s of sampling: batch 1 without and with the decode engine (and whether the texts are
    identical), and a batch of `batch` sequences through the engine."""
    torch.manual_seed(0)
    model = GPTLanguageModel(model_cfg).to(device).eval()
    model.set_attention(kernel)
    out, texts = {}, {}
    for name, rows, use_cache in (("no_cache", 1, False), ("cache", 1, True), ("cache_batch", batch, True)):
        prompt = torch.zeros((rows, 1), dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        with autocast(device, dtype):
            model.generate(prompt, 4, generator=gen, use_cache=use_cache)  # warm-up (and CUDA-graph capture)
            gen.manual_seed(1337)
            _sync(device)
            t0 = time.perf_counter()
            texts[name] = model.generate(prompt, n_tokens, generator=gen, use_cache=use_cache)
            _sync(device)
        out[name] = {"chars_per_sec": rows * n_tokens / (time.perf_counter() - t0), "batch": rows}
    return {**out, "identical": torch.equal(texts["cache"], texts["no_cache"])}


def run_bench(args) -> int:
    device = resolve_device(args.device)
    model_cfg, batch = bench_settings(args.preset, args.vocab_size)
    fast_dtype, why = choose_dtype("auto", device)
    fast_kernel = resolve_attention("auto", device)
    n_tokens = args.sample_tokens or model_cfg.block_size - 1
    peaks = {str(d).removeprefix("torch."): peak_matmul_flops(d, device) for d in peak_dtypes(device)}
    results = {"preset": args.preset, "device": str(device), "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": batch,
               "model": C.to_dict(model_cfg), "peak_flops": peaks, "train": {}, "sample": {},
               "auto_dtype": str(fast_dtype).removeprefix("torch."), "auto_dtype_reason": why}

    paths = []
    if not args.skip_plain:
        paths.append(("plain", torch.float32, "reference", False))
    paths.append(("fast", fast_dtype, fast_kernel, False))
    if args.compile:
        paths.append(("fast+compile", fast_dtype, fast_kernel, True))
    for name in filter(None, (args.dtypes or "").split(",")):  # the fast path in each dtype asked for
        if name not in DTYPES:
            raise UserError(f"--dtypes takes {', '.join(DTYPES)} (comma-separated), not {name!r}")
        paths.append((f"fast {name}", DTYPES[name], fast_kernel, False))
    for name, dtype, kernel, comp in paths:
        with memory_guard(f"out of memory on {device.type} timing the {name} training path (batch {batch} x "
                          f"block {model_cfg.block_size}); bench a smaller --preset or a settings file with a "
                          "smaller batch_size"):
            r = time_training(model_cfg, batch, device, dtype, kernel, comp, args.iters, args.repeats)
        r.update(dtype=str(dtype).removeprefix("torch."), attention=kernel, compile=comp)
        peak = peaks.get(r["dtype"])
        r["mfu"] = r["flops_per_iter"] / (r["ms_per_iter"] / 1000) / peak if peak else None
        results["train"][name] = r
    for name, dtype, kernel in [("plain", torch.float32, "manual"),
                                ("fast", inference_dtype("auto", device), fast_kernel)]:
        if name == "plain" and args.skip_plain:
            continue
        with memory_guard(f"out of memory on {device.type} timing {name} sampling (block {model_cfg.block_size}); "
                          "bench a smaller --preset"):
            results["sample"][name] = time_sampling(model_cfg, device, dtype, kernel, n_tokens,
                                                      args.sample_batch)

    print(format_table(results, n_tokens))
    with disk_guard(lambda e: f"{what_failed(e)}; the figures are printed above, the file was not written: "
                    "free some space or pass another --json"):
        atomic_write_text(args.json, json.dumps(results, indent=2))
    print(f"\nfigures written to {args.json}")
    return 0


def format_table(r: dict, n_tokens: int) -> str:
    peaks = r["peak_flops"]
    lines = [
        f"tinygpt bench — preset {r['preset']}, {r['device']} ({r['threads']} threads), torch {r['torch']}",
        f"--dtype auto: {r['auto_dtype']} ({r['auto_dtype_reason']})",
        "peak matmul: " + ", ".join(f"{d} {f / 1e9:,.0f} GFLOP/s" for d, f in peaks.items())
        + ("" if "bfloat16" in peaks else " (no native bf16 units: bf16 not measured)"),
        "",
        "| training path | dtype | attention | compile | ms/iter | tokens/s | MFU | speed-up |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    base = r["train"].get("plain")
    for name, t in r["train"].items():
        ratio = f"{base['ms_per_iter'] / t['ms_per_iter']:.2f}x" if base else "—"
        mfu = "—" if t["mfu"] is None else f"{t['mfu']:.1%}"
        lines.append(f"| {name} | {t['dtype']} | {t['attention']} | {'yes' if t['compile'] else 'no'} | "
                     f"{t['ms_per_iter']:,.0f} | {t['tokens_per_sec']:,.0f} | {mfu} | {ratio} |")
    batch = next(iter(r["sample"].values()))["cache_batch"]["batch"] if r["sample"] else 0
    lines += ["", f"| sampling ({n_tokens} tokens) | batch 1, no cache chars/s | batch 1, decode engine chars/s "
              f"| speed-up | batch {batch}, decode engine chars/s | identical text |", "|---|---:|---:|---:|---:|---|"]
    for name, s in r["sample"].items():
        a, b, c = (s[k]["chars_per_sec"] for k in ("no_cache", "cache", "cache_batch"))
        same = "yes" if s["identical"] else "NO"
        lines.append(f"| {name} | {a:,.0f} | {b:,.0f} | {b / a:.1f}x | {c:,.0f} | {same} |")
    return "\n".join(lines)
