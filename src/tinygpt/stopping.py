"""Stopping a run on Ctrl-C or SIGTERM: at once, and so that the run resumes as if never stopped.

The first signal interrupts the loop wherever it is (in a step, a loss estimate, the final
evaluation), except inside `SignalStop.deferred` blocks (an update and its step count, a report
and its checkpoint), which finish first. A half-done step is dropped: `random_state` takes the
random state a step consumes before it starts, so the loop can put it back. A second signal
exits at once; checkpoints are written atomically, so that cannot leave a broken one.
"""

import contextlib
import os
import signal
import threading

import torch


class Stopped(Exception):
    """Training was stopped by a signal after saving; carries the exit status (130 or 143)."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code


class Interrupted(Exception):
    """Raised inside the loop by the first Ctrl-C / SIGTERM."""


class SignalStop:
    """SIGINT/SIGTERM stop the run: at once where `interruptible` (raising `Interrupted` in the
    loop, outside `deferred` blocks), else after the step; a second signal exits now."""

    def __init__(self, interruptible: bool = True):
        self.signum: int | None = None
        self.interruptible = interruptible
        self.blocked = 0  # inside `deferred` blocks
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            # Checkpoints are written atomically, so leaving mid-save cannot corrupt one.
            os._exit(128 + signum)
        self.signum = signum
        if self.interruptible and not self.blocked:
            raise Interrupted

    @contextlib.contextmanager
    def deferred(self):
        """A block that a signal does not cut short; the stop happens right after it."""
        self.blocked += 1
        try:
            yield
        finally:
            self.blocked -= 1
        if self.interruptible and not self.blocked and self.signum is not None:
            raise Interrupted

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def let_signals_in(model: torch.nn.Module) -> None:
    """A no-op gradient hook on every parameter: the backward pass then calls into Python once
    per parameter, which is where a pending Ctrl-C gets handled (a backward can take many
    seconds on a slow CPU)."""
    for p in model.parameters():
        p.register_hook(signal_hook)


def signal_hook(grad):
    """Does nothing: Python runs here, and so does a pending signal's handler."""


def random_state(sampler, device, restore: tuple | None = None) -> tuple:
    """The random state a training step consumes (dropout, batches), or put `restore` back."""
    if restore is not None:
        torch.set_rng_state(restore[0])
        if restore[1] is not None:
            torch.cuda.set_rng_state(restore[1], device)
        sampler.load_state_dict(restore[2])
        return restore
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, sampler.state_dict()
