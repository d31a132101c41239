"""The decode engine: generation with a preallocated, fixed-shape key/value cache.

Generating token t+1 needs the keys and values of tokens 0..t in every layer. Recomputing them
each step (the lecture's `generate`) costs a forward pass over the whole context per token; the
cache keeps them, so each step runs the model on one new position.

    engine = DecodeEngine(model, max_batch=4)
    logits = engine.start(slot, prompt_ids)       # prefill one slot: next-token logits (vocab,)
    logits = engine.step({slot: token, ...})      # one batched forward for every given slot

A *slot* is one sequence: its row of the cache. Slots are independent (a server runs different
requests in them, each at its own length), so a batched step attends through a mask: query b
sees keys 0..pos[b]. The cache is allocated once, (slots, heads, block_size, head_size) per layer
in the inference dtype, and never grows or is concatenated to.

Past `block_size` a slot follows its *window* rule:

- "full" (the default, the lecture's): the model sees the last `block_size` tokens, so every
  position shifts by one and the cache is refilled from those tokens for every new token: a
  forward over the whole block, exactly what the uncached path computes (tests check the text is
  identical, token for token). Its cost per token is the forward's FLOPs, ~2 x params x block.
- "chunked": when the window is full, keep its last half (`chunk_keep`), refill the cache from
  those tokens once, and go on with cached steps until it is full again. The model sees between
  block/2 and block tokens of context, never fewer: the refill costs half a block's forward per
  block/2 tokens, so a token costs about one cached step. The text differs from "full"'s past the
  block; what that costs in loss is measured in docs/performance.md.

On CPU a one-token step is matrix-vector products that stream every weight from memory once.
For the layers that widen or keep the width (q/k/v, the projections, the MLP's first layer)
nn.Linear's (out, in) layout ran at ~8 GB/s here, half the speed of the same product on an
(in, out) copy, so the engine keeps transposed float32 copies of those weights and the decode
steps use them (`StreamedLinears`; the MLP's narrowing layer was faster as it is). The copies
cost memory (~0.6x the weights) and are taken when the engine is made: build a new engine after
changing the weights.

On CUDA every decoding step has the same shapes (all slots, the whole block, masked), so the step
is captured once as a CUDA graph and replayed: one launch instead of ~150 small kernels per token,
and no attention backend that re-plans for every new length.
"""

import functools

import torch
from torch import nn

WINDOWS = ("full", "chunked")


def check_window(window: str) -> str:
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}")
    return window


def chunk_keep(block_size: int) -> int:
    """Tokens the chunked window keeps when it is full: the last half of the block."""
    return max(1, block_size // 2)


def slide(context: list[int], token: int, block_size: int, window: str) -> list[int]:
    """The context after `token`: the last `block_size` tokens ("full"); or, once that would
    exceed the block, only the last `chunk_keep` ("chunked")."""
    context = context + [token]
    if len(context) <= block_size:
        return context
    return context[-(block_size if window == "full" else chunk_keep(block_size)):]


class KVCache:
    """Keys and values per layer, (slots, n_head, block_size, head_size), plus the plan of the
    forward pass in flight: which rows, at which positions, and how attention is masked.

    The model calls only `positions` and `update`; the engine sets the plan with `prefill` or
    `decode` before each forward.
    """

    def __init__(self, n_layer: int, slots: int, n_head: int, block_size: int, head_size: int,
                 device, dtype):
        shape = (slots, n_head, block_size, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.block_size = block_size
        self.positions: torch.Tensor | None = None  # (T,) or (B, 1): positions of this forward's tokens
        self.previous: torch.Tensor | None = None  # decode: (B, 1) the token before each row's new one
        self._rows = slice(None)
        self._write: torch.Tensor | int | None = None  # decode: (B, nh, 1, hs) scatter index, or one position
        self._mask: torch.Tensor | None = None  # decode: (B, 1, 1, Tk)
        self._t_k = 0

    def prefill(self, rows: slice | torch.Tensor, length: int, device) -> None:
        """The next forward fills positions 0..length-1 of `rows` (a slice, or slot indices), the
        tokens causal among themselves."""
        self._rows, self._write, self._mask, self.previous = rows, None, None, None
        self.positions = torch.arange(length, device=device)

    def decode_uniform(self, rows: slice, pos: int, device, previous: torch.Tensor | None = None) -> None:
        """The next forward adds one token per row, every row at position `pos`: a slice write
        and no mask (the cheap path of plain batched sampling). `previous` (B,): the token
        before each row's new one (-1: none), for a model with a bigram input."""
        self._rows, self._write, self._mask, self._t_k = rows, pos, None, pos + 1
        self.previous = None if previous is None else previous[:, None]
        self.positions = torch.tensor([pos], device=device)

    def decode(self, rows: slice, positions: torch.Tensor, t_k: int, previous: torch.Tensor | None = None) -> None:
        """The next forward adds one token per row at `positions` (B,); each row attends to its
        own keys 0..position, within the first `t_k` of the block. `previous`: as decode_uniform."""
        self._rows, self._t_k = rows, t_k
        self.previous = None if previous is None else previous[:, None]
        self.positions = positions[:, None]  # (B, 1)
        n_head, head_size = self.k[0].shape[1], self.k[0].shape[3]
        self._write = positions.view(-1, 1, 1, 1).expand(-1, n_head, 1, head_size)
        keys = torch.arange(t_k, device=positions.device)
        self._mask = (keys[None, :] <= positions[:, None]).view(-1, 1, 1, t_k)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this forward's k, v (B, nh, T, hs); return the keys, values and mask to attend with."""
        if self._write is None:  # prefill: the new tokens are the whole context
            T = k.shape[2]
            dtype = self.k[layer].dtype  # a bf16 prefill into a float32 cache (DecodeEngine's prefill_dtype)
            self.k[layer][self._rows, :, :T] = k.to(dtype)  # in place, for a slice or for slot indices
            self.v[layer][self._rows, :, :T] = v.to(dtype)
            return k, v, None
        ck, cv = self.k[layer][self._rows], self.v[layer][self._rows]  # views of the slots' rows
        if isinstance(self._write, int):  # every row at the same position
            ck[:, :, self._write : self._write + 1] = k
            cv[:, :, self._write : self._write + 1] = v
            return ck[:, :, : self._t_k], cv[:, :, : self._t_k], None
        ck.scatter_(2, self._write, k)
        cv.scatter_(2, self._write, v)
        return ck[:, :, : self._t_k], cv[:, :, : self._t_k], self._mask


def _vector_linear(weight_t: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's output from a transposed (in, out) weight: x (..., in) -> (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ weight_t if bias is None else torch.addmm(bias, x2, weight_t)
    return y.view(*x.shape[:-1], weight_t.shape[1])


class StreamedLinears:
    """While entered, every nn.Linear of `model` with out_features >= in_features computes from a
    transposed copy of its weight (CPU, float32: measured 2-3x faster one token at a time; for a
    narrowing layer the (out, in) layout was faster)."""

    def __init__(self, model: nn.Module):
        self.layers = [(m, m.weight.detach().t().contiguous(), m.bias) for m in model.modules()
                       if isinstance(m, nn.Linear) and m.out_features >= m.in_features]

    def __enter__(self):
        for m, weight_t, bias in self.layers:
            m.forward = functools.partial(_vector_linear, weight_t, bias)  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc):
        for m, _, _ in self.layers:
            del m.forward


class DecodeEngine:
    """Batched generation over `max_batch` independent slots (see the module docstring).

    Models without a cache (the bigram) run uncached: each step is a forward over the slot's
    last `block_size` tokens, which for the bigram is its last token anyway.
    """

    def __init__(self, model, max_batch: int, static: bool | None = None, window: str = "full",
                 prefill_dtype: torch.dtype | None = None):
        self.model = model
        self.window = check_window(window)  # the rule of slots started without their own
        # Prompts and full-window refills are GEMMs over up to block_size tokens: on a CPU whose
        # bf16 matmul is faster, they may run in bf16 while the one-token steps stay in float32.
        self.prefill_dtype = prefill_dtype
        self.block_size = model.config.block_size
        self.max_batch = max_batch
        self.cache: KVCache | None = model.make_cache(max_batch)
        self.device = next(model.parameters()).device
        self.context: list[list[int]] = [[] for _ in range(max_batch)]  # ids each slot holds
        self.windows = [window] * max_batch  # each slot's rule past block_size
        # On CUDA: every step over all slots and the whole block, so shapes never change (and the
        # step is a CUDA graph). `static=True` elsewhere runs the same shapes eagerly (tests).
        cuda = self.device.type == "cuda"
        self.static = self.cache is not None and (cuda if static is None else static)
        self.graphs = self.static and cuda
        self.bigram = getattr(model.config, "bigram_embed", False)  # a decode step needs each row's previous token
        self._graph = None
        cpu_fp32 = self.device.type == "cpu" and self.cache is not None and self.cache.k[0].dtype == torch.float32
        self.streamed = StreamedLinears(model) if cpu_fp32 else None  # decode steps only (see the docstring)

    # --- the interface -----------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, slot: int, ids: list[int], window: str | None = None) -> torch.Tensor:
        """Put a prompt in `slot` (cropped to its last `block_size` tokens), to continue under
        `window`'s rule (default: the engine's); next-token logits."""
        if not ids:
            raise ValueError("a prompt needs at least one token")
        self.windows[slot] = self.window if window is None else check_window(window)
        self.context[slot] = list(ids[-self.block_size :])
        return self._prefill(slice(slot, slot + 1), torch.tensor([self.context[slot]], device=self.device))[0]

    @torch.inference_mode()
    def start_batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Put the rows of `idx` (B, T) in slots 0..B-1 in one forward; logits (B, vocab)."""
        idx = idx[:, -self.block_size :]
        for b, row in enumerate(idx.tolist()):
            self.context[b], self.windows[b] = row, self.window
        return self._prefill(slice(0, idx.shape[0]), idx.to(self.device))

    @torch.inference_mode()
    def step(self, tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        """Append one token to each given slot; return each slot's next-token logits (vocab,)."""
        full = [s for s in tokens if len(self.context[s]) == self.block_size]
        for s, t in tokens.items():
            self.context[s] = slide(self.context[s], t, self.block_size, self.windows[s])
        out = {}
        stepping = [s for s in tokens if s not in full]
        if stepping:
            logits = self._decode(stepping, tokens)
            out.update({s: logits[s] for s in stepping})
        # The context slid past block_size: refill those slots, together where their lengths agree
        # (a full window's whole block; a chunked one's kept half).
        for length in sorted({len(self.context[s]) for s in full}):
            refill = [s for s in full if len(self.context[s]) == length]
            rows = torch.tensor(refill, device=self.device)
            logits = self._prefill(rows, torch.tensor([self.context[s] for s in refill], device=self.device))
            out.update(zip(refill, logits))
        return out

    def step_batch(self, tokens: torch.Tensor) -> torch.Tensor:
        """`step` for slots 0..B-1 with tokens (B, 1) or (B,); logits (B, vocab)."""
        ids = tokens.view(-1).tolist()
        out = self.step(dict(enumerate(ids)))
        return torch.stack([out[s] for s in range(len(ids))])

    def free(self, slot: int) -> None:
        self.context[slot] = []

    # --- the forward passes --------------------------------------------------------------------

    def _prefill(self, rows: slice | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Forward `idx` (n, T) into the n slots `rows` from position 0; last logits (n, vocab)."""
        if self.cache is None:
            return self.model(idx)[0][:, -1].float()
        self.cache.prefill(rows, idx.shape[1], self.device)
        if self.prefill_dtype is None:
            return self.model(idx, cache=self.cache)[0][:, -1].float()
        with torch.autocast(self.device.type, dtype=self.prefill_dtype):
            return self.model(idx, cache=self.cache)[0][:, -1].float()

    def _decode(self, slots: list[int], tokens: dict[int, int]) -> torch.Tensor:
        """One batched forward of one token per slot; logits indexed by slot (rows 0..end-1)."""
        if self.cache is None:  # uncached: each slot's whole (cropped) context
            rows = {s: self.model(torch.tensor([self.context[s]], device=self.device))[0][0, -1] for s in slots}
            return {s: r.float() for s, r in rows.items()}
        end = self.max_batch if self.static else max(slots) + 1
        # Slots in range that do not step get a dummy token at their next free position (or the
        # last one of a full slot, which is refilled right after): nothing they hold is touched.
        ids = [tokens.get(s, 0) for s in range(end)]
        pos = [min(len(self.context[s]) - (s in tokens), self.block_size - 1) for s in range(end)]
        # A bigram input needs the token before each new one (the context already ends with the
        # new one); -1: none.
        prev = [self.context[s][-2] if s in tokens and len(self.context[s]) > 1 else -1
                for s in range(end)] if self.bigram else None
        if self.graphs:
            return self._graph_step(ids, pos, prev)

        def tensor(values: list[int] | None) -> torch.Tensor | None:
            return None if values is None else torch.tensor(values, device=self.device)

        if self.static:
            return self._decode_forward(tensor(ids), tensor(pos), self.block_size, tensor(prev))
        if len(slots) == end and len(set(pos)) == 1:  # slots 0..end-1 all step, at one position
            self.cache.decode_uniform(slice(0, end), pos[0], self.device, tensor(prev))
            return self._one_token(tensor(ids))
        t_k = max(pos[s] for s in slots) + 1
        return self._decode_forward(tensor(ids), tensor(pos), t_k, tensor(prev))

    def _decode_forward(self, ids: torch.Tensor, pos: torch.Tensor, t_k: int,
                        prev: torch.Tensor | None) -> torch.Tensor:
        self.cache.decode(slice(0, len(ids)), pos, t_k, prev)
        return self._one_token(ids)

    def _one_token(self, ids: torch.Tensor) -> torch.Tensor:
        """The model on one token per row, as the cache's plan says; logits (rows, vocab)."""
        if self.streamed is None:
            return self.model(ids[:, None], cache=self.cache)[0][:, -1].float()
        with self.streamed:
            return self.model(ids[:, None], cache=self.cache)[0][:, -1].float()

    def _graph_step(self, ids: list[int], pos: list[int], prev: list[int] | None) -> torch.Tensor:
        """The CUDA decoding step: captured once as a graph over static inputs, then replayed."""
        if self._graph is None:
            self._ids = torch.tensor(ids, device=self.device)
            self._pos = torch.tensor(pos, device=self.device)
            self._prev = None if prev is None else torch.tensor(prev, device=self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (allocations, autotuning)
                for _ in range(2):
                    self._decode_forward(self._ids, self._pos, self.block_size, self._prev)
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._logits = self._decode_forward(self._ids, self._pos, self.block_size, self._prev)
        self._ids.copy_(torch.tensor(ids), non_blocking=True)
        self._pos.copy_(torch.tensor(pos), non_blocking=True)
        if prev is not None:
            self._prev.copy_(torch.tensor(prev), non_blocking=True)
        self._graph.replay()
        return self._logits
