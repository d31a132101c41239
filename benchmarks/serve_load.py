"""Serving throughput: total characters per second with 1, 4 and 16 concurrent streaming clients.

    python benchmarks/serve_load.py --ckpt runs/mine                  # starts tinygpt serve itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000       # or measures a running server

Each client streams one completion of --max-tokens tokens (temperature 1, its own seed) through
POST /v1/completions. A round starts every client at once and ends when the last one finishes;
chars/s is all the text received divided by the round's wall time, the median over --rounds
(after one warm-up round per concurrency). Prints a markdown table and writes the raw figures
as JSON.

    python benchmarks/serve_load.py --ckpt runs/mine --score 100 --clients   # scoring only

`--score N` also times N scoring requests one after the other, what lm-eval sends for a
log-likelihood: `max_tokens: 0`, `echo`, `logprobs: 1`, a 64-character prompt each, and beside
it (with --ckpt) one forward pass of the model over the same 64 tokens in this process.
"""

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def server(args):
    """The URL of the server to measure: --url, or `tinygpt serve` started here on a free port."""
    if args.url:
        yield args.url.rstrip("/")
        return
    cmd = [sys.executable, "-m", "tinygpt", "serve", "--ckpt", args.ckpt, "--port", "0", "--max-batch",
           str(max(args.clients, default=16))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # the first line names the URL; the rest is uvicorn's log
            found = re.search(r"API (http://\S+)/v1", line)
            if found:
                break
        else:
            raise SystemExit(f"tinygpt serve exited with {proc.wait()} before it was ready: {' '.join(cmd)}")
        url = found.group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("tinygpt serve did not answer /health within 60 s") from None
                time.sleep(0.05)
        threading.Thread(target=drain, args=(proc.stdout,), daemon=True).start()  # uvicorn's log must not block
        yield url
    finally:
        proc.terminate()
        proc.wait()


def drain(stream) -> None:
    for _ in stream:
        pass


async def one_client(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float]:
    """Characters received, and seconds until the first of them."""
    t0, first, chars = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise SystemExit(chunk["error"]["message"])
                chars += sum(len(c["text"]) for c in chunk["choices"])
                if first is None and chars:
                    first = time.perf_counter() - t0
    return chars, first or 0.0


async def one_round(url: str, clients: int, max_tokens: int, prompt: str, round_no: int) -> dict:
    bodies = [{"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 * round_no + i,
               "stream": True} for i in range(clients)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, b) for b in bodies))
        wall = time.perf_counter() - t0
    chars = sum(c for c, _ in results)
    return {"chars": chars, "seconds": wall, "chars_per_sec": chars / wall,
            "first_char_sec": statistics.median(f for _, f in results)}


def score(url: str, n: int, ckpt: str | None) -> dict:
    """N scoring requests in a row (after 3 warm-ups); with a run directory, a forward of the model
    over the same tokens here, for comparison."""
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4)[:64]
    body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1}
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            client.post(url + "/v1/completions", json=body).raise_for_status()
        t0 = time.perf_counter()
        for _ in range(n):
            client.post(url + "/v1/completions", json=body).raise_for_status()
        seconds = (time.perf_counter() - t0) / n
    forward_ms = None
    if ckpt:
        import torch

        from tinygpt.checkpoint import load_run

        model, tok = load_run(ckpt, "best")
        idx = torch.tensor([tok.encode(text)[-model.config.block_size:]])
        with torch.no_grad():
            for _ in range(3):
                model(idx)
            t0 = time.perf_counter()
            for _ in range(n):
                model(idx)
        forward_ms = (time.perf_counter() - t0) / n * 1000
    return {"requests": n, "requests_per_sec": 1 / seconds, "ms_per_request": seconds * 1000, "forward_ms": forward_ms}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ckpt", help="run directory: start `tinygpt serve --ckpt DIR` for the measurement")
    where.add_argument("--url", help="measure a server that is already running")
    p.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16], help="concurrencies (default: 1 4 16)")
    p.add_argument("--score", type=int, default=0, metavar="N", help="also time N scoring requests (default: 0)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per completion (default: 200)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per concurrency (default: 3)")
    p.add_argument("--prompt", default="\n", help="prompt of every request (default: a newline)")
    p.add_argument("--json", default="serve_load.json", help="where to write the raw figures")
    args = p.parse_args()

    figures = {}
    with server(args) as url:
        model = httpx.get(url + "/v1/models").json()["data"][0]
        for clients in args.clients:
            asyncio.run(one_round(url, clients, args.max_tokens, args.prompt, 0))  # warm-up
            rounds = [asyncio.run(one_round(url, clients, args.max_tokens, args.prompt, r + 1))
                      for r in range(args.rounds)]
            figures[clients] = {"rounds": rounds, **{k: statistics.median(r[k] for r in rounds)
                                                     for k in ("chars_per_sec", "first_char_sec")}}
        scoring = score(url, args.score, args.ckpt) if args.score else None
    print(f"{model['id']}: {model['parameters']:,} parameters, block_size {model['block_size']}, "
          f"{args.max_tokens} tokens per completion, median of {args.rounds} rounds\n")
    if figures:
        print("| clients | total chars/s | chars/s per client | time to first char |")
        print("|---:|---:|---:|---:|")
    for clients, f in figures.items():
        print(f"| {clients} | {f['chars_per_sec']:,.0f} | {f['chars_per_sec'] / clients:,.0f} | "
              f"{f['first_char_sec'] * 1000:.0f} ms |")
    if scoring:
        forward = "" if scoring["forward_ms"] is None else \
            f"; one forward over the same 64 tokens in this process: {scoring['forward_ms']:.1f} ms"
        print(f"\nscoring (max_tokens 0, echo, logprobs 1, 64-character prompts, one at a time): "
              f"{scoring['requests_per_sec']:.0f} requests/s, {scoring['ms_per_request']:.1f} ms each{forward}")
    Path(args.json).write_text(json.dumps({"model": model, "max_tokens": args.max_tokens, "figures": figures,
                                           "scoring": scoring}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
