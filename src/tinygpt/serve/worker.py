"""The generation worker: one thread that decodes every active request together.

The web handlers turn a request into `Sequence`s, one per choice (each prompt x n), and submit
them. The worker owns the decode engine's slots: it admits waiting sequences into free slots
(prefill), then on every step samples one token for each active sequence with that sequence's
own seeded generator and advances all of them in one batched forward. A sequence that finishes,
or whose client went away, frees its slot for the next one waiting.

The model runs on this thread and the web side on the asyncio event loop; text goes back as
`Event`s put on the request's asyncio queue with `call_soon_threadsafe`, the one safe way to
hand an object to an event loop from another thread.
"""

import asyncio
import collections
import sys
import threading
import traceback
from dataclasses import dataclass, field

import torch

from tinygpt.engine import DecodeEngine
from tinygpt.resources import is_out_of_memory
from tinygpt.runtime import autocast
from tinygpt.sampling import sample_next_token
from tinygpt.scoring import logprobs_of_next


@dataclass
class Event:
    """Text for choice `index`; the last event of a choice has `finish` (or `error`) set."""

    index: int
    text: str = ""
    finish: str | None = None  # "stop" (a stop sequence) or "length" (max_tokens)
    tokens: int = 0  # tokens generated, on the last event
    error: str | None = None
    status: int = 500  # of an error: 503 when the server ran out of memory (retry later, or ask for less)
    logprobs: list | None = None  # with `logprobs` asked for: (token id, its log-prob, {id: log-prob} of the top)


@dataclass(eq=False)
class Sequence:
    """One choice to generate: prompt ids, sampling settings, and where its events go."""

    index: int
    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: bool = False  # set from the event loop when the client is gone; read by the worker
    logprobs: int | None = None  # report each token's log-prob and this many alternatives
    window: str = "full"  # the context rule past block_size (engine.py)


def post(items: list[tuple[Sequence, Event]]) -> None:
    """Hand a step's events to the event loop in one call: one wake-up per step, not per token."""
    by_loop: dict = {}
    for seq, event in items:
        by_loop.setdefault(seq.loop, []).append((seq.queue, event))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list) -> None:
    for queue, event in batch:
        queue.put_nowait(event)


class TextStream:
    """Token ids in, text out, honouring stop sequences.

    Text is released only once it can no longer become part of a stop sequence: a tail that is
    the start of one is held back until the next token decides. Ids that decode to an unfinished
    multi-byte character (byte-level BPE) are held until the character is complete.
    """

    def __init__(self, decode, stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` released
        self.pending: list[int] = []  # ids not yet decodable into whole characters

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; returns (text to release now, whether a stop sequence was reached)."""
        self.pending.append(token)
        piece = self.decode(self.pending)
        if piece.endswith("\ufffd"):
            return "", False
        self.pending = []
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held()), False

    def flush(self) -> str:
        """At the end: everything held back (no stop sequence came)."""
        if self.pending:
            self.text += self.decode(self.pending)
            self.pending = []
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of `text` that begins some stop sequence."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return out


@dataclass(eq=False)
class _Active:
    seq: Sequence
    text: TextStream
    generator: torch.Generator
    logits: torch.Tensor  # next-token logits, (vocab,)
    generated: int = 0
    entries: list = field(default_factory=list)  # log-probs of tokens not yet sent


class Busy(Exception):
    """More sequences waiting than the worker accepts; the client should retry later."""


class Worker:
    """Owns the decode engine and its slots; `start()` runs the decode loop on a daemon thread."""

    def __init__(self, model: torch.nn.Module, decode, max_batch: int, device: torch.device, dtype: torch.dtype,
                 max_waiting: int = 1024):
        self.decode = decode  # the tokenizer's ids -> text
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.device, self.dtype = device, dtype
        with autocast(device, dtype):  # the cache takes the dtype the forward will run in
            self.engine = DecodeEngine(model, max_batch)  # float32 on CPU: log-probs are float32's
        self.waiting: collections.deque[Sequence] = collections.deque()  # guarded by cv
        self.free_slots = list(range(max_batch))[::-1]  # guarded by cv
        self.active: dict[int, _Active] = {}  # slot -> its sequence; the worker thread's alone
        self.jobs: collections.deque = collections.deque()  # (fn, loop, future): model work besides decoding
        self.cv = threading.Condition()
        self.stopping = False
        self.finished = self.cancelled = 0  # sequences completed, and dropped because their client left
        self.steps = self.tokens = 0  # batched forwards, and the sequences they advanced (tokens/steps = batch)
        self.thread = threading.Thread(target=self._run, name="tinygpt-generate", daemon=True)

    # --- called from the event loop -----------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def submit(self, seqs: list[Sequence]) -> None:
        with self.cv:
            if len(self.waiting) + len(seqs) > self.max_waiting:
                raise Busy(f"{len(self.waiting)} sequences are already waiting")
            self.waiting.extend(seqs)
            self.cv.notify()

    def call(self, fn, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Run `fn()` (scoring a prompt) on the worker thread, between decoding steps: the model
        is only ever used from one thread. The future gets its result or its exception."""
        future = loop.create_future()
        with self.cv:
            self.jobs.append((fn, loop, future))
            self.cv.notify()
        return future

    def cancel(self, seqs: list[Sequence]) -> None:
        """The client is gone: its sequences stop at the next step and free their slots."""
        for s in seqs:
            s.cancelled = True

    def load(self) -> dict:
        return {"active": len(self.active), "waiting": len(self.waiting), "slots": self.max_batch,
                "finished": self.finished, "cancelled": self.cancelled, "steps": self.steps, "tokens": self.tokens}

    # --- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            while True:
                with self.cv:
                    while not self.stopping and not self.waiting and not self.active and not self.jobs:
                        self.cv.wait()
                    if self.stopping:
                        return
                    jobs = list(self.jobs)
                    self.jobs.clear()
                    admitted = []
                    while self.waiting and self.free_slots:
                        seq = self.waiting.popleft()
                        if seq.cancelled:
                            self.cancelled += 1
                        else:
                            admitted.append((self.free_slots.pop(), seq))
                for fn, loop, future in jobs:
                    _run_job(fn, loop, future)
                for slot, seq in admitted:  # in `active` before prefill, so a failure reaches them too
                    generator = torch.Generator(device=self.device).manual_seed(seq.seed)
                    self.active[slot] = _Active(seq, TextStream(self.decode, seq.stop), generator, None)
                try:
                    for slot, seq in admitted:
                        self.active[slot].logits = self.engine.start(slot, seq.ids, seq.window)
                    self._step()
                except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                    if is_out_of_memory(e):
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
                        n = len(self.active)
                        self._fail_all(f"the server ran out of memory on {self.device} generating {n} sequence(s); "
                                       "retry, or ask for fewer tokens or choices", status=503)
                        continue
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all("generation failed on the server; see its log")

    def _step(self) -> None:
        """Sample one token for every active sequence, then advance them all in one forward."""
        tokens, outbox = {}, []
        for slot, a in list(self.active.items()):
            seq = a.seq
            if seq.cancelled:
                self.cancelled += 1
                self._release(slot)
                continue
            token = int(sample_next_token(a.logits[None], a.generator, seq.temperature, seq.top_k, seq.top_p))
            a.generated += 1
            if seq.logprobs is not None:  # the distribution the token was drawn from, before temperature
                a.entries.append((token, *logprobs_of_next(a.logits, token, seq.logprobs)))
            text, stopped = a.text.push(token)
            finish = "stop" if stopped else "length" if a.generated >= seq.max_tokens else None
            if finish == "length":
                text += a.text.flush()
            if text or finish or a.entries:
                entries, a.entries = (a.entries if seq.logprobs is not None else None), []
                outbox.append((seq, Event(seq.index, text, finish, a.generated if finish else 0, logprobs=entries)))
            if finish:
                self.finished += 1
                self._release(slot)
            else:
                tokens[slot] = token
        post(outbox)  # before the forward, so clients have this token while the next is computed
        if tokens:
            self.steps += 1
            self.tokens += len(tokens)
            for slot, logits in self.engine.step(tokens).items():
                self.active[slot].logits = logits

    def _release(self, slot: int) -> None:
        del self.active[slot]
        self.engine.free(slot)
        with self.cv:
            self.free_slots.append(slot)

    def _fail_all(self, message: str, status: int = 500) -> None:
        post([(a.seq, Event(a.seq.index, error=message, status=status)) for a in self.active.values()])
        for slot in list(self.active):
            try:
                self._release(slot)
            except Exception:  # the engine itself is broken; the slot is still ours to reuse
                self.active.pop(slot, None)
                self.free_slots.append(slot)


def _run_job(fn, loop, future) -> None:
    """Run one job and hand its outcome to the event loop (an exception too: the handler answers it)."""
    try:
        result, error = fn(), None
    except Exception as e:  # noqa: BLE001 - the request's handler decides what the client sees
        result, error = None, e
    loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
