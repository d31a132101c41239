"""The fast paths compute what the plain paths compute: the CPU dropout masks, the attention
kernels against the lecture's reference, and bfloat16 against float32. (Speed itself is measured
by `tinygpt bench`.)"""

import pytest
import torch
from conftest import tiny_configs

from tinygpt.config import ModelConfig
from tinygpt.kernels import dropout, dropout_mask, kept_fraction, mask_bits, reference_attention
from tinygpt.model import GPTLanguageModel
from tinygpt.runs import read_metrics
from tinygpt.runtime import cpu_bf16_speedup, resolve_dtype
from tinygpt.train import train

V = 11


def gpt(**kw):
    cfg = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPTLanguageModel(ModelConfig(**cfg)).eval()


# --- dropout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,bits", [(0.2, 8), (0.5, 8), (0.1, 16), (0.003, 16)])
def test_fast_dropout_statistics(p, bits):
    torch.manual_seed(0)
    assert mask_bits(p) == bits
    assert abs((1 - kept_fraction(p)) - p) <= 0.01 * p
    x = torch.ones(2_000_000)
    y = dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.003
    assert torch.allclose(y[y != 0], torch.tensor(1 / kept_fraction(p)))
    assert abs(y.mean().item() - 1.0) < 0.005  # unbiased
    assert torch.equal(dropout(x, 0.2, training=False), x)
    m = dropout_mask((4, 1000), 0.5, torch.bfloat16, "cpu")
    assert m.dtype == torch.bfloat16 and set(m.unique().tolist()) == {0.0, 1.0}


def test_fast_dropout_is_seeded():
    torch.manual_seed(3)
    a = dropout(torch.ones(1000), 0.3)
    torch.manual_seed(3)
    b = dropout(torch.ones(1000), 0.3)
    assert torch.equal(a, b)


# --- attention kernels ----------------------------------------------------------------------------------


def test_reference_attention_is_the_lecture_formula():
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    out = reference_attention(q, k, v)
    # position 0 attends only to itself
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    w = torch.softmax((q[0, 1, 2] @ k[0, 1, :3].T) / 2.0, -1)
    torch.testing.assert_close(out[0, 1, 2], w @ v[0, 1, :3])


@pytest.mark.parametrize("kernel", ["sdpa", "manual"])
def test_fast_attention_equals_reference(kernel):
    m = gpt()
    idx = torch.randint(0, V, (3, 16))
    m.set_attention("reference")
    ref, _ = m(idx)
    m.set_attention(kernel)
    fast, _ = m(idx)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


# --- bfloat16 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["manual", "sdpa"])
def test_kernels_agree_in_bf16(kernel):
    m = GPTLanguageModel(ModelConfig(vocab_size=20, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 20, (2, 32))
    m.set_attention("reference")
    ref, _ = m(idx)
    m.set_attention(kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = m(idx)
    assert (fast.float() - ref).abs().max().item() < 0.05


def test_bf16_and_fp32_training_agree(tiny_text_file, tmp_path):
    """Same seed, same data: bf16 autocast tracks the float32 loss curve closely."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        m, t = tiny_configs(tiny_text_file, tmp_path / dtype, max_iters=80, eval_interval=20, dtype=dtype,
                            dropout=0.1, attention="manual")
        train(m, t, log=lambda *_: None)
        curves[dtype] = [r["val_loss"] for r in read_metrics(tmp_path / dtype)]
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert fp32[-1] < fp32[0] - 1.0  # it learned
    for a, b in zip(fp32, bf16):
        assert abs(a - b) < 0.05 * a


def test_auto_dtype_is_detected_not_assumed(monkeypatch):
    import tinygpt.runtime as rt

    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    monkeypatch.setattr(rt, "cpu_bf16_speedup", lambda: 0.0)
    assert rt.resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(rt, "cpu_bf16_speedup", lambda: 5.0)
    assert rt.resolve_dtype("auto", cpu) == torch.bfloat16
    speedup = cpu_bf16_speedup()
    has_bf16_units = bool({"amx_bf16", "avx512_bf16"} & rt.cpu_flags())
    assert (speedup > 0) == has_bf16_units


@pytest.mark.parametrize("busy, cores, want", [(0.0, 2, 2), (1.0, 2, 1), (0.8, 2, 1), (0.5, 2, 2), (3.9, 4, 1)])
def test_threads_auto_leaves_the_busy_cores(monkeypatch, busy, cores, want):
    """On 2 cores with one busy, 2 threads trained 2.7x slower than 1 here; idle, 2 were 1.5x
    faster. So "auto" counts the cores other work leaves idle."""
    import tinygpt.runtime as rt

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(rt, "cpu_busy_cores", lambda: busy)
    monkeypatch.setattr(rt.os, "sched_getaffinity", lambda pid: set(range(cores)))
    try:
        assert rt.resolve_threads("auto", torch.device("cpu")) == want == torch.get_num_threads()
        assert rt.resolve_threads("3", torch.device("cpu")) == 3 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert rt.resolve_threads("auto", torch.device("cpu")) is None  # the user's OMP_NUM_THREADS decides
    finally:
        torch.set_num_threads(before)
