"""The two language models of the lecture, written from scratch.

Both share one interface, so the trainer and the sampler never ask which one they hold:

    logits, loss = model(idx, targets)          # idx, targets: (B, T) token ids
    out = model.generate(idx, max_new_tokens)    # (B, T + max_new_tokens)

`GPTLanguageModel` is the lecture's final GPT: token + position embeddings, `n_layer` pre-norm
blocks of causal self-attention and a 4x feed-forward, a final norm and a linear head. The
lecture's architecture is the default; a few small options (rotary positions, RMSNorm, QK-norm,
squared ReLU, tied embeddings) are switched on by `ModelConfig` fields for the faster presets.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.config import ModelConfig
from tinygpt.sampling import generate_stream


class LanguageModel(nn.Module):
    """What both models share: the loss, and generation through `tinygpt.sampling`."""

    config: ModelConfig

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The loss is always computed in float32, whatever dtype the logits came in.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def make_cache(self, batch_size: int):
        """A key/value cache for fast generation, or None where the model has no use for one."""
        return None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True):
        """Continue each row of `idx` by `max_new_tokens` sampled tokens; returns (B, T + new)."""
        new = list(generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p,
                                   generator, use_cache))
        return torch.cat([idx, *new], dim=1) if new else idx


class BigramLanguageModel(LanguageModel):
    """Each token reads the logits for the next token straight from a (vocab x vocab) table."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx, targets=None, cache=None):
        logits = self.token_embedding_table(idx)  # (B, T, vocab)
        loss = None if targets is None else self.loss(logits, targets)
        return logits, loss


# --- GPT ---------------------------------------------------------------------------------------


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


def reference_attention(q, k, v, dropout: nn.Module | None = None):
    """The lecture's attention, one head at a time. Slow and plain: the yardstick for tests.

    q, k, v: (B, nh, T, hs). Returns (B, nh, T, hs).
    """
    T, hs = q.shape[-2], q.shape[-1]
    tril = torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
    heads = []
    for h in range(q.shape[1]):
        wei = q[:, h] @ k[:, h].transpose(-2, -1) * hs**-0.5  # (B, T, T)
        wei = wei.masked_fill(~tril, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        if dropout is not None:
            wei = dropout(wei)
        heads.append(wei @ v[:, h])  # (B, T, hs)
    return torch.stack(heads, dim=1)


def manual_attention(q, k, v, dropout_p: float = 0.0):
    """All heads at once as matmul-softmax-matmul: on CPU in bf16 the fastest for these head sizes.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs); the queries are the last Tq of the Tk positions.
    """
    B, nh, t_q, hs = q.shape
    t_k = k.shape[2]
    q, k = q.flatten(0, 1), k.flatten(0, 1)  # (B*nh, T, hs)
    if t_q > 1:  # one query (a cached generation step) sees every key: no mask
        # The causal mask enters as an additive bias (0 or -inf) fused into the matmul, which
        # measured faster than a separate masked_fill, forward and backward.
        bias = causal_bias(t_q, t_k, q.device, q.dtype).expand(B * nh, t_q, t_k)
        att = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=hs**-0.5)
    else:
        att = torch.bmm(q, k.transpose(1, 2)) * hs**-0.5
    att = F.softmax(att.view(B, nh, t_q, t_k), dim=-1)  # bf16 softmax accumulates in float32
    if dropout_p > 0 and torch.compiler.is_compiling():
        return F.dropout(att, dropout_p, training=True) @ v
    if dropout_p > 0:
        # Drop attention weights; the 1 / (1 - p) rescale is applied to the smaller output.
        att = att * dropout_mask(att.shape, dropout_p, att.dtype, att.device)
        return (att @ v) * (1.0 / kept_fraction(dropout_p))
    return att @ v  # (B, nh, Tq, hs)


_bias_cache: dict = {}


def causal_bias(t_q: int, t_k: int, device, dtype) -> torch.Tensor:
    key = (t_q, t_k, str(device), dtype)
    if key not in _bias_cache:
        allowed = causal_mask(t_q, t_k, device)
        _bias_cache[key] = torch.zeros(t_q, t_k, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))
    return _bias_cache[key]


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """Queries are the last `t_q` of `t_k` positions; each sees itself and what came before."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: rotates pairs of q/k features by a position-dependent angle.

    Feature i is paired with feature i + hs/2 (the "rotate half" layout), so the rotation is two
    multiplies on contiguous memory instead of strided even/odd slices.
    """

    def __init__(self, head_size: int, max_len: int, base: float = 10000.0):
        super().__init__()
        half = head_size // 2
        inv_freq = 1.0 / base ** (torch.arange(half).float() / half)
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hs/2)
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], -1), persistent=False)

    def forward(self, x, start: int = 0):
        """x: (B, T, ..., hs) with positions start .. start + T - 1 along dim 1."""
        T, hs = x.shape[1], x.shape[-1]
        shape = (T,) + (1,) * (x.dim() - 3) + (hs,)
        cos = self.cos[start : start + T].view(shape).to(x.dtype)
        sin = self.sin[start : start + T].view(shape).to(x.dtype)
        swapped = torch.cat([x[..., hs // 2 :], x[..., : hs // 2]], dim=-1)
        return x * cos + swapped * sin


class KVCache:
    """Keys and values of the positions seen so far, one slot per layer, up to `block_size`."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_size: int,
                 device, dtype):
        shape = (batch, n_head, max_len, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0  # positions filled, shared by all layers

    def update(self, layer: int, k, v):
        """Append this step's k, v (B, nh, T, hs); return all keys and values so far."""
        T = k.shape[2]
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        end = self.pos + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int):
        self.pos += n

    def reset(self):
        self.pos = 0


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused projection for q, k and v."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.head_size = config.n_head, config.head_size
        # The lecture's heads have no bias on key/query/value (GPT-2's do); the output projection has one.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.attn_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = Dropout(config.attn_pdrop)
        self.resid_dropout = Dropout(config.dropout)
        self.kernel = config.attention  # "auto" is resolved by the trainer / loader

    def forward(self, x, rope: RotaryEmbedding | None = None, cache: KVCache | None = None):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]  # queries and keys get the same treatment, at once
        if self.config.qk_norm:
            qk = F.rms_norm(qk, (self.head_size,))
        start = cache.pos if cache is not None else 0
        if rope is not None:
            qk = rope(qk, start)
        q, k = qk.unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = self.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v):
        t_q, t_k = q.shape[2], k.shape[2]
        p = self.attn_dropout.p if self.training else 0.0
        if self.kernel == "reference":
            assert t_q == t_k, "the reference attention has no cache"
            return reference_attention(q, k, v, self.attn_dropout if p > 0 else None)
        if self.kernel == "sdpa":
            if t_q == t_k:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            mask = None if t_q == 1 else causal_mask(t_q, t_k, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return manual_attention(q, k, v, p)


class MLP(nn.Module):
    """The feed-forward: widen 4x, non-linearity, project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x):
        x = self.c_fc(x)
        if self.activation == "relu2":
            x = F.relu(x).square()
        elif self.activation == "gelu":
            x = F.gelu(x)
        elif self.activation == "gelu_tanh":  # GPT-2's GELU
            x = F.gelu(x, approximate="tanh")
        else:
            x = F.relu(x)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    """Communication (attention) then computation (MLP), each on a normalised residual branch."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPTLanguageModel(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_emb == "learned":
            self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
            self.rope = None
        else:
            self.rope = RotaryEmbedding(config.head_size, config.block_size)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.head_bias)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding_table.weight

    def _init_weights(self, module):
        # As the lecture's final version: N(0, 0.02) weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_attention(self, kernel: str) -> None:
        """Choose the attention kernel ("sdpa", "manual" or "reference") for every block."""
        for block in self.blocks:
            block.attn.kernel = kernel

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        assert start + T <= self.config.block_size, f"{start + T} tokens exceed block_size"
        x = self.token_embedding_table(idx)  # (B, T, C)
        if self.rope is None:
            pos = torch.arange(start, start + T, device=idx.device)
            x = x + self.position_embedding_table(pos)  # (T, C) broadcast over B
        for block in self.blocks:
            x = block(x, self.rope, cache)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None if targets is None else self.loss(logits, targets)
        return logits, loss

    def make_cache(self, batch_size: int) -> KVCache:
        c = self.config
        p = self.lm_head.weight
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.head_size, p.device, dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.rope is None:
            n -= self.position_embedding_table.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus the attention matmuls."""
        c = self.config
        n = self.num_params()
        attn = 12 * c.n_layer * c.n_embd * c.block_size / 2  # causal: half the T x T scores
        return 6 * n + attn


def build_model(config: ModelConfig) -> LanguageModel:
    if config.model == "bigram":
        return BigramLanguageModel(config)
    return GPTLanguageModel(config)


__all__ = [
    "BigramLanguageModel",
    "GPTLanguageModel",
    "CausalSelfAttention",
    "MLP",
    "Block",
    "KVCache",
    "build_model",
]
