"""Hugging Face interop: a run as a GPT-2 checkpoint, and a GPT-2 checkpoint as a run's start.

    tinygpt export RUN --to hf --out DIR    DIR loads with transformers' AutoModelForCausalLM and
                                            AutoTokenizer, no custom code (GPT2LMHeadModel)
    tinygpt train --init-from hf:DIR ...    fine-tune a local GPT-2-family directory (what
                                            `save_pretrained` writes: config.json, weights, tokenizer)

The lecture's GPT is GPT-2's architecture with three differences, each a `ModelConfig` field:
no bias on the q/k/v projection (`attn_bias`), a bias on the output head (`head_bias`), and
exact GELU or ReLU where GPT-2 uses GELU's tanh approximation (`activation="gelu_tanh"`). The
weights keep nanoGPT's names, so the mapping is a rename plus a transpose:

    tinygpt                      GPT-2 (transformers)
    token_embedding_table        transformer.wte
    position_embedding_table     transformer.wpe
    blocks.i.ln_1, ln_2          transformer.h.i.ln_1, ln_2
    blocks.i.attn.c_attn/c_proj  transformer.h.i.attn.c_attn/c_proj    Conv1D: weight is (in, out)
    blocks.i.mlp.c_fc/c_proj     transformer.h.i.mlp.c_fc/c_proj       Conv1D
    ln_f                         transformer.ln_f
    lm_head                      lm_head                               nn.Linear, no bias

Neither direction needs transformers installed: the files are JSON and safetensors, and the
tokenizer is written and read with the `tokenizers` library. The tests load every export with
transformers and check that it computes tinygpt's logits.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinygpt import checkpoint as ckpt
from tinygpt.chat import CHAT_TEMPLATE, CHAT_TOKENS, END_OF_TURN, has_chat
from tinygpt.config import ModelConfig, build
from tinygpt.errors import UserError
from tinygpt.tokenizer import END_OF_DOCUMENT, BPETokenizer, CharTokenizer

HF_PREFIX = "hf:"  # --init-from hf:DIR

# GPT-2 uses torch's LayerNorm with this epsilon, which is also nn.LayerNorm's default (tinygpt's).
LAYER_NORM_EPS = 1e-5

# tinygpt activation -> transformers' ACT2FN name computing the same function.
# "gelu" there is torch's exact (erf) GELU; GPT-2's "gelu_new" is the tanh approximation.
HF_ACTIVATION = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
# ...and back: every ACT2FN name that is one of tinygpt's activations (up to float rounding).
FROM_HF_ACTIVATION = {"relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_python_tanh": "gelu_tanh"}

# Settings GPT2LMHeadModel has no place for, with the value it needs.
GPT2_ARCHITECTURE = {"pos_emb": "learned", "norm": "layernorm", "qk_norm": False, "logit_softcap": 0.0,
                     "bigram_embed": False}

# GPT-2's config.json defaults (transformers' GPT2Config), for keys a file leaves out.
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1, "attn_pdrop": 0.1,
                 "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "add_cross_attention": False, "tie_word_embeddings": True}

# The weights GPT-2 keeps as (in_features, out_features): transformers' Conv1D, not nn.Linear.
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_RENAMES = (("token_embedding_table.", "transformer.wte."), ("position_embedding_table.", "transformer.wpe."),
            ("blocks.", "transformer.h."), ("ln_f.", "transformer.ln_f."))

_VOCAB_ROWS = ("token_embedding_table.weight", "lm_head.weight")  # one row per token
END_OF_TEXT = END_OF_DOCUMENT  # GPT-2's one special token, bos, eos and unk at once: a run's document end
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def hf_name(name: str) -> str:
    """The GPT-2 (GPT2LMHeadModel) name of a tinygpt weight."""
    for ours, theirs in _RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name  # lm_head.*


def is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


# --- export ------------------------------------------------------------------------------------


def check_exportable(cfg: ModelConfig, run: Path) -> None:
    """Refuse, in one line naming the settings, a model GPT2LMHeadModel cannot compute."""
    if cfg.model != "gpt":
        raise UserError(f"{run} is a {cfg.model} model; only GPT runs export to transformers (GPT2LMHeadModel)")
    off = [f"{k}={getattr(cfg, k)!r}" for k, v in GPT2_ARCHITECTURE.items() if getattr(cfg, k) != v]
    if cfg.activation not in HF_ACTIVATION:
        off.append(f"activation={cfg.activation!r}")
    if off:
        raise UserError(f"{run} uses {', '.join(off)}, which GPT-2 has no place for; only runs with learned "
                        "positions, LayerNorm, relu, gelu or gelu_tanh, no qk_norm, no logit soft-cap and no bigram "
                        "input export to transformers")


def fold_head_bias(weight: torch.Tensor, head_bias: torch.Tensor, ln_bias: torch.Tensor) -> torch.Tensor | str:
    """ln_f's bias with the head's bias folded in, or the reason it cannot be folded exactly.

    The head computes W·LN(x) + b with LN(x) = g*x̂ + β. For any d with W·d = b,
    W·(g*x̂ + β + d) = W·LN(x) + b: the bias moves into ln_f's bias, whose only reader is the head.
    Such a d exists for every b when W (vocab x n_embd) has full row rank, which needs
    vocab <= n_embd. The check uses the folded bias rounded to float32, as the exported file holds it.
    """
    vocab, width = weight.shape
    if vocab > width:
        return f"vocab {vocab} > n_embd {width}"
    w64, b64, beta64 = weight.double(), head_bias.double(), ln_bias.double()
    d = torch.linalg.pinv(w64) @ b64  # the smallest d with W·d = b, where one exists
    folded = (beta64 + d).float()
    error = (w64 @ folded.double() - (w64 @ beta64 + b64)).abs().max().item()
    if error <= 1e-5:
        return folded
    rank = int(torch.linalg.matrix_rank(w64))
    if rank < vocab:
        return f"the head's rank is {rank} < vocab {vocab}"
    return f"the head is ill-conditioned: the fold would move the logits by up to {error:.1e}"


def gpt2_state(model, run: Path) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names and layouts (float32)."""
    cfg = model.config
    state = {name: t.detach().float() for name, t in model.state_dict().items()}
    if cfg.head_bias:
        folded = fold_head_bias(state["lm_head.weight"], state.pop("lm_head.bias"), state["ln_f.bias"])
        if isinstance(folded, str):
            raise UserError(f"{run}'s output head has a bias, which GPT2LMHeadModel lacks, and it cannot be folded "
                            f"into ln_f exactly ({folded}); train with --no-head-bias to export")
        state["ln_f.bias"] = folded
    if not cfg.attn_bias:  # GPT-2's q/k/v projection always has a bias: zero computes the same
        for i in range(cfg.n_layer):
            state[f"blocks.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.n_embd)
    if cfg.tie_embeddings:  # transformers ties lm_head to wte itself; safetensors stores a tensor once
        del state["lm_head.weight"]
    return {hf_name(n): (t.t() if is_conv1d(n) else t).contiguous() for n, t in state.items()}


def gpt2_config(cfg: ModelConfig, tokenizer) -> dict:
    """config.json for GPT2LMHeadModel computing what `cfg` does."""
    eos = _end_of_text_id(tokenizer)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as tinygpt's MLP
        "activation_function": HF_ACTIVATION[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": 0.0,  # tinygpt drops nothing after the embeddings
        "attn_pdrop": cfg.attn_pdrop,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": tokenizer_eos(tokenizer),
        "use_cache": True,
    }


def tokenizer_eos(tokenizer) -> int | None:
    """Where generation ends: a chat run's end of turn, else the end of a document (or none)."""
    return tokenizer.stoi[END_OF_TURN] if tokenizer.kind == "char" and has_chat(tokenizer) else (
        tokenizer.hf.token_to_id(END_OF_TURN) if has_chat(tokenizer) else _end_of_text_id(tokenizer))


def _end_of_text_id(tokenizer) -> int | None:
    """GPT-2's <|endoftext|>, or a run's end-of-document token (the same name): bos and eos."""
    return tokenizer.eot_id


def char_tokenizer_as_hf(tokenizer: CharTokenizer):
    """The char tokenizer as a `tokenizers.Tokenizer`: every character is a piece of its own (no
    normaliser; the regex matches newlines too), looked up in a word-level vocabulary, and the
    decoder concatenates, so spaces and newlines round-trip exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(dict(tokenizer.stoi), unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if tokenizer.eot_id is not None:  # a run trained on documents: its end-of-document token, as eos
        tok.add_special_tokens([END_OF_TEXT])
    if has_chat(tokenizer):  # a run fine-tuned on conversations: its template's tokens, never split
        tok.add_special_tokens(list(CHAT_TOKENS))
    return tok


def tokenizer_files(tokenizer, block_size: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json: what PreTrainedTokenizerFast loads."""
    hf_tok = tokenizer.hf if isinstance(tokenizer, BPETokenizer) else char_tokenizer_as_hf(tokenizer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        # transformers would otherwise turn " ." into "." when decoding, and char text must round-trip.
        "clean_up_tokenization_spaces": False,
    }
    if _end_of_text_id(tokenizer) is not None:
        config.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    if has_chat(tokenizer):  # apply_chat_template renders as tinygpt does; a reply ends at its end of turn
        config.update(chat_template=CHAT_TEMPLATE, eos_token=END_OF_TURN)
    return {"tokenizer.json": hf_tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def check_out_dir(out: Path) -> None:
    """Export never replaces anything: --out must not exist, or be an empty directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a new directory path for the export")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory or remove it")


def export_run(run: str | Path, out: str | Path, which: str = "latest") -> Path:
    """Write the run's `which` checkpoint to `out` as a transformers GPT-2 model directory.

    The directory is written under a temporary name and renamed into place, so `out` is either
    absent or complete, whenever the process stops.
    """
    run, out = Path(run), Path(out)
    check_out_dir(out)
    meta = ckpt.read_run_meta(run)
    cfg, _ = ckpt.configs_from_meta(meta)
    check_exportable(cfg, run)  # before loading: a refusal should not cost the weights' read
    model, tokenizer = ckpt.load_run(run, which)
    files = {"config.json": json.dumps(gpt2_config(cfg, tokenizer), indent=2) + "\n",
             **tokenizer_files(tokenizer, cfg.block_size)}
    state = gpt2_state(model, run)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", _default_file_mode())  # safetensors writes 0600; this is for sharing
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, out)  # rename(2) may replace an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt.fsync_dir(out.parent)
    return out


def _default_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask (which can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


# --- import --------------------------------------------------------------------------------------


def read_gpt2_config(directory: Path, block_size: int | None = None) -> ModelConfig:
    """The ModelConfig computing what a GPT-2 config.json describes; `block_size` may crop
    n_positions (as nanoGPT's crop_block_size), the only architecture change allowed."""
    path = directory / "config.json"
    if not directory.is_dir():
        raise UserError(f"--init-from hf:{directory}: no such directory; give a directory written by save_pretrained")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json, so it is not a Hugging Face model directory; "
                        "give one written by save_pretrained") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); the model directory is damaged") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "gpt2":
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise UserError(f"{directory} holds a {kind!r} model; --init-from hf: reads GPT-2-family checkpoints "
                        "(model_type 'gpt2') only")
    try:
        return _model_config({**GPT2_DEFAULTS, **raw}, path, block_size)
    except TypeError as e:  # e.g. a number written as a string
        raise UserError(f"{path} has a value of the wrong type ({e}); the model directory is damaged") from None


def _model_config(c: dict, path: Path, block_size: int | None) -> ModelConfig:
    n_embd, activation = c["n_embd"], c["activation_function"]
    unsupported = []
    if activation not in FROM_HF_ACTIVATION:
        unsupported.append(f"activation_function={activation!r}")
    if c["n_inner"] not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={c['n_inner']} (tinygpt's MLP is 4 * n_embd = {4 * n_embd})")
    if abs(c["layer_norm_epsilon"] - LAYER_NORM_EPS) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={c['layer_norm_epsilon']}")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c[key]:
            unsupported.append(f"{key}=true")
    if not c["scale_attn_weights"]:
        unsupported.append("scale_attn_weights=false")
    if unsupported:
        raise UserError(f"{path} has {', '.join(unsupported)}, which tinygpt's GPT does not compute; "
                        "only GPT-2's own architecture can be imported")
    n_positions = c["n_positions"]
    if block_size is not None and block_size > n_positions:
        raise UserError(f"--block-size {block_size} is longer than the checkpoint's n_positions ({n_positions}); "
                        "a fine-tuning run may only shorten it")
    # build() checks every value's type, so a damaged config.json is a one-line error.
    return build(ModelConfig, dict(
        model="gpt", vocab_size=c["vocab_size"], block_size=block_size or n_positions, n_layer=c["n_layer"],
        n_head=c["n_head"], n_embd=n_embd, dropout=c["resid_pdrop"], attn_dropout=c["attn_pdrop"],
        activation=FROM_HF_ACTIVATION[activation], tie_embeddings=c["tie_word_embeddings"],
        attn_bias=True, head_bias=False,
    ))


def read_gpt2_tokenizer(directory: Path):
    """The directory's tokenizer: tokenizer.json (byte-level BPE, or the char layout tinygpt
    exports), else GPT-2's older vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            kind = data["model"]["type"]
            tok = Tokenizer.from_str(json.dumps(data))
        except Exception as e:  # tokenizers raises its own Exception subclass for bad files
            raise UserError(f"{path} is not a readable tokenizer ({e}); the model directory is damaged") from None
        if kind == "BPE":
            return BPETokenizer(tok)
        vocab = data["model"].get("vocab", {})
        # and a run's end-of-document token and chat template's tokens
        chars = all(len(ch) == 1 or ch == END_OF_TEXT or ch in CHAT_TOKENS for ch in vocab)
        if kind == "WordLevel" and chars and sorted(vocab.values()) == list(range(len(vocab))):
            return CharTokenizer(sorted(vocab, key=vocab.get))  # a char run exported by tinygpt
        raise UserError(f"{path} is a {kind} tokenizer; tinygpt reads byte-level BPE (GPT-2's) or its own char one")
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.is_file() and merges.is_file():
        try:
            tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise UserError(f"{vocab} and {merges} are not a readable BPE tokenizer ({e})") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(END_OF_TEXT) is not None:  # special: never split, as GPT2Tokenizer does
            tok.add_special_tokens([END_OF_TEXT])
        return BPETokenizer(tok)
    raise UserError(f"{directory} has no tokenizer (tokenizer.json, or vocab.json and merges.txt); "
                    "save it there too with tokenizer.save_pretrained")


def read_gpt2(directory: str | Path, block_size: int | None = None):
    """(ModelConfig, tokenizer) of a GPT-2-family directory, checked to agree."""
    directory = Path(directory)
    cfg = read_gpt2_config(directory, block_size)
    tokenizer = read_gpt2_tokenizer(directory)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                        f"vocab_size is {cfg.vocab_size}; tinygpt needs them equal")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{directory} has no weights ({', '.join(WEIGHT_FILES)}); save the model with save_pretrained")
    return cfg, tokenizer


def read_gpt2_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, named without the `transformer.` prefix (GPT2Model saves none).
    safetensors first; a .bin is read with weights_only=True, so no code in it can run."""
    try:
        if (directory / "model.safetensors").is_file():
            state = load_file(str(directory / "model.safetensors"))
        elif (directory / "model.safetensors.index.json").is_file():  # sharded
            index = json.loads((directory / "model.safetensors.index.json").read_text(encoding="utf-8"))
            state = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_file(str(directory / shard)))
        else:
            state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"the weights in {directory} are unreadable ({e}); the model directory is damaged") from None
    except Exception as e:  # unpickling fails in many types; all mean "do not trust this file"
        raise UserError(f"{directory / 'pytorch_model.bin'} is unreadable or unsafe ({type(e).__name__}); "
                        "it was not loaded") from None
    return {name.removeprefix("transformer."): t for name, t in state.items()}


def load_gpt2_weights(model, directory: str | Path) -> None:
    """Copy a GPT-2 checkpoint's weights into `model` (built from `read_gpt2`'s config)."""
    directory = Path(directory)
    state = read_gpt2_weights(directory)
    cfg = model.config
    own = model.state_dict()
    new = {}
    for name, target in own.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # the same tensor as the token embedding
        source = hf_name(name).removeprefix("transformer.")
        if source not in state:
            raise UserError(f"{directory}'s weights lack {source}, which config.json implies; "
                            "the model directory is damaged")
        tensor = state[source].t() if is_conv1d(name) else state[source]
        if name == "position_embedding_table.weight":
            tensor = tensor[: cfg.block_size]  # a shorter block keeps the first positions
        if name in _VOCAB_ROWS and tensor.shape[1:] == target.shape[1:] and len(tensor) < len(target):
            tensor = ckpt.grow_rows(tensor, len(target))  # new tokens: the mean of the others
        if tensor.shape != target.shape:
            raise UserError(f"{directory}: weight {source} has shape {tuple(state[source].shape)}, but config.json "
                            f"implies {tuple(target.t().shape if is_conv1d(name) else target.shape)}; "
                            "the weights are of another model")
        new[name] = tensor.to(target.dtype)
    model.load_state_dict(new, strict=False)  # strict would ask for the tied head twice


def load_gpt2(directory: str | Path, device: str | torch.device = "cpu"):
    """Model (in eval mode) and tokenizer from a GPT-2-family directory: `load_run` for HF."""
    from tinygpt.model import build_model

    cfg, tokenizer = read_gpt2(directory)
    model = build_model(cfg)
    load_gpt2_weights(model, directory)
    return model.to(device).eval(), tokenizer


def source_dir(init_from: str) -> Path | None:
    """The directory of `--init-from hf:DIR`, or None for a tinygpt run."""
    return Path(init_from[len(HF_PREFIX):]) if init_from.startswith(HF_PREFIX) else None
