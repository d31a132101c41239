"""Typed, validated settings: what a model is, how to train it, how to sample from it.

Every setting is a dataclass field documented where it is declared; that text is also its
`--help` line, so the two can never drift apart. `__post_init__` rejects bad values with a
message that names the field. Presets are TOML files in `tinygpt/presets/` (plain data).

Settings are layered, later wins: the model's lecture defaults, then `--preset`, then
`--config FILE.toml`, then command-line flags.
"""

import dataclasses
import math
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tinygpt.errors import UserError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def setting(default: Any, help: str, choices: tuple | None = None, cli: bool = True,
            gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None):
    """A dataclass field that carries its own help text, allowed values and limits
    (gt: greater than, ge: at least, lt: less than, le: at most), all checked by `check_fields`."""
    limits = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli, "limits": limits})


@dataclass
class ModelConfig:
    """The architecture. Defaults are the lecture's final GPT."""

    model: str = setting("gpt", "which model to train", choices=("gpt", "bigram"))
    vocab_size: int = setting(0, "number of tokens; taken from the tokenizer", cli=False, ge=0)
    block_size: int = setting(256, "context length in tokens", gt=0)
    n_layer: int = setting(6, "number of transformer blocks", gt=0)
    n_head: int = setting(6, "attention heads per block", gt=0)
    n_embd: int = setting(384, "embedding width; must be divisible by n_head", gt=0)
    dropout: float = setting(0.2, "dropout on the outputs of attention and feed-forward, before they join the "
                             "residual stream (0 = off)", ge=0, lt=1)
    attn_dropout: float | None = setting(
        None, "dropout on attention probabilities (default: same as --dropout, as the lecture)", ge=0, lt=1
    )
    pos_emb: str = setting(
        "learned", "position encoding: learned table (lecture) or rotary", choices=("learned", "rope")
    )
    norm: str = setting("layernorm", "normalisation layer", choices=("layernorm", "rmsnorm"))
    activation: str = setting(
        "relu", "feed-forward non-linearity (relu2 = squared ReLU; gelu_tanh = GELU's tanh approximation, GPT-2's)",
        choices=("relu", "relu2", "gelu", "gelu_tanh"),
    )
    qk_norm: bool = setting(False, "normalise queries and keys (parameter-free RMSNorm per head) before attention")
    tie_embeddings: bool = setting(False, "share the token embedding with the output head")
    attn_bias: bool = setting(False, "bias on the query/key/value projection (GPT-2 has one; the lecture does not)")
    head_bias: bool = setting(True, "bias on the output head (the lecture's has one; GPT-2's does not)")
    logit_softcap: float = setting(
        0.0, "bound the logits smoothly to (-c, c): c * tanh(logits / c) (modded-nanogpt's soft-cap; 0 = off)", ge=0)
    zero_init_proj: bool = setting(
        False, "start every block's output projections (attention's and the MLP's) at zero, so each block starts "
        "as the identity (modded-nanogpt)")
    bigram_embed: bool = setting(
        False, "add a learned vector for each (previous token, token) pair to the token embedding, zero at first: "
        "the model sees the last two characters before any attention (exact up to 255 tokens; hashed beyond)")
    attention: str = setting(
        "auto",
        "attention kernel: auto picks the fastest measured for the device; reference is the "
        "lecture's per-head loop (for tests)",
        choices=("auto", "sdpa", "manual", "reference"),
    )

    def __post_init__(self):
        check_fields(self)
        if self.n_embd % self.n_head:
            raise UserError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "pick sizes such as --n-embd 384 --n-head 6"
            )
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError("rotary embeddings need an even head size (n_embd / n_head)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attn_pdrop(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout


@dataclass
class TrainConfig:
    """How to train. Defaults are the lecture's GPT recipe."""

    data: str | None = setting(
        None, "what to train on: a UTF-8 text file (.txt, .md, any text), .jsonl, .csv, .tsv or .parquet (a record a "
        "document), a directory of these (a file a document, sorted path order), or hf:NAME[:SPLIT], a Hugging Face "
        "dataset (default: Tiny Shakespeare, downloaded once)")
    text_field: str = setting("text", "the field (.jsonl) or column (.csv, .tsv, .parquet, hf:) that holds each "
                              "document's text")
    val_split: str = setting(
        "auto", "how val is held out: tail = the last --val-fraction of the text (the lecture's); documents = a "
        "fixed, seeded share of whole documents; auto = documents from 20 documents on, else tail",
        choices=("auto", "tail", "documents"))
    val_fraction: float = setting(0.1, "the share of the text (tail) or of the documents (documents) held out as val",
                                  gt=0, lt=1)
    data_format: str = setting(
        "auto", "chat: the data is conversations to fine-tune an assistant on (.jsonl, a line each: {\"messages\": "
        "[{\"role\": \"user\", \"content\": ...}, ...]}); text: documents; auto: chat when a .jsonl file's first "
        "record has a \"messages\" list", choices=("auto", "text", "chat"))
    loss_on: str = setting("assistant", "conversations: learn the assistant's answers only (assistant) or every "
                           "token (all)", choices=("assistant", "all"))
    out: str | None = setting(None, "run directory to write (default: runs/MODEL-TIMESTAMP)")
    resume: str | None = setting(None, "continue the run in this directory from its latest checkpoint")
    overwrite: bool = setting(False, "allow replacing an existing run directory given by --out")
    init_from: str | None = setting(
        None, "start from this run's weights and tokenizer (fine-tuning); hf:DIR starts from a local "
        "Hugging Face GPT-2 directory"
    )
    grow_vocab: bool = setting(
        False, "with --init-from: add characters the old tokenizer lacks instead of refusing"
    )
    tokenizer: str = setting("char", "tokenizer to train", choices=("char", "bpe"))
    vocab_size: int = setting(512, "vocabulary size for --tokenizer bpe", gt=0)
    batch_size: int = setting(64, "sequences per micro-batch (per process)", gt=0)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", gt=0)
    max_iters: int = setting(5000, "optimizer steps", ge=0)
    max_time: float = setting(
        0.0, "stop training after this many seconds from the command's start (0 = no limit); when fewer than "
        "max_iters steps fit, the learning-rate schedule is fitted to the steps that do (re-estimated at every "
        "report), so its decay ends in time on any machine", ge=0)
    eval_interval: int = setting(500, "steps between loss reports and checkpoints", gt=0)
    eval_iters: int = setting(200, "batches per split in each periodic loss estimate", gt=0)
    early_stop: int = setting(0, "stop after this many loss reports without a new best val loss (0 = off)", ge=0)
    final_eval: bool = setting(True, "at the end, evaluate the best and the last model on the whole val split")
    learning_rate: float = setting(3e-4, "peak learning rate", gt=0)
    min_lr: float = setting(0.0, "learning rate at the end of a cosine schedule", ge=0)
    lr_schedule: str = setting(
        "constant", "learning-rate schedule: constant, cosine down to min_lr, or wsd (warm-up, stable, then a "
        "linear decay to min_lr over the last --cooldown-frac of the steps; 'trapezoidal')",
        choices=("constant", "cosine", "wsd"))
    warmup_iters: int = setting(0, "steps of linear warm-up", ge=0)
    cooldown_frac: float = setting(0.3, "wsd: the fraction of max_iters spent decaying to min_lr", gt=0, le=1)
    optimizer: str = setting(
        "adamw", "adamw for every parameter; muon: Muon (momentum, orthogonalised by Newton-Schulz) for the "
        "blocks' weight matrices, AdamW for embeddings, head, norms and biases", choices=("adamw", "muon"))
    muon_lr: float = setting(0.02, "Muon's peak learning rate (it follows --lr-schedule's shape)", gt=0)
    muon_momentum: float = setting(0.95, "Muon's (Nesterov) momentum", ge=0, lt=1)
    muon_momentum_warmup: int = setting(
        0, "Muon's momentum goes linearly from 0.85 to --muon-momentum over this many first steps (modded-nanogpt's "
        "warm-up; 0 = off)", ge=0)
    muon_split_qkv: bool = setting(
        False, "--optimizer muon: orthogonalise the fused query/key/value projection as three matrices, each on its "
        "own (modded-nanogpt's separate Q, K and V), instead of as one")
    embed_lr_mult: float = setting(
        1.0, "the embedding tables (token, position, bigram) learn at this multiple of --learning-rate "
        "(modded-nanogpt gives embeddings a far higher rate than the head)", gt=0)
    weight_decay: float = setting(0.01, "AdamW weight decay on matrices (not biases, norms, embeddings); Muon's "
                                  "decoupled weight decay too", ge=0)
    ema_decay: float = setting(
        0.0, "keep an exponential moving average of the weights with this decay (0.99: about the last 100 steps, "
        "bias-corrected from step 1) and make it the run's model: the loss reports, checkpoints, final figure and "
        "samples all use the average (0 = off)", ge=0, lt=1)
    beta1: float = setting(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = setting(0.999, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = setting(0.0, "clip gradient norm to this value (0 = off)", ge=0)
    seed: int = setting(1337, "random seed for weights, batches and dropout")
    device: str = setting("auto", "auto picks cuda, then mps, then cpu", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = setting(
        "auto", "auto: bfloat16 where the hardware has it (and, on CPU, it measures faster), float16 with loss "
        "scaling on GPUs with fp16 tensor cores only (T4, V100), else float32",
        choices=("auto", "float32", "bfloat16", "float16")
    )
    compile: bool = setting(False, "compile the model with torch.compile")
    threads: str = setting(
        "auto", "CPU threads: auto uses the cores that are idle when the run starts (all of them on an idle "
        "machine; OMP_NUM_THREADS, when set, wins), or a number"
    )
    sample_chars: int = setting(500, "characters to generate and print at the end (0 = none)", ge=0)
    report_sample_chars: int = setting(
        0, "characters to generate at every loss report, from token 0 with the same seed each time, written to "
        "metrics.jsonl with the report (the studio pins them to the curve; 0 = none)", ge=0)
    plot: bool = setting(True, "draw RUN/loss.png at the end of the run")
    quiet: bool = setting(False, "print only the loss reports, no progress bar")

    def __post_init__(self):
        check_fields(self)
        if self.threads != "auto" and not (self.threads.isdigit() and int(self.threads) > 0):
            raise UserError(f"threads must be auto or a positive number, got {self.threads!r}")
        if self.min_lr > self.learning_rate:
            raise UserError(f"min_lr must be in [0, learning_rate], got {self.min_lr}")


@dataclass
class SampleConfig:
    """How to generate text from a trained run."""

    prompt: str = setting("\n", "text to continue")
    max_new_tokens: int = setting(500, "tokens to generate per sample", ge=0)
    temperature: float = setting(1.0, "softmax temperature; 0 = always the most likely token", ge=0)
    top_k: int | None = setting(None, "sample only among the k most likely tokens", ge=1)
    top_p: float | None = setting(None, "sample only among the most likely tokens with this total probability",
                                  gt=0, le=1)
    num_samples: int = setting(1, "independent samples, generated together as one batch", gt=0)
    seed: int = setting(1337, "random seed: the same seed gives the same text")
    drop_unknown: bool = setting(False, "drop prompt characters the tokenizer does not know instead of refusing")
    kv_cache: bool = setting(True, "reuse attention keys/values between steps (GPT)")
    window: str = setting(
        "full", "past block_size: full = the last block_size tokens, exactly the lecture's text (a forward over "
        "the whole block per token); chunked = once full, keep the last half and continue cached (several "
        "times faster; other text)", choices=("full", "chunked"))
    stop_at_end: bool = setting(True, "end a sample where the model ends its document (runs trained on many "
                                "documents: .jsonl, .csv, a folder ...), instead of going on into the next")
    show_probs: bool = setting(False, "after the text, how likely the model found each generated token and what "
                               "else it considered (coloured on a terminal; a table otherwise)")

    def __post_init__(self):
        check_fields(self)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject sampling arguments that have no meaning (the limits of `SampleConfig`'s fields)."""
    fields = {f.name: f for f in dataclasses.fields(SampleConfig)}
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        check_value(fields[name], value)


def check_fields(cfg) -> None:
    """Every field against what its `setting` declares: allowed values, finiteness, limits."""
    for f in dataclasses.fields(cfg):
        check_value(f, getattr(cfg, f.name))


def check_value(f: dataclasses.Field, value) -> None:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{f.name} must be a finite number, got {value}")
    limits = f.metadata.get("limits") or {}
    if value is None or isinstance(value, bool) or not limits:
        return
    ok = all({"gt": value > bound, "ge": value >= bound, "lt": value < bound, "le": value <= bound}[kind]
             for kind, bound in limits.items())
    if not ok:
        raise UserError(f"{f.name} must be {describe_limits(limits)}, got {value}")


def describe_limits(limits: dict) -> str:
    """{"ge": 0, "lt": 1} -> "in [0, 1)"; {"gt": 0} -> "> 0"; {"ge": 1} -> ">= 1"."""
    low = next(((k, v) for k, v in limits.items() if k in ("gt", "ge")), None)
    high = next(((k, v) for k, v in limits.items() if k in ("lt", "le")), None)
    if low and high:
        return f"in {'(' if low[0] == 'gt' else '['}{low[1]:g}, {high[1]:g}{')' if high[0] == 'lt' else ']'}"
    kind, bound = low or high
    return f"{ {'gt': '>', 'ge': '>=', 'lt': '<', 'le': '<='}[kind]} {bound:g}"


# --- layering: defaults < preset < config file < flags ---------------------------------------

# The lecture's bigram.py differs from gpt.py in these settings; everything else is shared.
BIGRAM_DEFAULTS = {
    "block_size": 8,
    "batch_size": 32,
    "learning_rate": 1e-2,
    "max_iters": 3000,
    "eval_interval": 300,
    "dropout": 0.0,
    "weight_decay": 0.0,
}


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


TRAIN_KEYS = {f.name for f in cli_fields(ModelConfig)} | {f.name for f in cli_fields(TrainConfig)}


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the TOML file's `description`)."""
    out = {}
    for entry in sorted(resources.files("tinygpt.presets").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            out[entry.name[: -len(".toml")]] = data.get("description", "")
    return out


def load_preset(name: str) -> dict:
    entry = resources.files("tinygpt.presets") / f"{name}.toml"
    if not entry.is_file():
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return _check_keys(tomllib.loads(entry.read_text(encoding="utf-8")), f"preset {name}")


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist: give the path of a .toml file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    return _check_keys(data, f"config file {path}")


def _check_keys(data: dict, where: str) -> dict:
    data = {k.replace("-", "_"): v for k, v in data.items() if k != "description"}
    unknown = sorted(set(data) - TRAIN_KEYS - {"preset"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; see `tinygpt train --help` for the keys")
    return data


def resolve_train_settings(flags: dict, planned: dict | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Merge defaults, preset (or `planned`: what --preset auto chose), config file and flags
    (later wins) into validated configs."""
    layers: list[dict] = [planned] if planned else []
    if flags.get("preset") and not planned:
        layers.append(load_preset(flags["preset"]))
    if flags.get("config"):
        layers.append(load_config_file(flags["config"]))
    explicit = {k: v for k, v in flags.items() if k in TRAIN_KEYS}
    layers.append(explicit)
    model = next((layer["model"] for layer in reversed(layers) if "model" in layer), "gpt")
    merged: dict = dict(BIGRAM_DEFAULTS) if model == "bigram" else {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k != "preset"})
    return build(ModelConfig, merged), build(TrainConfig, merged)


def build(cls, values: dict):
    """Make a `cls` from the keys of `values` it knows, checking each value's type."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(f, values[f.name])
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value):
    base = field_base_type(f)
    if value is None:
        if base is not f.type:  # `X | None`: None means "not set"
            return None
        raise UserError(f"{f.name} must be {base.__name__}, got None")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UserError(f"{f.name} must be {base.__name__}, got {value!r}")
    return value


def field_base_type(f: dataclasses.Field) -> type:
    """`int | None` -> int; plain types unchanged."""
    t = f.type
    if isinstance(t, types.UnionType):
        t = next(a for a in t.__args__ if a is not type(None))
    return t


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def as_flags(settings: dict) -> list[str]:
    """Settings as `tinygpt train` flags: {"n_layer": 2, "plot": False} -> --n-layer 2 --no-plot
    (None: left out)."""
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            out += [flag, str(value)]
    return out
