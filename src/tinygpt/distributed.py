"""More than one process: a small adapter over `torch.distributed` for `torchrun`.

    torchrun --nproc_per_node=2 -m tinygpt train ...

starts two copies of `tinygpt train`, each with RANK, WORLD_SIZE and LOCAL_RANK in its
environment. Each copy holds the whole model; `DistributedDataParallel` averages the gradients
(gloo on CPU, nccl on CUDA). The batch sampler draws the whole global batch on every rank and
hands each its share, so N processes with `--grad-accum A` train exactly as one process with
`--grad-accum N*A`. Rank 0 alone prints, evaluates, samples and writes the run directory.

The training loop sees only `Distributed`; with one process (no torchrun) every method is a
no-op, so the single-process path runs no distributed code at all.
"""

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinygpt.errors import UserError


@dataclass
class Distributed:
    """Which process this is, and the few operations the training loop needs across processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ddp: torch.nn.Module | None = None  # the DistributedDataParallel wrapper, once made

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """With several processes on CUDA, each uses its own GPU (LOCAL_RANK)."""
        if self.world > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        if self.world > 1 and device.type != "cpu":
            raise UserError(f"torchrun training runs on cpu (gloo) or cuda (nccl), not {device.type}; "
                            "pass --device cpu or --device cuda")
        return device

    def wrap(self, model: torch.nn.Module, seed: int) -> torch.nn.Module:
        """The module to train through: DDP over `model` with several processes, else `model`.

        Ranks after the first reseed torch's generator so their dropout masks differ (DDP has
        already made every rank's weights rank 0's)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if next(model.parameters()).device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=ids)
        if self.rank:
            torch.manual_seed(seed + self.rank)
        return self.ddp

    def sync_gradients(self, last_micro_batch: bool):
        """Context for one micro-batch's backward: average gradients across ranks only after the
        last micro-batch of a step (DDP's `no_sync` before it)."""
        if self.ddp is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any: stop decisions (time, signals) agree."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def on_main(self, fn: Callable, *args, **kwargs):
        """Run `fn` on rank 0 only (writing the run directory); every rank gets its result, or
        raises the `UserError` it raised, so no rank waits forever on a failed one."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except UserError as e:
                error = e
        if self.world > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0, device=self._collective_device())
            result, error = box[0]
        if error is not None:
            raise error
        return result

    def main_only(self, log: Callable) -> Callable:
        """`log` on rank 0; a function that prints nothing on the other ranks."""
        return log if self.is_main else (lambda *args, **kwargs: None)

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = Distributed()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[Distributed]:
    """Join the process group torchrun set up (if any) for the duration of a training run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield SINGLE
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield Distributed(rank=rank, world=world, local_rank=local_rank)
        # Ranks > 0 wait here for rank 0's final eval and sample: a rank that tears down its
        # connections while a peer still holds them can abort in gloo's teardown.
        dist.barrier()
    finally:
        dist.destroy_process_group()
