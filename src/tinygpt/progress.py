"""Progress during training: a tqdm bar on a terminal, plain periodic lines in logs, or quiet.

Loss reports (`step N: train loss X, val loss Y`) are always printed, above the bar.
"""

import sys
import time


class Progress:
    def __init__(self, total: int, initial: int = 0, quiet: bool = False, log=print,
                 interval_s: float = 10.0, stream=None):
        self.total, self.n, self.initial, self.log = total, initial, initial, log
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.bar = None
        self.interval_s = interval_s
        self.last_line = time.perf_counter()
        self.started = time.perf_counter()
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=self.stream, leave=False)

    def report(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.log(line)

    def step(self, loss: float, tokens_per_sec: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            self.bar.update(1)
        elif not self.quiet and time.perf_counter() - self.last_line >= self.interval_s:
            self.last_line = time.perf_counter()
            elapsed = self.last_line - self.started
            done = max(1, self.n - self.initial)
            eta = elapsed / done * (self.total - self.n) if self.total > self.n else 0.0
            self.log(f"  step {self.n}/{self.total}  loss {loss:.4f}  {tokens_per_sec:,.0f} tok/s  "
                     f"eta {eta:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
