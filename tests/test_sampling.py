import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt.errors import UserError
from tinygpt.sampling import sample_next_token


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert sample_next_token(logits, temperature=0).flatten().tolist() == [1, 0]


def test_top_k_one_is_argmax_and_top_k_limits_support():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, g, top_k=1), logits.argmax(-1, keepdim=True))
    top3 = logits.topk(3, -1).indices
    for _ in range(50):
        t = sample_next_token(logits, g, top_k=3)
        assert (top3 == t).any(-1).all()


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next_token(logits, g, top_p=0.75)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75
    seen = {int(sample_next_token(logits, g, top_p=0.4)) for _ in range(50)}
    assert seen == {0}


def test_sampling_follows_distribution():
    logits = torch.tensor([[0.0, 1.0]]).log_softmax(-1)  # p = [0.269, 0.731]
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next_token(logits.expand(1000, 2), g) for _ in range(4)])
    assert abs(draws.float().mean().item() - 0.731) < 0.03


@pytest.mark.parametrize("kw,msg", [({"temperature": -0.1}, "temperature"), ({"top_k": 0}, "top_k"),
                                     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_arguments_named(kw, msg):
    with pytest.raises(UserError, match=msg):
        sample_next_token(torch.zeros(1, 3), **kw)


@given(temperature=st.floats(0.01, 5.0), top_k=st.one_of(st.none(), st.integers(1, 40)),
       top_p=st.one_of(st.none(), st.floats(0.01, 1.0)), seed=st.integers(0, 2**31))
@settings(max_examples=150, deadline=None)
def test_sampled_token_always_valid_and_within_filters(temperature, top_k, top_p, seed):
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(seed)) * 3
    t = sample_next_token(logits, torch.Generator().manual_seed(seed), temperature, top_k, top_p)
    assert t.shape == (3, 1) and ((0 <= t) & (t < 20)).all()
    if top_k is not None:
        kth = logits.topk(min(top_k, 20), -1).values[:, -1:]
        assert (logits.gather(1, t) >= kth).all()
    if top_p is not None:  # the chosen token's higher-ranked mass is below top_p
        probs = (logits / temperature).softmax(-1)
        chosen = probs.gather(1, t)
        above = (probs * (probs > chosen)).sum(-1, keepdim=True)
        assert (above < top_p + 1e-5).all()


@pytest.mark.parametrize("temperature, top_p", [(1e-300, None), (1.0, 5e-324), (1e-30, 1e-30)])
def test_extreme_but_valid_settings_still_sample(temperature, top_p):
    """Found by fuzzing the server: a tiny temperature overflowed the logits to inf - inf, and a
    top_p below float32's range dropped even the most likely token; both must give the argmax."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, gen, temperature, None, top_p).item() == 1
