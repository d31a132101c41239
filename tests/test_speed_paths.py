"""The fast paths compute what the plain paths compute (speed itself is measured by `tinygpt bench`)."""

import json

import pytest
import torch
from conftest import run_cli, tiny_configs

from tinygpt.kernels import dropout, dropout_mask, kept_fraction, mask_bits
from tinygpt.runtime import cpu_bf16_speedup, resolve_dtype
from tinygpt.train import train


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


def test_bf16_and_fp32_training_agree(tiny_text_file, tmp_path):
    """Same seed, same data: bf16 autocast tracks the float32 loss curve closely."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        m, t = tiny_configs(tiny_text_file, tmp_path / dtype, max_iters=80, eval_interval=20, dtype=dtype,
                            dropout=0.1, attention="manual")
        train(m, t, log=lambda *_: None)
        rows = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        curves[dtype] = [r["val_loss"] for r in rows]
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


def test_bench_runs_and_reports_identical_sampling(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\nbatch_size = 4\ndropout = 0.0\n')
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--preset", cfg, "--iters", 1, "--vocab-size", 65, "--json", out)
    assert r.returncode == 0, r.stderr
    assert "| plain | float32 | reference | no |" in r.stdout
    figures = json.loads(out.read_text())
    assert set(figures["train"]) == {"plain", "fast"}
    assert all(s["identical"] for s in figures["sample"].values())
    assert figures["train"]["fast"]["tokens_per_sec"] > 0


def test_bench_skips_bf16_peak_without_native_bf16_units(tmp_path, monkeypatch, capsys):
    # An AMD CPU without AVX512-BF16/AMX: bf16 is emulated (~300x slower), so the bench must not
    # time it (that took 27 minutes there) and the fast path runs in float32.
    import tinygpt.runtime as rt
    from tinygpt.cli import main

    monkeypatch.setattr(rt, "cpu_flags", lambda: set())
    monkeypatch.setattr(rt, "cpu_bf16_speedup", lambda: 0.0)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\nbatch_size = 4\ndropout = 0.0\n')
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", str(cfg), "--iters", "1", "--device", "cpu", "--vocab-size", "65",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["peak_flops"]) == {"float32"}
    assert figures["train"]["fast"]["dtype"] == "float32"
    assert "bf16 not measured" in capsys.readouterr().out


def test_peak_probe_shrinks_to_its_time_budget():
    from tinygpt.bench import peak_matmul_flops

    # A budget far below one 2048^3 matmul still gives a positive figure (from a smaller size).
    assert peak_matmul_flops(torch.float32, torch.device("cpu"), budget_s=1e-4, trials=1) > 0


@pytest.mark.parametrize("kernel", ["manual", "sdpa"])
def test_kernels_agree_in_bf16(kernel):
    from tinygpt.config import ModelConfig
    from tinygpt.model import GPTLanguageModel

    m = GPTLanguageModel(ModelConfig(vocab_size=20, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 20, (2, 32))
    m.set_attention("reference")
    ref, _ = m(idx)
    m.set_attention(kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = m(idx)
    assert (fast.float() - ref).abs().max().item() < 0.05


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch_bit_for_bit(fused, tmp_path):
    from tinygpt.optim import AdamW

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
