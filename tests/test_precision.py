"""Every user's hardware: which dtype `auto` picks for which device (the GPU's capability faked:
CI has none), float16 training with loss scaling on CPU, and the dispatch to torch's own ops
where a fast CPU kernel has no form on the device (MPS)."""

import json
import math

import pytest
import torch
from conftest import TINY_TEXT, assert_one_line_error, cli, losses_by_step, tiny_args, tiny_configs, weights

from tinygpt import kernels, optim, resources, runtime, stopping
from tinygpt.errors import UserError
from tinygpt.train import DivergedError, train

CUDA, CPU, MPS = torch.device("cuda"), torch.device("cpu"), torch.device("mps")


@pytest.mark.parametrize("gpu, capability, native_bf16, expected", [
    ("T4 (Colab)", (7, 5), False, torch.float16),
    ("V100", (7, 0), False, torch.float16),
    ("RTX 2080", (7, 5), False, torch.float16),
    ("P100", (6, 0), False, torch.float32),
    ("A100", (8, 0), True, torch.bfloat16),
    ("RTX 3090", (8, 6), True, torch.bfloat16),
    ("H100", (9, 0), True, torch.bfloat16),
])
def test_auto_dtype_on_cuda_follows_the_hardware(monkeypatch, gpu, capability, native_bf16, expected):
    """bf16 only where it is in hardware: `torch.cuda.is_bf16_supported()` says True on a T4
    (it counts emulation), where fp16 tensor cores are what is fast."""
    monkeypatch.setattr(runtime, "cuda_facts", lambda device: (capability, native_bf16))
    dtype, why = runtime.choose_dtype("auto", CUDA)
    assert dtype == expected, (gpu, why)
    assert f"compute capability {capability[0]}.{capability[1]}" in why
    assert runtime.inference_dtype("auto", CUDA) == expected  # generation and serving too
    assert runtime.resolve_attention("auto", CUDA) == "sdpa"
    assert runtime.choose_dtype("float32", CUDA)[0] == torch.float32  # asked for: as asked


@pytest.mark.parametrize("speedup, expected, says", [
    (6.0, torch.bfloat16, "6.0x float32's"),   # AMX
    (2.3, torch.bfloat16, "2.3x float32's"),   # AVX512-BF16
    (1.2, torch.float32, "only 1.2x"),
    (0.0, torch.float32, "no bf16 units"),     # emulated: never even timed
])
def test_auto_dtype_on_cpu_follows_the_measurement(monkeypatch, speedup, expected, says):
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: speedup)
    dtype, why = runtime.choose_dtype("auto", CPU)
    assert dtype == expected and says in why
    assert runtime.inference_dtype("auto", CPU) == torch.float32  # matrix-vector work: float32


def test_mps_and_explicit_choices():
    assert runtime.choose_dtype("auto", MPS)[0] == torch.float32
    assert runtime.resolve_attention("auto", MPS) == "manual"  # torch's own matmuls and softmax
    assert runtime.choose_dtype("float16", CPU) == (torch.float16, "--dtype float16")
    assert runtime.grad_scaler(torch.float16, CPU).is_enabled()
    assert not runtime.grad_scaler(torch.bfloat16, CPU).is_enabled()
    assert not runtime.grad_scaler(torch.float32, MPS).is_enabled()


def test_a_dtype_the_device_cannot_autocast_is_one_line():
    """(MPS without bf16, or another backend; the meta device has no autocast at all.)"""
    with pytest.raises(UserError, match=r"--dtype bfloat16 does not run on meta .*use --dtype float32"):
        runtime.choose_dtype("bfloat16", torch.device("meta"))
    assert runtime.choose_dtype("float32", torch.device("meta"))[0] == torch.float32


def test_kernels_without_a_device_form_use_torchs_own_ops(monkeypatch):
    """The CPU dropout masks and the fused AdamW exist for CPU (and CUDA); on any other device
    (MPS; here the meta device stands in) torch's own dropout and the foreach AdamW run."""
    monkeypatch.setattr(kernels, "dropout_mask", lambda *a, **k: pytest.fail("the CPU mask ran off the CPU"))
    x = torch.ones(4, 8, device="meta")
    assert kernels.dropout(x, 0.2, training=True).shape == (4, 8)
    assert "mps" not in optim.FUSED_DEVICES
    # The foreach path (what MPS runs) makes the fused kernel's update: CPU, 3 steps, to rounding.
    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(64)) for _ in range(2))
    b.data.copy_(a.data)
    fused = optim.AdamW([a], lr=1e-2, weight_decay=0.1, fused=True)
    foreach = optim.AdamW([b], lr=1e-2, weight_decay=0.1, fused=False)
    for _ in range(3):
        g = torch.randn(64)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        foreach.step()
    torch.testing.assert_close(a.data, b.data, rtol=1e-6, atol=1e-7)


def test_memory_estimate_on_mps_uses_what_metal_recommends(monkeypatch):
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * resources.GiB, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4 * resources.GiB, raising=False)
    assert resources.available_memory(MPS) == 12 * resources.GiB


# --- float16 with loss scaling, on CPU -------------------------------------------------------------


def run(tmp_path, name, **kw):
    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    m, t = tiny_configs(data, tmp_path / name, **kw)
    train(m, t, log=lambda *_: None, note=lambda *_: None)
    return tmp_path / name


def reports(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_float16_training_learns_like_float32(tmp_path):
    """The tiny model in float16 autocast with a loss scaler lowers the loss as float32 does:
    every report within 0.05 nats of float32's (same seed, same batches)."""
    fp32, fp16 = (losses_by_step(run(tmp_path, d, dtype=d)) for d in ("float32", "float16"))
    assert sorted(fp16) == sorted(fp32) == [0, 20, 40, 60]
    assert fp16[60][1] < fp16[0][1] - 1.0  # it learned
    for step in fp32:
        assert abs(fp16[step][1] - fp32[step][1]) < 0.05, (step, fp16[step], fp32[step])
    (rec,) = [r for r in reports(tmp_path / "float16") if r["step"] == 60]
    assert rec["loss_scale"] == 2.0**16 and rec["skipped_steps"] == 0
    assert "loss_scale" not in reports(tmp_path / "float32")[-1]
    assert json.loads((tmp_path / "float16" / "run.json").read_text())["dtype"] == "float16"


def test_overflowed_steps_are_skipped_and_counted_not_fatal(monkeypatch, tmp_path):
    """A loss scale far too large overflows float16's gradients: the scaler skips those steps and
    halves the scale each time; the run goes on, learns, and says how many it skipped."""
    monkeypatch.setattr(runtime, "FP16_INIT_SCALE", 2.0**40)
    out = run(tmp_path, "run", dtype="float16")
    last = [r for r in reports(out) if "loss_scale" in r][-1]
    skipped = last["skipped_steps"]
    assert skipped >= 10 and last["loss_scale"] == 2.0**40 / 2**skipped  # one halving per skipped step
    losses = losses_by_step(out)
    assert losses[60][1] < losses[0][1] - 0.5


def test_a_collapsing_loss_scale_is_divergence(monkeypatch, tmp_path):
    """Gradients that overflow however far the scale falls: exit status 3 once the scale is below 1,
    the last good checkpoint kept."""
    monkeypatch.setattr(stopping, "signal_hook", lambda grad: grad * math.inf)  # every gradient inf
    with pytest.raises(DivergedError, match=r"float16 loss scale fell to 0.5 \(17 steps skipped\)"):
        run(tmp_path, "run", dtype="float16")
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 0


def test_float16_resume_restores_the_loss_scale_bit_exactly(monkeypatch, tmp_path):
    """With a scale that has to back off, a resumed run equals the uninterrupted one only if the
    checkpoint carries the scaler's state: it does."""
    monkeypatch.setattr(runtime, "FP16_INIT_SCALE", 2.0**40)
    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    args = dict(dtype="float16", dropout=0.1, eval_interval=4)
    a = cli("train", *tiny_args(data, tmp_path / "a", max_iters=12, **args))
    b = cli("train", *tiny_args(data, tmp_path / "b", max_iters=6, **args))
    assert a.code == b.code == 0, a.err + b.err
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["scaler"]["scale"] < 2.0**40 and state["skipped_steps"] > 0
    r = cli("train", "--resume", tmp_path / "b", "--max-iters", 12)
    assert r.code == 0, r.err
    assert losses_by_step(tmp_path / "a") == {s: v for s, v in losses_by_step(tmp_path / "b").items() if s != 6}
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert reports(tmp_path / "a")[-1]["skipped_steps"] == [r for r in reports(tmp_path / "b")
                                                            if "skipped_steps" in r][-1]["skipped_steps"]


def test_float16_where_torch_cannot_scale_is_one_line(monkeypatch, tiny_text_file, tmp_path):
    def refuse(*a, **k):
        raise RuntimeError("GradScaler is not supported on this device")

    monkeypatch.setattr(torch.amp, "GradScaler", refuse)
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "run", dtype="float16"))
    assert_one_line_error(r, "float16 training with loss scaling is not supported on cpu", "use --dtype float32")
