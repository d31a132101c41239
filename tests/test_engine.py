"""The decode engine: cached generation is the uncached generation, token for token."""

import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.engine import DecodeEngine
from tinygpt.model import BigramLanguageModel, GPTLanguageModel

V = 11
POSITIONS = [{}, {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2"}]


def gpt(kernel="manual", **kw):
    cfg = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    cfg.update(kw)
    m = GPTLanguageModel(ModelConfig(**cfg)).eval()
    m.set_attention(kernel)
    return m


@pytest.mark.parametrize("kw", POSITIONS, ids=["learned", "rope"])
@pytest.mark.parametrize("kernel", ["manual", "sdpa", "reference"])
@pytest.mark.parametrize("batch", [1, 4])
def test_cached_equals_uncached_past_the_block(kw, kernel, batch):
    m = gpt(kernel, **kw)
    prompt = torch.randint(0, V, (batch, 5))
    out = {}
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        out[use_cache] = m.generate(prompt, 40, 1.0, generator=g, use_cache=use_cache)  # 45 > block 16
    assert out[True].shape == (batch, 45)
    assert torch.equal(out[True], out[False])


@pytest.mark.parametrize("kw", POSITIONS, ids=["learned", "rope"])
def test_slots_of_different_lengths_step_together(kw):
    """Three independent sequences, started at different lengths and stepped in changing subsets
    through one batched forward, each get exactly the logits of the model run on it alone."""
    m = gpt(**kw)
    engine = DecodeEngine(m, max_batch=4)
    g = torch.Generator().manual_seed(0)
    seqs = {0: torch.randint(0, V, (3,), generator=g).tolist(), 2: torch.randint(0, V, (9,), generator=g).tolist(),
            3: torch.randint(0, V, (20,), generator=g).tolist()}  # slot 3: longer than the block
    logits = {s: engine.start(s, ids) for s, ids in seqs.items()}
    for step in range(30):
        stepping = [s for s in seqs if (step + s) % 3]  # a different subset each step
        tokens = {s: int(logits[s].argmax()) for s in stepping}
        for s, t in tokens.items():
            seqs[s].append(t)
        logits.update(engine.step(tokens))
        for s in stepping:
            alone = m(torch.tensor([seqs[s][-16:]]))[0][0, -1]
            torch.testing.assert_close(logits[s], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", POSITIONS, ids=["learned", "rope"])
def test_static_shapes_decode_equals_uncached(kw):
    """The CUDA path's shapes (every slot, the whole block, masked), run eagerly on CPU: the same
    logits as the model on each sequence alone, idle slots included in every step."""
    m = gpt(**kw)
    engine = DecodeEngine(m, max_batch=3, static=True)
    assert engine.static and not engine.graphs
    seqs = {0: [1, 2, 3], 2: [4] * 7}  # slot 1 stays empty throughout
    logits = {s: engine.start(s, ids) for s, ids in seqs.items()}
    for _ in range(20):  # past the block of 16
        tokens = {s: int(logits[s].argmax()) for s in seqs}
        for s, t in tokens.items():
            seqs[s].append(t)
        logits.update(engine.step(tokens))
        for s in seqs:
            torch.testing.assert_close(logits[s], m(torch.tensor([seqs[s][-16:]]))[0][0, -1], atol=1e-5, rtol=1e-5)


def test_cache_is_allocated_once():
    m = gpt()
    engine = DecodeEngine(m, max_batch=2)
    ptrs = [t.data_ptr() for t in engine.cache.k + engine.cache.v]
    engine.start_batch(torch.zeros(2, 3, dtype=torch.long))
    for _ in range(20):  # past the block: refills reuse the same memory
        engine.step_batch(torch.ones(2, 1, dtype=torch.long))
    assert [t.data_ptr() for t in engine.cache.k + engine.cache.v] == ptrs
    assert engine.cache.k[0].shape == (2, 4, 16, 8)


def test_bigram_runs_through_the_engine_uncached():
    m = BigramLanguageModel(ModelConfig(model="bigram", vocab_size=V, block_size=8)).eval()
    engine = DecodeEngine(m, max_batch=2)
    assert engine.cache is None
    first = engine.start(1, [3, 4])
    torch.testing.assert_close(first, m.token_embedding_table.weight[4])
    assert torch.equal(engine.step({1: 5})[1], m.token_embedding_table.weight[5].detach())
