"""Where and in what precision the model runs: device, dtype, attention kernel.

"auto" is resolved here, once, from what the machine can do — never assumed:
- device: cuda, then mps, then cpu;
- dtype: bfloat16 autocast on CUDA with bf16 support, and on CPUs whose bf16 matmul measures
  faster than float32 (AMX or AVX512-BF16; checked by a short micro-benchmark, cached per
  process); float32 elsewhere;
- attention kernel: on CUDA, PyTorch's fused `scaled_dot_product_attention`; on CPU, the plain
  matmul-softmax-matmul, which measured faster there for the head sizes and blocks of these
  models (forward and backward; see `tinygpt bench`).
"""

import contextlib
import functools
import os
import time

import torch

from tinygpt.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but Apple's MPS is not available; use --device cpu or auto")
    return torch.device(name)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matmul runs than float32 on this CPU (measured once)."""
    if not native_bf16(torch.device("cpu")):
        return 0.0  # no native bf16 units: emulated bf16 is slower, skip the measurement
    a = torch.randn(512, 512)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm up
        t0 = time.perf_counter()
        for _ in range(10):
            x @ x
        times[dtype] = time.perf_counter() - t0
    return times[torch.float32] / times[torch.bfloat16]


def native_bf16(device: torch.device) -> bool:
    """Does this device do bf16 matmuls in hardware (not emulated)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_speedup() > 1.5 else torch.float32
    return torch.float32


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """Generation feeds one token at a time: matrix-vector products, where bf16 autocast on CPU
    only adds casts (measured 5x slower than float32 here). So "auto" means float32 on CPU."""
    if name == "auto" and device.type == "cpu":
        return torch.float32
    return resolve_dtype(name, device)


def resolve_attention(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "sdpa" if device.type == "cuda" else "manual"


def cpu_busy_cores(sample_s: float = 0.1) -> float:
    """How many of the machine's cores other work kept busy over `sample_s` (from /proc/stat)."""
    def read() -> tuple[list[int], int]:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
        fields = [int(x) for x in lines[0].split()[1:]]
        return fields, sum(line.startswith("cpu") and line[3:4].isdigit() for line in lines)

    (a, n), _ = read(), time.sleep(sample_s)
    b, _ = read()
    delta = [y - x for x, y in zip(a, b)]
    total = sum(delta) or 1
    idle = delta[3] + delta[4]  # idle + iowait
    return n * (total - idle) / total


def resolve_threads(setting: str, device: torch.device) -> int | None:
    """Set and return torch's CPU thread count for a run: a number as given; "auto" is every core
    this process may use that other work leaves idle (on 2 cores with one busy, 2 threads trained
    2.7x slower than 1 here: each waits on the other's time slice). OMP_NUM_THREADS, when set,
    decides instead (None: left as it is)."""
    if device.type != "cpu":
        return None
    if setting == "auto":
        if "OMP_NUM_THREADS" in os.environ:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        try:
            busy = cpu_busy_cores()
        except (OSError, ValueError, IndexError):
            busy = 0.0
        n = max(1, min(cores, round(cores - busy + 0.25)))  # a core busy 75% or more counts as taken
    else:
        n = int(setting)
    torch.set_num_threads(n)
    return n


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast where asked for; parameters and losses stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
