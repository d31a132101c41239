"""`tinygpt plot`: train/val loss of one or more runs on one chart, as a PNG.

By default the loss is in nats per token against optimizer steps, as the reports print it;
`--bpc` plots bits per character instead (the scale on which runs with different tokenizers
compare) and `--time` puts training seconds (evals excluded) on the x axis, for runs compared at
equal training time.
"""

import io
from pathlib import Path

from tinygpt import resources
from tinygpt.errors import UserError
from tinygpt.runs import read_metrics


def loss_figure(runs: list[Path], bpc: bool = False, time: bool = False):
    """A matplotlib figure: per run, a dashed train line and a solid val line of one colour."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    x_key = "train_seconds" if time else "step"
    train_key, val_key = ("train_bpc", "val_bpc") if bpc else ("train_loss", "val_loss")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, run in enumerate(runs):
        rows = read_metrics(run)
        xs = [r[x_key] for r in rows]
        label = Path(run).name
        ax.plot(xs, [r[train_key] for r in rows], color=f"C{i}", linestyle="--", label=f"{label} train")
        ax.plot(xs, [r[val_key] for r in rows], color=f"C{i}", label=f"{label} val")
    ax.set_xlabel("training seconds (evals excluded)" if time else "step")
    ax.set_ylabel("loss (bits/char)" if bpc else "loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(runs: list[Path], out: Path | None = None, bpc: bool = False, time: bool = False) -> Path:
    """Write the chart of `runs` to `out` (default: loss.png in the first run) and return the path.

    The image is drawn in memory and replaces `out` atomically: a full disk leaves the previous
    chart (or none), never half a PNG."""
    import matplotlib.pyplot as plt

    from tinygpt.checkpoint import atomic_write_text

    fig = loss_figure(runs, bpc, time)
    out = Path(out) if out else Path(runs[0]) / "loss.png"
    image = io.BytesIO()
    try:
        fig.savefig(image, format=out.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    try:
        atomic_write_text(out, image.getvalue())
    except OSError as e:
        if resources.is_disk_fault(e):
            raise resources.DiskError(f"{resources.what_failed(e)}; the plot was not written and nothing "
                                      "half-written is left: free some space or choose another --out") from None
        raise UserError(f"cannot write {out}: {e.strerror}; choose another --out") from None
    return out
