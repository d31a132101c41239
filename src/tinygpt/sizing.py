"""`--preset auto`: a model sized for your text, your time and your machine.

The rule, in the order it is applied (docs/guides/own-text.md shows the sweeps behind it):

1. The text: its train tokens, vocabulary and documents (from its encoded corpus file) and the
   count-based bigram loss of its val split (a reference the plan's expected loss is read from).
2. The time: `--max-time` (default 600 s) less what has passed since the command started, the
   periodic loss reports and the final whole-val evaluation, is the training time.
3. The machine: a timed probe of a few real training steps (forward, backward, optimizer) of each
   shape on the LADDER, smallest first, gives its tokens per second here; it stops at the first
   shape that cannot be trained well in the time (the larger ones could not either).
4. The shape: the largest that sees at least TOKENS_PER_PARAM tokens per parameter in the time,
   or passes over the text at least REPEAT_PASSES times in it (a text the time repeats is
   learned better by a larger model than by more passes of a smaller one), with at most
   PARAMS_PER_TOKEN parameters per train token and at least MIN_STEPS steps (the smallest if
   none qualifies).
5. The rest follows from the passes over the text the run will make: steps (the time's tokens
   over the batch's, but at most MAX_PASSES passes: a small text may end its run early),
   dropout (none under one pass, DROPOUT_AT above), and the learning rates, schedule and
   optimizer of the presets the ladder's shapes come from (Muon, cosine fitted to --max-time).

`plan` is a pure function of the text's figures, the probe's and the budget, so a test can fake
the probe and check the plan; `auto_settings` measures and prints it.
"""

import math
import time
from dataclasses import dataclass

from tinygpt.errors import UserError

DEFAULT_MAX_TIME = 600.0
# A shape must see this many tokens a parameter in the time... benchmarks/auto_size.py at 120 s, a
# 2-core Xeon: on Tiny Shakespeare 2x4x128 (16 a parameter) won and 3x4x192 (2.1) lost by 0.04;
# on 20 MB of Python 3x4x192 (2.1) won and 2x4x128 (11.7) came within 0.022. Between the two.
TOKENS_PER_PARAM = 6.0
# ... or pass over the text this many times: on Tiny Shakespeare at 600 s 4x4x256 (2.6 tokens a
# parameter, 8.3 passes) beat 3x4x192 (15 passes) by 0.010; on the 97k-token licenses at 120 s
# 4x4x256 (15 passes) beat every smaller shape; at 120 s on Tiny Shakespeare 3x4x192's 3.2
# passes lost. (On Python at 600 s, 1 pass: 3x4x192 at 12 tokens a parameter, auto's choice, and
# 4x4x256 at 3.1 came within 0.003 of each other.)
REPEAT_PASSES = 5.0
# The licenses corpus (97k train tokens) was learned best by the 3.2M-parameter 4x4x256 (33 a
# token); nanoGPT's Shakespeare model has 10.7 on 1.0M tokens.
PARAMS_PER_TOKEN = 40.0
# (passes over the text below, dropout). At 17 passes over the licenses 4x4x256 scored 1.602 at
# dropout 0.1, 1.620 at 0.2; 2x4x128 at 24 passes 1.625 and 1.618: 0.1 throughout.
DROPOUT_AT = ((1.0, 0.0), (math.inf, 0.1))
MIN_STEPS = 50  # fewer steps than this do not train any shape: the budget is too short
# At most this many passes over the train split: past it a small text is memorised (the licenses
# corpus, 4x4x256 at dropout 0.1: val lowest after 13.5 passes of a 17-pass schedule, rising
# after); the run then ends before its --max-time. The final evaluation scores the best
# checkpoint, so a cap a little late costs less than one early.
MAX_PASSES = 16.0
MIN_TRAIN_TOKENS = 1000
START_SECONDS = 2.0  # a run's own start after the plan: building the model, its timed probe
REPORTS = 6  # loss reports a planned run makes (at step 0 and every fifth of the steps)
STEPS_HEADROOM = 1.5  # max_iters over the planned steps (see auto_settings)


@dataclass(frozen=True)
class Shape:
    """A rung of the ladder: a model and the batch and learning rate it trains with."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    learning_rate: float
    qk_norm: bool

    def settings(self) -> dict:
        return {"n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
                "block_size": self.block_size, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "min_lr": self.learning_rate / 10, "qk_norm": self.qk_norm}

    def params(self, vocab_size: int) -> int:
        from tinygpt.config import ModelConfig
        from tinygpt.resources import param_count

        return param_count(ModelConfig(**{k: v for k, v in self.settings().items() if k in MODEL_KEYS},
                                       vocab_size=vocab_size, pos_emb="rope"))

    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def flops_per_token(self, vocab_size: int) -> float:
        """Training work a token: 6 a parameter that multiplies (not the embedding table, a lookup)
        and attention over the block, forward and backward."""
        multiplying = self.params(vocab_size) - vocab_size * self.n_embd
        return 6 * multiplying + 6 * self.n_layer * self.block_size * self.n_embd


# cpu-quick's and cpu-10min's shapes, the lecture's, and one below and between them.
LADDER = (
    Shape("2x2x64", 2, 2, 64, 64, 32, 1e-2, True),
    Shape("2x4x128", 2, 4, 128, 64, 32, 1e-2, True),  # cpu-quick
    Shape("3x4x192", 3, 4, 192, 128, 32, 4e-3, False),
    Shape("4x4x256", 4, 4, 256, 128, 32, 2e-3, False),  # cpu-10min
    Shape("6x6x384", 6, 6, 384, 256, 64, 1e-3, True),  # the lecture's
)
MODEL_KEYS = {"n_layer", "n_head", "n_embd", "block_size", "qk_norm"}
# What every plan shares: the presets' modern GPT and its optimizer.
COMMON = {"model": "gpt", "pos_emb": "rope", "norm": "layernorm", "activation": "relu2", "optimizer": "muon",
          "muon_lr": 0.02, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0, "lr_schedule": "cosine",
          "eval_iters": 20}


@dataclass(frozen=True)
class TextFigures:
    """What the plan needs to know of the text."""

    chars: int
    train_tokens: int
    val_tokens: int
    vocab_size: int
    documents: int
    bigram_loss: float  # count-based bigram loss of the val split, nats per token


@dataclass(frozen=True)
class Plan:
    shape: Shape
    settings: dict  # train settings, as a preset's
    params: int
    tokens_per_sec: float
    train_seconds: float
    tokens: int  # tokens the run is expected to see
    passes: float  # ... as passes over the train split
    expected_loss: float
    measured: dict  # shape name -> tokens per second, as probed

    def describe(self, text: TextFigures, budget: float) -> str:
        probe = ", ".join(f"{name} {tps:,.0f}" for name, tps in self.measured.items())
        s = self.settings
        return (f"--preset auto: your text has {text.chars:,} characters ({text.train_tokens:,} train tokens, "
                f"vocabulary {text.vocab_size}, {text.documents:,} document{'s' * (text.documents != 1)}); this "
                f"machine trains {probe} tokens/s (a timed probe). Plan for {budget:g} s: a {self.shape.name} GPT "
                f"({self.params / 1e6:.2f}M parameters), block {s['block_size']}, batch {s['batch_size']}, about "
                f"{s['max_iters']:,} steps ({self.tokens / 1e6:.1f}M tokens, {self.passes:.1f} passes over the "
                f"text{'; more would memorise it' if self.passes >= MAX_PASSES - 0.5 else ''}), dropout "
                f"{s['dropout']:g}, Muon, learning rate {s['learning_rate']:g}; expected val loss "
                f"about {self.expected_loss:.2f} for text like Tiny Shakespeare (code and repetitive text go lower; "
                f"the count-based bigram's: {text.bigram_loss:.2f}). Any flag you give overrides the plan.")


def expected_loss(bigram_loss: float, tokens: int) -> float:
    """A rough guide, from the sweeps: the trained model's val loss as a share of the bigram's,
    falling with the tokens seen (Tiny Shakespeare: 0.75 at 0.4M tokens, 0.61 at 4.7M)."""
    share = 0.748 - 0.125 * (math.log10(max(tokens, 1)) - 5.61)
    return bigram_loss * min(0.95, max(0.45, share))


def dropout_for(passes: float) -> float:
    return next(p for limit, p in DROPOUT_AT if passes < limit)


def train_seconds(text: TextFigures, shape: Shape, tokens_per_sec: float, seconds: float) -> float:
    """Of the `seconds` left, those for training steps: less the run's own start, its final
    whole-val evaluation (a forward of the val split: about a third of a training step's time a
    token) and its REPORTS periodic loss estimates (2 x eval_iters batches each)."""
    forward = (text.val_tokens + REPORTS * 2 * COMMON["eval_iters"] * shape.tokens_per_step()) / (3 * tokens_per_sec)
    return max(1.0, seconds - START_SECONDS - forward)


def plan(text: TextFigures, tokens_per_sec: dict[str, float], seconds: float, force: str | None = None) -> Plan:
    """The plan for `text` given each probed shape's tokens per second here and the `seconds`
    left of the budget. Shapes missing from `tokens_per_sec` were not probed: not chosen.
    `force` names the shape to plan for instead of choosing one (benchmarks/auto_size.py's grid)."""
    check_text(text)
    probed = [s for s in LADDER if s.name in tokens_per_sec]
    if not probed:
        raise ValueError("no shape was probed")
    full = MAX_PASSES * text.train_tokens  # the tokens of MAX_PASSES passes

    def time_tokens(shape: Shape) -> float:
        return tokens_per_sec[shape.name] * train_seconds(text, shape, tokens_per_sec[shape.name], seconds)

    def possible(shape: Shape) -> bool:
        return (shape.params(text.vocab_size) <= PARAMS_PER_TOKEN * text.train_tokens
                and min(time_tokens(shape), full) / shape.tokens_per_step() >= MIN_STEPS
                and text.val_tokens > shape.block_size and text.train_tokens > shape.block_size)

    sized = [s for s in probed if possible(s) and enough(text, s.params(text.vocab_size), time_tokens(s))]
    chosen = next(s for s in LADDER if s.name == force) if force else sized[-1] if sized else probed[0]
    tps = tokens_per_sec[chosen.name]
    train_s = train_seconds(text, chosen, tps, seconds)
    steps = max(MIN_STEPS, int(min(tps * train_s, MAX_PASSES * text.train_tokens) / chosen.tokens_per_step()))
    tokens = steps * chosen.tokens_per_step()
    passes = tokens / text.train_tokens
    settings = {**COMMON, **chosen.settings(), "dropout": dropout_for(passes), "max_iters": steps,
                "warmup_iters": min(50, steps // 10), "eval_interval": max(1, -(-steps // (REPORTS - 1)))}
    return Plan(chosen, settings, chosen.params(text.vocab_size), tps, train_s, tokens, passes,
                expected_loss(text.bigram_loss, tokens), dict(tokens_per_sec))


def enough(text: TextFigures, params: int, tokens: float) -> bool:
    """Whether `tokens` seen in the time train a model of `params` well: TOKENS_PER_PARAM a
    parameter, or REPEAT_PASSES passes over the text."""
    return tokens >= TOKENS_PER_PARAM * params or tokens >= REPEAT_PASSES * text.train_tokens


def check_text(text: TextFigures) -> None:
    if text.train_tokens < MIN_TRAIN_TOKENS or text.val_tokens <= LADDER[0].block_size:
        raise UserError(f"the text has {text.chars:,} characters ({text.train_tokens:,} train and {text.val_tokens:,} "
                        f"val tokens), too small for any model --preset auto sizes (it needs {MIN_TRAIN_TOKENS:,} "
                        f"train and {LADDER[0].block_size + 1} val tokens); give more text, or choose the model "
                        "yourself (--n-layer, --n-embd, --block-size ...)")


# --- measuring: the text and the machine ------------------------------------------------------


def bigram_loss(train, val, vocab_size: int, limit: int = 1 << 24) -> float:
    """The count-based bigram's val loss (nats per token): pair counts of the train split (its
    first `limit` tokens), add-one smoothed, scored on val (its first `limit` tokens)."""
    import numpy as np

    def pairs(ids):
        ids = np.asarray(ids[:limit], dtype=np.int64)
        return ids[:-1] * vocab_size + ids[1:]

    counts = np.bincount(pairs(train), minlength=vocab_size * vocab_size).reshape(vocab_size, vocab_size) + 1.0
    logp = np.log(counts / counts.sum(axis=1, keepdims=True)).ravel()
    return float(-logp[pairs(val)].mean())


def probe(shape: Shape, vocab_size: int, base: dict, steps: int = 2) -> float:
    """Tokens per second of `shape`'s training steps here, with the run's device, dtype and
    optimizer (`seconds_per_step`)."""
    from tinygpt import config as C

    values = {**base, **COMMON, **shape.settings(), "vocab_size": vocab_size, "dropout": 0.1}
    model_cfg, cfg = C.build(C.ModelConfig, values), C.build(C.TrainConfig, values)
    return shape.tokens_per_step() / seconds_per_step(model_cfg, cfg, steps)


def seconds_per_step(model_cfg, cfg, steps: int = 2) -> float:
    """Seconds a training step of these settings takes here: one untimed step (one-off costs),
    then the mean of `steps` timed ones (forward, backward, optimizer) on random ids. The global
    random state is left as it was."""
    import torch

    from tinygpt.model import build_model
    from tinygpt.optim import make_optimizer
    from tinygpt.runtime import autocast, resolve_attention, resolve_device, resolve_dtype
    from tinygpt.train import muon_ns_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    state = torch.get_rng_state()
    model = build_model(model_cfg).to(device)
    model.set_attention(resolve_attention(model_cfg.attention, device))
    optimizer = make_optimizer(model, cfg, muon_ns_dtype(dtype))
    x = torch.randint(model_cfg.vocab_size, (cfg.batch_size, model_cfg.block_size + 1), device=device)
    seconds = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(device, dtype):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += (time.perf_counter() - t0) if i else 0.0
    torch.set_rng_state(state)
    return seconds / steps


def probe_ladder(text: TextFigures, base: dict, seconds: float, measure=probe) -> dict[str, float]:
    """Tokens per second of the ladder's shapes, smallest first, up to the first the rule turns
    down (a larger one is slower and has more parameters: it would be turned down too); a shape
    whose pace, guessed from the last one's by its work a token, falls far short is not probed."""
    out: dict[str, float] = {}
    last = None
    for shape in LADDER:
        params = shape.params(text.vocab_size)
        if out and params > PARAMS_PER_TOKEN * text.train_tokens:
            break
        if last is not None:  # predicted from the last one's pace by work per token: far short, not probed
            guess = out[last.name] * last.flops_per_token(text.vocab_size) / shape.flops_per_token(text.vocab_size)
            if not enough(text, params, 2 * guess * train_seconds(text, shape, guess, seconds)):
                break  # small models run below their work's pace (a 2x slower guess, measured): 2x
        out[shape.name], last = measure(shape, text.vocab_size, base), shape
        if not enough(text, params, out[shape.name] * train_seconds(text, shape, out[shape.name], seconds)):
            break  # the rule turns it down: a larger shape is slower and bigger
    return out


def text_figures(flags: dict) -> TextFigures:
    """The figures of the text `flags` train on, from its token file (encoded now if need be)."""
    from tinygpt import config as C
    from tinygpt.corpus import Layout, open_tokens, prepare
    from tinygpt.data import find_corpus
    from tinygpt.tokenizer import tokenizer_from_json
    from tinygpt.train import note_on_stderr

    cfg = C.build(C.TrainConfig, {k: v for k, v in flags.items() if k in C.TRAIN_KEYS})
    path = prepare(find_corpus(cfg.data), kind=cfg.tokenizer, vocab_size=cfg.vocab_size, log=note_on_stderr,
                   layout=Layout.of(cfg))
    header, ids = open_tokens(path)
    vocab = tokenizer_from_json(header["tokenizer"]).vocab_size
    train, val = ids[: header["train_tokens"]], ids[header["train_tokens"]:]
    loss = bigram_loss(train, val, vocab) if len(val) > 1 and len(train) > 1 else math.nan
    return TextFigures(header["chars"], header["train_tokens"], header["val_tokens"], vocab, header["documents"], loss)


def auto_settings(flags: dict, note) -> dict:
    """The settings `--preset auto` picks for the run `flags` ask for, its plan said in `note`."""
    from tinygpt import STARTED

    budget = float(flags.get("max_time") or DEFAULT_MAX_TIME)
    text = text_figures(flags)
    check_text(text)
    measured = probe_ladder(text, flags, budget - (time.perf_counter() - STARTED))
    result = plan(text, measured, budget - (time.perf_counter() - STARTED))
    note(result.describe(text, budget))
    # The run's --max-time counts from its own start and bounds its training and reports: what is
    # left of the budget after the plan, less the final whole-val evaluation that follows it.
    final_eval = text.val_tokens / (3 * result.tokens_per_sec)
    left = round(max(1.0, budget - (time.perf_counter() - STARTED) - final_eval), 1)
    return {**result.settings, "max_iters": max_iters(result, text), "max_time": left}


def max_iters(result: Plan, text: TextFigures) -> int:
    """The planned steps, or more where time bounds them: --max-time fits the schedule to the
    steps that really fit, so a probe that was optimistic costs nothing and a pessimistic one
    leaves no time unused. Where MAX_PASSES bounds them, exactly those."""
    steps = result.settings["max_iters"]
    capped = (steps + 1) * result.shape.tokens_per_step() > MAX_PASSES * text.train_tokens
    return steps if capped else int(steps * STEPS_HEADROOM)
