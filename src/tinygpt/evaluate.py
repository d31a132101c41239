"""Losses: the quick periodic estimate, and the exact figure over a whole split."""

import math

import torch

from tinygpt.data import IGNORE, count_windows, random_batches, windows
from tinygpt.runtime import autocast


@torch.no_grad()
def estimate_loss(model, splits: dict, block_size: int, batch_size: int, eval_iters: int,
                  device, dtype, seed: int = 0, tick=None) -> dict:
    """The lecture's estimate: mean loss over `eval_iters` random batches of each split.

    The batches come from their own seeded generator, so every report uses the same batches
    (comparable from step to step) and training's random streams are left untouched.
    """
    was_training = model.training
    model.eval()
    out = {}
    for name, data in splits.items():
        total = 0.0
        for x, y in random_batches(data, block_size, batch_size, eval_iters, seed):
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            total += loss.item()
            if tick:
                tick()
        out[name] = total / eval_iters
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_split(model, data: torch.Tensor, block_size: int, device, dtype,
                   n_chars: int | None = None, batch_size: int = 32, tick=None, eot: int | None = None) -> dict:
    """Loss over the whole of `data`: consecutive non-overlapping windows of `block_size`, each
    token predicted exactly once from the tokens before it in its window (and, with `eot`, in its
    document: no window crosses a document boundary).

    Returns nats per token and bits per character (`n_chars` is the number of characters the
    predicted tokens spell; for a character tokenizer, the number of tokens). `tick` is called
    after every batch (progress).
    """
    was_training = model.training
    model.eval()
    total_nats, count = 0.0, 0
    for x, y in windows(data, block_size, batch_size, eot):
        with autocast(device, dtype):
            logits, _ = model(x.to(device))
        nll = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum", ignore_index=IGNORE
        )
        total_nats += nll.item()
        count += int((y != IGNORE).sum())
        if tick:
            tick()
    model.train(was_training)
    n_chars = n_chars or count
    return {
        "loss": total_nats / count,
        "bits_per_char": total_nats / n_chars / math.log(2),
        "tokens": count,
        "chars": n_chars,
    }


def final_eval_batch(block_size: int) -> int:
    """Windows per forward pass in the final eval: about 16k tokens, at least 32 windows."""
    return max(32, 16384 // block_size)


def final_eval(model, corpus, block_size: int, device, dtype, run_dir, best_step: int | None, step: int,
               progress, seconds_hint: float | None) -> tuple[dict, dict]:
    """The end of a run: the whole val split scored for the last model and, where the best
    checkpoint is another one, for that checkpoint too, whose weights are then left in `model`.
    Returns (best, last); they are the same dict when the last model is the best."""
    from tinygpt.checkpoint import checkpoint_dir, load_weights

    batch = final_eval_batch(block_size)
    n_batches = count_windows(len(corpus.val), block_size, batch, corpus.val, corpus.eot)

    def score(which: str) -> dict:
        with progress.phase(f"whole-val-split loss ({which})", n_batches, seconds_hint) as ph:
            return evaluate_split(model, corpus.val, block_size, device, dtype, corpus.val_chars,
                                  batch_size=batch, tick=ph.tick, eot=corpus.eot)

    last = score("last model")
    if best_step is None or best_step == step:
        return last, last
    load_weights(checkpoint_dir(run_dir, "best") / "model.safetensors", model)
    return score(f"best checkpoint, step {best_step}"), last
