"""Muon (`--optimizer muon`): the update is torch.optim.Muon's; the Newton-Schulz iteration makes a
matrix nearly orthogonal in either dtype; a tiny GPT trained with it learns; a run resumes with it
bit for bit; and the choice is recorded in run.json and cannot change on a resume."""

import json

import pytest
import torch
from conftest import assert_one_line_error, assert_same_weights, cli, losses_by_step, snapshot, tiny_args

from tinygpt.checkpoint import checkpoint_dir
from tinygpt.config import TrainConfig
from tinygpt.model import build_model
from tinygpt.optim import AdamW, Muon, MuonAdamW, lr_at, make_optimizer, orthogonalize, orthogonalize_all, set_lr
from tinygpt.train import muon_ns_dtype


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_newton_schulz_pushes_every_singular_value_towards_one(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, v = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values 0.1 .. 10
    assert torch.linalg.svdvals(g).min() == pytest.approx(0.1, rel=1e-3)
    for dtype in (torch.float32, torch.bfloat16):
        o = orthogonalize(g, dtype)
        assert o.dtype == dtype and o.shape == g.shape
        s = torch.linalg.svdvals(o.float())
        assert s.min() > 0.5 and s.max() < 1.3, (dtype, s)


def test_stacked_newton_schulz_is_the_one_by_one_iteration():
    """Same-shape matrices (tall ones turned wide) go through one batched call: the same result
    as one by one, to float32's rounding (bfloat16's to the bit); a lone shape takes the
    one-by-one path itself."""
    torch.manual_seed(0)
    gs = [torch.randn(24, 8), torch.randn(8, 24), torch.randn(8, 24), torch.randn(16, 16), torch.randn(5, 7)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.0)):
        alone = [orthogonalize(g, dtype) for g in gs]
        stacked = orthogonalize_all(gs, dtype)
        assert [s.shape for s in stacked] == [g.shape for g in gs] and all(s.dtype == dtype for s in stacked)
        assert max((a.float() - b.float()).abs().max().item() for a, b in zip(alone, stacked)) <= tol
        assert torch.equal(stacked[3], alone[3]) and torch.equal(stacked[4], alone[4])  # lone shapes


def test_muon_update_is_torch_muons():
    """torch.optim.Muon iterates in bfloat16; ours in bfloat16 takes the very same steps, and in
    float32 the same steps to bfloat16's rounding."""
    torch.manual_seed(0)
    start = [torch.randn(12, 8), torch.randn(8, 20)]
    runs = {}
    for name in ("torch", "bf16", "fp32"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        if name == "torch":
            opt = torch.optim.Muon(params, lr=0.02, momentum=0.95, weight_decay=0.1)
        else:
            opt = Muon(params, lr=0.02, momentum=0.95, weight_decay=0.1,
                       ns_dtype=torch.bfloat16 if name == "bf16" else torch.float32)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs[name] = params
    for a, b, c in zip(runs["torch"], runs["bf16"], runs["fp32"]):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, atol=2e-3) and not torch.equal(a, c)
        assert not torch.allclose(a, start[0] if a.shape == start[0].shape else start[1], atol=1e-2)  # it moved


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from tinygpt.config import ModelConfig

    model = build_model(ModelConfig(vocab_size=20, n_layer=2, n_head=2, n_embd=16, block_size=8))
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.03))
    assert isinstance(opt, MuonAdamW) and isinstance(opt.adamw, AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    assert muon == sorted(f"blocks.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")), muon
    rest = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert rest == set(names.values()) - set(muon)
    assert "token_embedding_table.weight" in rest and "lm_head.weight" in rest
    set_lr(opt, 5e-4)  # the schedule scales both: Muon stays muon_lr / learning_rate above AdamW
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.015, 5e-4, 5e-4])
    assert isinstance(make_optimizer(model, TrainConfig()), AdamW)


def test_muon_refuses_a_model_without_blocks(tiny_text_file, tmp_path):
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "b", model="bigram", optimizer="muon"))
    assert_one_line_error(r, "--optimizer muon", "the bigram", "--optimizer adamw")
    assert not (tmp_path / "b").exists()


def test_muon_ns_dtype_follows_the_run():
    assert muon_ns_dtype(torch.bfloat16) == torch.bfloat16
    assert muon_ns_dtype(torch.float32) == torch.float32
    assert muon_ns_dtype(torch.float16) == torch.float32


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = TrainConfig(learning_rate=1e-2, min_lr=1e-3, lr_schedule="wsd", warmup_iters=10, max_iters=100,
                      cooldown_frac=0.3)
    lrs = [lr_at(s, cfg) for s in range(101)]
    assert lrs[9] == pytest.approx(1e-2) and lrs[0] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-2) for lr in lrs[10:71])  # stable until the last 30 steps
    assert lrs[85] == pytest.approx(1e-2 - 0.5 * 9e-3)  # halfway down the cooldown
    assert lrs[100] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


MUON = dict(optimizer="muon", muon_lr=0.02, learning_rate=3e-3, dropout=0.1, attention="manual", batch_size=8,
            eval_iters=2)


def test_muon_training_lowers_the_loss_and_is_recorded(tiny_text_file, tmp_path):
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "m", **{**MUON, "dropout": 0.0}, max_iters=40,
                                eval_interval=40))
    assert r.code == 0, r.err
    losses = losses_by_step(tmp_path / "m")
    assert losses[0][1] > 3.0 and losses[40][1] < losses[0][1] - 1.0, losses  # val loss, from ln(34) = 3.5
    meta = json.loads((tmp_path / "m" / "run.json").read_text())
    assert meta["train"]["optimizer"] == "muon" and meta["train"]["muon_lr"] == 0.02
    assert meta["muon_ns_dtype"] == "float32"  # the run is float32
    saved = torch.load(checkpoint_dir(tmp_path / "m", "latest") / "optimizer.pt", weights_only=True)
    assert set(saved) == {"muon", "adamw"} and len(saved["muon"]["state"]) == 8  # 2 blocks x 4 matrices


def test_muon_resume_is_bit_exact(tiny_text_file, tmp_path):
    a = cli("train", *tiny_args(tiny_text_file, tmp_path / "a", **MUON, eval_interval=4, max_iters=12))
    assert a.code == 0, a.err
    b = cli("train", *tiny_args(tiny_text_file, tmp_path / "b", **MUON, eval_interval=4, max_iters=6))
    assert b.code == 0, b.err
    b = cli("train", "--resume", tmp_path / "b", "--max-iters", 12)
    assert b.code == 0, b.err
    la, lb = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    assert {s: lb[s] for s in la} == la
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_resume_refuses_another_optimizer(tiny_text_file, tmp_path):
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "r", max_iters=4, eval_interval=4))
    assert r.code == 0, r.err
    before = snapshot(tmp_path / "r")
    r = cli("train", "--resume", tmp_path / "r", "--optimizer", "muon", "--max-iters", 8)
    assert_one_line_error(r, "--optimizer muon conflicts with the run being resumed", "optimizer='adamw'")
    assert snapshot(tmp_path / "r") == before


def test_max_time_fits_the_schedule_to_the_steps_that_fit(tiny_text_file, tmp_path):
    """A cosine over 100,000 steps with 4 s to run: the schedule is fitted to the steps the time
    allows, so the learning rate has come down to min_lr by the time the run stops."""
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "t", max_iters=100_000, max_time=4, eval_interval=50,
                                lr_schedule="cosine", learning_rate=3e-3, min_lr=3e-4, warmup_iters=5))
    assert r.code == 0, r.err
    assert "leaves time for about" in r.err and "of the 100000 steps here" in r.err
    from tinygpt.runs import read_metrics

    reports = [m for m in read_metrics(tmp_path / "t") if "lr" in m]
    last = reports[-1]
    assert last["step"] < 100_000
    assert last["lr"] < 3e-4 + 0.25 * (3e-3 - 3e-4), reports  # most of the way down (the stop is by time)
    assert max(m["lr"] for m in reports) > 2e-3  # it did run at the peak first


def test_fit_horizon_counts_the_steps_that_fit():
    from tinygpt.optim import fit_horizon

    cfg = TrainConfig(max_iters=1000, max_time=100)
    assert fit_horizon(cfg, 10, remaining_s=50.0, seconds_per_step=0.1) == 10 + int(0.98 * 500)
    assert fit_horizon(cfg, 10, remaining_s=500.0, seconds_per_step=0.1) is None  # max_iters fits
    fitted = [lr_at(s, TrainConfig(lr_schedule="cosine", max_iters=1000, min_lr=0.0), horizon=500) for s in (250, 500)]
    assert fitted == pytest.approx([lr_at(s, TrainConfig(lr_schedule="cosine", max_iters=500, min_lr=0.0))
                                    for s in (250, 500)])
