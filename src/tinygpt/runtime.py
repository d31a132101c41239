"""Where and in what precision the model runs: device, dtype, attention kernel.

"auto" is resolved here, once, from what the machine can do — never assumed:
- device: cuda, then mps, then cpu;
- dtype (`choose_dtype`, which also says why): on CUDA, bfloat16 autocast where the GPU has
  bf16 in hardware (compute capability 8.0 and up: A100, H100, RTX 30xx+), float16 autocast
  with loss scaling where it has fp16 tensor cores only (7.x: V100, T4, RTX 20xx; there
  `torch.cuda.is_bf16_supported()` says True because it counts emulation), float32 below; on
  CPUs, bfloat16 where its matmul measures faster than float32 (AMX or AVX512-BF16; a short
  micro-benchmark, cached per process); float32 elsewhere, MPS included;
- attention kernel: on CUDA, PyTorch's fused `scaled_dot_product_attention`; on CPU, the plain
  matmul-softmax-matmul, which measured faster there for the head sizes and blocks of these
  models (forward and backward; see `tinygpt bench`).
Also here: CPU threads (`resolve_threads`) and the C allocator's settings for training
(`keep_freed_memory`).
"""

import contextlib
import ctypes
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_facts(device: torch.device) -> tuple[tuple[int, int], bool]:
    """(compute capability, has bf16 in hardware) of a CUDA device; tests fake this."""
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device), native


def choose_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The training dtype for `--dtype name` on `device`, and why."""
    if name != "auto":
        if name != "float32" and device.type not in ("cpu", "cuda") and not _autocast_works(device, DTYPES[name]):
            raise UserError(f"--dtype {name} does not run on {device.type} with this torch ({torch.__version__}): "
                            "use --dtype float32 (or auto)")
        return DTYPES[name], f"--dtype {name}"
    if device.type == "cuda":
        (major, minor), native = cuda_facts(device)
        cc = f"compute capability {major}.{minor}"
        if native or major >= 8:
            return torch.bfloat16, f"{cc} has bf16 in hardware"
        if major >= 7:
            return torch.float16, (f"{cc} has fp16 tensor cores but no bf16 (emulated bf16 is several times "
                                   "slower): fp16 with loss scaling")
        return torch.float32, f"{cc} has neither bf16 nor fp16 tensor cores"
    if device.type == "cpu":
        speedup = cpu_bf16_speedup()
        if speedup > 1.5:
            return torch.bfloat16, f"this CPU's bf16 matmul is {speedup:.1f}x float32's (AMX or AVX512-BF16)"
        if speedup:
            return torch.float32, f"this CPU's bf16 matmul is only {speedup:.1f}x float32's"
        return torch.float32, "this CPU has no bf16 units (AMX or AVX512-BF16): bf16 would be emulated, far slower"
    return torch.float32, f"{device.type}: float32, the one dtype tinygpt has checked there"


def _autocast_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Can this torch autocast a matmul to `dtype` on `device` (MPS: bf16 needs macOS 14)?"""
    if not torch.amp.is_autocast_available(device.type):
        return False
    try:
        with torch.autocast(device.type, dtype=dtype):
            x = torch.ones(2, 2, device=device)
            (x @ x).sum().item()
        return True
    except (RuntimeError, TypeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return choose_dtype(name, device)[0]


def grad_scaler(dtype: torch.dtype, device: torch.device):
    """The loss scaler of a float16 run (float16's range is narrow: small gradients underflow
    unscaled); disabled, a no-op, in every other dtype."""
    if dtype != torch.float16:
        return torch.amp.GradScaler(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False)
    try:
        return torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserError(f"float16 training with loss scaling is not supported on {device.type} by this torch "
                        f"({torch.__version__}: {str(e).splitlines()[0]}); use --dtype float32") from None


FP16_INIT_SCALE = 2.0**16  # torch's default: the first steps find the right scale by overflowing


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """Generation feeds one token at a time: matrix-vector products, where bf16 autocast on CPU
    only adds casts (measured 5x slower than float32 here). So "auto" means float32 on CPU."""
    if name == "auto" and device.type == "cpu":
        return torch.float32
    return resolve_dtype(name, device)


def prefill_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype of generation's prompt and refill forwards (GEMMs over up to block_size tokens),
    where it differs from the one-token steps': with "auto" on a CPU, bfloat16 where its matmul
    measures faster (`choose_dtype`), since there the steps stay float32 (`inference_dtype`).
    None: the same as the steps. Only `--dtype float32` then gives the float32 text exactly."""
    if name == "auto" and device.type == "cpu":
        dtype = resolve_dtype("auto", device)
        return dtype if dtype != torch.float32 else None
    return None


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
    """bf16 or fp16 autocast where asked for; parameters and losses stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit machines
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees for the next step to reuse.

    By default it hands large blocks (activations, gradients) back to the kernel when they are
    freed, so the next step's first touch of each page faults and the kernel zeroes it: ~20,000
    page faults a `cpu-10min` step, about 3% of its time on the Xeon here
    (`benchmarks/cpu_step.py`). Blocks up to 32 MiB then come from the heap, which is not
    trimmed below 1 GiB of free space. The numbers computed are unchanged; the process keeps
    its peak memory. Returns whether it applied: glibc only (not macOS, not musl), and not
    with TINYGPT_KEEP_FREED_MEMORY=0 (how the benchmark measures the difference)."""
    if os.environ.get("TINYGPT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except (OSError, TypeError):  # TypeError: Windows has no such handle
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own symbol: its mallopt parameters are known
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))
