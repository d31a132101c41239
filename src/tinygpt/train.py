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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygpt import STARTED, resources, runs
from tinygpt import checkpoint as ckpt
from tinygpt import config as C
from tinygpt.chat import ChatSampler
from tinygpt.corpus import describe, load_corpus, read_header
from tinygpt.data import BatchSampler
from tinygpt.distributed import SINGLE, Distributed
from tinygpt.errors import UserError
from tinygpt.evaluate import estimate_loss, final_eval, final_eval_batch
from tinygpt.model import build_model
from tinygpt.optim import (
    WeightAverage,
    clip_grad_norm,
    fit_horizon,
    lr_at,
    make_optimizer,
    momentum_at,
    set_lr,
    set_momentum,
)
from tinygpt.progress import Progress, time_probe
from tinygpt.runtime import (
    autocast,
    grad_scaler,
    keep_freed_memory,
    resolve_attention,
    resolve_device,
    resolve_dtype,
    resolve_threads,
)
from tinygpt.sampling import sample_text
from tinygpt.stopping import Interrupted, SignalStop, Stopped, let_signals_in, random_state

__all__ = ["train", "TrainResult", "Stopped", "DivergedError"]


# float16: below this loss scale, gradients overflow even scaled down: the run has diverged.
MIN_LOSS_SCALE = 1.0


class DivergedError(UserError):
    """Loss or gradient norm stopped being finite."""

    exit_code = 3


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


@dataclass
class LoopState:
    """What the loop carries from step to step; every checkpoint's state.json holds it."""

    step: int = 0
    best_val: float = math.inf
    best_step: int | None = None
    stale_reports: int = 0  # reports since the last new best (--early-stop)
    train_seconds: float = 0.0  # the training clock: optimizer steps only, no evaluation
    reported: bool = True  # this step's loss report was done before the checkpoint
    skipped_steps: int = 0  # float16: steps whose gradients overflowed, skipped by the loss scaler
    horizon: int | None = None  # --max-time: the steps the schedule is fitted to, when max_iters will not fit


def note_on_stderr(line: str) -> None:
    """Notices and progress go to stderr; stdout is for what the command produces."""
    print(line, file=sys.stderr, flush=True)


def train(model_cfg: C.ModelConfig, cfg: C.TrainConfig, log=print, note=note_on_stderr,
          dist: Distributed = SINGLE) -> TrainResult:
    """Train a model as `model_cfg` and `cfg` say (resolved by `runs.settings_from_flags`).
    `log` gets the loss reports and the final figure, `note` notices and progress lines; `dist`
    is this process's place under torchrun."""
    t_start = time.perf_counter()
    log, note = dist.main_only(log), dist.main_only(note)
    s = _setup(model_cfg, cfg, dist, note)
    model_cfg, model, optimizer, sampler, state, run_dir = s.model_cfg, s.model, s.optimizer, s.sampler, s.state, \
        s.run_dir
    device, dtype, start_step, reported_at_start, scaler = s.device, s.dtype, state.step, state.reported, s.scaler
    average = s.average  # --ema-decay: the average of the weights is the run's model
    as_the_model = average.in_model if average else contextlib.nullcontext
    runner = dist.wrap(model, cfg.seed)
    runner = torch.compile(runner) if cfg.compile else runner
    splits = {"train": s.corpus.train, "val": s.corpus.val}
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world * model_cfg.block_size
    progress = Progress(total=cfg.max_iters, initial=start_step, quiet=cfg.quiet or not dist.is_main, log=log,
                        note=note, max_time=cfg.max_time, started=t_start)
    result = TrainResult(run_dir=run_dir, step=start_step, tokenizer=s.tokenizer, device=device)
    memorising = Memorising()
    saved_step = start_step if cfg.resume else None
    session_seconds = 0.0  # this command's training clock after its first WARM_UP steps (their one-off costs)

    def save(is_best: bool, reported: bool = True) -> None:
        nonlocal saved_step
        state.reported = reported
        with as_the_model():
            ckpt.save_checkpoint(run_dir, state.step, model, optimizer, _state_json(state, sampler, scaler), is_best,
                                 average.training_weights() if average else None)
        saved_step = state.step

    def report() -> None:  # step `state.step`'s loss report, its metrics line and its checkpoint
        with as_the_model():
            _report()

    def _report() -> None:
        step = state.step
        with progress.phase(f"step {step} loss estimate", 2 * cfg.eval_iters, s.timing["estimate"]) as ph:
            losses = estimate_loss(model, splits, model_cfg.block_size, cfg.batch_size, cfg.eval_iters, device,
                                   dtype, seed=cfg.seed + 1, tick=ph.tick)
        progress.report(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if memorising.seen(losses):
            note(memorising.message(state.best_val, state.best_step))
        if not all(map(math.isfinite, losses.values())):  # never save weights that broke
            raise _diverged(f"step {step}: train loss {losses['train']:.4g}, val loss {losses['val']:.4g}", cfg,
                            run_dir)
        # What the model writes now, kept with the report: off the training clock, own generator
        sample = sample_text(model, s.tokenizer, cfg.report_sample_chars, cfg.seed, device, dtype) \
            if cfg.report_sample_chars else None
        with stop.deferred():  # a report, its metrics line and its checkpoint go together
            result.losses, is_best = losses, losses["val"] < state.best_val
            if is_best:
                state.best_val, state.best_step, state.stale_reports = losses["val"], step, 0
            else:
                state.stale_reports += 1
            tok_s = tokens_per_step * (step - start_step) / state.train_seconds if state.train_seconds else None
            extra = {"loss_scale": scaler.get_scale(), "skipped_steps": state.skipped_steps} if scaler.is_enabled() \
                else {}
            if sample:
                extra["sample"] = sample
            runs.append_report(run_dir / "metrics.jsonl", step, losses, lr_at(step, cfg, state.horizon), tok_s,
                               state.train_seconds,
                               s.corpus.chars_per_token(), extra)
            save(is_best)

    if dist.world == 1:  # a signal handler needs Python to run: let it in during backward passes too
        let_signals_in(model)
    model.train()
    # One process stops at once; under torchrun every rank must finish the step together. Running
    # out of memory or disk ends the run with one line; the last checkpoint saved stays the run's.
    phase = "report"  # "report": the state is step `state.step`'s, its report (if due) not done yet
    with (SignalStop(interruptible=dist.world == 1) as stop,
          resources.memory_guard(lambda: _out_of_memory(phase, state.step, saved_step, run_dir, cfg, model_cfg,
                                                        device, dtype)),
          resources.disk_guard(lambda e: resources.out_of_disk_message(e, state.step, saved_step, run_dir))):
        try:
            while True:
                phase = "report"
                time_up = cfg.max_time > 0 and time.perf_counter() - t_start >= cfg.max_time
                last_step = dist.any(state.step >= cfg.max_iters or time_up)
                redone = cfg.resume and state.step == start_step and reported_at_start  # reported before the stop
                if (state.step % cfg.eval_interval == 0 or last_step) and dist.is_main and not redone:
                    report()
                if cfg.early_stop and not last_step and dist.any(state.stale_reports >= cfg.early_stop):
                    note(f"early stop at step {state.step}: no new best val loss in {cfg.early_stop} reports "
                         f"(best {state.best_val:.4f} at step {state.best_step})")
                    break
                if last_step:
                    break
                if cfg.max_time > 0 and dist.world == 1 and (state.step - start_step == FIT_AFTER or (
                        state.step % cfg.eval_interval == 0 and state.step - start_step > FIT_AFTER)):
                    _fit_schedule(state, cfg, t_start, session_seconds, start_step, note)

                phase, rewind = "train", random_state(sampler, device)
                if cfg.optimizer == "muon" and cfg.muon_momentum_warmup:  # a function of the step: resumes exactly
                    set_momentum(optimizer, momentum_at(state.step, cfg))
                t0 = time.perf_counter()
                loss = _forward_backward(runner, optimizer, sampler, lr_at(state.step, cfg, state.horizon), cfg,
                                         device, dtype, dist, scaler)
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op outside float16)
                grad_norm = clip_grad_norm(model, cfg.grad_clip)
                # float16: an overflowed gradient is the scaler's to skip; a non-finite loss is divergence
                if not math.isfinite(loss) or not (scaler.is_enabled() or math.isfinite(grad_norm)):
                    raise _diverged(f"step {state.step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}", cfg, run_dir)
                with stop.deferred():  # the update and the step count change together
                    scale = scaler.get_scale() if scaler.is_enabled() else None
                    scaler.step(optimizer)  # skipped where float16 gradients overflowed
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    state.skipped_steps += scale is not None and scaler.get_scale() < scale  # it backed off
                    if average:
                        average.update(state.step + 1)
                    state.step, phase, dt = state.step + 1, "report", time.perf_counter() - t0
                    state.train_seconds += dt
                    session_seconds += dt if state.step - start_step > WARM_UP else 0.0
                if scale is not None and scaler.get_scale() < MIN_LOSS_SCALE:
                    raise _diverged(f"step {state.step}: the float16 loss scale fell to {scaler.get_scale():.3g} "
                                    f"({state.skipped_steps} steps skipped)", cfg, run_dir)
                progress.step(loss, tokens_per_step / dt)
                if dist.any(stop.signum is not None):  # several processes: all stop after the same step
                    raise Interrupted
            phase = "final"
            progress.close()
            result.step = state.step
            if average:  # from here on the model is the average
                average.swap()
            if cfg.final_eval and dist.is_main:
                _final_report(result, model, s.corpus, model_cfg, device, dtype, state, progress, s.timing, t_start,
                              log)
        except Interrupted:
            progress.close()
            if phase == "final":
                note(f"stopped during the final evaluation; the run is complete and saved in {run_dir} "
                     f"(`tinygpt eval --ckpt {run_dir}` scores it)")
                raise Stopped(stop.exit_code) from None
            if phase == "train":  # drop the half-done step: rewind its randomness, forget its gradients
                random_state(sampler, device, rewind)
                optimizer.zero_grad(set_to_none=True)
            if dist.any(saved_step != state.step):
                dist.on_main(save, False, reported=phase == "train")
            note(f"stopped at step {state.step}; checkpoint saved in {run_dir}. "
                 f"Resume with: tinygpt train --resume {run_dir}")
            raise Stopped(stop.exit_code) from None
    result.model = model
    return result


@dataclass
class _Setup:
    """Everything a run is built from, before its first step."""

    model_cfg: C.ModelConfig
    tokenizer: object
    corpus: object
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    optimizer: object
    sampler: BatchSampler
    run_dir: Path
    state: LoopState
    timing: dict
    scaler: torch.amp.GradScaler
    average: WeightAverage | None


def _setup(model_cfg: C.ModelConfig, cfg: C.TrainConfig, dist: Distributed, note) -> _Setup:
    """The run's data, device, model, optimizer and batches; its directory (new, or the resumed
    one with its loop state restored); and a timed probe of how long it will take."""
    device = dist.device(resolve_device(cfg.device))
    chat = runs.is_chat_data(cfg)  # conversations (tinygpt.chat), or text
    if chat:
        tokenizer, data_path, conversations, meta = runs.chat_data(cfg)
    else:
        tokenizer, data_path, tokens, meta = runs.tokenizer_and_tokens(cfg, dist, note)
    if cfg.init_from:  # fine-tuning keeps the base run's architecture
        model_cfg = runs.finetune_model_config(cfg.init_from, model_cfg)
    data_format = "chat" if chat else "text"
    if (cfg.tokenizer, cfg.data_format) != (tokenizer.kind, data_format):  # run.json says what the run really uses
        cfg = C.build(C.TrainConfig, {**C.to_dict(cfg), "tokenizer": tokenizer.kind, "data_format": data_format})
    base_vocab = model_cfg.vocab_size
    model_cfg = C.build(C.ModelConfig, {**C.to_dict(model_cfg), "vocab_size": tokenizer.vocab_size})
    if chat:  # in memory, a conversation a row
        corpus = runs.chat_corpus(conversations, tokenizer, data_path, model_cfg.block_size, cfg, note)
    else:
        corpus = load_corpus(tokens, model_cfg.block_size)  # memory-mapped: memory does not grow with it
        header = read_header(tokens)[0]
        if header["documents"] > 1 or header["empty_documents"]:
            note(describe(header))
    dtype = resolve_dtype(cfg.dtype, device)
    ns_dtype = muon_ns_dtype(dtype)  # --optimizer muon's Newton-Schulz iteration
    kernel = resolve_attention(model_cfg.attention, device)
    resources.check_training_fits(model_cfg, cfg.batch_size, cfg.grad_accum, dtype, device, kernel)
    _use_threads(cfg, device, note)  # said here, once the input is known to be good
    if device.type == "cpu":
        keep_freed_memory()  # each step reuses the memory the last one freed: no page faults for it

    torch.manual_seed(cfg.seed)
    with resources.memory_guard(lambda: _out_of_memory("build", 0, None, None, cfg, model_cfg, device, dtype)):
        model = build_model(model_cfg)
        if cfg.init_from:
            runs.load_init_weights(model, cfg, grown=tokenizer.vocab_size > base_vocab)
        model.to(device)
        model.set_attention(kernel)
        optimizer = make_optimizer(model, cfg, ns_dtype)
        average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    scaler = grad_scaler(dtype, device)
    if chat:
        sampler = ChatSampler(corpus.train, cfg.batch_size, cfg.seed, cfg.grad_accum, rank=dist.rank, world=dist.world)
    else:
        sampler = BatchSampler(corpus.train, model_cfg.block_size, cfg.batch_size, cfg.seed, cfg.grad_accum,
                               rank=dist.rank, world=dist.world)
    state = LoopState()
    if cfg.resume:
        run_dir = Path(cfg.resume)
        runs.check_world_size(meta, run_dir, dist.world)
        latest = ckpt.checkpoint_dir(run_dir, "latest")
        ckpt.load_weights(latest / "model.safetensors", model)
        if average:  # that was the average; the model trains on from the optimizer's weights, kept beside it
            average = WeightAverage(model, cfg.ema_decay)
            ckpt.load_training_weights(latest, model)
        saved = ckpt.load_training_state(latest, optimizer)
        sampler.load_state_dict(ckpt.restore_rng(saved["rng"]))
        state = LoopState(saved["step"], saved["best_val"], saved.get("best_step"), saved.get("stale_reports", 0),
                          saved.get("train_seconds", 0.0), saved.get("reported", True), saved.get("skipped_steps", 0),
                          saved.get("horizon"))
        if scaler.is_enabled() and "scaler" in saved:  # the scale the run had reached: resumes exactly
            scaler.load_state_dict(saved["scaler"])
        dist.on_main(runs.trim_metrics, run_dir / "metrics.jsonl", state.step)
        note(f"resuming {run_dir} at step {state.step}")
    else:
        run_dir = dist.on_main(runs.new_run_dir, cfg, model_cfg, tokenizer,
                               runs.run_record(cfg, data_path, dtype, kernel, device, dist.world, ns_dtype))

    with resources.memory_guard(lambda: _out_of_memory("probe", state.step, state.step if cfg.resume else None,
                                                       run_dir, cfg, model_cfg, device, dtype)):
        timing = time_probe(model, cfg, corpus, device, dtype, state.step)
    if timing["total"] >= 3600:
        note(f"this run will take about {timing['total'] / 3600:.1f} h on this machine "
             f"({timing['step']:.2g} s a step, {timing['estimate']:.0f} s a loss estimate; from a timed probe). "
             "For a result in minutes: --preset cpu-quick (or cpu-10min), or a GPU")
    return _Setup(model_cfg, tokenizer, corpus, device, dtype, model, optimizer, sampler, run_dir, state, timing,
                  scaler, average)


class Memorising:
    """Tells, once a run, when val loss has risen for REPORTS reports in a row while train loss
    fell: the model is learning the train text by heart, not the language."""

    REPORTS = 3

    def __init__(self):
        self.history: list[dict] = []
        self.said = False

    def seen(self, losses: dict) -> bool:
        """Record a report; True the first time the pattern shows."""
        self.history = (self.history + [dict(losses)])[-(self.REPORTS + 1):]
        pairs = list(zip(self.history, self.history[1:]))
        if self.said or len(pairs) < self.REPORTS:
            return False
        self.said = all(b["val"] > a["val"] and b["train"] < a["train"] for a, b in pairs)
        return self.said

    def message(self, best_val: float, best_step: int | None) -> str:
        return (f"val loss has risen for {self.REPORTS} reports while train loss fell: the model is memorising "
                f"its train text (best val {best_val:.4f} at step {best_step}, kept as the best checkpoint). Next "
                "time: fewer steps (--max-iters, or --early-stop 2), more --dropout, a smaller model, or more text; "
                "--preset auto sizes all of these for your text")


def muon_ns_dtype(dtype: torch.dtype) -> torch.dtype:
    """Muon's Newton-Schulz iteration runs in bfloat16 where the run computes in it (the hardware
    has it natively: `auto` measured it faster), else in float32: emulated bfloat16 made the
    iteration ~10x slower than float32 on a CPU without it; float16 can overflow in it."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


# --max-time: the schedule is first fitted after FIT_AFTER steps, then at each report, at the pace of
# this command's steps after its first WARM_UP (which pay one-off costs).
FIT_AFTER, WARM_UP = 20, 3


def _fit_schedule(state: LoopState, cfg: C.TrainConfig, t_start: float, session_seconds: float, start_step: int,
                  note) -> None:
    """Fit the learning-rate schedule to the steps --max-time leaves room for, at this command's pace."""
    remaining = cfg.max_time - (time.perf_counter() - t_start)
    horizon = fit_horizon(cfg, state.step, remaining, session_seconds / (state.step - start_step - WARM_UP))
    if horizon is not None and state.horizon is None:
        note(f"--max-time {cfg.max_time:g} leaves time for about {horizon} of the {cfg.max_iters} steps here: the "
             f"learning-rate schedule is fitted to them (re-estimated at every report)")
    state.horizon = horizon


def _use_threads(cfg: C.TrainConfig, device, note) -> None:
    """Set the CPU threads (--threads), saying so when other work leaves fewer cores idle."""
    before = torch.get_num_threads()
    threads = resolve_threads(cfg.threads, device)
    if threads is not None and threads < before and cfg.threads == "auto":
        note(f"other work is using this machine's cores: training on {threads} thread(s) instead of "
             f"{before} (--threads {before} to insist)")


def _forward_backward(runner, optimizer, sampler, lr: float, cfg: C.TrainConfig, device, dtype, dist,
                      scaler) -> float:
    """One step's gradients, accumulated over its micro-batches at learning rate `lr` (scaled by
    the float16 loss scaler, a no-op in other dtypes); the mean loss."""
    set_lr(optimizer, lr)
    loss_sum = 0.0
    micro_batches = sampler.next_step()
    for i, (x, y) in enumerate(micro_batches):
        with dist.sync_gradients(i == len(micro_batches) - 1):
            with autocast(device, dtype):
                _, loss = runner(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            scaler.scale(loss / cfg.grad_accum).backward()
        loss_sum += loss.item()
    return loss_sum / cfg.grad_accum


def _state_json(state: LoopState, sampler, scaler) -> dict:
    """The loop state as a checkpoint's state.json holds it, random states (and a float16 run's
    loss scale) included."""
    out = {"step": state.step, "best_val": state.best_val, "best_step": state.best_step,
           "stale_reports": state.stale_reports, "rng": ckpt.rng_state(sampler.state_dict()),
           "train_seconds": state.train_seconds, "reported": state.reported, "horizon": state.horizon}
    if scaler.is_enabled():
        out |= {"scaler": scaler.state_dict(), "skipped_steps": state.skipped_steps}
    return out


def _final_report(result, model, corpus, model_cfg, device, dtype, state: LoopState, progress, timing, t_start,
                  log) -> None:
    """The whole val split scored (best checkpoint and last model), printed and logged."""
    best, last = final_eval(model, corpus, model_cfg.block_size, device, dtype, result.run_dir, state.best_step,
                            state.step, progress, timing["final"])
    result.final, result.best_step = best, state.best_step if state.best_step is not None else state.step
    result.final_last = last if best is not last else None
    where = "" if best is last else f" (best checkpoint, step {state.best_step}; last step {state.step}: " \
        f"{last['loss']:.4f})"
    log(f"val loss over the whole val split: {best['loss']:.4f} nats/token, {best['bits_per_char']:.4f} "
        f"bits/char{where} ({time.perf_counter() - STARTED:.1f} s since the command started)")
    runs.write_json_line(result.run_dir / "metrics.jsonl", {
        "step": state.step, "final_val_loss": best["loss"], "final_val_bpc": best["bits_per_char"],
        "best_step": result.best_step, "last_val_loss": last["loss"], "elapsed": time.perf_counter() - t_start,
        "since_start": time.perf_counter() - STARTED})


def _diverged(what: str, cfg: C.TrainConfig, run_dir: Path) -> DivergedError:
    return DivergedError(
        f"{what} — training diverged; lower --learning-rate (now {cfg.learning_rate:g}), set --grad-clip 1.0 "
        f"or use --dtype float32. The last good checkpoint in {run_dir} is untouched"
    )


def _out_of_memory(phase, step, saved_step, run_dir, cfg: C.TrainConfig, model_cfg, device, dtype) -> str:
    batch = final_eval_batch(model_cfg.block_size) if phase == "final" else cfg.batch_size
    return resources.out_of_memory_message(phase, step, saved_step, run_dir, batch, cfg.grad_accum, model_cfg,
                                           device, dtype)
