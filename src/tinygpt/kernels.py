"""The fast paths under the model: CPU dropout masks, elementwise ops with hand-written
gradients, and the attention kernels.

`model.py` says *what* is computed (the lecture's architecture); this file says *how*, on each
device, quickly. Every kernel computes the lecture's attention, which `reference_attention`
spells out one head at a time; tests check each kernel against it.

Attention arguments, for every kernel:
    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs)
    mask: None, or bool (B, 1, Tq, Tk), True where a query may see a key.
With no mask the queries are the last Tq of the Tk positions and each sees itself and what came
before (plain causal attention when Tq == Tk). A mask comes from the decode engine, whose slots
hold sequences of different lengths.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = ("sdpa", "manual", "reference")


# --- dropout -------------------------------------------------------------------------------------


def mask_bits(p: float) -> int:
    """Random bits per element for a dropout mask: 8 when p is within 1% of a multiple of 1/256
    (0.2 -> 51/256 = 0.1992), else 16."""
    k = round(p * 256)
    return 8 if k >= 1 and abs(k / 256 - p) <= 0.01 * p else 16


def kept_fraction(p: float) -> float:
    """The exact keep probability of `dropout_mask`, which the rescaling uses (no bias)."""
    levels = 2 ** mask_bits(p)
    return 1 - round(p * levels) / levels


def dropout_mask(shape, p: float, dtype, device) -> torch.Tensor:
    """1 where an element is kept (probability `kept_fraction(p)`), 0 where dropped, in `dtype`.

    On CPU, torch's dropout draws one random float per element through `bernoulli_`, which took
    a third of a lecture-sized training step here. 8 (or 16) random bits per element, cut from
    64-bit draws, are enough and several times cheaper.
    """
    n = math.prod(shape)
    bits = mask_bits(p)
    per_draw = 64 // bits
    draws = torch.randint(-(2**63), 2**63 - 1, ((n + per_draw - 1) // per_draw,), dtype=torch.int64, device=device)
    small = draws.view(torch.int8 if bits == 8 else torch.int16)[:n].view(shape)  # uniform, signed
    levels = 2**bits
    return (small >= -levels // 2 + round(p * levels)).to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability p and scale the rest to keep the expectation."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: fused into one kernel
        return F.dropout(x, p, training=True)
    return x * dropout_mask(x.shape, p, x.dtype, x.device).mul_(1.0 / kept_fraction(p))


class Dropout(nn.Dropout):
    """`nn.Dropout` with the fast CPU path above."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


# --- elementwise ops with a hand-written backward ---------------------------------------------
#
# On a CPU a small model's step is mostly elementwise passes over its activations, and autograd
# spends several passes on the backward of a composite op. These compute the same numbers as the
# composite (tests check them bit for bit) with fewer passes.


class _Relu2(torch.autograd.Function):
    """relu(x)^2 saving only relu(x); the gradient 2 relu(x) g is two passes (autograd: five)."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return (grad * r).mul_(2.0)  # doubling is exact: the same numbers as grad * (2 r)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, `F.relu(x).square()`, with a cheaper backward (compiled: the composite)."""
    if torch.compiler.is_compiling():
        return F.relu(x).square()
    return _Relu2.apply(x)


class _Rotate(torch.autograd.Function):
    """x cos + swap_halves(x) sin: a rotation of each feature pair, whose gradient is the same
    rotation backwards, g cos - swap_halves(g) sin (autograd: eight passes, here four)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return x * cos + swap_halves(x) * sin

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # autograd's swap_halves(g sin) is swap_halves(g) * -sin (sin's halves are each other's negation)
        return grad * cos - swap_halves(grad) * sin, None, None


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """The last dimension's two halves swapped: (x1, x2) -> (x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + swap_halves(x) * sin`, cos and sin broadcast against x; sin's two halves are
    each other's negation (-sin t, sin t), as rotary embeddings lay them out."""
    if torch.compiler.is_compiling() or not (x.requires_grad and torch.is_grad_enabled()):
        return x * cos + swap_halves(x) * sin
    return _Rotate.apply(x, cos, sin)


class _NormRotate(torch.autograd.Function):
    """RMS-normalise each vector of x's last dimension (QK-norm, no weight), then rotate it:
    computed in float32 and rounded once to x's dtype. Saves the normalised x and the scales."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        x32 = x.float()
        eps = torch.finfo(x32.dtype).eps  # F.rms_norm's: that of the float type it computes in
        scale = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        n = x32 * scale
        ctx.save_for_backward(n, scale, cos, sin)
        return _rotate_halves(n, cos, sin).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        n, scale, cos, sin = ctx.saved_tensors
        g = grad.float()
        g = _rotate_halves(g, cos, sin, backwards=True)
        # through y = n * scale, n = x / rms(x): dx = scale (g - n mean(g n))
        dot = torch.linalg.vecdot(g, n, dim=-1).unsqueeze(-1).div_(n.shape[-1])
        return torch.addcmul(g, n, dot, value=-1.0).mul_(scale).to(grad.dtype), None, None


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backwards: bool = False) -> torch.Tensor:
    """x * cos + swap_halves(x) * sin (backwards: - swap_halves(x) * sin, the rotation undone),
    each half's sine term added in place (no swapped copy)."""
    half, sign = x.shape[-1] // 2, -1.0 if backwards else 1.0
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


def norm_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate(F.rms_norm(x, (hs,)), cos, sin)` in one step: the QK-norm and the rotary
    positions of queries and keys, fewer passes forward and half the backward's."""
    if torch.compiler.is_compiling():
        return rotate(F.rms_norm(x, (x.shape[-1],)), cos, sin).to(x.dtype)  # cos, sin: float32
    return _NormRotate.apply(x, cos, sin)


# --- attention -----------------------------------------------------------------------------------


_recording: list[list[torch.Tensor]] = []


@contextlib.contextmanager
def recording_attention():
    """Inside, every attention computed by the manual or reference kernel appends its
    probabilities, (B, nh, Tq, Tk), to the list this yields: the very tensor the forward
    multiplies the values by, one per layer in order (`/v1/inspect` shows them)."""
    records: list[torch.Tensor] = []
    _recording.append(records)
    try:
        yield records
    finally:
        _recording.remove(records)


def _record(att: torch.Tensor) -> None:
    if _recording:
        _recording[-1].append(att.detach())


def attention(kernel: str, q, k, v, mask=None, dropout_p: float = 0.0, drop: nn.Module | None = None):
    """Softmax(q k^T / sqrt(hs)) v with the causal (or given) mask, by the named kernel."""
    if kernel == "reference":
        return reference_attention(q, k, v, mask, drop if dropout_p > 0 else None)
    if kernel == "sdpa":
        t_q, t_k = q.shape[2], k.shape[2]
        if mask is None and t_q == t_k:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if mask is None and t_q > 1:
            mask = causal_mask(t_q, t_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if kernel == "manual":
        return manual_attention(q, k, v, mask, dropout_p)
    raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def reference_attention(q, k, v, mask=None, dropout: nn.Module | None = None):
    """The lecture's attention, one head at a time. Slow and plain: the yardstick for tests."""
    t_q, t_k, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    allowed = causal_mask(t_q, t_k, q.device) if mask is None else mask[:, 0]  # (Tq, Tk) or (B, Tq, Tk)
    heads, weights = [], []
    for h in range(q.shape[1]):
        wei = q[:, h] @ k[:, h].transpose(-2, -1) * hs**-0.5  # (B, Tq, Tk)
        wei = wei.masked_fill(~allowed, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        weights.append(wei)
        if dropout is not None:
            wei = dropout(wei)
        heads.append(wei @ v[:, h])  # (B, Tq, hs)
    if _recording:
        _record(torch.stack(weights, dim=1))
    return torch.stack(heads, dim=1)  # (B, nh, Tq, hs)


def manual_attention(q, k, v, mask=None, dropout_p: float = 0.0):
    """All heads at once as matmul-softmax-matmul: on CPU in bf16 the fastest for these head sizes."""
    B, nh, t_q, hs = q.shape
    t_k = k.shape[2]
    if mask is not None:
        att = (q @ k.transpose(-2, -1)) * hs**-0.5  # (B, nh, Tq, Tk)
        att = att.masked_fill(~mask, float("-inf"))
    elif t_q > 1:
        # The causal mask enters as an additive bias (0 or -inf) fused into the matmul, which
        # measured faster than a separate masked_fill, forward and backward.
        bias = causal_bias(t_q, t_k, q.device, q.dtype).expand(B * nh, t_q, t_k)
        att = torch.baddbmm(bias, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), alpha=hs**-0.5)
        att = att.view(B, nh, t_q, t_k)
    else:  # one query (a decoding step) that sees every key: no mask
        att = (q @ k.transpose(-2, -1)) * hs**-0.5
    att = F.softmax(att, dim=-1)  # bf16 softmax accumulates in float32
    _record(att)
    if dropout_p > 0 and torch.compiler.is_compiling():
        return F.dropout(att, dropout_p, training=True) @ v
    if dropout_p > 0:
        # Drop attention weights; the 1 / (1 - p) rescale is applied to the smaller output.
        att = att * dropout_mask(att.shape, dropout_p, att.dtype, att.device)
        return (att @ v) * (1.0 / kept_fraction(dropout_p))
    return att @ v  # (B, nh, Tq, hs)


_bias_cache: dict = {}


def causal_bias(t_q: int, t_k: int, device, dtype) -> torch.Tensor:
    """The causal mask as an additive (Tq, Tk) bias of 0 and -inf, made once per shape."""
    key = (t_q, t_k, str(device), dtype)
    if key not in _bias_cache:
        allowed = causal_mask(t_q, t_k, device)
        _bias_cache[key] = torch.zeros(t_q, t_k, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))
    return _bias_cache[key]


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """Queries are the last `t_q` of `t_k` positions; each sees itself and what came before."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)
