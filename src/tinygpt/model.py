"""The two language models of the lecture, written from scratch.

Both share one interface, so the trainer and the sampler never ask which one they hold:

    logits, loss = model(idx, targets)          # idx, targets: (B, T) token ids
    out = model.generate(idx, max_new_tokens)    # (B, T + max_new_tokens)

`GPTLanguageModel` is the lecture's final GPT: token + position embeddings, `n_layer` pre-norm
blocks of causal self-attention and a 4x feed-forward, a final norm and a linear head. The file
reads in the lecture's order: attention, feed-forward, block, the model; then the pieces the
options add (rotary positions, norms). How attention and dropout are computed fast is in
`kernels.py`; the key/value cache for generation is in `engine.py`.

The lecture's architecture is the default; a few small options (rotary positions, RMSNorm,
QK-norm, squared ReLU, tied embeddings, a bigram input, soft-capped logits) are switched on by
`ModelConfig` fields for the presets.

Shapes in comments: B batch, T time (positions), C channels (n_embd), nh heads, hs head size.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.config import ModelConfig
from tinygpt.kernels import KERNELS, Dropout, attention, norm_rotate, relu2, rotate


class LanguageModel(nn.Module):
    """What both models share: the loss, the attention switch, and generation."""

    config: ModelConfig

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The loss is always computed in float32, whatever dtype the logits came in.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def set_attention(self, kernel: str) -> None:
        """Choose the attention kernel ("sdpa", "manual" or "reference"); no-op without attention."""

    def make_cache(self, batch_size: int):
        """A key/value cache for fast generation, or None where the model has no use for one."""
        return None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True, window="full"):
        """Continue each row of `idx` by `max_new_tokens` sampled tokens; returns (B, T + new).
        `window`: "full" (the lecture's last block_size tokens) or "chunked" (see engine.py)."""
        from tinygpt.sampling import generate_stream

        new = list(generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p,
                                   generator, use_cache, window))
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


# --- GPT -----------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: the lecture's heads, all computed at once from one fused
    q/k/v projection."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.head_size = config.n_head, config.head_size
        # The lecture's heads have no bias on key/query/value (GPT-2's do); the output projection has one.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.attn_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = Dropout(config.attn_pdrop)
        self.resid_dropout = Dropout(config.dropout)
        self.kernel = "manual"  # set by the model's set_attention

    def forward(self, x, positions, rope=None, cache=None):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size)  # (B, T, 3, nh, hs)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]  # queries and keys get the same treatment, at once
        if rope is not None:
            qk = rope(qk, positions, norm=self.config.qk_norm)  # QK-norm (if on), then the rotation
        elif self.config.qk_norm:
            qk = F.rms_norm(qk, (self.head_size,))
        q, k = qk.unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        mask = None
        if cache is not None:  # generation: keys and values of earlier positions come from the cache
            k, v, mask = cache.update(self.layer, k, v)  # (B, nh, Tk, hs), mask (B, 1, T, Tk) or None
        p = self.attn_dropout.p if self.training else 0.0
        y = attention(self.kernel, q, k, v, mask, p, self.attn_dropout)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """The feed-forward: widen 4x, non-linearity, project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4C)
        if self.activation == "relu2":
            x = relu2(x)  # F.relu(x).square(), with a cheaper backward
        elif self.activation == "gelu":
            x = F.gelu(x)
        elif self.activation == "gelu_tanh":  # GPT-2's GELU
            x = F.gelu(x, approximate="tanh")
        else:
            x = F.relu(x)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Communication (attention) then computation (MLP), each on a normalised residual branch."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, positions, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), positions, rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPTLanguageModel(LanguageModel):
    """The lecture's GPT: embeddings, `n_layer` blocks, a final norm and a linear head.

    `forward(idx, targets=None, cache=None)`: idx (B, T) token ids with T <= block_size; returns
    logits (B, T, vocab) and the mean cross-entropy against `targets` (or None). With a `cache`
    (see `engine.py`) the tokens continue what the cache holds, at the positions it says.
    """

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
        if config.zero_init_proj:  # each block's branches add nothing at first: the block is the identity
            for block in self.blocks:
                nn.init.zeros_(block.attn.c_proj.weight)
                nn.init.zeros_(block.mlp.c_proj.weight)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding_table.weight
        if config.bigram_embed:  # zero, drawing no random numbers: the same seed gives the same model as without it
            rows = bigram_rows(config.vocab_size)
            self.bigram_embedding_table = nn.Embedding(rows, config.n_embd, _weight=torch.zeros(rows, config.n_embd))
        self.set_attention(config.attention if config.attention != "auto" else "manual")

    def _init_weights(self, module):
        # As the lecture's final version: N(0, 0.02) weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_attention(self, kernel: str) -> None:
        """Choose the attention kernel ("sdpa", "manual" or "reference") for every block."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        for block in self.blocks:
            block.attn.kernel = kernel

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        if cache is None:
            assert T <= self.config.block_size, f"{T} tokens exceed block_size {self.config.block_size}"
            positions = torch.arange(T, device=idx.device)  # (T,)
        else:
            positions = cache.positions  # (T,) or, one token per row, (B, 1)
        x = self.token_embedding_table(idx)  # (B, T, C)
        if self.config.bigram_embed:
            previous = previous_tokens(idx, cache)  # (B, T): the token before each, -1 for none
            x = x + self.bigram_embedding_table(bigram_index(previous, idx, self.config.vocab_size))
        if self.rope is None:
            x = x + self.position_embedding_table(positions)  # (T, C) or (B, 1, C), broadcast
        for block in self.blocks:
            x = block(x, positions, self.rope, cache)
        if cache is not None:  # generation wants the next token's logits only: (B, 1, vocab)
            x = x[:, -1:]
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap:  # smoothly into (-c, c): no logit runs away early in training
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits / c)
        loss = None if targets is None else self.loss(logits, targets)
        return logits, loss

    def make_cache(self, batch_size: int):
        from tinygpt.engine import KVCache

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


# --- the options -------------------------------------------------------------------------------


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

    def forward(self, x, positions, norm: bool = False):
        """x: (B, T, ..., hs); positions: (T,) for every row, or (B, T) per row. With `norm`, x
        is RMS-normalised first (QK-norm), fused with the rotation."""
        hs = x.shape[-1]
        shape = positions.shape + (1,) * (x.dim() - 3) + (hs,)  # (T, 1, .., hs) or (B, T, 1, .., hs)
        cos, sin = self.cos[positions].view(shape), self.sin[positions].view(shape)
        if norm:  # computed in float32
            return norm_rotate(x, cos, sin)  # rotate(F.rms_norm(x, (hs,)), cos, sin)
        return rotate(x, cos.to(x.dtype), sin.to(x.dtype))  # x * cos + swap_halves(x) * sin


def bigram_rows(vocab_size: int) -> int:
    """Rows of the bigram table: one per (previous token or none, token) pair, at most 65,536."""
    return min((vocab_size + 1) * vocab_size, BIGRAM_MAX_ROWS)


BIGRAM_MAX_ROWS = 65536  # every pair of a vocabulary of up to 255 tokens gets its own row
REGROW_MAX_PAIRS = 2**25  # regrow_bigram moves each old pair's vector up to this many pairs


def bigram_index(previous: torch.Tensor, idx: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bigram table's row for each (previous, token): exact for a small vocabulary; past
    BIGRAM_MAX_ROWS pairs share rows by a modulo hash. `previous` is -1 where there is none."""
    return ((previous + 1) * vocab_size + idx) % bigram_rows(vocab_size)


def previous_tokens(idx: torch.Tensor, cache=None) -> torch.Tensor:
    """The token before each of `idx` (B, T): within the forward's tokens, and, for a decode step
    (one token a row, continuing the cache), the one the cache remembers. The first token of a
    window has none (-1), in training and generation alike."""
    if cache is not None and cache.previous is not None:
        return cache.previous  # (B, 1)
    none = torch.full_like(idx[:, :1], -1)
    return torch.cat([none, idx[:, :-1]], dim=1)


def regrow_bigram(saved: torch.Tensor, old_vocab: int, new_vocab: int) -> torch.Tensor:
    """A bigram table trained with `old_vocab` tokens, laid out for `new_vocab` (a grown
    vocabulary): each old pair's vector moves to the pair's row in the new table, pairs with a
    new token start at zero. Where the new table is hashed (past BIGRAM_MAX_ROWS rows) and
    several old pairs now share a row, the row is the mean of their vectors. The work grows with
    the square of the old vocabulary (~2 s for 4,096 tokens here); past REGROW_MAX_PAIRS old
    pairs (a vocabulary of ~5,800) the table starts again at zero, as a new one does."""
    rows = bigram_rows(new_vocab)
    if rows != BIGRAM_MAX_ROWS:  # both exact: the old (pairs x d) block, in place in the new one
        grown = saved.new_zeros(rows, saved.shape[1])
        grown.view(new_vocab + 1, new_vocab, -1)[: old_vocab + 1, :old_vocab] = saved.view(old_vocab + 1, old_vocab, -1)
        return grown
    if (old_vocab + 1) * old_vocab > REGROW_MAX_PAIRS:
        return saved.new_zeros(rows, saved.shape[1])
    total, count = torch.zeros(rows, saved.shape[1]), torch.zeros(rows)
    tokens = torch.arange(old_vocab)
    for previous in range(-1, old_vocab):  # a previous token at a time: memory stays (old_vocab x d)
        prev = torch.full_like(tokens, previous)
        src, dst = bigram_index(prev, tokens, old_vocab), bigram_index(prev, tokens, new_vocab)
        total.index_add_(0, dst, saved[src].float())
        count.index_add_(0, dst, torch.ones(old_vocab))
    return (total / count.clamp(min=1).unsqueeze(1)).to(saved.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd)


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
    "build_model",
]
