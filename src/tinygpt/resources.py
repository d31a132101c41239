"""Memory and disk: what a training run needs, and running out of either as one line.

Two everyday faults end a run that nothing else is wrong with: the device runs out of memory
(a batch or a width too large) and the disk fills up (or the run directory stops being
writable) while a checkpoint is written. Neither should end in a traceback, and neither may
cost the user the last good checkpoint.

- `check_training_fits` estimates, before any weight is allocated, the memory a training step
  needs and refuses (exit status 2) a model clearly too big for the memory the device reports.
- `memory_guard` turns an allocation failure inside its block (CPU or CUDA, at build, in a
  step, an eval or sampling) into `OutOfMemory`: one line naming what ran out and the fix.
- `disk_guard` does the same for writes that fail for lack of space or permission (`DiskError`).
  The writers themselves (`checkpoint.py`, `runs.write_json_line`) leave no partial file.

Both errors are `ResourceError`s, `UserError`s with exit status 4, so the CLI prints them on one
line. A server catches `OutOfMemory` (or tests any exception with `is_out_of_memory`) to answer
one request with an error and stay up.

This module imports torch only inside the functions that need it: the CLI wraps every command
in `memory_guard` without making `tinygpt --help` load torch.
"""

import contextlib
import errno
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tinygpt.errors import UserError

GiB = 2**30


class ResourceError(UserError):
    """The machine ran out of something (memory, disk) or refused a write: exit status 4."""

    exit_code = 4


class OutOfMemory(ResourceError):
    """An allocation failed on the CPU or the GPU."""


class DiskError(ResourceError):
    """A write failed: the disk (or a quota) is full, or the directory is not writable."""


# --- recognising the faults ----------------------------------------------------------------------

# What torch's allocators say when they fail without a dedicated exception type: the CPU allocator
# ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"), CUDA outside the
# caching allocator ("CUDA error: out of memory"), Apple's MPS ("MPS backend out of memory").
_OOM_MESSAGE = re.compile(r"can't allocate memory|out of memory|DefaultCPUAllocator|Failed to allocate",
                          re.IGNORECASE)

# The errnos of a write the machine refused: no space, quota, file too large, read-only, denied.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def is_out_of_memory(exc: BaseException) -> bool:
    """Is `exc` an allocation failure (CPU or GPU), rather than a bug?"""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # without torch loaded, no torch allocation can have failed
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM_MESSAGE.search(str(exc)))


def is_disk_fault(exc: BaseException) -> bool:
    """Is `exc` a write the machine refused (full disk, quota, read-only or denied)?"""
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def free_memory() -> None:
    """Hand cached GPU blocks back after a failed allocation, so what runs next has them."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class memory_guard:
    """Inside the block, an allocation failure raises `OutOfMemory(describe)` instead (exit 4).

        with memory_guard("out of memory sampling ...; use a smaller --num-samples"):
            ...

    `describe` may be a function, called only when memory ran out, so the message can name the
    step the loop had reached. The failed allocation's traceback is dropped before the new error
    is raised: its frames hold the failed work's tensors, which would otherwise stay allocated
    for as long as the error lives (a server that answers one request with an error and goes on
    needs them gone)."""

    def __init__(self, describe: str | Callable[[], str]):
        self.describe = describe

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, Exception) or not is_out_of_memory(exc):
            return False
        exc.__traceback__ = None  # the failed frames (and their tensors) go with both references
        del tb
        error = OutOfMemory(self.describe() if callable(self.describe) else self.describe)
        free_memory()
        raise error from None


@contextlib.contextmanager
def disk_guard(describe: str | Callable[[OSError], str]) -> Iterator[None]:
    """Inside the block, a refused write raises `DiskError(describe(e))` instead (exit 4)."""
    try:
        yield
    except OSError as e:
        if not is_disk_fault(e):
            raise
        raise DiskError(describe(e) if callable(describe) else describe) from None


def what_failed(e: OSError) -> str:
    """ "out of disk space writing PATH" or "cannot write PATH (Read-only file system)"."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        kind = "out of disk space" if e.errno == errno.ENOSPC else "disk quota or file size limit reached"
        return f"{kind} writing{where}"
    return f"cannot write{where} ({e.strerror})"


# --- the memory estimate -------------------------------------------------------------------------


def param_count(m) -> int:
    """Parameters of the model `m` (a ModelConfig) describes, from the config alone."""
    v, c, t = m.vocab_size, m.n_embd, m.block_size
    if m.model == "bigram":
        return v * v
    norm = c if m.norm == "rmsnorm" else 2 * c  # weight (and bias, for LayerNorm)
    attn = 3 * c * c + (c * c + c)  # fused q/k/v without bias, output projection with
    mlp = (4 * c * c + 4 * c) + (4 * c * c + c)
    n = v * c + (t * c if m.pos_emb == "learned" else 0) + m.n_layer * (2 * norm + attn + mlp) + norm
    if m.bigram_embed:
        from tinygpt.model import bigram_rows

        n += bigram_rows(v) * c
    return n + (0 if m.tie_embeddings else v * c) + v  # the head's weight (unless tied) and bias


@dataclass
class MemoryEstimate:
    """Bytes a training step needs at its peak, by what holds them."""

    weights: int
    gradients: int
    optimizer: int  # AdamW's two moments
    activations: int  # what the forward pass keeps for the backward, for one micro-batch

    @property
    def total(self) -> int:
        # The backward frees activations as it makes gradients: the two peak one after the other.
        return self.weights + self.optimizer + max(self.gradients, self.activations)


def training_memory(m, batch_size: int, dtype_bytes: int = 4, attention: str = "manual") -> MemoryEstimate:
    """The memory one training step of the model `m` needs, on a micro-batch of `batch_size`.

    Weights, gradients and AdamW's two moments are float32 whatever the autocast dtype:
    4 + 4 + 8 bytes per parameter (`optim.py` keeps the moments in the parameters' dtype). Under
    bfloat16 autocast the matmuls also cache a bf16 copy of each weight: 2 more. Gradients are
    dropped after each step (`zero_grad(set_to_none=True)`), so at the peak they replace the
    activations the backward has freed rather than add to them.

    Activations, in elements of `dtype_bytes` (B batch, T block, C width, nh heads, V vocab):
    - per block, 14 B*T*C: the norms' inputs and outputs, q, k and v and their flattened copies
      for the batched matmul, the attention output, the 4C-wide ReLU output, the dropout masks
      (counted with `torch.autograd.graph.saved_tensors_hooks` on the lecture's model: 14.0 and
      20.5 B*T*C per block without and with dropout; the floor is kept);
    - per block, B*nh*T*T for the softmax output, 3 B*nh*T*T with attention dropout (its mask
      and the dropped weights too); none for "sdpa", which keeps O(T) per row, not T x T;
    - once, 2 B*T*C (embeddings, final norm) and 3 B*T*V float32 for the logits: the logits,
      the log-softmax the loss keeps and its gradient.
    This is a floor. Measured with glibc told to return every freed block (so RSS is what is
    live), the peak of a training step on CPU is 1.0-1.25x the estimate; with glibc's default
    it is up to 1.7x, freed blocks kept for reuse (`test_memory_estimate_matches_measured_peaks`).
    Refusing only runs whose floor exceeds the memory available never refuses one that fits.
    """
    n = param_count(m)
    weights = 4 * n + (2 * n if dtype_bytes == 2 else 0)
    B, T, C, V = batch_size, m.block_size, m.n_embd, m.vocab_size
    logits = 3 * 4 * B * T * V
    if m.model == "bigram":
        return MemoryEstimate(weights, 4 * n, 8 * n, logits)
    attn = 0 if attention == "sdpa" else (3 if m.attn_pdrop > 0 else 1) * B * m.n_head * T * T
    kept = m.n_layer * (14 * B * T * C + attn) + 2 * B * T * C
    return MemoryEstimate(weights, 4 * n, 8 * n, dtype_bytes * kept + logits)


def available_memory(device) -> int | None:
    """Bytes this process can still allocate on `device`, or None where that is not known.

    CPU: MemAvailable from /proc/meminfo, or the container's cgroup limit less its usage where
    that is lower (a container sees the host's meminfo). CUDA: the free memory the driver
    reports. MPS: the working set Metal recommends for this process less what the driver holds
    (torch >= 2.5 says both; older: unknown). Anything else: unknown, so nothing is refused."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        import torch

        if not hasattr(torch.mps, "recommended_max_memory"):
            return None
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type != "cpu":
        return None
    figures = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(figures) if figures else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _cgroup_available() -> int | None:
    try:  # cgroup v2; "max" means no limit
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read())
        return None if limit == "max" else max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def check_training_fits(m, batch_size: int, grad_accum: int, dtype, device, attention: str) -> MemoryEstimate:
    """Refuse (one line, exit 2), before anything is allocated, a model whose training step
    needs more memory than `device` has available; return the estimate otherwise.

    The estimate is a floor (see `training_memory`), so a refused run could not have fit. The
    fix offered first is the one that helps: a smaller micro-batch (with the factor that fits,
    the effective batch kept by --grad-accum) when the activations are what does not fit, else a
    smaller model."""
    import torch

    dtype_bytes = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    est = training_memory(m, batch_size, dtype_bytes, attention)
    have = available_memory(device)
    if have is None or est.total <= have:
        return est
    batch_part = (f"activations for batch {batch_size} x block {m.block_size} in {str(dtype).removeprefix('torch.')}"
                  if est.activations >= est.gradients else "gradients")
    figures = (f"{est.weights / GiB:.1f} GiB of weights, {est.optimizer / GiB:.1f} of AdamW state and "
               f"{max(est.activations, est.gradients) / GiB:.1f} of {batch_part}")
    model_fix = "a smaller vocabulary" if m.model == "bigram" else "a smaller --n-embd or --n-layer"
    # The smallest power-of-two cut of the micro-batch that fits, if any does.
    factor = next((k for k in (2**i for i in range(1, batch_size.bit_length() + 1))
                   if training_memory(m, -(-batch_size // k), dtype_bytes, attention).total <= have), None)
    fix = model_fix
    if factor is not None:
        fix = (f"--batch-size {-(-batch_size // factor)} --grad-accum {grad_accum * factor} (the same effective "
               f"batch in smaller micro-batches), or {model_fix}")
    raise UserError(f"this model needs about {est.total / GiB:.1f} GiB to train ({figures}) but {device.type} "
                    f"has {have / GiB:.1f} GiB available; use {fix}")


def halved_batch(batch_size: int, grad_accum: int) -> str | None:
    """Flags for a smaller micro-batch at the same effective batch (batch_size x grad_accum):
    the batch divided by its smallest factor, so 64 -> 32 x 2 and 5 -> 1 x 5; None at batch 1."""
    factor = next((d for d in range(2, batch_size + 1) if batch_size % d == 0), None)
    if factor is None:
        return None
    return f"--batch-size {batch_size // factor} --grad-accum {grad_accum * factor}"


def out_of_memory_message(phase: str, step: int, saved_step: int | None, run_dir, batch: int, grad_accum: int,
                          model_cfg, device, dtype) -> str:
    """The one line for memory running out in a training run: where (`phase`: build, probe,
    report, train or final), with which batch, what is kept, and the fix."""
    block = model_cfg.block_size
    where = {"build": "building the model", "probe": f"the timing probe at step {step}",
             "report": f"the step {step} loss estimate", "train": f"training step {step}",
             "final": "the final evaluation"}[phase]
    what = (f"out of memory on {device.type} in {where} (batch {batch} x block {block}, "
            f"{str(dtype).removeprefix('torch.')}")
    if phase == "build":
        return (f"{what}, {param_count(model_cfg):,} parameters); train a smaller model "
                "(--n-embd, --n-layer) or use a device with more memory")
    if phase == "final":
        return (f"{what}); the run is complete and saved in {run_dir}: score it with "
                f"`tinygpt eval --ckpt {run_dir} --batch-size {max(1, batch // 4)}`, and pass --no-final-eval "
                "next time")
    kept = ("no checkpoint was saved yet" if saved_step is None
            else f"the last checkpoint (step {saved_step}) in {run_dir} is intact")
    smaller = halved_batch(batch, grad_accum)
    if smaller is None:  # a batch of one: only a smaller model helps
        return f"{what}); {kept}; start a new run with a smaller --block-size, --n-embd or --n-layer"
    if saved_step is None:
        return f"{what}); {kept}: run the command again with --overwrite {smaller} (the same effective batch)"
    return f"{what}); {kept}: resume with `tinygpt train --resume {run_dir} {smaller}` (the same effective batch)"


def out_of_disk_message(e: OSError, step: int, saved_step: int | None, run_dir) -> str:
    """The one line for a refused write in a training run: which file, what is kept, how to go on."""
    if saved_step is None:
        return (f"{what_failed(e)} at step {step}; training stopped before its first checkpoint: "
                "free some space (or choose another --out), then run the command again with --overwrite")
    return (f"{what_failed(e)} at step {step}; training stopped, the last checkpoint (step {saved_step}) "
            f"is intact and nothing half-written is left in {run_dir}: free some space, then "
            f"`tinygpt train --resume {run_dir}`")
