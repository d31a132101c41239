"""`tinygpt plot`: train/val loss against steps for one or more runs, as a PNG."""

import json
from pathlib import Path

from tinygpt.errors import UserError


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; give a run directory written by tinygpt train")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise UserError(f"{path} line {n} is not JSON; the metrics file is damaged") from None
    return [r for r in rows if "val_loss" in r]


def plot_runs(runs: list[Path], out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, run in enumerate(runs):
        rows = read_metrics(run)
        steps = [r["step"] for r in rows]
        color = f"C{i}"
        label = Path(run).name
        ax.plot(steps, [r["train_loss"] for r in rows], color=color, linestyle="--", label=f"{label} train")
        ax.plot(steps, [r["val_loss"] for r in rows], color=color, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = out or Path(runs[0]) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
