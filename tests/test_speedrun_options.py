"""The speedrun's small-model options (issue 28), each against a plain reference: the logit soft-cap
is c * tanh(logits / c) of the uncapped model's logits and bounds them; zero-initialised output
projections make every block the identity at step 0; Muon's momentum warm-up goes 0.85 -> the set
momentum; the embeddings' own learning rate is theirs alone; a run with every option on resumes bit
for bit; each is recorded in run.json, off by default (the lecture's model stays the lecture's),
and refused by the Hugging Face export where GPT-2 has no place for it."""

import json

import pytest
import torch
from conftest import assert_one_line_error, assert_same_weights, cli, losses_by_step, tiny_args, tiny_configs, weights
from safetensors.torch import load_file, save_file

from tinygpt.checkpoint import checkpoint_dir
from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.model import build_model
from tinygpt.optim import MUON_MOMENTUM_START, WeightAverage, momentum_at
from tinygpt.train import train

SMALL = dict(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def test_the_options_are_off_by_default():
    m, t = ModelConfig(), TrainConfig()
    assert (m.logit_softcap, m.zero_init_proj, m.bigram_embed, t.muon_momentum_warmup, t.embed_lr_mult,
            t.ema_decay, t.muon_split_qkv) == (0.0, False, False, 0, 1.0, 0.0, False)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_soft_cap_is_tanh_of_the_uncapped_logits_and_bounds_them(pos_emb):
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**SMALL, pos_emb=pos_emb)).eval()
    capped = build_model(ModelConfig(**SMALL, pos_emb=pos_emb, logit_softcap=0.05)).eval()
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(20, (3, 12))
    with torch.no_grad():
        raw, capped_logits = plain(idx)[0], capped(idx)[0]
    assert raw.abs().max() > 0.05  # the cap bites
    assert torch.equal(capped_logits, 0.05 * torch.tanh(raw / 0.05))
    assert capped_logits.abs().max() < 0.05
    _, loss = capped(idx, idx)
    assert torch.isfinite(loss)


def test_zero_initialised_projections_make_each_block_the_identity():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, zero_init_proj=True)).eval()
    for block in model.blocks:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    idx = torch.randint(20, (2, 12))
    with torch.no_grad():
        x = model.token_embedding_table(idx) + model.position_embedding_table(torch.arange(12))
        expected = model.lm_head(model.ln_f(x))  # no block adds anything
        assert torch.equal(model(idx)[0], expected)
    torch.manual_seed(0)
    lecture = build_model(ModelConfig(**SMALL))
    assert lecture.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)  # unchanged when off


def test_muon_momentum_warms_up_linearly():
    cfg = TrainConfig(optimizer="muon", muon_momentum=0.95, muon_momentum_warmup=100)
    assert momentum_at(0, cfg) == MUON_MOMENTUM_START == 0.85
    assert momentum_at(50, cfg) == pytest.approx(0.90)
    assert momentum_at(100, cfg) == momentum_at(10_000, cfg) == 0.95
    assert momentum_at(0, TrainConfig(optimizer="muon")) == 0.95  # off: the set momentum from the start


def test_embeddings_learn_at_their_own_rate_only_when_asked():
    from tinygpt.optim import make_optimizer, set_lr

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL))
    plain = make_optimizer(model, TrainConfig(optimizer="muon"))
    assert len(plain.adamw.param_groups) == 2  # the layout of every earlier run's optimizer state
    faster = make_optimizer(model, TrainConfig(optimizer="muon", embed_lr_mult=10.0))
    set_lr(faster, 1e-3)
    groups = faster.adamw.param_groups
    assert len(groups) == 3 and groups[2]["lr"] == pytest.approx(1e-2) and groups[0]["lr"] == 1e-3
    emb = {id(model.token_embedding_table.weight), id(model.position_embedding_table.weight)}
    assert {id(p) for p in groups[2]["params"]} == emb
    assert not emb & {id(p) for g in groups[:2] for p in g["params"]}


@pytest.mark.parametrize("split", [False, True])
def test_muon_orthogonalises_query_key_and_value_apart_only_when_asked(split):
    """Split: the fused projection's update is its three (C, C) blocks' polar factors one under the
    other, each at scale 1 (square); whole: the (3C, C) matrix's, at sqrt(3). Every other matrix's
    update is the same either way."""
    from tinygpt.optim import make_optimizer, orthogonalize

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.1, weight_decay=0.0, muon_split_qkv=split))
    opt.muon.step()
    for name, p in model.named_parameters():
        if not (name.startswith("blocks.") and p.dim() == 2):
            continue
        g = grads[name].lerp(grads[name] * 0.05, 0.95)  # Nesterov look-ahead from a zero momentum buffer
        if name.endswith("attn.c_attn.weight") and split:
            expected = torch.cat([orthogonalize(q) for q in g.chunk(3)])
        else:
            expected = orthogonalize(g) * max(1.0, p.shape[0] / p.shape[1]) ** 0.5
        torch.testing.assert_close(before[name] - p.detach(), 0.1 * expected, rtol=1e-4, atol=1e-6)
    step = (before["blocks.0.attn.c_attn.weight"] - model.blocks[0].attn.c_attn.weight.detach()) / 0.1
    sv = [torch.linalg.svdvals(m) for m in (step.chunk(3) if split else [step / 3**0.5])]
    assert all(s.min() > 0.6 and s.max() < 1.3 for s in sv)  # each one orthogonalised, or the three as one


ALL_ON = dict(optimizer="muon", logit_softcap=15.0, zero_init_proj=True, muon_momentum_warmup=8, dropout=0.1,
              embed_lr_mult=3.0, bigram_embed=True, ema_decay=0.5, muon_split_qkv=True,
              batch_size=8, eval_iters=2, attention="manual", pos_emb="rope", norm="rmsnorm")


def test_every_option_on_resumes_bit_exact_and_is_recorded(tiny_text_file, tmp_path):
    a = cli("train", *tiny_args(tiny_text_file, tmp_path / "a", **ALL_ON, eval_interval=4, max_iters=12))
    assert a.code == 0, a.err
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "b", **ALL_ON, eval_interval=4, max_iters=6))
    assert r.code == 0, r.err
    b = cli("train", "--resume", tmp_path / "b", "--max-iters", 12)  # mid warm-up: the momentum is the step's
    assert b.code == 0, b.err
    la, lb = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    assert {s: lb[s] for s in la} == la
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    ta, tb = (load_file(str(checkpoint_dir(r) / "training.safetensors")) for r in (tmp_path / "a", tmp_path / "b"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert (meta["model"]["logit_softcap"], meta["model"]["zero_init_proj"], meta["model"]["bigram_embed"]) == (
        15.0, True, True)
    assert (meta["train"]["muon_momentum_warmup"], meta["train"]["embed_lr_mult"], meta["train"]["ema_decay"],
            meta["train"]["muon_split_qkv"]) == (8, 3.0, 0.5, True)


def test_the_momentum_warm_up_changes_the_run(tiny_text_file, tmp_path):
    flags = dict(optimizer="muon", batch_size=8, eval_iters=2, eval_interval=4, max_iters=8)
    assert cli("train", *tiny_args(tiny_text_file, tmp_path / "off", **flags)).code == 0
    assert cli("train", *tiny_args(tiny_text_file, tmp_path / "on", **flags, muon_momentum_warmup=8)).code == 0
    off, on = losses_by_step(tmp_path / "off"), losses_by_step(tmp_path / "on")
    assert off[0] == on[0] and off[8] != on[8]  # the same start; another path


@pytest.mark.parametrize("option, named", [({"logit_softcap": 30.0}, "logit_softcap=30.0"),
                                           ({"bigram_embed": True}, "bigram_embed=True")])
def test_options_gpt2_has_no_place_for_are_refused_by_the_export(tiny_text_file, tmp_path, option, named):
    assert cli("train", *tiny_args(tiny_text_file, tmp_path / "run", max_iters=2, eval_interval=2, **option)).code == 0
    r = cli("export", tmp_path / "run", "--out", tmp_path / "hf")
    assert_one_line_error(r, named, "which GPT-2 has no place for")
    assert not (tmp_path / "hf").exists()


# --- the bigram input ----------------------------------------------------------------------------


def test_a_zero_bigram_table_leaves_the_model_as_it_was():
    """Same seed, with and without the table: the same weights, and while the table is zero the
    same logits (it starts at zero and draws no random numbers)."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**SMALL)).eval()
    after_plain = torch.randn(3)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, bigram_embed=True)).eval()
    assert torch.equal(torch.randn(3), after_plain)  # the generator is where it was: training draws the same
    table = model.bigram_embedding_table.weight
    assert table.shape == (21 * 20, 16) and not table.any()  # (none or a token, token) pairs
    for name, p in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    idx = torch.randint(20, (3, 12))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], plain(idx)[0])


def test_each_position_gets_its_own_pairs_vector():
    """What the first block receives is token + position + the row of (previous, token); the first
    position has no previous token and reads the "none" rows."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, bigram_embed=True)).eval()
    table = model.bigram_embedding_table.weight
    with torch.no_grad():
        table.copy_(torch.randn_like(table))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    idx = torch.tensor([[3, 5, 3, 5, 7]])
    with torch.no_grad():
        model(idx)
        added = seen[0] - model.token_embedding_table(idx) - model.position_embedding_table(torch.arange(5))
    rows = [0 * 20 + 3, 4 * 20 + 5, 6 * 20 + 3, 4 * 20 + 5, 6 * 20 + 7]  # (previous + 1) * V + token
    torch.testing.assert_close(added[0], table[rows], atol=1e-6, rtol=0)


def test_a_large_vocabulary_hashes_its_pairs_into_a_bounded_table():
    from tinygpt.model import BIGRAM_MAX_ROWS, bigram_index, bigram_rows

    assert bigram_rows(65) == 66 * 65 and bigram_rows(255) == 256 * 255 and bigram_rows(50257) == BIGRAM_MAX_ROWS
    prev, idx = torch.tensor([-1, 0, 50256, 1234]), torch.tensor([50256, 17, 50256, 4321])
    rows = bigram_index(prev, idx, 50257)
    assert rows.min() >= 0 and rows.max() < BIGRAM_MAX_ROWS
    assert len(set(bigram_index(torch.arange(-1, 65), torch.arange(66) % 65, 65).tolist())) == 66  # exact: distinct


def test_a_grown_vocabulary_keeps_each_pairs_vector():
    from tinygpt.model import regrow_bigram

    old = torch.randn(4 * 3, 2)  # vocabulary 3: (none, 0, 1, 2) x (0, 1, 2)
    grown = regrow_bigram(old, 3, 5)
    assert grown.shape == (6 * 5, 2)
    for p in range(-1, 3):
        for c in range(3):
            assert torch.equal(grown[(p + 1) * 5 + c], old[(p + 1) * 3 + c])
    assert not grown.view(6, 5, 2)[4:].any() and not grown.view(6, 5, 2)[:, 3:].any()  # pairs with a new token: zero



@pytest.mark.parametrize("old_vocab, new_vocab", [(200, 300), (300, 310)])  # exact -> hashed, hashed -> hashed
def test_a_vocabulary_grown_past_the_exact_table_keeps_each_pairs_vector(old_vocab, new_vocab):
    """Looked up through the new table, every old pair reads its old row, averaged only with the
    other old pairs that now share its row; pairs with a new token read only what old pairs left."""
    from tinygpt.model import bigram_index, bigram_rows, regrow_bigram

    torch.manual_seed(0)
    old = torch.randn(bigram_rows(old_vocab), 3)
    grown = regrow_bigram(old, old_vocab, new_vocab)
    assert grown.shape == (bigram_rows(new_vocab), 3) == (65536, 3)
    prev = torch.arange(-1, old_vocab).repeat_interleave(old_vocab)
    tok = torch.arange(old_vocab).repeat(old_vocab + 1)
    src, dst = bigram_index(prev, tok, old_vocab), bigram_index(prev, tok, new_vocab)
    sharing = torch.bincount(dst, minlength=len(grown))
    alone = sharing[dst] == 1
    assert alone.sum() > 1000  # most old pairs have a row of their own
    assert torch.equal(grown[dst[alone]], old[src[alone]])
    assert (~alone).any() == (old_vocab > 255)  # hashed -> hashed: 90,300 old pairs in 65,536 rows
    for shared in dst[~alone][:50].tolist():  # a row several old pairs now share: their mean
        torch.testing.assert_close(grown[shared], old[src[dst == shared]].mean(0))
    assert not grown[sharing == 0].any()  # rows only new pairs reach start at zero

def test_the_bigram_input_learns_what_a_pair_predicts(tmp_path):
    """A text where the next character is set by the last two: a one-layer model with the bigram
    input learns it in fewer steps than the same model (same seed, same batches) without it."""
    import random

    rng = random.Random(0)
    rule = {(a, b): rng.choice("abcdef") for a in "abcdef" for b in "abcdef"}
    text = ["a", "b"]
    for _ in range(20_000):
        text.append(rule[text[-2], text[-1]] if rng.random() > 0.1 else rng.choice("abcdef"))
    data = tmp_path / "pairs.txt"
    data.write_text("".join(text))
    flags = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=16, max_iters=60, eval_interval=60,
                 eval_iters=4, learning_rate=1e-2, dropout=0.0)
    for name, extra in (("off", {}), ("on", {"bigram_embed": True})):
        assert cli("train", *tiny_args(data, tmp_path / name, **flags, **extra)).code == 0
    off, on = losses_by_step(tmp_path / "off"), losses_by_step(tmp_path / "on")
    assert off[0] == on[0]  # the same model at step 0
    assert on[60][1] < off[60][1] - 0.3, (on, off)  # val loss: 0.55 against 1.07 here


# --- the average of the weights (--ema-decay) --------------------------------------------------------


def test_the_weight_average_is_the_bias_corrected_moving_average():
    """After step t it is sum_k d^(t-k) (1-d) w_k / (1 - d^t): step 1's weights alone at first, never
    pulled towards the initialisation."""
    torch.manual_seed(0)
    model, decay = torch.nn.Linear(5, 3), 0.9
    average, seen = WeightAverage(model, decay), []
    for t in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        seen.append([p.detach().double().clone() for p in model.parameters()])
        average.update(t)
        norm = 1 - decay ** t
        for i, held in enumerate(average.held):
            expected = sum(decay ** (t - k) * (1 - decay) * w[i] for k, w in enumerate(seen, start=1)) / norm
            torch.testing.assert_close(held.double(), expected, rtol=0, atol=1e-6)


def test_the_average_swaps_in_and_out_without_copies():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    average = WeightAverage(model, 0.5)
    trained = [p.detach().clone() for p in model.parameters()]
    storage = [p.data_ptr() for p in model.parameters()]
    with torch.no_grad():
        for held in average.held:
            held.mul_(2)  # an average that differs from the weights
    with average.in_model():
        assert all(torch.equal(p, 2 * w) for p, w in zip(model.parameters(), trained))
        with average.in_model():  # re-entrant: still the average inside
            assert all(torch.equal(p, 2 * w) for p, w in zip(model.parameters(), trained))
        assert all(torch.equal(p, 2 * w) for p, w in zip(model.parameters(), trained))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), trained))
    assert [p.data_ptr() for p in model.parameters()] == storage  # the optimizer's tensors, in place


def test_a_run_with_the_average_trains_the_same_weights_and_keeps_their_average(tiny_text_file, tmp_path):
    """--ema-decay changes nothing the optimizer sees (the training weights are those of a run
    without it, bit for bit); the checkpoint's model is the average of the weights after each step,
    and so is the model the run ends with."""
    decay, steps = 0.5, 4

    def run(out, max_iters, **flags):
        return train(*tiny_configs(tiny_text_file, tmp_path / out, max_iters=max_iters, eval_interval=steps,
                                   batch_size=8, eval_iters=2, **flags), log=lambda *_: None, note=lambda *_: None)

    each_step = [weights(run(f"plain{k}", k).run_dir) for k in range(1, steps + 1)]  # constant lr: one path
    result = run("ema", steps, ema_decay=decay)
    training = load_file(str(checkpoint_dir(result.run_dir) / "training.safetensors"))
    assert training.keys() == each_step[-1].keys()
    assert all(torch.equal(training[k], each_step[-1][k]) for k in training)
    average = weights(result.run_dir)
    for name, got in average.items():
        expected = sum(decay ** (steps - k) * (1 - decay) * w[name].double() for k, w in enumerate(each_step, 1))
        torch.testing.assert_close(got.double(), expected / (1 - decay ** steps), rtol=0, atol=1e-6)
    assert sum(not torch.equal(average[k], training[k]) for k in average) == len(average)  # every tensor moved
    in_memory = dict(result.model.named_parameters())
    assert all(torch.equal(in_memory[k].detach(), average[k]) for k in average)


@pytest.mark.parametrize("damage", ["missing", "foreign"])
def test_resuming_an_averaged_run_without_its_training_weights_is_refused(tiny_text_file, tmp_path, damage):
    args = tiny_args(tiny_text_file, tmp_path / "run", ema_decay=0.9, max_iters=4, eval_interval=2, batch_size=8,
                     eval_iters=2)
    assert cli("train", *args).code == 0
    training = checkpoint_dir(tmp_path / "run") / "training.safetensors"
    training.unlink()
    if damage == "foreign":
        save_file({"other.weight": torch.zeros(3, 3)}, str(training))
    kept = weights(tmp_path / "run")
    r = cli("train", "--resume", tmp_path / "run", "--max-iters", 6)
    if damage == "missing":
        assert_one_line_error(r, "training.safetensors is missing", "--init-from")
    else:
        assert_one_line_error(r, "training.safetensors do not fit the model in run.json", "unexpected ['other.weight']")
    assert all(torch.equal(kept[k], v) for k, v in weights(tmp_path / "run").items())  # nothing overwritten
