"""The fast paths compute what the plain paths compute: the CPU dropout masks, the hand-written
gradients against autograd's, the attention kernels against the lecture's reference, and
bfloat16 against float32. (Speed itself is measured
by `tinygpt bench`.)"""

import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import tiny_configs

from tinygpt.config import ModelConfig
from tinygpt.kernels import dropout, dropout_mask, kept_fraction, mask_bits, reference_attention, relu2
from tinygpt.model import GPTLanguageModel, RotaryEmbedding
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



# --- hand-written gradients -------------------------------------------------------------------------


def value_and_grad(fn, x, grad):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(grad)
    return out, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_is_the_composite_bit_for_bit(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64).to(dtype)
    x[0, 0, :8] = 0.0  # relu's kink: no gradient through it, either way
    grad = torch.randn(4, 8, 64).to(dtype)
    out, gx = value_and_grad(relu2, x, grad)
    ref_out, ref_gx = value_and_grad(lambda t: torch.relu(t).square(), x, grad)
    assert out.dtype == gx.dtype == dtype
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    assert (gx[x <= 0] == 0).all() and gx.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared-positions", "per-row-positions"])
def test_rotary_gradient_is_autograds_bit_for_bit(dtype, per_row):
    rope = RotaryEmbedding(head_size=16, max_len=32)
    torch.manual_seed(0)
    x = torch.randn(3, 10, 2, 4, 16).to(dtype)  # (B, T, q and k, nh, hs), as attention calls it
    grad = torch.randn_like(x)
    positions = torch.randint(0, 32, (3, 10)) if per_row else torch.arange(5, 15)

    def composite(t):  # the rotation spelled out, differentiated by autograd
        shape = positions.shape + (1,) * (t.dim() - 3) + (16,)
        cos, sin = (b[positions].view(shape).to(dtype) for b in (rope.cos, rope.sin))
        return t * cos + torch.cat([t[..., 8:], t[..., :8]], -1) * sin

    out, gx = value_and_grad(lambda t: rope(t, positions), x, grad)
    ref_out, ref_gx = value_and_grad(composite, x, grad)
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    with torch.no_grad():  # generation takes the plain path: the same numbers
        assert torch.equal(rope(x, positions), ref_out)
    if dtype == torch.float32:  # a rotation: its gradient is the rotation backwards, norms kept
        torch.testing.assert_close(gx.norm(dim=-1), grad.norm(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qk_norm_and_rotation_match_the_two_ops(dtype):
    rope = RotaryEmbedding(head_size=16, max_len=32)
    torch.manual_seed(0)
    x = (3 * torch.randn(3, 10, 2, 4, 16)).to(dtype)
    grad = torch.randn_like(x)
    positions = torch.arange(3, 13)

    def two_ops(t):  # QK-norm, then the rotation, as separate autograd ops in t's dtype
        return rope(torch.nn.functional.rms_norm(t, (16,)), positions)

    out, gx = value_and_grad(lambda t: rope(t, positions, norm=True), x, grad)
    ref_out, ref_gx = value_and_grad(two_ops, x.double(), grad.double())  # the exact figures
    assert out.dtype == gx.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # float32: exact to rounding; bf16: rounded once
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(gx.double(), ref_gx, atol=tol, rtol=tol)
    if dtype == torch.bfloat16:  # no worse than the two ops computed in bf16
        two, two_gx = value_and_grad(two_ops, x, grad)
        assert (out.double() - ref_out).abs().max() <= (two.double() - ref_out).abs().max()
        assert (gx.double() - ref_gx).abs().max() <= (two_gx.double() - ref_gx).abs().max()
    torch.testing.assert_close(out.double().norm(dim=-1), torch.full(out.shape[:-1], 4.0, dtype=torch.double),
                               atol=0.02, rtol=0)  # unit RMS over 16 features: norm 4, kept by the rotation

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


FAULTS_PER_STEP = """
import ctypes, resource, sys, torch
from tinygpt.config import ModelConfig
from tinygpt.model import GPTLanguageModel
from tinygpt.runtime import keep_freed_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the machine's huge-page setting
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.manual_seed(0)
m = GPTLanguageModel(ModelConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=128, activation="relu2"))
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x = torch.randint(0, 65, (32, 64))
def step(size):  # the activations' sizes change from step to step, as they do between train and eval
    _, loss = m(x[:size], x[:size])
    loss.backward()
    opt.step()
    opt.zero_grad()
for size in (32, 8) * 4:  # glibc's thresholds settle on the sizes asked for
    step(size)
before = faults()
for size in (32, 8) * 5:
    step(size)
print(applied, (faults() - before) / 10)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings: Linux with glibc only")
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in(tmp_path):
    """With keep_freed_memory a step's activations reuse the last step's pages; glibc's default
    trims the heap's free top once it passes twice the largest block freed, so each step's
    activations are faulted in (and zeroed by the kernel) again. Whether it trims depends on where
    small blocks happen to lie (import order, address layout), so each process starts the same way."""
    def same_addresses():  # where the heap lies, and so whether glibc's default trims it, varies from run to run
        ctypes.CDLL(None).personality(0x0040000)  # ADDR_NO_RANDOMIZE, as `setarch -R` does

    runs = {}
    for keep in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], capture_output=True, text=True, check=True,
                             preexec_fn=same_addresses, env={**os.environ, "TINYGPT_KEEP_FREED_MEMORY": keep,
                                                             "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
        applied, faults = out.stdout.split()
        assert applied == str(keep == "1"), out.stdout
        runs[keep] = float(faults)
    # pages faulted in per step: handed back 1,500-3,600 here (by which CPU kernels run), kept 70-170
    # (what Python and the math libraries map for themselves faults either way)
    assert runs["1"] * 4 < runs["0"], runs
