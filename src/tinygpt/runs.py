"""Run directories as a whole: making one, its metrics log, the rules for resuming and
fine-tuning from one, and listing them.

`checkpoint.py` owns the files' format (writing them atomically, reading them safely); this
module owns what a run *is*: which settings a resume may change, which a fine-tune may, where a
new run goes, and what `metrics.jsonl` holds.

    RUN/metrics.jsonl   one JSON line per loss report:
        {"step", "train_loss", "val_loss", "train_bpc", "val_bpc", "lr", "tokens_per_sec", "train_seconds"}
      plus, in a float16 run, "loss_scale" and "skipped_steps" (overflowed steps so far, skipped)
      and at the end of a run one line with the whole-val-split figures:
        {"step", "final_val_loss", "final_val_bpc", "best_step", "last_val_loss", "elapsed", "since_start"}
      (elapsed: seconds since training started; since_start: since the command started)
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

from tinygpt import checkpoint as ckpt
from tinygpt import config as C
from tinygpt import resources
from tinygpt.errors import UserError

# Settings that may differ when a run is resumed; any other flag must match the saved run.
RESUMABLE_OVERRIDES = {"max_iters", "max_time", "eval_interval", "quiet", "sample_chars", "report_sample_chars",
                       "plot", "device", "final_eval", "resume", "data", "out", "overwrite", "early_stop", "threads",
                       "batch_size", "grad_accum"}
# What a fine-tuning run may change about the model it starts from; the rest is its architecture.
FINETUNE_OVERRIDES = {"dropout", "attn_dropout", "attention"}


# --- resolving settings: once, from the flags the user gave -------------------------------------


def settings_from_flags(flags: dict, note=lambda line: None) -> tuple[C.ModelConfig, C.TrainConfig]:
    """The configs a `train` command asked for. With --resume the saved run's settings fill in
    what the flags do not say (and a flag that contradicts it is refused); with --init-from the
    base run's model settings do, and a flag that would change its architecture is refused."""
    if flags.get("resume"):
        flags = {k: v for k, v in resume_flags(flags).items() if k != "preset"}  # the run's settings are whole
    elif flags.get("init_from"):
        flags = finetune_flags(flags)
    elif flags.get("preset") == "auto":
        from tinygpt.sizing import auto_settings

        if is_chat_data(C.build(C.TrainConfig, _given(flags))):
            raise UserError("--preset auto sizes a model for text; conversations fine-tune a run you have: "
                            "tinygpt train --init-from RUN --data CHATS.jsonl (or --data-format text to read them "
                            "as documents)")
        planned = auto_settings(_given(flags), note)
        # The plan's --max-time is what is left of the budget once planned: the command keeps to it.
        return C.resolve_train_settings({**flags, "max_time": planned["max_time"]}, planned=planned)
    return C.resolve_train_settings(flags)


def _given(flags: dict) -> dict:
    """The train settings flags and --config say, for --preset auto to plan with."""
    config = C.load_config_file(flags["config"]) if flags.get("config") else {}
    return {**config, **{k: v for k, v in flags.items() if k in C.TRAIN_KEYS}}


def resume_flags(flags: dict) -> dict:
    """The flags given with --resume on top of the saved run's settings, once checked to agree."""
    meta = ckpt.read_run_meta(Path(flags["resume"]))
    check_writable(Path(flags["resume"]))
    saved_model, saved_train = ckpt.configs_from_meta(meta)
    saved = {k: v for k, v in {**C.to_dict(saved_model), **C.to_dict(saved_train)}.items() if k in C.TRAIN_KEYS}
    refuse_conflicts(saved, flags, RESUMABLE_OVERRIDES, "the run being resumed",
                     "drop the flag or start a new run with --out")
    if ("batch_size" in flags or "grad_accum" in flags) and (
        flags.get("batch_size", saved["batch_size"]) * flags.get("grad_accum", saved["grad_accum"])
        != saved["batch_size"] * saved["grad_accum"]
    ):
        raise UserError(f"--batch-size x --grad-accum must stay {saved['batch_size'] * saved['grad_accum']} "
                        f"sequences per step when resuming (the run used --batch-size {saved['batch_size']} "
                        f"--grad-accum {saved['grad_accum']}); e.g. halve one and double the other")
    return {**saved, **flags}


def finetune_flags(flags: dict) -> dict:
    """The base run's model settings under the flags, refusing architecture changes."""
    base = base_model_config(flags["init_from"], flags.get("block_size"))
    saved = {k: v for k, v in C.to_dict(base).items() if k in C.TRAIN_KEYS}
    changeable = FINETUNE_OVERRIDES | ({"block_size"} if hf_source(flags["init_from"]) else set())
    refuse_conflicts(saved, flags, changeable, f"the run --init-from {flags['init_from']}",
                     "fine-tuning keeps the model it starts from, so drop the flag")
    return {**saved, **flags}


def finetune_model_config(init_from: str, given: C.ModelConfig) -> C.ModelConfig:
    """The base's architecture, with dropout and the attention kernel from `given` (and, from a
    Hugging Face directory, a shorter context: nanoGPT's crop_block_size)."""
    base = base_model_config(init_from, given.block_size if hf_source(init_from) else None)
    return C.build(C.ModelConfig, {**C.to_dict(base), **{k: getattr(given, k) for k in FINETUNE_OVERRIDES}})


def base_model_config(init_from: str, block_size: int | None = None) -> C.ModelConfig:
    """The model settings of what --init-from names: a tinygpt run, or hf:DIR (GPT-2 family)."""
    hf_dir = hf_source(init_from)
    if hf_dir is not None:
        from tinygpt.hf import read_gpt2

        return read_gpt2(hf_dir, block_size)[0]  # checks its tokenizer and weights are there too
    return ckpt.configs_from_meta(ckpt.read_run_meta(Path(init_from)))[0]


def hf_source(init_from: str) -> Path | None:
    """The directory of `--init-from hf:DIR`, or None for a tinygpt run."""
    from tinygpt.hf import source_dir

    return source_dir(init_from)


def refuse_conflicts(saved: dict, flags: dict, changeable: set, where: str, fix: str) -> None:
    """A one-line error for the first flag that contradicts a saved setting it may not change."""
    for key, value in flags.items():
        if key in saved and key not in changeable and value != saved[key]:
            raise UserError(f"--{key.replace('_', '-')} {value} conflicts with {where} "
                            f"({key}={saved[key]!r}); {fix}")


# --- a new run directory -----------------------------------------------------------------------


def default_run_dir(model: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{model}-{stamp}", 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{model}-{stamp}-{n}"
    return path


def prepare_run_dir(out: str | None, model: str, overwrite: bool) -> Path:
    """A new, writable run directory; refuses to touch anything that exists unless told to."""
    run_dir = Path(out) if out else default_run_dir(model)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; choose a directory path for the run")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not (run_dir / "run.json").exists():
            raise UserError(f"--out {run_dir} exists and is not a tinygpt run directory; choose another --out")
        if not overwrite:
            raise UserError(
                f"run directory {run_dir} already exists; continue it with --resume {run_dir}, "
                "replace it with --overwrite, or choose another --out"
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write run directory {run_dir}: {e.strerror}; choose a writable --out") from None
    if overwrite:
        for name in ("checkpoints", "latest.json", "best.json", "metrics.jsonl"):
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return run_dir


def new_run_dir(cfg: C.TrainConfig, model_cfg: C.ModelConfig, tokenizer, extra: dict) -> Path:
    """Make the run directory and write the files it gets once: settings, versions, tokenizer."""
    run_dir = prepare_run_dir(cfg.out, model_cfg.model, cfg.overwrite)
    try:
        ckpt.write_run_files(run_dir, model_cfg, cfg, tokenizer, extra)
    except OSError as e:
        if not resources.is_disk_fault(e):
            raise
        for name in ("run.json", "tokenizer.json"):  # half a run directory would only be refused later
            (run_dir / name).unlink(missing_ok=True)
        raise resources.DiskError(f"{resources.what_failed(e)} while starting the run; free some space or "
                                  "choose another --out") from None
    return run_dir


def check_world_size(meta: dict, run_dir: Path, world: int) -> None:
    saved = meta.get("world_size", 1)
    if saved != world:
        raise UserError(f"{run_dir} was trained by {saved} process(es), this is {world}; "
                        f"resume it with torchrun --nproc_per_node {saved} (the same batches)")


# --- what a run trains on and starts from ---------------------------------------------------------


def tokenizer_and_tokens(cfg: C.TrainConfig, dist, note) -> tuple:
    """(tokenizer, data path, token file, the resumed run's run.json or None) of a run: the
    run's own tokenizer on a resume, the base run's on a fine-tune, else a new one trained on
    the data. Rank 0 encodes the text if it has to (see `tinygpt.corpus`); every process then
    maps the same file."""
    from tinygpt.corpus import Layout, prepare, read_tokenizer, scan
    from tinygpt.data import find_corpus
    from tinygpt.documents import open_source
    from tinygpt.tokenizer import CharTokenizer, tokenizer_from_json

    layout = Layout.of(cfg)
    if cfg.resume:
        meta = ckpt.read_run_meta(Path(cfg.resume))
        saved_model, _ = ckpt.configs_from_meta(meta)
        tokenizer = ckpt.load_run_tokenizer(cfg.resume, saved_model)
        data_path = cfg.data or meta["data_path"]
        return tokenizer, data_path, _token_file(dist, data_path, tokenizer, note, layout), meta
    data_path = find_corpus(cfg.data)
    if cfg.init_from:
        tokenizer = base_tokenizer(cfg.init_from)
        found = dist.on_main(scan, open_source(data_path, cfg.text_field))
        if cfg.grow_vocab and isinstance(tokenizer, CharTokenizer) and found.documents > 1:
            tokenizer = tokenizer.with_eot()  # documents get their end-of-document token (a new last id)
        tokenizer = grown(tokenizer, found.alphabet, cfg, data_path)
        return tokenizer, data_path, _token_file(dist, data_path, tokenizer, note, layout), None
    tokens = dist.on_main(prepare, data_path, kind=cfg.tokenizer, vocab_size=cfg.vocab_size, log=note, layout=layout)
    # Rank 0's tokenizer, sent to all: on another machine its token file may not exist.
    tokenizer = tokenizer_from_json(dist.on_main(lambda: read_tokenizer(tokens).to_json()))
    return tokenizer, data_path, tokens if dist.is_main else prepare(data_path, tokenizer, layout=layout), None


def base_tokenizer(init_from: str):
    """The tokenizer of what --init-from names: a run's, or a GPT-2-family directory's (hf:DIR)."""
    if hf_dir := hf_source(init_from):
        from tinygpt.hf import read_gpt2_tokenizer

        return read_gpt2_tokenizer(hf_dir)
    from tinygpt.tokenizer import load_tokenizer

    ckpt.read_run_meta(Path(init_from))
    return load_tokenizer(Path(init_from) / "tokenizer.json")


def grown(tokenizer, alphabet: str, cfg: C.TrainConfig, data_path):
    """The base run's tokenizer for a fine-tune on text of `alphabet`: with the characters it
    lacks added under --grow-vocab (char tokenizers), else refused naming them."""
    from tinygpt.tokenizer import CharTokenizer

    unknown = tokenizer.unknown(alphabet)
    if unknown and cfg.grow_vocab and isinstance(tokenizer, CharTokenizer):
        return tokenizer.extend(alphabet)
    if unknown:
        raise UserError(f"{data_path} has {len(unknown)} character(s) the run {cfg.init_from} never saw "
                        f"({', '.join(map(repr, unknown[:10]))}); pass --grow-vocab to add them")
    return tokenizer


def is_chat_data(cfg: C.TrainConfig) -> bool:
    """Whether the run trains on conversations: --data-format chat, or auto and a .jsonl file
    whose first record has a "messages" list (a resumed run: as it was recorded)."""
    if cfg.data_format != "auto":
        return cfg.data_format == "chat"
    from tinygpt.chat import looks_like_chat
    from tinygpt.documents import is_hf

    data = cfg.data or (ckpt.read_run_meta(Path(cfg.resume))["data_path"] if cfg.resume else None)
    return data is not None and not is_hf(data) and looks_like_chat(data)


def chat_data(cfg: C.TrainConfig) -> tuple:
    """(tokenizer with the chat template's tokens, data path, conversations, the resumed run's
    run.json or None) of a run on conversations (`tinygpt.chat`)."""
    from tinygpt.chat import alphabet, contents, read_conversations, with_chat
    from tinygpt.data import find_corpus
    from tinygpt.tokenizer import BPETokenizer, CharTokenizer

    if cfg.resume:
        meta = ckpt.read_run_meta(Path(cfg.resume))
        tokenizer = ckpt.load_run_tokenizer(cfg.resume, ckpt.configs_from_meta(meta)[0])
        data_path = cfg.data or meta["data_path"]
        return tokenizer, data_path, read_conversations(data_path), meta
    data_path = find_corpus(cfg.data)
    conversations = read_conversations(data_path)
    if cfg.init_from:
        tokenizer = grown(base_tokenizer(cfg.init_from), alphabet(conversations), cfg, data_path)
    elif cfg.tokenizer == "char":
        tokenizer = CharTokenizer.train(alphabet(conversations))
    else:
        tokenizer = BPETokenizer.train(contents(conversations), cfg.vocab_size)
    return with_chat(tokenizer), data_path, conversations, None


def chat_corpus(conversations, tokenizer, data_path, block_size: int, cfg: C.TrainConfig, note):
    """The train and val rows of a run on conversations, said in one paragraph first."""
    from tinygpt.chat import build_splits
    from tinygpt.data import Corpus

    train, val, stats = build_splits(conversations, tokenizer, block_size, cfg.loss_on, cfg.val_fraction,
                                     str(data_path))
    note(stats.describe(Path(data_path).name, block_size, cfg.loss_on))
    return Corpus(Path(data_path), train, val, val.chars, train.chars)


def _token_file(dist, data_path, tokenizer, note, layout) -> Path:
    """The token file of `data_path` with `tokenizer`: rank 0 encodes it if it must, then every
    other process finds it (a quick check) or, on a machine that does not share the disk,
    encodes its own copy."""
    from tinygpt.corpus import prepare

    tokens = dist.on_main(prepare, data_path, tokenizer, log=note, layout=layout)
    return tokens if dist.is_main else prepare(data_path, tokenizer, layout=layout)


def load_init_weights(model, cfg: C.TrainConfig, grown: bool = False) -> None:
    """A fine-tune's starting weights, from a GPT-2-family directory (`hf:DIR`) or a run;
    `grown`: the vocabulary gained tokens (see `checkpoint.load_weights`)."""
    if hf_dir := hf_source(cfg.init_from):
        from tinygpt.hf import load_gpt2_weights

        load_gpt2_weights(model, hf_dir)
    else:
        ckpt.load_weights(ckpt.checkpoint_dir(cfg.init_from, "latest") / "model.safetensors", model,
                          grown=grown or cfg.grow_vocab)


def run_record(cfg: C.TrainConfig, data_path, dtype, kernel: str, device, world: int,
               ns_dtype=None) -> dict:
    """What run.json records beyond the settings: what `auto` resolved to, and the sources."""
    from tinygpt.documents import open_source

    extra = {"data_path": open_source(data_path).key(), "dtype": str(dtype).removeprefix("torch."),
             "attention_kernel": kernel, "device": str(device), "world_size": world}
    if cfg.data_format == "chat":  # the template its conversations were rendered with (tinygpt.chat)
        from tinygpt.chat import CHAT_TEMPLATE

        extra["chat_template"] = CHAT_TEMPLATE
    if cfg.optimizer == "muon":
        extra["muon_ns_dtype"] = str(ns_dtype).removeprefix("torch.")
    if cfg.init_from:
        hf_dir = hf_source(cfg.init_from)
        extra["init_from"] = f"hf:{hf_dir.resolve()}" if hf_dir else str(Path(cfg.init_from).resolve())
    return extra


# --- metrics.jsonl -------------------------------------------------------------------------------


def write_json_line(path: Path, record: dict) -> None:
    """Append one line. A write that fails (disk full) is undone before the OSError is raised:
    no half line is left for a reader, nor a file that was not there."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    existed = path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.ftruncate(fd, size)  # shrinking needs no space
        if not existed:
            path.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def append_report(path: Path, step: int, losses: dict, lr: float, tokens_per_sec: float | None,
                  train_seconds: float, chars_per_token: dict, extra: dict | None = None) -> None:
    """One loss report, in nats per token and bits per character (`extra`: a float16 run's loss
    scale and skipped steps; the sample written at the report)."""
    write_json_line(path, {
        "step": step,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "train_bpc": losses["train"] / chars_per_token["train"] / math.log(2),
        "val_bpc": losses["val"] / chars_per_token["val"] / math.log(2),
        "lr": lr,
        "tokens_per_sec": tokens_per_sec,
        "train_seconds": train_seconds,
        **(extra or {}),
    })


def trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, forget lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash mid-write
            continue
        if record.get("step", 0) <= upto_step and "final_val_loss" not in record:
            keep.append(line)
    with resources.disk_guard(lambda e: f"{resources.what_failed(e)} while resuming: {path} could not be rewritten "
                              "(it is unchanged); free some space, then resume again"):
        ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))


def check_writable(run_dir: Path) -> None:
    """Refuse (one line, exit 4) a run directory that can no longer be written, before a run
    resumed in it computes anything it could not save."""
    probe = run_dir / f".write-test-{os.getpid()}"  # one per process: torchrun's ranks all check
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        probe.unlink()
    except OSError as e:
        raise resources.DiskError(f"run directory {run_dir} is not writable ({e.strerror}), so no checkpoint "
                                  "could be saved; make it writable (or copy it elsewhere), then resume") from None


def read_metrics(run_dir: Path, reports_only: bool = True) -> list[dict]:
    """The lines of a run's metrics.jsonl: its loss reports (or every line)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; give a run directory written by tinygpt train")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise UserError(f"{path} line {n} is not JSON; the metrics file is damaged") from None
    return [r for r in rows if "val_loss" in r] if reports_only else rows


# --- listing runs ----------------------------------------------------------------------------


def whole_val(run_dir: Path) -> dict | None:
    """The run's val loss over the whole val split, as its end scored it (best checkpoint):
    {"loss", "bits_per_char", "step"}; None for a run that stopped before, or skipped it."""
    finals = [r for r in read_metrics(run_dir, reports_only=False) if "final_val_loss" in r]
    if not finals:
        return None
    last = finals[-1]
    return {"loss": last["final_val_loss"], "bits_per_char": last["final_val_bpc"],
            "step": last.get("best_step", last["step"])}


def list_runs(root: Path) -> str:
    """A markdown table of the runs under `root` (name, size, steps, whole-split val loss,
    bits/char, date): the figure `train` prints at its end, not the periodic estimate."""
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give the directory that holds your runs (default: runs)")
    rows = []
    for run in sorted(p for p in root.iterdir() if (p / "run.json").is_file()):
        try:
            meta = ckpt.read_run_meta(run)
            model_cfg, _ = ckpt.configs_from_meta(meta)
            reports = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
            final = whole_val(run) if reports else None
        except UserError as e:
            rows.append(f"| {run.name} | damaged: {e} | | | | |")
            continue
        size = "bigram" if model_cfg.model == "bigram" else \
            f"{model_cfg.n_layer}x{model_cfg.n_head}x{model_cfg.n_embd}, {_param_count(model_cfg)}"
        steps = max((r["step"] for r in reports), default=0)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime((run / "run.json").stat().st_mtime))
        rows.append(f"| {run.name} | {size} | {steps} | "
                    + (f"{final['loss']:.4f} | {final['bits_per_char']:.4f}" if final else "— | —") + f" | {when} |")
    if not rows:
        return f"no runs in {root} (a run is a directory with a run.json, written by tinygpt train)"
    table = ["| run | model | steps | val loss (whole split) | bits/char | date |",
             "|---|---|---:|---:|---:|---|", *rows]
    if any("| — | — |" in row for row in rows):
        table.append("\n—: the run has no whole-split figure yet (stopped early, or --no-final-eval); "
                     "`tinygpt eval --ckpt RUN` computes it")
    return "\n".join(table)


def _param_count(m: C.ModelConfig) -> str:
    """Parameters of a GPT from its config alone (no torch): embeddings, blocks, final norm, head."""
    n = resources.param_count(m)
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"
