"""The training loop. Its shape is the run: a loss report and a checkpoint every `eval_interval`
steps and at the last step, one optimizer step in between; eval time is kept off the training
clock. At the end, the whole val split is scored for the best checkpoint and the last model.

Runs are resumable exactly: a checkpoint holds the weights, the optimizer, the step, the best
val loss and every random state (torch, Python, the batch sampler), so a run stopped at step k
and resumed gives the same losses and weights, bit for bit on CPU, as one never stopped.

Ctrl-C / SIGTERM stop within about a second wherever the loop is (in a step, an estimate or the
final eval): a half-done step is dropped and its random state rewound, the last complete state
is saved, and the run resumes from there as if never stopped. Settings come resolved (see
`runs.settings_from_flags`); this file only runs them.
"""

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygpt import STARTED, resources, runs
from tinygpt import checkpoint as ckpt
from tinygpt import config as C
from tinygpt.corpus import load_corpus, prepare, read_tokenizer, text_alphabet
from tinygpt.data import BatchSampler, count_windows, find_corpus, take
from tinygpt.distributed import SINGLE, Distributed
from tinygpt.errors import UserError
from tinygpt.evaluate import estimate_loss, evaluate_split
from tinygpt.model import build_model
from tinygpt.optim import lr_at, make_optimizer
from tinygpt.progress import Progress
from tinygpt.runtime import autocast, resolve_attention, resolve_device, resolve_dtype, resolve_threads
from tinygpt.tokenizer import CharTokenizer, load_tokenizer, tokenizer_from_json


class DivergedError(UserError):
    """Loss or gradient norm stopped being finite."""

    exit_code = 3


class Stopped(Exception):
    """Training was stopped by a signal after saving; carries the exit status (130 or 143)."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code


class Interrupted(Exception):
    """Raised inside the loop by the first Ctrl-C / SIGTERM."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict = field(default_factory=dict)  # last periodic estimate
    final: dict | None = None  # whole-val-split evaluation of the best checkpoint
    final_last: dict | None = None  # ... and of the last model, when that is another one
    best_step: int | None = None
    model: torch.nn.Module | None = None  # the best model, in memory (the CLI samples from it)
    tokenizer: object = None
    device: torch.device | None = None


def train(model_cfg: C.ModelConfig, cfg: C.TrainConfig, log=print, dist: Distributed = SINGLE) -> TrainResult:
    """Train a model as `model_cfg` and `cfg` say (resolved by `runs.settings_from_flags`);
    `dist` is this process's place under torchrun."""
    t_start = time.perf_counter()
    log = dist.main_only(log)
    device = dist.device(resolve_device(cfg.device))
    threads_before = torch.get_num_threads()
    threads = resolve_threads(cfg.threads, device)
    if threads is not None and threads < threads_before and cfg.threads == "auto":
        log(f"other work is using this machine's cores: training on {threads} thread(s) instead of "
            f"{threads_before} (--threads {threads_before} to insist)")
    tokenizer, data_path, tokens, meta = _tokenizer_and_tokens(cfg, dist, log)
    if cfg.init_from:  # fine-tuning keeps the base run's architecture
        model_cfg = runs.finetune_model_config(cfg.init_from, model_cfg)
    if cfg.tokenizer != tokenizer.kind:  # run.json says which tokenizer the run really uses
        cfg = C.build(C.TrainConfig, {**C.to_dict(cfg), "tokenizer": tokenizer.kind})
    model_cfg = C.build(C.ModelConfig, {**C.to_dict(model_cfg), "vocab_size": tokenizer.vocab_size})
    corpus = load_corpus(tokens, model_cfg.block_size)  # memory-mapped: memory does not grow with it
    dtype = resolve_dtype(cfg.dtype, device)
    kernel = resolve_attention(model_cfg.attention, device)

    resources.check_training_fits(model_cfg, cfg.batch_size, cfg.grad_accum, dtype, device, kernel)
    torch.manual_seed(cfg.seed)
    with resources.memory_guard(lambda: _out_of_memory("build", 0, None, None, cfg, model_cfg, device, dtype)):
        model = build_model(model_cfg)
        if cfg.init_from and runs.hf_source(cfg.init_from):
            from tinygpt.hf import load_gpt2_weights

            load_gpt2_weights(model, runs.hf_source(cfg.init_from))
        elif cfg.init_from:
            ckpt.load_weights(ckpt.checkpoint_dir(cfg.init_from, "latest") / "model.safetensors", model,
                              grown=cfg.grow_vocab)
        model.to(device)
        model.set_attention(kernel)
        optimizer = make_optimizer(model, cfg)
    sampler = BatchSampler(corpus.train, model_cfg.block_size, cfg.batch_size, cfg.seed, cfg.grad_accum,
                           rank=dist.rank, world=dist.world)

    start_step, best_val, best_step, train_clock, stale = 0, float("inf"), None, 0.0, 0
    reported_at_start = False  # did the checkpoint we resume from come after its step's report?
    if cfg.resume:
        run_dir = Path(cfg.resume)
        runs.check_world_size(meta, run_dir, dist.world)
        latest = ckpt.checkpoint_dir(run_dir, "latest")
        ckpt.load_weights(latest / "model.safetensors", model)
        state = ckpt.load_training_state(latest, optimizer)
        sampler.load_state_dict(ckpt.restore_rng(state["rng"]))
        start_step, best_val = state["step"], state["best_val"]
        best_step, stale = state.get("best_step"), state.get("stale_reports", 0)
        train_clock, reported_at_start = state.get("train_seconds", 0.0), state.get("reported", True)
        dist.on_main(runs.trim_metrics, run_dir / "metrics.jsonl", start_step)
        log(f"resuming {run_dir} at step {start_step}")
    else:
        extra = {"data_path": str(data_path.resolve()), "dtype": str(dtype).removeprefix("torch."),
                 "attention_kernel": kernel, "device": str(device), "world_size": dist.world}
        if cfg.init_from:
            hf_dir = runs.hf_source(cfg.init_from)
            extra["init_from"] = f"hf:{hf_dir.resolve()}" if hf_dir else str(Path(cfg.init_from).resolve())
        run_dir = dist.on_main(runs.new_run_dir, cfg, model_cfg, tokenizer, extra)

    with resources.memory_guard(lambda: _out_of_memory("probe", start_step, start_step if cfg.resume else None,
                                                       run_dir, cfg, model_cfg, device, dtype)):
        timing = time_probe(model, cfg, corpus, device, dtype, start_step)
    if timing["total"] >= 3600 and dist.is_main:
        log(f"this run will take about {timing['total'] / 3600:.1f} h on this machine "
            f"({timing['step']:.2g} s a step, {timing['estimate']:.0f} s a loss estimate; from a timed probe). "
            "For a result in minutes: --preset cpu-quick (or cpu-10min), or a GPU")

    runner = dist.wrap(model, cfg.seed)
    runner = torch.compile(runner) if cfg.compile else runner
    splits = {"train": corpus.train, "val": corpus.val}
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world * model_cfg.block_size
    progress = Progress(total=cfg.max_iters, initial=start_step, quiet=cfg.quiet or not dist.is_main, log=log,
                        max_time=cfg.max_time, started=t_start)
    result = TrainResult(run_dir=run_dir, step=start_step, tokenizer=tokenizer, device=device)
    saved_step = start_step if cfg.resume else None

    def save(step: int, is_best: bool, reported: bool = True) -> None:
        # `reported`: this step's loss report is done (a stop before it saves; a resume redoes it)
        nonlocal saved_step
        state = {"step": step, "best_val": best_val, "best_step": best_step, "stale_reports": stale,
                 "rng": ckpt.rng_state(sampler.state_dict()), "train_seconds": train_clock, "reported": reported}
        ckpt.save_checkpoint(run_dir, step, model, optimizer, state, is_best)
        saved_step = step

    if dist.world == 1:  # a signal handler needs Python to run: let it in during backward passes too
        for p in model.parameters():
            p.register_hook(_let_signals_in)
    model.train()
    # One process stops at once; under torchrun every rank must finish the step together. Running
    # out of memory or disk ends the run with one line; the last checkpoint saved stays the run's.
    with (SignalStop(interruptible=dist.world == 1) as stop,
          resources.memory_guard(lambda: _out_of_memory(phase, step, saved_step, run_dir, cfg, model_cfg, device,
                                                        dtype)),
          resources.disk_guard(lambda e: _out_of_disk(e, step, saved_step, run_dir))):
        step, phase, rewind = start_step, "report", None
        try:
            while True:
                phase = "report"  # the state is step `step`'s; its report (if due) is not done
                time_up = cfg.max_time > 0 and time.perf_counter() - t_start >= cfg.max_time
                last_step = dist.any(step >= cfg.max_iters or time_up)
                report_due = step % cfg.eval_interval == 0 or last_step
                if report_due and dist.is_main and not (cfg.resume and step == start_step and reported_at_start):
                    with progress.phase(f"step {step} loss estimate", 2 * cfg.eval_iters, timing["estimate"]) as ph:
                        losses = estimate_loss(model, splits, model_cfg.block_size, cfg.batch_size,
                                               cfg.eval_iters, device, dtype, seed=cfg.seed + 1, tick=ph.tick)
                    progress.report(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    if not all(map(math.isfinite, losses.values())):  # never save weights that broke
                        raise _diverged(f"step {step}: train loss {losses['train']:.4g}, "
                                        f"val loss {losses['val']:.4g}", cfg, run_dir)
                    with stop.deferred():  # a report, its metrics line and its checkpoint go together
                        result.losses = losses
                        is_best = losses["val"] < best_val
                        if is_best:
                            best_val, best_step, stale = losses["val"], step, 0
                        else:
                            stale += 1
                        tok_s = tokens_per_step * (step - start_step) / train_clock if train_clock else None
                        runs.append_report(run_dir / "metrics.jsonl", step, losses, lr_at(step, cfg), tok_s,
                                           train_clock, corpus.chars_per_token())
                        save(step, is_best)
                if cfg.early_stop and not last_step and dist.any(stale >= cfg.early_stop):
                    log(f"early stop at step {step}: no new best val loss in {cfg.early_stop} reports "
                        f"(best {best_val:.4f} at step {best_step})")
                    break
                if last_step:
                    break

                phase, rewind = "train", _random_state(sampler, device)
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
                    raise _diverged(f"step {step}: loss {loss_sum / cfg.grad_accum:.4g}, "
                                    f"gradient norm {grad_norm:.4g}", cfg, run_dir)
                with stop.deferred():  # the update and the step count change together
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    phase = "report"
                    dt = time.perf_counter() - t0
                    train_clock += dt
                progress.step(loss_sum / cfg.grad_accum, tokens_per_step / dt)
                if dist.any(stop.signum is not None):  # several processes: all stop after the same step
                    raise Interrupted
            phase = "final"
            progress.close()
            result.step = step
            if cfg.final_eval and dist.is_main:
                _final_eval(result, model, corpus, model_cfg, device, dtype, best_step, step, timing, progress,
                            t_start, log)
        except Interrupted:
            progress.close()
            if phase == "final":
                log(f"stopped during the final evaluation; the run is complete and saved in {run_dir} "
                    f"(`tinygpt eval --ckpt {run_dir}` scores it)")
            else:
                if phase == "train":  # drop the half-done step: rewind its randomness, forget its gradients
                    _random_state(sampler, device, rewind)
                    optimizer.zero_grad(set_to_none=True)
                if dist.any(saved_step != step):
                    dist.on_main(save, step, False, reported=phase == "train")
                log(f"stopped at step {step}; checkpoint saved in {run_dir}. "
                    f"Resume with: tinygpt train --resume {run_dir}")
            raise Stopped(128 + (stop.signum or signal.SIGTERM)) from None
    result.model = model
    return result


def _tokenizer_and_tokens(cfg: C.TrainConfig, dist: Distributed, log):
    """The tokenizer (the run's, the base run's, or a new one trained on the data), the data
    path and its encoded corpus file (see `tinygpt.corpus`). Rank 0 encodes the text if it has
    to; every process then maps the same file."""
    if cfg.resume:
        meta = ckpt.read_run_meta(Path(cfg.resume))
        saved_model, _ = ckpt.configs_from_meta(meta)
        tokenizer = ckpt.load_run_tokenizer(cfg.resume, saved_model)
        data_path = Path(cfg.data) if cfg.data else Path(meta["data_path"])
        return tokenizer, data_path, _prepared(dist, data_path, tokenizer, log), meta
    data_path = find_corpus(cfg.data)
    if cfg.init_from:
        if runs.hf_source(cfg.init_from):
            from tinygpt.hf import read_gpt2_tokenizer

            tokenizer = read_gpt2_tokenizer(runs.hf_source(cfg.init_from))
        else:
            ckpt.read_run_meta(Path(cfg.init_from))
            tokenizer = load_tokenizer(Path(cfg.init_from) / "tokenizer.json")
        alphabet = dist.on_main(text_alphabet, data_path)  # in order of first appearance
        unknown = tokenizer.unknown(alphabet)
        if unknown and cfg.grow_vocab and isinstance(tokenizer, CharTokenizer):
            tokenizer = tokenizer.extend(alphabet)
        elif unknown:
            raise UserError(
                f"{data_path} has {len(unknown)} character(s) the run {cfg.init_from} never saw "
                f"({', '.join(map(repr, unknown[:10]))}); pass --grow-vocab to add them"
            )
        return tokenizer, data_path, _prepared(dist, data_path, tokenizer, log), None
    tokens = dist.on_main(prepare, data_path, kind=cfg.tokenizer, vocab_size=cfg.vocab_size, log=log)
    # Rank 0's tokenizer, sent to all: on another machine its token file may not exist.
    tokenizer = tokenizer_from_json(dist.on_main(lambda: read_tokenizer(tokens).to_json()))
    return tokenizer, data_path, tokens if dist.is_main else prepare(data_path, tokenizer), None


def _prepared(dist: Distributed, data_path: Path, tokenizer, log) -> Path:
    """The token file of `data_path` with `tokenizer`: rank 0 encodes it if it must, then every
    other process finds it (a quick check) or, on a machine that does not share the disk,
    encodes its own copy."""
    tokens = dist.on_main(prepare, data_path, tokenizer, log=log)
    return tokens if dist.is_main else prepare(data_path, tokenizer)


def _final_eval(result, model, corpus, model_cfg, device, dtype, best_step, step, timing, progress, t_start,
                log) -> None:
    """Score the whole val split for the last model and, where it is another one, the best
    checkpoint; print both; leave the best weights in `model`."""
    batch = _final_eval_batch(model_cfg.block_size)
    n_batches = count_windows(len(corpus.val), model_cfg.block_size, batch)
    hint = timing["final"]

    def score(which: str) -> dict:
        with progress.phase(f"whole-val-split loss ({which})", n_batches, hint) as ph:
            return evaluate_split(model, corpus.val, model_cfg.block_size, device, dtype, corpus.val_chars,
                                  batch_size=batch, tick=ph.tick)

    last = score("last model")
    best = last
    if best_step is not None and best_step != step:
        ckpt.load_weights(ckpt.checkpoint_dir(result.run_dir, "best") / "model.safetensors", model)
        best = score(f"best checkpoint, step {best_step}")
        result.final_last = last
    result.final, result.best_step = best, best_step if best_step is not None else step
    where = "" if best is last else f" (best checkpoint, step {best_step}; last step {step}: {last['loss']:.4f})"
    log(f"val loss over the whole val split: {best['loss']:.4f} nats/token, {best['bits_per_char']:.4f} "
        f"bits/char{where} ({time.perf_counter() - STARTED:.1f} s since the command started)")
    runs.write_json_line(result.run_dir / "metrics.jsonl", {
        "step": step, "final_val_loss": best["loss"], "final_val_bpc": best["bits_per_char"],
        "best_step": result.best_step, "last_val_loss": last["loss"], "elapsed": time.perf_counter() - t_start,
        "since_start": time.perf_counter() - STARTED})


def _final_eval_batch(block_size: int) -> int:
    """Windows per forward pass in the final eval: about 16k tokens, at least 32 windows."""
    return max(32, 16384 // block_size)


def time_probe(model, cfg: C.TrainConfig, corpus, device, dtype, start_step: int) -> dict:
    """How long this run will take here, from one small timed forward + backward scaled up:
    seconds per step, per periodic loss estimate, for the final eval and in all. Random state
    and gradients are left as they were, so the run itself is unchanged."""
    block = model.config.block_size
    n = cfg.batch_size if device.type == "cuda" else min(4, cfg.batch_size)  # CPU: a small, fast probe
    x = take(corpus.train, torch.arange(min(len(corpus.train), n * block + 1)))
    x = x[: (len(x) - 1) // block * block + 1]
    rows = max(1, (len(x) - 1) // block)
    inputs, targets = x[:-1].view(rows, -1)[:, :block].to(device), x[1:].view(rows, -1)[:, :block].to(device)
    rng = torch.get_rng_state()
    was_training = model.training
    model.train()
    seconds = []
    for k in (1, rows):  # the first, on one row, pays the one-off costs
        t0 = time.perf_counter()
        with autocast(device, dtype):
            _, loss = model(inputs[:k], targets[:k])
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    torch.set_rng_state(rng)
    per_row = seconds[-1] / rows
    forward_row = per_row / 3  # a forward is about a third of forward + backward
    step = per_row * cfg.batch_size * cfg.grad_accum
    estimate = forward_row * cfg.batch_size * cfg.eval_iters * 2
    final = forward_row * len(corpus.val) / block if cfg.final_eval else 0.0
    steps = max(0, cfg.max_iters - start_step)
    reports = steps // cfg.eval_interval + 1
    total = steps * step + reports * estimate + final
    if cfg.max_time > 0:
        total = min(total, cfg.max_time + estimate + final)
    return {"step": step, "estimate": estimate, "final": final, "total": total}


class SignalStop:
    """SIGINT/SIGTERM stop the run: at once where `interruptible` (raising `Interrupted` in the
    loop, outside `deferred` blocks), else after the step; a second signal exits now."""

    def __init__(self, interruptible: bool = True):
        self.signum: int | None = None
        self.interruptible = interruptible
        self.blocked = 0  # inside `deferred` blocks
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            # Checkpoints are written atomically, so leaving mid-save cannot corrupt one.
            os._exit(128 + signum)
        self.signum = signum
        if self.interruptible and not self.blocked:
            raise Interrupted

    @contextlib.contextmanager
    def deferred(self):
        """A block that a signal does not cut short; the stop happens right after it."""
        self.blocked += 1
        try:
            yield
        finally:
            self.blocked -= 1
        if self.interruptible and not self.blocked and self.signum is not None:
            raise Interrupted

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def _let_signals_in(grad):
    """A no-op gradient hook: the backward pass calls into Python once per parameter, which is
    where a pending Ctrl-C gets handled (a backward can take many seconds on a slow CPU)."""


def _random_state(sampler, device, restore: tuple | None = None) -> tuple:
    """The random state a training step consumes (dropout, batches), or put `restore` back."""
    if restore is not None:
        torch.set_rng_state(restore[0])
        if restore[1] is not None:
            torch.cuda.set_rng_state(restore[1], device)
        sampler.load_state_dict(restore[2])
        return restore
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, sampler.state_dict()


def _diverged(what: str, cfg: C.TrainConfig, run_dir: Path) -> DivergedError:
    return DivergedError(
        f"{what} — training diverged; lower --learning-rate (now {cfg.learning_rate:g}), set --grad-clip 1.0 "
        f"or use --dtype float32. The last good checkpoint in {run_dir} is untouched"
    )


def _out_of_memory(phase: str, step: int, saved_step: int | None, run_dir: Path | None, cfg: C.TrainConfig,
                   model_cfg: C.ModelConfig, device, dtype) -> str:
    """The one line for memory running out: where, with which batch, what is kept, the fix."""
    block = model_cfg.block_size
    batch = _final_eval_batch(block) if phase == "final" else cfg.batch_size
    where = {"build": "building the model", "probe": f"the timing probe at step {step}",
             "report": f"the step {step} loss estimate", "train": f"training step {step}",
             "final": "the final evaluation"}[phase]
    what = (f"out of memory on {device.type} in {where} (batch {batch} x block {block}, "
            f"{str(dtype).removeprefix('torch.')}")
    if phase == "build":
        return (f"{what}, {resources.param_count(model_cfg):,} parameters); train a smaller model "
                "(--n-embd, --n-layer) or use a device with more memory")
    if phase == "final":
        return (f"{what}); the run is complete and saved in {run_dir}: score it with "
                f"`tinygpt eval --ckpt {run_dir} --batch-size {max(1, batch // 4)}`, and pass --no-final-eval "
                "next time")
    kept = ("no checkpoint was saved yet" if saved_step is None
            else f"the last checkpoint (step {saved_step}) in {run_dir} is intact")
    smaller = resources.halved_batch(batch, cfg.grad_accum)
    if smaller is None:  # a batch of one: only a smaller model helps
        return f"{what}); {kept}; start a new run with a smaller --block-size, --n-embd or --n-layer"
    if saved_step is None:
        return f"{what}); {kept}: run the command again with --overwrite {smaller} (the same effective batch)"
    return f"{what}); {kept}: resume with `tinygpt train --resume {run_dir} {smaller}` (the same effective batch)"


def _out_of_disk(e: OSError, step: int, saved_step: int | None, run_dir: Path) -> str:
    """The one line for a refused write: which file, what is kept, and how to go on."""
    if saved_step is None:
        return (f"{resources.what_failed(e)} at step {step}; training stopped before its first checkpoint: "
                "free some space (or choose another --out), then run the command again with --overwrite")
    return (f"{resources.what_failed(e)} at step {step}; training stopped, the last checkpoint (step {saved_step}) "
            f"is intact and nothing half-written is left in {run_dir}: free some space, then "
            f"`tinygpt train --resume {run_dir}`")


def _grad_norm(model, clip: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
