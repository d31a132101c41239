"""The models: shapes and the loss, causality under every attention kernel, the lecture's
initialisation, and generation (cached equals uncached, seeded, past the block size)."""

import math

import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.model import BigramLanguageModel, GPTLanguageModel

V = 11


def gpt(**kw):
    cfg = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPTLanguageModel(ModelConfig(**cfg)).eval()


VARIANTS = [
    {},
    {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2", "tie_embeddings": True},
    {"activation": "gelu"},
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_shapes_and_loss(kw):
    m = gpt(**kw)
    idx = torch.randint(0, V, (3, 10))
    logits, loss = m(idx)
    assert logits.shape == (3, 10, V) and loss is None
    logits, loss = m(idx, idx)
    assert loss.shape == () and loss.dtype == torch.float32


def test_bigram_shapes():
    m = BigramLanguageModel(ModelConfig(model="bigram", vocab_size=V, block_size=8))
    logits, loss = m(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, V)
    assert abs(loss.item() - float(-torch.log_softmax(logits[0, 0].detach(), -1)[0])) < 1e-6


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("kernel", ["sdpa", "manual", "reference"])
def test_causality(kw, kernel):
    """Changing future tokens never changes the logits of earlier positions."""
    m = gpt(**kw)
    m.set_attention(kernel)
    a = torch.randint(0, V, (2, 16))
    b = a.clone()
    b[:, 9:] = torch.randint(0, V, (2, 7))
    la, _ = m(a)
    lb, _ = m(b)
    assert torch.equal(la[:, :9], lb[:, :9])
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


@pytest.mark.parametrize("kw", VARIANTS)
def test_loss_at_init_near_uniform(kw):
    torch.manual_seed(0)
    m = gpt(**kw)
    idx, targets = torch.randint(0, V, (2, 8, 16))
    _, loss = m(idx, targets)
    assert abs(loss.item() - math.log(V)) < 0.1


def test_weight_init_is_lectures():
    m = gpt(n_embd=64)
    w = m.blocks[0].mlp.c_fc.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(m.blocks[0].mlp.c_fc.bias) == 0


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None), (0.8, 5, 0.9)])
def test_kv_cache_generation_identical(kw, temperature, top_k, top_p):
    """Cached and uncached generation give the same tokens, including past the block size."""
    m = gpt(**kw)
    prompt = torch.randint(0, V, (2, 5))
    out = {}
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        out[use_cache] = m.generate(prompt, 40, temperature, top_k, top_p, generator=g, use_cache=use_cache)
    assert out[True].shape == (2, 45)
    assert torch.equal(out[True], out[False])


def test_generate_length_and_seed_determinism():
    m = gpt()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = m.generate(prompt, 30, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 30, generator=torch.Generator().manual_seed(1))
    c = m.generate(prompt, 30, generator=torch.Generator().manual_seed(2))
    assert a.shape == (1, 31) and torch.equal(a, b) and not torch.equal(a, c)
    bigram = BigramLanguageModel(ModelConfig(model="bigram", vocab_size=V, block_size=8))
    assert bigram.generate(prompt, 25).shape == (1, 26)


def test_tied_embeddings_share_storage():
    m = gpt(tie_embeddings=True)
    assert m.lm_head.weight is m.token_embedding_table.weight
