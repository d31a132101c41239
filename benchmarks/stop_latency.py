"""How quickly `python gpt.py` shows an ETA, and how quickly Ctrl-C ends it, phase by phase.

    python benchmarks/stop_latency.py            # needs Tiny Shakespeare (TINYGPT_DATA_DIR or ./input.txt)

Runs the lecture's `python gpt.py` (its defaults: 6x6x384, batch 64, block 256) off a terminal,
as a log would see it, and reports:
- seconds from launch to the first progress line that carries an ETA;
- seconds from SIGINT to exit, with the signal sent in each phase: the step-0 loss estimate, a
  training step (the first, after step 0 is saved), the final whole-val evaluation, and
  `tinygpt sample` generating.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Proc:
    """A command whose output lines are timestamped as they arrive."""

    def __init__(self, cmd: list[str]):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in self.lines:
                if text in line:
                    return t
            if self.p.poll() is not None:
                raise SystemExit(f"ended before {text!r}: " + "\n".join(line for _, line in self.lines[-10:]))
            time.sleep(0.01)
        raise SystemExit(f"no {text!r} within {timeout} s")

    def stop(self) -> tuple[float, int]:
        t = time.monotonic()
        self.p.send_signal(signal.SIGINT)
        code = self.p.wait(timeout=600)
        return time.monotonic() - t, code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stop-"))
    gpt = [sys.executable, str(REPO / "gpt.py")]
    rows = []

    run = Proc([*gpt, "--out", str(tmp / "a")])
    eta = run.wait_for(", eta")
    rows.append(("first progress line with an ETA", f"{eta:.1f} s after launch", ""))
    time.sleep(1)
    took, code = run.stop()
    rows.append(("Ctrl-C in the step-0 loss estimate", f"{took:.2f} s", f"exit {code}"))

    run = Proc([*gpt, "--out", str(tmp / "b"), "--eval-iters", "1"])
    run.wait_for("step 0: train loss")
    while not (tmp / "b" / "latest.json").exists():
        time.sleep(0.01)
    time.sleep(1)
    took, code = run.stop()
    rows.append(("Ctrl-C in a training step", f"{took:.2f} s", f"exit {code}"))

    run = Proc([*gpt, "--out", str(tmp / "c"), "--eval-iters", "1", "--max-iters", "0"])
    run.wait_for("whole-val-split loss")
    time.sleep(1)
    took, code = run.stop()
    rows.append(("Ctrl-C in the final whole-val evaluation", f"{took:.2f} s", f"exit {code}"))

    run = Proc([sys.executable, "-m", "tinygpt", "sample", "--ckpt", str(tmp / "c"), "--max-new-tokens", "100000"])
    run.wait_for("using the")
    time.sleep(2)
    took, code = run.stop()
    rows.append(("Ctrl-C in `tinygpt sample`", f"{took:.2f} s", f"exit {code}"))

    print("| what | time | |\n|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
