"""Start `tinygpt serve`: load the run (refusing a damaged one), bind the port, run uvicorn."""

import socket
import sys
from pathlib import Path

from tinygpt.checkpoint import checkpoint_dir, load_run, which_checkpoint
from tinygpt.errors import UserError
from tinygpt.runs import read_metrics
from tinygpt.runtime import inference_dtype, resolve_device
from tinygpt.serve.guard import allowed_hosts, is_loopback


def serve(ckpt: str, which: str = "best", host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          dtype: str = "auto", api_key: str | None = None, max_batch: int = 16, window: str = "full") -> int:
    """Serve the run in `ckpt` until interrupted. `port` 0 picks a free port (printed). `window`:
    the rule past the block for requests that do not choose one."""
    import uvicorn

    from tinygpt.serve.app import create_app

    if max_batch < 1:
        raise UserError(f"--max-batch must be positive, got {max_batch}")
    # The generation thread and the event loop hand the GIL back and forth every step; at
    # Python's default 5 ms switch interval each hand-off could wait that long.
    sys.setswitchinterval(1e-4)
    if not api_key and not is_loopback(host):
        sys.stderr.write(f"tinygpt serve: warning: listening on {host} without --api-key: anyone who can reach "
                         "this machine can use the model; add --api-key KEY\n")
    served = load_served(ckpt, which, device, dtype)
    sock = bind(host, port)
    card = served.card
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    print(f"serving {card['id']} ({card['checkpoint']} checkpoint, step {card['step']}, "
          f"{card['parameters']:,} parameters) on {served.device}: playground {url}/ API {url}/v1", flush=True)
    app = create_app(served, api_key, max_batch, window, allowed_hosts(host))
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def load_served(ckpt: str, which: str = "best", device: str = "auto", dtype: str = "auto"):
    """The run loaded as `tinygpt sample` loads it: same device and dtype choice, same errors."""
    from tinygpt.serve.app import Served

    dev = resolve_device(device)
    model, tokenizer = load_run(ckpt, which, dev)
    return Served(model, tokenizer, model_card(Path(ckpt), which, model, tokenizer), dev, inference_dtype(dtype, dev))


def model_card(run_dir: Path, which: str, model, tokenizer) -> dict:
    """OpenAI's model object, plus what the run is: size, vocabulary, context and val loss."""
    ckpt = checkpoint_dir(run_dir, which)
    used = which_checkpoint(run_dir, which)
    step = _step_of(ckpt)
    try:
        reports = [r for r in read_metrics(run_dir) if isinstance(r.get("val_loss"), (int, float))]
    except UserError as e:  # the weights are fine: serve them, without figures
        sys.stderr.write(f"tinygpt serve: warning: no val loss for the model card: {e}\n")
        reports = []
    at_step = next((r for r in reversed(reports) if r.get("step") == step), {})
    best = min(reports, key=lambda r: r["val_loss"], default={})
    return {
        "id": run_dir.resolve().name,
        "object": "model",
        "created": int((ckpt / "model.safetensors").stat().st_mtime),
        "owned_by": "tinygpt",
        "model": model.config.model,
        "checkpoint": used,
        "step": step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.kind,
        "block_size": model.config.block_size,
        "val_loss": at_step.get("val_loss"),  # this checkpoint's, nats per token
        "val_bpc": at_step.get("val_bpc"),  # bits per character
        "best_val_loss": best.get("val_loss"),
        "best_val_bpc": best.get("val_bpc"),
    }


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, handed to uvicorn; a port in use is a one-line error."""
    if not 0 <= port <= 65535:  # getaddrinfo would silently wrap 70000 to 4464
        raise UserError(f"--port must be in 0-65535 (0 picks a free port), got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    return sock


def _step_of(ckpt: Path) -> int | None:
    try:
        return int(ckpt.name.removeprefix("step_"))
    except ValueError:
        return None
