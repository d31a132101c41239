"""The studio's runs and its one training job: `tinygpt train` as a supervised subprocess.

A job is the CLI's own command (`python -m tinygpt train --data TEXT --out RUNS/NAME ...`), in
its own process group, at lower priority, on one core fewer than the machine has (the page stays
responsive), writing its output to a log. Its record, RUNS/.studio/jobs/NAME.json (pid, command,
state, times, exit status), outlives the studio: a restarted studio adopts a job still running
and marks one whose process died as stopped, and resumable (its last checkpoint is whole).

Stop is SIGTERM to the job's process group: train saves and exits (a run resumes exactly).
Resume is `tinygpt train --resume RUN`, with more steps or time when the run had finished.
Every limit is checked here, not only in the page.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tinygpt import config as C
from tinygpt.checkpoint import atomic_write_text, configs_from_meta, read_run_meta
from tinygpt.errors import UserError
from tinygpt.resources import param_count
from tinygpt.studio import texts

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
# Train settings the studio chooses itself: where the text and the run are, and how the job runs.
STUDIO_CHOOSES = {"data", "out", "resume", "init_from", "overwrite", "grow_vocab", "threads", "quiet",
                  "report_sample_chars"}
REPORT_SAMPLE_CHARS = 200  # what the model writes at each report, pinned to the curve
STOPPED_CODES = {130, 143}  # train's exit status after saving on SIGINT / SIGTERM
ACTIVE = ("starting", "running", "stopping")


class Conflict(UserError):
    """A request the current state refuses (HTTP 409): a job runs already, the run is busy ..."""


class NotFound(UserError):
    """No such run (HTTP 404)."""


class TooLarge(UserError):
    """Past a limit of the server's (HTTP 422 for settings, 507 for disk)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What the studio lets a job ask for (`tinygpt studio --max-params ...`)."""

    max_params: int = 50_000_000
    max_steps: int = 1_000_000
    max_time: float = 24 * 3600.0
    min_free_bytes: int = 200 * 2**20  # disk left after the run's checkpoints


class Jobs:
    """The runs under `runs` and the (at most one) training job."""

    def __init__(self, runs: Path, limits: Limits = Limits(), threads: int | None = None):
        self.runs, self.limits = runs, limits
        self.threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self.folder = runs / ".studio" / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.current: str | None = None  # the run the job trains
        self.recover()

    # --- records ---------------------------------------------------------------------------------

    def record(self, name: str) -> dict | None:
        path = self.folder / f"{name}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write(self, name: str, **changes) -> dict:
        rec = {**(self.record(name) or {}), **changes}
        atomic_write_text(self.folder / f"{name}.json", json.dumps(rec, indent=1))
        return rec

    def recover(self) -> None:
        """After a restart: adopt a job whose process still runs; mark one that died stopped."""
        for path in self.folder.glob("*.json"):
            name = path.stem
            rec = self.record(name)
            if not rec or rec.get("state") not in ACTIVE:
                continue
            if alive(rec.get("pid"), name):
                self.current = name
                threading.Thread(target=self._watch_adopted, args=(name, rec["pid"]), daemon=True).start()
            else:
                self.write(name, state="stopped", ended=time.time(), exit_code=None,
                           message="the job's process ended while the studio was not running; resume it")

    # --- starting, stopping, resuming --------------------------------------------------------------

    def check_settings(self, text_id: str, preset: str | None, settings: dict) -> tuple:
        """(ModelConfig, TrainConfig, text figures) of a new run, or a one-line error naming the field."""
        for key in settings:
            if key in STUDIO_CHOOSES:
                raise UserError(f"settings.{key}: the studio sets this itself (runs live in its --runs directory, "
                                "texts are chosen by id); leave it out")
            if key not in C.TRAIN_KEYS:
                raise UserError(f"settings.{key}: unknown setting; the settings are tinygpt train's flags, with "
                                "underscores (see tinygpt train --help)")
        figures = texts.figures(self.runs, text_id)
        if preset is not None and preset != "auto" and preset not in C.list_presets():
            raise UserError(f"preset {preset!r} is unknown; choose one of: auto, {', '.join(C.list_presets())}")
        flags = {**settings, **({"preset": preset} if preset and preset != "auto" else {})}
        # --preset auto plans in the job; here its settings resolve to the lecture's model, the largest
        # it may pick, so the parameter limit holds whatever it picks
        model_cfg, cfg = C.resolve_train_settings(flags)
        vocab = cfg.vocab_size if cfg.tokenizer == "bpe" else figures["vocab_size"]
        model_cfg = C.build(C.ModelConfig, {**C.to_dict(model_cfg), "vocab_size": vocab})
        self.check_limits(model_cfg, cfg.max_iters, cfg.max_time or (600.0 if preset == "auto" else 0.0))
        return model_cfg, cfg, figures

    def check_limits(self, model_cfg: C.ModelConfig, steps: int, seconds: float) -> None:
        lim = self.limits
        params = param_count(model_cfg)
        if params > lim.max_params:
            raise TooLarge(f"the model has {params:,} parameters; this studio allows at most {lim.max_params:,} "
                           "(tinygpt studio --max-params): choose a smaller model")
        if steps > lim.max_steps:
            raise TooLarge(f"max_iters {steps:,} is over this studio's limit of {lim.max_steps:,} steps "
                           "(tinygpt studio --max-steps)")
        if seconds > lim.max_time:  # 0: no limit asked, so the studio's (the job is given it)
            raise TooLarge(f"max_time {seconds:g} s is over this studio's limit of {lim.max_time:g} s "
                           "(tinygpt studio --max-time)")
        need = 3 * 3 * 4 * params + self.limits.min_free_bytes  # best, latest and one being written; Adam's 2x
        free = shutil.disk_usage(self.runs).free
        if free < need:
            raise TooLarge(f"{free / 2**20:,.0f} MB of disk is free where the runs are; this run needs about "
                           f"{need / 2**20:,.0f} MB: free some space", status=507)

    def start(self, text_id: str, preset: str | None, settings: dict, name: str | None = None) -> dict:
        with self.lock:
            self.refuse_if_busy()
            model_cfg, cfg, figures = self.check_settings(text_id, preset, settings)
            name = self.new_name(name, preset or model_cfg.model)
            run_dir = self.runs / name
            command = [sys.executable, "-m", "tinygpt", "train", "--data", str(texts.text_path(self.runs, text_id)),
                       "--out", str(run_dir), *(["--preset", preset] if preset else []), *C.as_flags(settings)]
            if preset == "auto" and "max_time" not in settings:
                command += ["--max-time", str(int(cfg.max_time or 600))]
            elif cfg.max_time == 0:
                command += ["--max-time", str(int(self.limits.max_time))]  # a bound the studio keeps
            self.write(name, run=name, text=text_id, text_name=figures["name"], preset=preset, settings=settings,
                       created=time.time(), runs=[], max_iters=cfg.max_iters)
            return self._launch(name, command, start_step=0)

    def resume(self, name: str, steps: int | None = None, seconds: float | None = None) -> dict:
        """Continue a stopped run; with `steps` (more than it had) or `seconds`, extend it."""
        with self.lock:
            self.refuse_if_busy()
            run_dir = self.run_dir(name)
            meta = read_run_meta(run_dir)
            model_cfg, cfg = configs_from_meta(meta)
            step = last_step(run_dir)
            if step is None:
                raise Conflict(f"run {name} has no checkpoint to resume from; start a new run")
            planned = self.planned(name, cfg)
            max_iters = planned + steps if steps else planned
            if step >= max_iters:
                raise Conflict(f"run {name} has finished its {planned:,} steps; extend it: resume with "
                               "{\"steps\": N} more")
            budget = seconds or (cfg.max_time or self.limits.max_time)
            self.check_limits(model_cfg, max_iters, budget)
            command = [sys.executable, "-m", "tinygpt", "train", "--resume", str(run_dir),
                       "--max-iters", str(max_iters), "--max-time", f"{budget:g}"]
            self.write(name, run=name, created=(self.record(name) or {}).get("created", time.time()),
                       max_iters=max_iters)  # run.json keeps the first plan; the record, the latest
            return self._launch(name, command, start_step=step)

    def stop(self, name: str) -> dict:
        with self.lock:
            rec = self.record(name)
            if self.current != name or not rec or rec.get("state") not in ACTIVE:
                raise Conflict(f"run {name} is not training; nothing to stop")
            try:
                os.killpg(rec["pid"], signal.SIGTERM)  # train saves, then exits (143)
            except ProcessLookupError:
                pass
            return self.write(name, state="stopping")

    def planned(self, name: str, cfg) -> int:
        """The steps the run is to reach: its last resume's --max-iters, else run.json's."""
        return (self.record(name) or {}).get("max_iters") or cfg.max_iters

    def refuse_if_busy(self) -> None:
        if self.current is not None:
            raise Conflict(f"run {self.current} is training; one job runs at a time: stop it or wait for it")

    def _launch(self, name: str, command: list[str], start_step: int) -> dict:
        log = self.folder / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads),
               "TINYGPT_CACHE_DIR": str(self.runs / ".studio" / "encoded")}  # token files beside the texts
        command = [*command, "--threads", str(self.threads), "--quiet", "--report-sample-chars",
                   str(REPORT_SAMPLE_CHARS)]
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)  # its own group: Stop reaches all of it
        try:
            os.setpriority(os.PRIO_PROCESS, proc.pid, 10)  # below the studio's: the page stays responsive
        except OSError:
            pass
        self.current = name
        history = (self.record(name) or {}).get("runs", []) + [{"started": time.time(), "from_step": start_step}]
        rec = self.write(name, pid=proc.pid, command=command, state="running", started=time.time(), ended=None,
                         exit_code=None, message=None, start_step=start_step, runs=history)
        threading.Thread(target=self._watch, args=(name, proc), daemon=True).start()
        return rec

    def _watch(self, name: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        self._ended(name, code)

    def _watch_adopted(self, name: str, pid: int) -> None:
        while alive(pid, name):
            time.sleep(0.5)
        self._ended(name, None)

    def _ended(self, name: str, code: int | None) -> None:
        with self.lock:
            run_dir = self.runs / name
            done = self.finished(name)
            if code == 0 or (code is None and done):
                state, message = "finished", None
            elif code in STOPPED_CODES or code is None or code < 0:
                state, message = "stopped", "stopped; resume continues it exactly"
            else:
                state, message = "failed", last_error(self.folder / f"{name}.log")
            if state == "failed" and not (run_dir / "run.json").is_file():
                message = message or "the run did not start"
            self.write(name, state=state, ended=time.time(), exit_code=code, message=message)
            if self.current == name:
                self.current = None

    def finished(self, name: str) -> bool:
        """Whether the run `name` ended on its own (`ended`)."""
        run_dir = self.runs / name
        try:
            _, cfg = configs_from_meta(read_run_meta(run_dir))
        except UserError:
            return False
        return ended(last_step(run_dir), self.planned(name, cfg), read_lines(run_dir))

    # --- names and views ---------------------------------------------------------------------------

    def new_name(self, name: str | None, model: str) -> str:
        if name is not None:
            if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
                raise UserError(f"name must be letters, digits, '.', '_' or '-' (at most 80, no path), got {name!r}")
            if (self.runs / name).exists() or self.record(name):
                raise Conflict(f"a run named {name} exists already; choose another name")
            return name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name, n = f"{model}-{stamp}", 1
        while (self.runs / name).exists() or self.record(name):
            n += 1
            name = f"{model}-{stamp}-{n}"
        return name

    def names(self) -> list[str]:
        found = {p.name for p in self.runs.iterdir() if p.is_dir() and (p / "run.json").is_file()}
        found |= {p.stem for p in self.folder.glob("*.json")}
        return sorted(found, key=lambda n: self.created(n), reverse=True)

    def created(self, name: str) -> float:
        rec = self.record(name)
        if rec and rec.get("created"):
            return rec["created"]
        meta = self.runs / name / "run.json"
        return meta.stat().st_mtime if meta.is_file() else 0.0

    def run_dir(self, name: object) -> Path:
        """The run `name` names: a plain name (no path: letters, digits, '.', '_', '-', no '..') of a
        run in `runs`, as `names` lists them (a run.json, or a job record)."""
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name or not (
                (self.runs / name / "run.json").is_file() or (self.folder / f"{name}.json").is_file()):
            raise NotFound(f"no run {name!r} in this studio's runs directory; GET /api/runs lists them")
        return self.runs / name

    def view(self, name: str, with_metrics: bool = False) -> dict:
        """What the page shows of a run: state, size, progress, best val loss, settings."""
        run_dir = self.run_dir(name)
        rec = self.record(name) or {}
        out = {"id": name, "created": self.created(name), "job": job_part(rec), "text": rec.get("text"),
               "text_name": rec.get("text_name"), "preset": rec.get("preset")}
        meta = None
        try:
            meta = read_run_meta(run_dir) if (run_dir / "run.json").is_file() else None
        except UserError as e:
            out.update(state="damaged", message=str(e))
            return out
        lines = read_lines(run_dir)
        rows = [r for r in lines if is_report(r)]
        state = rec.get("state") if rec.get("state") in ACTIVE or rec.get("state") == "failed" else None
        if meta is None:
            out.update(state=state or "starting", settings=None, parameters=None, step=0, max_iters=None)
            return out
        model_cfg, cfg = configs_from_meta(meta)
        saved = last_step(run_dir)
        step = max([r["step"] for r in rows] + [saved or 0])  # a stop saves between reports
        best = min((r for r in rows if is_number(r.get("val_loss"))), key=lambda r: r["val_loss"], default=None)
        final = next((r for r in reversed(lines) if "final_val_loss" in r), None)
        max_iters = rec.get("max_iters") or cfg.max_iters  # as `planned`, from the record read above
        if state is None:
            state = "finished" if ended(saved, max_iters, lines) else "stopped"
        out.update(
            state=state, model=model_cfg.model, shape=shape(model_cfg), parameters=param_count(model_cfg),
            vocab_size=model_cfg.vocab_size, block_size=model_cfg.block_size, step=step, max_iters=max_iters,
            max_time=cfg.max_time, best_step=best["step"] if best else None,
            best_val_loss=best["val_loss"] if best else None, best_val_bpc=best.get("val_bpc") if best else None,
            final_val_loss=final.get("final_val_loss") if final else None,
            train_seconds=rows[-1].get("train_seconds") if rows else None,
            tokens_per_sec=rows[-1].get("tokens_per_sec") if rows else None,
            eta_seconds=eta(rec, step, max_iters) if state in ACTIVE else None,
            settings={**meta.get("model", {}), **{k: v for k, v in meta.get("train", {}).items()
                                                  if k not in ("data", "out", "resume", "init_from")}},
            message=rec.get("message"),
        )
        if with_metrics:
            out["metrics"] = rows
        return out


def job_part(rec: dict) -> dict | None:
    keys = ("pid", "command", "state", "started", "ended", "exit_code", "message", "start_step", "runs")
    return {k: rec.get(k) for k in keys} if rec.get("command") else None


def alive(pid: object, name: str) -> bool:
    """Whether `pid` still runs the job for run `name` (not another process given its number)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # Linux: check it is that run's tinygpt train
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        return b"tinygpt" in args and any(a.endswith(b"/" + name.encode()) for a in args)
    return True


def read_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines, skipping one cut short by a write in progress."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def is_report(line: dict) -> bool:
    return "val_loss" in line and isinstance(line.get("step"), int)


def reports(run_dir: Path) -> list[dict]:
    return [r for r in read_lines(run_dir) if is_report(r)]


def ended(saved_step: int | None, planned: int, lines: list[dict]) -> bool:
    """Whether a run ended on its own: its last planned step saved, or (stopped by --max-time or
    early stopping) its final line written after its last resume (a resume trims it)."""
    if saved_step is not None and saved_step >= planned:
        return True
    return bool(lines) and "final_val_loss" in lines[-1]


def last_step(run_dir: Path) -> int | None:
    try:
        latest = json.loads((run_dir / "latest.json").read_text(encoding="utf-8"))
        return int(latest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def eta(rec: dict, step: int, max_iters: int) -> float | None:
    """Seconds left: the steps left at this job's pace so far (reports included), bounded by
    its --max-time."""
    started, first = rec.get("started"), rec.get("start_step", 0)
    if not started:
        return None
    elapsed = time.time() - started
    left = None
    if step > first:
        left = (max_iters - step) * elapsed / (step - first)
    command = rec.get("command") or []
    if "--max-time" in command:
        budget = float(command[command.index("--max-time") + 1]) - elapsed
        left = budget if left is None else min(left, budget)
    return None if left is None else max(0.0, left)


def shape(m: C.ModelConfig) -> str:
    return "bigram" if m.model == "bigram" else f"{m.n_layer}x{m.n_head}x{m.n_embd}"


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def last_error(log: Path) -> str:
    """The one-line error train printed last, for a failed job."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "the job failed"
    said = [line for line in lines if "error:" in line]
    return (said[-1] if said else (lines[-1] if lines else "the job failed")).strip()[:500]
