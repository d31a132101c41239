"""The optimizer and its schedule: AdamW is torch's update bit for bit (fused and not, across a
save and load of its state); the learning rate warms up linearly and decays by a cosine."""

import pytest
import torch

from tinygpt.config import TrainConfig
from tinygpt.optim import AdamW, lr_at


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch_bit_for_bit(fused, tmp_path):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    a = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.99), fused=fused)
    kind = {"fused": True} if fused else {"foreach": False}
    b = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.99), **kind)
    for step in range(30):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(5, 3)
            q.grad = p.grad.clone()
        if step == 10:  # a round trip through a weights-only file in the middle changes nothing
            torch.save(a.state_dict(), tmp_path / "opt.pt")
            a = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.99), fused=fused)
            a.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert a.state_dict()["param_groups"][0]["weight_decay"] == 0.1


def test_learning_rate_warms_up_then_follows_its_schedule():
    constant = TrainConfig(learning_rate=1e-3, warmup_iters=4, max_iters=100)
    assert [lr_at(s, constant) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert lr_at(99, constant) == 1e-3

    cosine = TrainConfig(learning_rate=1e-3, min_lr=1e-4, lr_schedule="cosine", warmup_iters=4, max_iters=104)
    assert lr_at(3, cosine) == pytest.approx(1e-3)  # the end of warm-up is the peak
    assert lr_at(4, cosine) == pytest.approx(1e-3)
    assert lr_at(54, cosine) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway down
    assert lr_at(104, cosine) == pytest.approx(1e-4) and lr_at(500, cosine) == pytest.approx(1e-4)
    lrs = [lr_at(s, cosine) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after warm-up
