"""Progress: a tqdm bar on a terminal, plain periodic lines in logs, or quiet.

Loss reports (`step N: train loss X, val loss Y`) are always printed (`log`, stdout: they are what
training produces), above the bar; the bar and the plain progress lines go to `note` (stderr). Long phases
inside training (the periodic loss estimate, the whole-split evaluation) get their own progress
line with an ETA, so a slow machine never sits silent. The ETA honours `--max-time`.
"""

import sys
import time


def _fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"


class Progress:
    def __init__(self, total: int, initial: int = 0, quiet: bool = False, log=print, note=None,
                 interval_s: float = 10.0, stream=None, max_time: float = 0.0, started: float | None = None):
        self.total, self.n, self.initial, self.log = total, initial, initial, log
        self.stream = stream or sys.stderr  # where the bar is drawn
        self.note = note or (lambda line: print(line, file=self.stream, flush=True))
        self.quiet = quiet
        self.bar = None
        self.interval_s = interval_s
        self.last_line = time.perf_counter()
        self.started = time.perf_counter()
        self.max_time = max_time
        self.run_started = self.started if started is None else started  # what --max-time counts from
        self.terminal = not quiet and self.stream.isatty()
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream,
                            leave=False, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def report(self, line: str) -> None:
        if self.bar is None:
            self.log(line)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):  # the bar steps aside for the line
            self.log(line)

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left: steps to go at the pace so far, capped by what --max-time leaves."""
        now = time.perf_counter() if now is None else now
        done = self.n - self.initial
        eta = (now - self.started) / done * max(0, self.total - self.n) if done > 0 else None
        if self.max_time > 0:
            left = max(0.0, self.max_time - (now - self.run_started))
            eta = left if eta is None else min(eta, left)
        return eta

    def step(self, loss: float, tokens_per_sec: float) -> None:
        self.n += 1
        eta = self.eta()
        eta_text = "?" if eta is None else _fmt_seconds(eta)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.4f}, tok/s={tokens_per_sec:,.0f}, eta={eta_text}", refresh=False)
            self.bar.update(1)
        elif not self.quiet and time.perf_counter() - self.last_line >= self.interval_s:
            self.last_line = time.perf_counter()
            self.note(f"  step {self.n}/{self.total}  loss {loss:.4f}  {tokens_per_sec:,.0f} tok/s  eta {eta_text}")

    def phase(self, name: str, total: int, seconds_hint: float | None = None) -> "Phase":
        """Progress of a long inner phase (`total` batches); `seconds_hint`: its expected length."""
        return Phase(self, name, total, seconds_hint)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Phase:
    """One phase's progress: a second bar on a terminal, else a line at its start (with the
    expected time, when known) and one every `interval_s`."""

    def __init__(self, parent: Progress, name: str, total: int, seconds_hint: float | None):
        self.parent, self.name, self.total, self.hint = parent, name, total, seconds_hint
        self.i = 0
        self.started = self.last_line = time.perf_counter()
        self.bar = None
        if parent.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, unit="batch", dynamic_ncols=True, file=parent.stream,
                            leave=False)
        elif not parent.quiet and (seconds_hint is None or seconds_hint >= parent.interval_s):
            eta = "" if seconds_hint is None else f", eta ~{_fmt_seconds(seconds_hint)}"
            parent.note(f"  {name}: 0/{total} batches{eta}")

    def tick(self) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        if not self.parent.quiet and now - self.last_line >= self.parent.interval_s and self.i < self.total:
            self.last_line = now
            eta = (now - self.started) / self.i * (self.total - self.i)
            self.parent.note(f"  {self.name}: {self.i}/{self.total} batches, eta {_fmt_seconds(eta)}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def time_probe(model, cfg, corpus, device, dtype, start_step: int) -> dict:
    """How long this run will take here, from one small timed forward + backward scaled up:
    seconds per step, per periodic loss estimate, for the final eval and in all. Random state
    and gradients are left as they were, so the run itself is unchanged."""
    import torch

    from tinygpt.data import is_chat, take
    from tinygpt.runtime import autocast

    block = model.config.block_size
    n = cfg.batch_size if device.type == "cuda" else min(4, cfg.batch_size)  # CPU: a small, fast probe
    if is_chat(corpus.train):  # conversations: a row each
        rows = min(n, len(corpus.train))
        inputs, targets = (t.to(device) for t in corpus.train.batch(torch.arange(rows)))
    else:
        x = take(corpus.train, torch.arange(min(len(corpus.train), n * block + 1)))
        x = x[: (len(x) - 1) // block * block + 1]
        rows = max(1, (len(x) - 1) // block)
        inputs, targets = x[:-1].view(rows, -1)[:, :block].to(device), x[1:].view(rows, -1)[:, :block].to(device)
    rng = torch.get_rng_state()
    was_training = model.training
    model.train()
    seconds = []
    for k in (1, rows):  # the first, on one row, pays the one-off costs
        t0 = time.perf_counter()
        with autocast(device, dtype):
            _, loss = model(inputs[:k], targets[:k])
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    torch.set_rng_state(rng)
    per_row = seconds[-1] / rows
    forward_row = per_row / 3  # a forward is about a third of forward + backward
    step = per_row * cfg.batch_size * cfg.grad_accum
    estimate = forward_row * cfg.batch_size * cfg.eval_iters * 2
    val_rows = len(corpus.val) if is_chat(corpus.val) else len(corpus.val) / block
    final = forward_row * val_rows if cfg.final_eval else 0.0
    steps = max(0, cfg.max_iters - start_step)
    reports = steps // cfg.eval_interval + 1
    total = steps * step + reports * estimate + final
    if cfg.max_time > 0:
        total = min(total, cfg.max_time + estimate + final)
    return {"step": step, "estimate": estimate, "final": final, "total": total}
