"""Issue 25, `--preset auto`: the plan is a pure function of the text's figures, the probe's and
the budget; a real run keeps to its budget; and any run says when its model starts memorising."""

import json
import random
import re

import pytest
from conftest import TINY_TEXT, cli, tiny_configs

from tinygpt import sizing as S
from tinygpt.errors import UserError
from tinygpt.train import Memorising, train

SHAKESPEARE_LIKE = S.TextFigures(chars=1_115_394, train_tokens=1_003_854, val_tokens=111_540, vocab_size=65,
                                 documents=1, bigram_loss=2.48)
# Tokens per second of the ladder's shapes, as a 2-core Xeon measured them (the probe, faked).
PROBED = {"2x2x64": 80_000.0, "2x4x128": 45_000.0, "3x4x192": 27_000.0, "4x4x256": 11_600.0, "6x6x384": 3_000.0}


def test_the_plan_is_the_same_for_the_same_figures_and_follows_the_rule():
    a = S.plan(SHAKESPEARE_LIKE, PROBED, 120)
    assert a == S.plan(SHAKESPEARE_LIKE, PROBED, 120)
    # 2x4x128 (0.41M parameters) sees ~4.7M tokens in the time: >= 6 a parameter; 3x4x192 would
    # see 2.7M for its 1.36M.
    assert a.shape.name == "2x4x128" and a.settings["n_layer"] == 2 and a.settings["block_size"] == 64
    train_s = S.train_seconds(SHAKESPEARE_LIKE, a.shape, 45_000, 120)
    assert a.settings["max_iters"] == int(45_000 * train_s / (32 * 64)) and a.tokens >= 6 * a.params
    assert a.settings["dropout"] == 0.1 and 1 < a.passes < 8  # a few passes over the text
    assert a.settings["optimizer"] == "muon" and a.settings["min_lr"] == a.settings["learning_rate"] / 10
    assert a.expected_loss == pytest.approx(S.expected_loss(2.48, a.tokens))
    assert f"a 2x4x128 GPT ({a.params / 1e6:.2f}M parameters), block 64" in a.describe(SHAKESPEARE_LIKE, 120)
    # Ten minutes: 4x4x256 sees only ~2 tokens a parameter, but passes over the text more than
    # REPEAT_PASSES times: a text the time repeats goes to the larger model (6x6x384: 1.7 passes).
    b = S.plan(SHAKESPEARE_LIKE, PROBED, 600)
    assert b.shape.name == "4x4x256" and b.tokens < S.TOKENS_PER_PARAM * b.params
    assert S.REPEAT_PASSES <= b.passes < S.MAX_PASSES and b.settings["dropout"] == 0.1
    assert "more would memorise it" not in b.describe(SHAKESPEARE_LIKE, 600)


def test_less_time_a_smaller_model_and_a_small_text_caps_the_size():
    assert S.plan(SHAKESPEARE_LIKE, PROBED, 20).shape.name == "2x2x64"
    # A small text: the largest model under 40 parameters a token, 16 passes, then the run ends
    # (the time would allow 75).
    small = S.TextFigures(100_000, 90_000, 10_000, 80, 30, 2.6)
    plan = S.plan(small, PROBED, 600)
    assert plan.shape.name == "4x4x256" and plan.params <= 40 * small.train_tokens
    assert plan.passes == pytest.approx(S.MAX_PASSES, rel=0.01) and plan.passes <= S.MAX_PASSES
    assert plan.settings["dropout"] == 0.1 and S.max_iters(plan, small) == plan.settings["max_iters"]
    assert "more would memorise it" in plan.describe(small, 600)
    tiny = S.TextFigures(30_000, 27_000, 3_000, 80, 30, 2.6)  # 40 parameters a token: at most 1.08M
    assert S.plan(tiny, PROBED, 600).shape.name == "2x4x128"
    assert S.dropout_for(0.5) == 0.0 and S.dropout_for(30) == 0.1 and S.dropout_for(3) == 0.1
    big = S.plan(SHAKESPEARE_LIKE, PROBED, 120)  # bound by time: headroom for a probe that was too slow
    assert S.max_iters(big, SHAKESPEARE_LIKE) == int(big.settings["max_iters"] * S.STEPS_HEADROOM)


def test_the_probe_stops_at_the_first_shape_that_fails_the_rule():
    measured = []

    def fake(shape, vocab_size, base):
        measured.append(shape.name)
        return PROBED[shape.name]

    got = S.probe_ladder(SHAKESPEARE_LIKE, {}, 120, measure=fake)
    # 3x4x192 is not probed: from 2x4x128's pace and its work a token, it would see ~1.4M tokens,
    # far short of 6 for each of its 1.36M parameters.
    assert measured == ["2x2x64", "2x4x128"] and got == {n: PROBED[n] for n in measured}
    assert S.plan(SHAKESPEARE_LIKE, got, 120).shape.name == "2x4x128"
    measured.clear()
    S.probe_ladder(S.TextFigures(20_000, 18_000, 2_000, 40, 1, 2.5), {}, 600, measure=fake)
    assert measured == ["2x2x64", "2x4x128"]  # 3x4x192 has more than 40 parameters a train token


def test_a_text_too_small_for_any_model_is_refused():
    with pytest.raises(UserError, match="too small for any model --preset auto sizes"):
        S.plan(S.TextFigures(500, 450, 50, 20, 1, 2.0), PROBED, 600)


def test_the_bigram_reference_is_the_count_based_loss():
    import numpy as np

    train = np.array([0, 1, 0, 1, 0, 1, 0], dtype=np.uint8)
    # After 0 always 1 (3 of 3, add-one over 2 tokens: 4/5), after 1 always 0 (3/5... 4/5).
    assert S.bigram_loss(train, np.array([0, 1, 0]), 2) == pytest.approx(-np.log(4 / 5))


def test_a_real_auto_run_keeps_to_its_budget_and_says_its_plan(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TINY_TEXT * 3)
    r = cli("train", "--preset", "auto", "--max-time", 12, "--data", path, "--out", tmp_path / "run", "--no-plot",
            "--sample-chars", 0, "--device", "cpu", process=True, timeout=120)
    assert r.code == 0, r.err
    assert "--preset auto: your text has 21,000 characters" in r.err
    shape = re.search(r"Plan for 12 s: a (\d+)x(\d+)x(\d+) GPT", r.err)  # which one depends on this machine's pace
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    m = run["model"]
    assert shape and (m["n_layer"], m["n_head"], m["n_embd"]) == tuple(map(int, shape.groups()))
    assert 0 < run["train"]["max_time"] <= 12
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["since_start"] < 12 * 1.15 + 2, final  # the whole command, final evaluation included


def test_memorising_is_said_once_when_val_rises_while_train_falls():
    m = Memorising()
    reports = [(3.0, 3.0), (2.0, 2.5), (1.5, 2.6), (1.0, 2.7), (0.8, 2.8), (0.5, 3.0)]
    said = [m.seen({"train": t, "val": v}) for t, v in reports]
    assert said == [False, False, False, False, True, False]
    m = Memorising()
    assert not any(m.seen({"train": t, "val": v}) for t, v in [(3, 3), (2, 2.5), (1.5, 2.6), (1, 2.55), (0.5, 2.7)])


def test_a_run_that_memorises_a_random_text_says_so(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "noise.txt"
    path.write_text("".join(rng.choice("abcdefgh") for _ in range(800)))  # nothing to learn but the text itself
    m, t = tiny_configs(path, tmp_path / "run", n_embd=64, block_size=32, max_iters=200, eval_interval=25)
    notes = []
    train(m, t, log=lambda *a: None, note=notes.append)
    said = [n for n in notes if "the model is memorising its train text" in n]
    assert len(said) == 1 and "--preset auto sizes all of these" in said[0]
