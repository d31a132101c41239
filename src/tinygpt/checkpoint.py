"""Run directories: what a training run writes, and how it is read back safely.

    RUN/
      run.json               resolved config, command line, library versions, format version
      tokenizer.json         the tokenizer (JSON)
      metrics.jsonl          one JSON line per loss report
      latest.json, best.json pointers to the newest and the best-val checkpoint
      checkpoints/step_000500/
        model.safetensors    weights (float32, the uncompiled module's names); with --ema-decay, their average
        training.safetensors with --ema-decay only: the weights the optimizer steps (for --resume)
        optimizer.pt         optimizer state: tensors and numbers only (loaded weights_only)
        state.json           step, best val loss, schedule position, every RNG state

Crash safety: a checkpoint directory is written under a temporary name, every file fsynced,
then renamed into place; only then is the pointer file replaced (write temp, fsync, rename).
A pointer therefore always names a complete checkpoint, whenever the process dies.
Nothing here unpickles arbitrary objects: weights come from safetensors, metadata from JSON,
and the optimizer file is read with `torch.load(weights_only=True)`.
"""

import base64
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import tinygpt
from tinygpt import config as C
from tinygpt.errors import UserError
from tinygpt.model import regrow_bigram
from tinygpt.tokenizer import load_tokenizer

FORMAT_VERSION = 1
TRAINING_WEIGHTS = "training.safetensors"  # --ema-decay: the weights the optimizer steps


# --- atomic file writes ------------------------------------------------------------------------
# A write that fails (a full disk, a quota, a directory made read-only) raises OSError with the
# file's name and leaves nothing behind: no temporary file, no half-written one.


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FdWriter:
    """A file opened for writing, written with `os.write`, each write checked.

    Libraries that take a file object (torch.save) get this one: when they turn an OSError into
    an error of their own ("unexpected pos ..."), `error` still holds the real one."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            self.error = OSError(e.errno, e.strerror, str(self.path))
            raise self.error from None
        return size

    def flush(self) -> None:
        pass


def write_file(path: Path, data: bytes | str | Callable) -> None:
    """Write `path` (text, bytes, or `data(file)` for a serializer) and fsync it; on failure
    remove the partial file and raise the OSError, which names the file."""
    path = Path(path)
    try:
        f = _FdWriter(path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        try:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            os.fsync(f.fd)  # some filesystems report a full disk only here
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
        except Exception:
            if f.error is not None:  # the serializer hid the write's own error: raise that one
                raise f.error from None
            raise
        finally:
            os.close(f.fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_file(tmp, text)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# --- RNG state as JSON ---------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state(sampler_state: dict) -> dict:
    state = {
        "python": _py_state_to_json(random.getstate()),
        "torch": _b64(torch.get_rng_state()),
        "sampler": _b64(sampler_state["generator"]),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> dict:
    """Restore global RNGs; return the batch sampler's state to load into it."""
    random.setstate(_py_state_from_json(state["python"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    return {"generator": _unb64(state["sampler"])}


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


# --- writing -----------------------------------------------------------------------------------


def versions() -> dict:
    import safetensors

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "tinygpt": tinygpt.version(),
    }


def write_run_files(run_dir: Path, model_cfg, train_cfg, tokenizer, extra: dict | None = None) -> None:
    """The files a run directory gets once, at the start: config, versions, tokenizer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": C.to_dict(model_cfg),
        "train": C.to_dict(train_cfg),
        "command": sys.argv,
        "versions": versions(),
        **(extra or {}),
    }
    write_json(run_dir / "run.json", meta)
    write_json(run_dir / "tokenizer.json", tokenizer.to_json())


def _stored(t: torch.Tensor) -> torch.Tensor:
    """A tensor as a checkpoint stores it: float32, contiguous, on the CPU."""
    return t.detach().to("cpu", torch.float32).contiguous()


def model_state(model: torch.nn.Module) -> dict:
    """float32, contiguous, with tied tensors stored once (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = _stored(t)
    return out


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, best: bool,
                    training_weights: dict | None = None) -> Path:
    """Write checkpoints/step_N atomically, point latest.json (and best.json) at it, prune old.
    `training_weights`: with --ema-decay, model.safetensors holds the average (the run's model)
    and training.safetensors these, the weights the optimizer steps (for --resume).

    All or nothing: when a write fails (OSError: disk full, read-only), the run directory is
    left as it was before the call, its previous checkpoint and pointers untouched, no partial
    file behind; then the error is raised."""
    ckpts = run_dir / "checkpoints"
    made_dir = not ckpts.is_dir()
    ckpts.mkdir(exist_ok=True)
    name = f"step_{step:06d}"
    final = ckpts / name
    tmp, old = ckpts / f".{name}.tmp", ckpts / f".{name}.old"
    for leftover in (tmp, old):  # from a process killed mid-save
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        tmp.mkdir()
        _write_weights(model_state(model), tmp / "model.safetensors")
        if training_weights is not None:
            _write_weights({name: _stored(t) for name, t in training_weights.items()}, tmp / TRAINING_WEIGHTS)
        write_file(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
        write_file(tmp / "state.json", json.dumps(state) + "\n")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a stop right after an eval): set it aside
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(ckpts)
        rel = f"checkpoints/{name}"
        pointers = {"latest": {"checkpoint": rel, "step": step}}
        if best:
            pointers["best"] = {"checkpoint": rel, "step": step, "val_loss": state.get("best_val")}
        _write_pointers(run_dir, pointers)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():  # put the checkpoint of this step that was there back
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
        elif f"checkpoints/{name}" not in {pointer(run_dir, "latest"), pointer(run_dir, "best")}:
            shutil.rmtree(final, ignore_errors=True)  # made by this call: nothing names it
        if made_dir:
            shutil.rmtree(ckpts, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _prune(run_dir)
    return final


def _write_weights(tensors: dict, path: Path) -> None:
    """safetensors' `save_file`, whose I/O errors (from Rust) come back as the OSError they are."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        path.unlink(missing_ok=True)
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def _write_pointers(run_dir: Path, pointers: dict) -> None:
    """Replace latest.json (and best.json) together: every temporary file is written first, so
    a failed write changes neither pointer."""
    written = []
    try:
        for which, data in pointers.items():
            path = run_dir / f"{which}.json"
            tmp = path.with_name(f".{path.name}.tmp")
            write_file(tmp, json.dumps(data, indent=2) + "\n")
            written.append((tmp, path))
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in written:
        os.replace(tmp, path)
    fsync_dir(run_dir)


def _prune(run_dir: Path) -> None:
    keep = {pointer(run_dir, p) for p in ("latest", "best")}
    for d in (run_dir / "checkpoints").iterdir():
        if d.is_dir() and f"checkpoints/{d.name}" not in keep:
            shutil.rmtree(d, ignore_errors=True)


def pointer(run_dir: Path, which: str) -> str | None:
    """The checkpoint `latest.json` / `best.json` names (relative to the run), or None."""
    p = run_dir / f"{which}.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- reading -----------------------------------------------------------------------------------


def read_run_meta(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist; give the --out of a `tinygpt train` run")
    if run_dir.is_file():
        where = run_dir.parent if run_dir.name == "run.json" else "the directory tinygpt train wrote"
        raise UserError(f"{run_dir} is a file, not a run directory; give the directory that holds run.json ({where})")
    if not (run_dir / "run.json").is_file():
        raise UserError(f"{run_dir} is not a tinygpt run directory (no run.json); give a directory tinygpt train wrote")
    try:
        meta = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        version = meta["format_version"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{run_dir / 'run.json'} is garbled (not tinygpt's JSON); the run is damaged") from None
    if version != FORMAT_VERSION:
        raise UserError(
            f"{run_dir} was written in checkpoint format {version}; this tinygpt reads format {FORMAT_VERSION} — "
            "use the tinygpt version that wrote it"
        )
    return meta


def which_checkpoint(run_dir: Path, which: str) -> str:
    """The checkpoint `which` resolves to: "best" when asked for and the run has one, else
    "latest" (what `checkpoint_dir` falls back to)."""
    return "best" if which == "best" and pointer(Path(run_dir), "best") else "latest"


def checkpoint_dir(run_dir: Path, which: str = "latest") -> Path:
    rel = pointer(Path(run_dir), which)
    if rel is None:
        if which == "best" and pointer(Path(run_dir), "latest"):
            return checkpoint_dir(run_dir, "latest")
        raise UserError(f"{run_dir} holds no checkpoint yet ({which}.json missing or garbled); train it first")
    return Path(run_dir) / rel


def configs_from_meta(meta: dict):
    try:
        return C.build(C.ModelConfig, meta["model"]), C.build(C.TrainConfig, meta["train"])
    except (KeyError, TypeError) as e:
        raise UserError(f"run.json is garbled ({e}); the run directory is damaged") from None


def load_weights(path: Path, model: torch.nn.Module, grown: bool = False) -> None:
    """Load a safetensors file into `model`, refusing (one line) a damaged file or one that does
    not fit. `grown`: the model's vocabulary was extended (fine-tuning with --grow-vocab, or on
    conversations: the chat template's tokens), so the saved rows (and bigram columns) are
    copied; a new token's embedding and output-head row (and head bias) start as the mean of the
    saved ones (`grow_rows`), other new entries keep their fresh init."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"weights file {path} is truncated or corrupted ({e}); use another checkpoint") from None
    if grown:
        own = model.state_dict()
        for name, tensor in state.items():
            if name == "bigram_embedding_table.weight" and name in own and own[name].shape != tensor.shape:
                old_vocab = len(state["token_embedding_table.weight"])  # the saved model's vocabulary
                state[name] = regrow_bigram(tensor, old_vocab, model.config.vocab_size)
            elif name in own and own[name].shape != tensor.shape and own[name].dim() == tensor.dim() and all(
                a >= b for a, b in zip(own[name].shape, tensor.shape)
            ):
                own[name][tuple(slice(0, n) for n in tensor.shape)] = tensor
                if own[name].shape[1:] == tensor.shape[1:]:  # grown along the vocabulary only
                    own[name] = grow_rows(tensor, len(own[name]))
                state[name] = own[name]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes: weights of a different model
        shapes = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"weights in {path} do not fit the model in run.json ({shapes}); "
                        "the run directory is inconsistent") from None
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UserError(
            f"weights in {path} do not fit the model in run.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )


def grow_rows(saved: torch.Tensor, n: int) -> torch.Tensor:
    """`saved` (one row a token) grown to `n` rows, each new one the mean of the saved rows. A
    new token then starts as an average token: its output logit is the mean of the others' (not
    a random one that might dominate), so the first fine-tuning step's loss stays near the base
    model's, and it learns its own direction from there (Hewitt, "Initializing new word
    embeddings for pretrained language models", 2021)."""
    mean = saved.float().mean(dim=0, keepdim=True).to(saved.dtype)
    return torch.cat([saved, mean.expand(n - len(saved), *saved.shape[1:])])


def load_run_tokenizer(run_dir: Path, model_cfg):
    """The run's tokenizer, checked to have the vocabulary its model was built for."""
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise UserError(
            f"{run_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
            f"{model_cfg.vocab_size}; the run directory is inconsistent"
        )
    return tokenizer


def load_run(run_dir: str | Path, which: str = "latest", device: str | torch.device = "cpu"):
    """Model (in eval mode) and tokenizer from a run directory. The public loader."""
    from tinygpt.model import build_model
    from tinygpt.runtime import resolve_attention

    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    model_cfg, _ = configs_from_meta(meta)
    tokenizer = load_run_tokenizer(run_dir, model_cfg)
    model = build_model(model_cfg)
    load_weights(checkpoint_dir(run_dir, which) / "model.safetensors", model)
    device = torch.device(device)
    model.set_attention(resolve_attention(model_cfg.attention, device))  # "auto": the kernel for this device
    return model.to(device).eval(), tokenizer


def load_training_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """A checkpoint's training weights (--ema-decay) into `model`, refusing (one line) a
    checkpoint without them, or with damaged ones."""
    path = ckpt / TRAINING_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} is missing: an --ema-decay run resumes from the weights its optimizer steps, "
                        "kept there; start the run again, or fine-tune its model (the average) with --init-from")
    load_weights(path, model)


def load_training_state(ckpt: Path, optimizer) -> dict:
    """Optimizer state (weights_only: no code runs) and the JSON loop state of a checkpoint."""
    try:
        opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; all mean "do not trust this file"
        raise UserError(f"optimizer state {ckpt / 'optimizer.pt'} is unreadable or unsafe ({type(e).__name__}); "
                        "it was not loaded") from None
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"optimizer state {ckpt / 'optimizer.pt'} does not fit the model ({e}); "
                        "the checkpoint is damaged") from None
    try:
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt / 'state.json'} is unreadable ({e}); the checkpoint is damaged") from None
