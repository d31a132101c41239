"""Resume: a run stopped at step k and resumed ends with the losses, weights and optimizer state
of one never stopped, bit for bit on CPU; settings the run fixed cannot be changed on resume."""

import json
import os
import signal

import pytest
from conftest import (
    assert_one_line_error,
    assert_same_weights,
    cli,
    losses_by_step,
    snapshot,
    tiny_args,
    tiny_flags,
)

from tinygpt.checkpoint import checkpoint_dir
from tinygpt.runs import settings_from_flags
from tinygpt.train import Stopped, train

# Dropout on, so that a resume which failed to restore the random state would show.
RESUMABLE = dict(dropout=0.1, attention="manual", batch_size=8, eval_iters=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_resume_after_max_iters_is_bit_exact(tiny_text_file, tmp_path, dtype):
    def args(out, max_iters):
        return tiny_args(tiny_text_file, out, **RESUMABLE, dtype=dtype, eval_interval=4, max_iters=max_iters)

    a = cli("train", *args(tmp_path / "a", 12))
    assert a.code == 0, a.err
    r = cli("train", *args(tmp_path / "b", 6))
    assert r.code == 0, r.err
    b = cli("train", "--resume", tmp_path / "b", "--max-iters", 12)
    assert b.code == 0, b.err
    assert b.err == f"resuming {tmp_path / 'b'} at step 6\n"  # a notice: on stderr, beside the reports

    la, lb = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    assert sorted(la) == [0, 4, 8, 12] and sorted(lb) == [0, 4, 6, 8, 12]
    assert {s: lb[s] for s in la} == la  # every loss, to the last bit
    reports = [ln for ln in b.out.splitlines() if ln.startswith("step ")]
    assert reports == [ln for ln in a.out.splitlines() if ln.startswith(("step 8:", "step 12:"))]
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 12


# The signal arrives while step 3's (or 5's) report is printed: the stop saves that step unreported.
@pytest.mark.parametrize("eval_interval, stop_after_report", [(3, 3), (1, 5)])
def test_resume_after_signal_stop_is_bit_exact(tiny_text_file, tmp_path, eval_interval, stop_after_report):
    """A SIGTERM during training saves and stops; resuming gives the uninterrupted run's losses,
    weights and optimizer state, with a cosine schedule and warm-up in play."""
    base = tiny_flags(tiny_text_file, **RESUMABLE, lr_schedule="cosine", warmup_iters=3, min_lr=1e-4,
                      max_iters=10, eval_interval=eval_interval)

    def run(flags, log=lambda *_: None):
        model_cfg, train_cfg = settings_from_flags(flags)
        return train(model_cfg, train_cfg, log=log, note=log)

    run({**base, "out": str(tmp_path / "a")})

    lines = []

    def stop_soon(line):  # a signal that arrives while the report is being printed
        lines.append(line)
        if line.startswith(f"step {stop_after_report}:"):
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped:
        run({**base, "out": str(tmp_path / "b")}, log=stop_soon)
    assert stopped.value.exit_code == 143
    b = tmp_path / "b"
    assert lines[-1] == (f"stopped at step {stop_after_report}; checkpoint saved in {b}. "
                         f"Resume with: tinygpt train --resume {b}")
    assert json.loads((b / "latest.json").read_text())["step"] == stop_after_report
    assert not json.loads((checkpoint_dir(b) / "state.json").read_text())["reported"]  # the resume redoes it
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is put back

    run({"resume": str(b)})
    assert losses_by_step(b) == losses_by_step(tmp_path / "a")  # no report lost or doubled
    assert_same_weights(tmp_path / "a", b)
    assert (json.loads((b / "best.json").read_text())
            == json.loads((tmp_path / "a" / "best.json").read_text()))


def test_resume_refuses_conflicting_model_flags(trained_run):
    before = snapshot(trained_run)
    r = cli("train", "--resume", trained_run, "--n-embd", 64)
    assert_one_line_error(r, "--n-embd 64 conflicts with the run being resumed", "n_embd=32")
    r = cli("train", "--resume", trained_run, "--learning-rate", 0.1)
    assert_one_line_error(r, "--learning-rate 0.1 conflicts")
    assert snapshot(trained_run) == before


def test_resume_takes_unchanged_settings_from_the_run(damaged_run):
    """`--resume DIR --n-embd 32` repeats the run's own value: checked against the run, not the
    defaults (n_head 6 would not divide 32)."""
    r = cli("train", "--resume", damaged_run, "--n-embd", 32, "--max-iters", 6)
    assert r.code == 0, r.err
    assert sorted(losses_by_step(damaged_run)) == [0, 2, 4, 6]


def test_resume_keeps_the_global_batch(damaged_run):
    """--batch-size and --grad-accum may trade against each other on resume (another machine's
    memory), never change the sequences per step: that would be another run."""
    before = snapshot(damaged_run)
    r = cli("train", "--resume", damaged_run, "--batch-size", 4, "--max-iters", 6)
    assert_one_line_error(r, "--batch-size x --grad-accum must stay 8 sequences per step",
                          "--batch-size 8 --grad-accum 1")
    assert snapshot(damaged_run) == before
    r = cli("train", "--resume", damaged_run, "--batch-size", 4, "--grad-accum", 2, "--max-iters", 6)
    assert r.code == 0, r.err
    assert sorted(losses_by_step(damaged_run)) == [0, 2, 4, 6]


@pytest.mark.slow
def test_resume_through_the_script(tiny_text_file, tmp_path):
    out = tmp_path / "run"
    r = cli("train", *tiny_args(tiny_text_file, out, **RESUMABLE, model="gpt", max_iters=3, eval_interval=3))
    assert r.code == 0, r.err
    r = cli("--resume", out, "--max-iters", 5, script="gpt.py", timeout=120)
    assert r.code == 0, r.err
    assert f"resuming {out} at step 3" in r.err and "step 5: train loss" in r.out
    assert sorted(losses_by_step(out)) == [0, 3, 5]
    r = cli("train", "--model", "bigram", "--resume", out)  # what bigram.py passes
    assert_one_line_error(r, "--model bigram conflicts with the run being resumed")
