"""The decode engine: cached generation is the uncached generation, token for token."""

import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.engine import DecodeEngine
from tinygpt.model import BigramLanguageModel, GPTLanguageModel

V = 11
POSITIONS = [{}, {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2"},
             {"pos_emb": "rope", "bigram_embed": True}]  # the engine carries each slot's previous token
IDS = ["learned", "rope", "bigram"]


def gpt(kernel="manual", **kw):
    cfg = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    cfg.update(kw)
    m = GPTLanguageModel(ModelConfig(**cfg)).eval()
    m.set_attention(kernel)
    if m.config.bigram_embed:  # it starts at zero; a trained one is not
        with torch.no_grad():
            m.bigram_embedding_table.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return m


@pytest.mark.parametrize("kw", POSITIONS, ids=IDS)
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


@pytest.mark.parametrize("kw", POSITIONS, ids=IDS)
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


@pytest.mark.parametrize("kw", POSITIONS, ids=IDS)
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


def chunked_reference(m, prompt: list[int], n: int, seed: int) -> list[int]:
    """The chunked window's rule, written out plainly and run without a cache: the context is the
    prompt's last block_size tokens; a token that would overflow the block leaves only the last
    block_size // 2 tokens; every next token comes from the whole model on that context."""
    from tinygpt.sampling import sample_next_token

    block, keep = m.config.block_size, m.config.block_size // 2
    g = torch.Generator().manual_seed(seed)
    ctx, out = prompt[-block:], []
    for _ in range(n):
        t = int(sample_next_token(m(torch.tensor([ctx]))[0][:, -1], g))
        out.append(t)
        ctx = ctx + [t]
        if len(ctx) > block:
            ctx = ctx[-keep:]
    return out


@pytest.mark.parametrize("kw", POSITIONS, ids=IDS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_chunked_window_follows_its_rule(kw, use_cache):
    m = gpt(**kw)
    with torch.no_grad():  # sharp distributions: an untrained model's are so flat that any context samples alike
        m.lm_head.weight.mul_(30)
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(11)
    out = m.generate(prompt, 60, 1.0, generator=g, use_cache=use_cache, window="chunked")  # 65 > 4 blocks
    assert out[0, 5:].tolist() == chunked_reference(m, prompt[0].tolist(), 60, 11)
    g = torch.Generator().manual_seed(11)
    full = m.generate(prompt, 60, 1.0, generator=g, window="full")
    assert torch.equal(full[0, :16], out[0, :16])  # the same inside the first block
    assert not torch.equal(full, out)  # past it, the contexts differ


def test_chunked_window_batch_and_slots():
    """Four rows at once equal four runs alone; the cache is never reallocated or grown; a slot
    of a server may choose its window apart from the engine's default."""
    m = gpt(**POSITIONS[1])
    prompts = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(5))
    engine = DecodeEngine(m, max_batch=4, window="chunked")
    ks = [k.data_ptr() for k in engine.cache.k]
    shapes = [tuple(k.shape) for k in engine.cache.k]
    logits = engine.start_batch(prompts)
    seqs = [row.tolist() for row in prompts]
    lengths = []
    for _ in range(50):
        tokens = logits.argmax(-1)
        for row, t in zip(seqs, tokens.tolist()):
            row.append(t)
        logits = engine.step_batch(tokens)
        lengths.append(len(engine.context[0]))
    assert [k.data_ptr() for k in engine.cache.k] == ks and [tuple(k.shape) for k in engine.cache.k] == shapes
    assert min(lengths) == 8 and max(lengths) == 16  # the window: from half the block to the block
    for b in range(4):  # greedy: the rule's reference at temperature 0
        ctx = seqs[b][:7]
        for t in seqs[b][7:]:
            assert int(m(torch.tensor([ctx]))[0][0, -1].argmax()) == t
            ctx = ctx + [t] if len(ctx) < 16 else (ctx + [t])[-8:]
    mixed = DecodeEngine(m, max_batch=2)  # default full; slot 1 chunked
    mixed.start(0, seqs[0][:7])
    mixed.start(1, seqs[0][:7], "chunked")
    for t in seqs[0][7:]:
        mixed.step({0: t, 1: t})
    assert mixed.context[0] == seqs[0][-16:]  # full: the last block
    assert mixed.context[1] == engine.context[0] and len(engine.context[0]) < 16  # chunked, as above
    with pytest.raises(ValueError, match="window must be one of full, chunked"):
        DecodeEngine(m, max_batch=1, window="half")
