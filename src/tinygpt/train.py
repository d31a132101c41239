"""The training loop. Its shape is the run: eval and save every `eval_interval` steps and at the
last step, one optimizer step in between; eval time is kept off the training clock.

Runs are resumable exactly: a checkpoint holds the weights, the optimizer, the step, the best
val loss and every random state (torch, Python, the batch sampler), so a run stopped at step k
and resumed gives the same losses and weights, bit for bit on CPU, as one never stopped.
"""

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygpt import STARTED
from tinygpt import checkpoint as ckpt
from tinygpt import config as C
from tinygpt.data import BatchSampler, find_corpus, read_text, split
from tinygpt.distributed import SINGLE, Distributed
from tinygpt.errors import UserError
from tinygpt.evaluate import estimate_loss, evaluate_split
from tinygpt.model import build_model
from tinygpt.optim import AdamW
from tinygpt.progress import Progress
from tinygpt.runtime import autocast, inference_dtype, resolve_attention, resolve_device, resolve_dtype
from tinygpt.tokenizer import CharTokenizer, load_tokenizer, train_tokenizer

# Settings that may differ when a run is resumed; any other flag must match the saved run.
RESUMABLE_OVERRIDES = {"max_iters", "max_time", "eval_interval", "quiet", "sample_chars", "plot", "device",
                       "final_eval", "resume", "data", "out", "overwrite"}


class DivergedError(UserError):
    """Loss or gradient norm stopped being finite."""

    exit_code = 3


class Stopped(Exception):
    """Training was stopped by a signal after saving; carries the exit status (130 or 143)."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code


@dataclass
class Corpus:
    path: Path
    train: torch.Tensor
    val: torch.Tensor
    val_chars: int
    train_chars: int


def encode_corpus(path: Path, text: str, tokenizer, block_size: int) -> Corpus:
    train_text, val_text = split(text)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    shortest = min(len(train_ids), len(val_ids))
    if shortest < block_size + 1:
        raise UserError(
            f"data file {path} is too short: its smaller split has {shortest} tokens, fewer than "
            f"block_size + 1 = {block_size + 1}; use a longer text or a smaller --block-size"
        )
    return Corpus(path, train_ids, val_ids, len(val_text) - 1, len(train_text) - 1)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict = field(default_factory=dict)  # last periodic estimate
    final: dict | None = None  # whole-val-split evaluation
    sample: str = ""


def make_optimizer(model, cfg: C.TrainConfig) -> AdamW:
    """AdamW; weight decay only on matrices that multiply activations (not biases, norms or
    embedding tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = "embedding_table" in name
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: C.TrainConfig) -> float:
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


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
    ckpt.write_run_files(run_dir, model_cfg, cfg, tokenizer, extra)
    return run_dir


def refuse_conflicts(saved: dict, flags: dict, changeable: set, where: str, fix: str) -> None:
    """A one-line error for the first flag that contradicts a saved setting it may not change."""
    for key, value in flags.items():
        if key in saved and key not in changeable and value != saved[key]:
            raise UserError(f"--{key.replace('_', '-')} {value} conflicts with {where} "
                            f"({key}={saved[key]!r}); {fix}")


def check_resume_flags(saved_model: C.ModelConfig, saved_train: C.TrainConfig, flags: dict) -> None:
    saved = {k: v for k, v in {**C.to_dict(saved_model), **C.to_dict(saved_train)}.items() if k in C.TRAIN_KEYS}
    refuse_conflicts(saved, flags, RESUMABLE_OVERRIDES, "the run being resumed",
                     "drop the flag or start a new run with --out")


def resume_flags(flags: dict) -> dict:
    """The flags given with --resume on top of the saved run's settings, once checked to agree."""
    meta = ckpt.read_run_meta(Path(flags["resume"]))
    saved_model, saved_train = ckpt.configs_from_meta(meta)
    check_resume_flags(saved_model, saved_train, flags)
    saved = {**C.to_dict(saved_model), **C.to_dict(saved_train)}
    return {**{k: v for k, v in saved.items() if k in C.TRAIN_KEYS}, **flags}


class SignalStop:
    """SIGINT/SIGTERM ask the loop to finish its step, save and exit; a second SIGINT exits now."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self):
        if _main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            # Checkpoints are written atomically, so leaving mid-save cannot corrupt one.
            os._exit(128 + signum)
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(model_cfg: C.ModelConfig, cfg: C.TrainConfig, flags: dict | None = None, log=print,
          dist: Distributed = SINGLE) -> TrainResult:
    """Train a model as `model_cfg` and `cfg` say; `flags` are the explicitly given settings
    (used to check a resume against the saved run); `dist` is this process's place under torchrun."""
    t_start = time.perf_counter()
    log = dist.main_only(log)
    device = dist.device(resolve_device(cfg.device))
    init_meta = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        meta = ckpt.read_run_meta(run_dir)
        saved_model, saved_train = ckpt.configs_from_meta(meta)
        check_resume_flags(saved_model, saved_train, flags or {})
        if meta.get("world_size", 1) != dist.world:
            raise UserError(f"{run_dir} was trained by {meta.get('world_size', 1)} process(es), this is {dist.world}; "
                            f"resume it with torchrun --nproc_per_node {meta.get('world_size', 1)} (the same batches)")
        overrides = {k: v for k, v in (flags or {}).items() if k in RESUMABLE_OVERRIDES}
        model_cfg = saved_model
        cfg = C.build(C.TrainConfig, {**C.to_dict(saved_train), **overrides})
        latest = ckpt.checkpoint_dir(run_dir, "latest")
        tokenizer = ckpt.load_run_tokenizer(run_dir, model_cfg)
        data_path = Path(cfg.data) if cfg.data else Path(meta["data_path"])
        text = read_text(data_path)
    else:
        data_path = find_corpus(cfg.data)
        text = read_text(data_path, min_chars=2 * (model_cfg.block_size + 1))
        if cfg.init_from:
            init_meta = ckpt.read_run_meta(Path(cfg.init_from))
            tokenizer = load_tokenizer(Path(cfg.init_from) / "tokenizer.json")
            unknown = tokenizer.unknown(text)
            if unknown and cfg.grow_vocab and isinstance(tokenizer, CharTokenizer):
                tokenizer = tokenizer.extend(text)
            elif unknown:
                raise UserError(
                    f"{data_path} has {len(unknown)} character(s) the run {cfg.init_from} never saw "
                    f"({', '.join(map(repr, unknown[:10]))}); pass --grow-vocab to add them"
                )
            base_model, _ = ckpt.configs_from_meta(init_meta)
            model_cfg = finetune_model_config(base_model, flags or {}, cfg.init_from)
            cfg = C.build(C.TrainConfig, {**C.to_dict(cfg), "tokenizer": tokenizer.kind})  # run.json says which
        else:
            split_at = int(0.9 * len(text))
            tokenizer = dist.on_main(train_tokenizer, cfg.tokenizer,
                                     text if cfg.tokenizer == "char" else text[:split_at], cfg.vocab_size)
        model_cfg = C.build(C.ModelConfig, {**C.to_dict(model_cfg), "vocab_size": tokenizer.vocab_size})
    corpus = encode_corpus(data_path, text, tokenizer, model_cfg.block_size)
    dtype = resolve_dtype(cfg.dtype, device)
    kernel = resolve_attention(model_cfg.attention, device)

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    if init_meta is not None:
        _init_from(model, Path(cfg.init_from))
    model.to(device)
    model.set_attention(kernel)
    optimizer = make_optimizer(model, cfg)
    sampler = BatchSampler(corpus.train, model_cfg.block_size, cfg.batch_size, cfg.seed, cfg.grad_accum,
                           rank=dist.rank, world=dist.world)

    start_step, best_val, train_clock = 0, float("inf"), 0.0  # train_clock: optimizer steps only
    reported_at_start = False  # did the checkpoint we resume from come after its step's report?
    if cfg.resume:
        ckpt.load_weights(latest / "model.safetensors", model)
        state = ckpt.load_training_state(latest, optimizer)
        sampler.load_state_dict(ckpt.restore_rng(state["rng"]))
        start_step, best_val = state["step"], state["best_val"]
        train_clock, reported_at_start = state.get("train_seconds", 0.0), state.get("reported", True)
        dist.on_main(_trim_metrics, run_dir / "metrics.jsonl", start_step)
        log(f"resuming {run_dir} at step {start_step}")
    else:
        extra = {"data_path": str(data_path.resolve()), "dtype": str(dtype).removeprefix("torch."),
                 "attention_kernel": kernel, "device": str(device), "world_size": dist.world}
        if cfg.init_from:
            extra["init_from"] = str(Path(cfg.init_from).resolve())
        run_dir = dist.on_main(new_run_dir, cfg, model_cfg, tokenizer, extra)

    runner = dist.wrap(model, cfg.seed)
    runner = torch.compile(runner) if cfg.compile else runner
    splits = {"train": corpus.train, "val": corpus.val}
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world * model_cfg.block_size
    progress = Progress(total=cfg.max_iters, initial=start_step, quiet=cfg.quiet or not dist.is_main, log=log)
    result = TrainResult(run_dir=run_dir, step=start_step)

    def save(step: int, is_best: bool, reported: bool = True) -> None:
        # `reported`: this step's loss report is done (a stop saves before it; a resume then does it)
        state = {"step": step, "best_val": best_val, "rng": ckpt.rng_state(sampler.state_dict()),
                 "train_seconds": train_clock, "reported": reported}
        ckpt.save_checkpoint(run_dir, step, model, optimizer, state, is_best)

    model.train()
    with SignalStop() as stop:
        step = start_step
        while True:
            time_up = cfg.max_time > 0 and time.perf_counter() - t_start >= cfg.max_time
            last_step = dist.any(step >= cfg.max_iters or time_up)
            report_due = step % cfg.eval_interval == 0 or last_step
            if report_due and dist.is_main and not (cfg.resume and step == start_step and reported_at_start):
                losses = estimate_loss(model, splits, model_cfg.block_size, cfg.batch_size,
                                       cfg.eval_iters, device, dtype, seed=cfg.seed + 1)
                progress.report(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if not all(map(math.isfinite, losses.values())):  # never save weights that broke
                    raise _diverged(f"step {step}: train loss {losses['train']:.4g}, val loss {losses['val']:.4g}",
                                    cfg, run_dir)
                result.losses = losses
                is_best = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                _append_metrics(run_dir / "metrics.jsonl", step, losses, lr_at(step, cfg),
                                tokens_per_step, train_clock, corpus)
                save(step, is_best)
            if last_step:
                break

            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            micro_batches = sampler.next_step()
            for i, (x, y) in enumerate(micro_batches):
                with dist.sync_gradients(i == len(micro_batches) - 1):
                    with autocast(device, dtype):
                        _, loss = runner(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            grad_norm = _grad_norm(model, cfg.grad_clip)
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                raise _diverged(f"step {step}: loss {loss_sum / cfg.grad_accum:.4g}, gradient norm {grad_norm:.4g}",
                                cfg, run_dir)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            train_clock += dt
            progress.step(loss_sum / cfg.grad_accum, tokens_per_step / dt)
            if dist.any(stop.signum is not None):
                dist.on_main(save, step, False, False)
                progress.close()
                log(f"stopped at step {step}; checkpoint saved in {run_dir}. "
                    f"Resume with: tinygpt train --resume {run_dir}")
                raise Stopped(128 + (stop.signum or signal.SIGTERM))
    progress.close()
    result.step = step

    if cfg.final_eval and dist.is_main:
        result.final = evaluate_split(model, corpus.val, model_cfg.block_size, device, dtype, corpus.val_chars,
                                      batch_size=max(32, 16384 // model_cfg.block_size))
        log(f"val loss over the whole val split: {result.final['loss']:.4f} nats/token, "
            f"{result.final['bits_per_char']:.4f} bits/char ({time.perf_counter() - STARTED:.1f} s since the "
            "command started)")
        write_json_line(run_dir / "metrics.jsonl", {"step": step, "final_val_loss": result.final["loss"],
                                                   "final_val_bpc": result.final["bits_per_char"],
                                                   "elapsed": time.perf_counter() - t_start})
    if cfg.plot and dist.is_main:
        from tinygpt.plot import plot_runs

        plot_runs([run_dir])  # RUN/loss.png; `tinygpt plot` redraws it or puts runs side by side
    if cfg.sample_chars and dist.is_main:
        from tinygpt.sampling import generate_stream

        prompt = torch.zeros((1, 1), dtype=torch.long, device=device)  # token 0, as the lecture
        model.eval()
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        with autocast(device, inference_dtype(cfg.dtype, device)):
            ids = [int(t) for t in generate_stream(model, prompt, cfg.sample_chars, generator=gen)]
        result.sample = tokenizer.decode(ids)
        log(result.sample)
    return result


def _diverged(what: str, cfg: C.TrainConfig, run_dir: Path) -> DivergedError:
    return DivergedError(
        f"{what} — training diverged; lower --learning-rate (now {cfg.learning_rate:g}), set --grad-clip 1.0 "
        f"or use --dtype float32. The last good checkpoint in {run_dir} is untouched"
    )


def _grad_norm(model, clip: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))


# What a fine-tuning run may change about the model it starts from; the rest is its architecture.
FINETUNE_OVERRIDES = {"dropout", "attn_dropout", "attention"}


def finetune_model_config(base: C.ModelConfig, flags: dict, init_from: str) -> C.ModelConfig:
    """The base run's model settings, with only dropout and the attention kernel changeable."""
    saved = C.to_dict(base)
    refuse_conflicts(saved, flags, FINETUNE_OVERRIDES, f"the run --init-from {init_from}",
                     "fine-tuning keeps the model it starts from, so drop the flag")
    return C.build(C.ModelConfig, {**saved, **{k: v for k, v in flags.items() if k in FINETUNE_OVERRIDES}})


def _init_from(model, run_dir: Path) -> None:
    """Copy a trained run's weights into `model`. With a grown vocabulary the old entries are
    copied (rows of the embedding, head and its bias; rows and columns of the bigram table) and
    the new ones keep their fresh init, as in a new model."""
    from safetensors.torch import load_file

    state = load_file(str(ckpt.checkpoint_dir(run_dir, "latest") / "model.safetensors"))
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            own[name][tuple(slice(0, n) for n in tensor.shape)] = tensor
            state[name] = own[name]
    model.load_state_dict(state, strict=False)  # a tied head shares the embedding, saved once


def write_json_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _append_metrics(path, step, losses, lr, tokens_per_step, train_clock, corpus) -> None:
    ln2 = math.log(2)
    chars_per_token_train = corpus.train_chars / max(1, len(corpus.train) - 1)
    chars_per_token_val = corpus.val_chars / max(1, len(corpus.val) - 1)
    write_json_line(path, {
        "step": step,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "train_bpc": losses["train"] / chars_per_token_train / ln2,
        "val_bpc": losses["val"] / chars_per_token_val / ln2,
        "lr": lr,
        "tokens_per_sec": tokens_per_step * step / train_clock if train_clock else None,
        "train_seconds": train_clock,
    })


def _trim_metrics(path: Path, upto_step: int) -> None:
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
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))
