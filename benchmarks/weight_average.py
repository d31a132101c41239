"""Which average of the weights to keep (`--ema-decay`), measured inside one real run: the run
trains as `tinygpt train FLAGS` does, and beside it keeps a moving average of the weights for
each decay asked (bias-corrected, as `--ema-decay` computes it, from step --start on); at the
end each average is scored on the whole val split beside the run's own last model and best
checkpoint. One run, so the rows differ only in which weights are scored: no seed or machine
noise between them.

    python benchmarks/weight_average.py --preset cpu-10min --ema-decay 0     # ten minutes
    python benchmarks/weight_average.py --decays 0.9,0.99 --start 5 --preset cpu-quick

Flags it does not know go to `tinygpt train`. Leave --ema-decay at 0 in them (the run's own
model is then its last weights); an --out directory is made in a temporary folder unless given.
Nothing else should run meanwhile: the averages cost time inside the run's time budget.
"""

import argparse
import sys
import tempfile
import time

import torch

import tinygpt.train as T
from tinygpt import cli
from tinygpt.evaluate import evaluate_split, final_eval_batch
from tinygpt.optim import WeightAverage


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decays", default="0.98,0.99,0.995,0.998", help="comma-separated decays to keep")
    p.add_argument("--start", type=int, default=1000, help="the averages start after this optimizer step")
    args, train_flags = p.parse_known_args()
    decays = [float(d) for d in args.decays.split(",")]
    averages: dict[float, WeightAverage] = {}
    steps = [0]
    clip, final_eval = T.clip_grad_norm, T.final_eval

    def fold_in(model) -> None:  # the weights after optimizer step steps[0]
        if steps[0] > args.start:
            for d in decays:
                averages.setdefault(d, WeightAverage(model, d)).update(steps[0] - args.start)

    def clip_then_average(model, max_norm):  # called once a step, before that step's update
        fold_in(model)
        steps[0] += 1
        return clip(model, max_norm)

    def final_eval_and_averages(model, corpus, block_size, device, dtype, *rest, **kw):
        fold_in(model)  # the last step's weights (before the best checkpoint may be loaded)
        best, last = final_eval(model, corpus, block_size, device, dtype, *rest, **kw)
        rows = [("the run's last model", last["loss"]), ("the run's best checkpoint", best["loss"])]
        for d, average in averages.items():
            with average.in_model():
                r = evaluate_split(model, corpus.val, block_size, device, dtype, corpus.val_chars,
                                   batch_size=final_eval_batch(block_size), eot=corpus.eot)
            rows.append((f"average, decay {d:g}", r["loss"]))
        print(f"\n{steps[0]} steps; averages of the weights after steps {args.start + 1}-{steps[0]}\n")
        print("| weights scored | val loss (whole split) | vs the last model |\n|---|---:|---:|")
        for name, loss in rows:
            print(f"| {name} | {loss:.4f} | {loss - last['loss']:+.4f} |")
        print(flush=True)
        return best, last

    T.clip_grad_norm, T.final_eval = clip_then_average, final_eval_and_averages
    with tempfile.TemporaryDirectory() as tmp:
        if "--out" not in train_flags:
            train_flags += ["--out", f"{tmp}/run"]
        t0 = time.perf_counter()
        code = cli.main(["train", *train_flags, "--sample-chars", "0"])
        print(f"{time.perf_counter() - t0:.0f} s; torch {torch.__version__}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
