"""Choosing the next token, and the generation loop that streams tokens one at a time."""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tinygpt.config import check_sampling
from tinygpt.engine import DecodeEngine, slide
from tinygpt.runtime import autocast


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None = None,
                      temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None) -> torch.Tensor:
    """Pick one token per row from `logits` (B, vocab); returns (B, 1) token ids.

    temperature 0 means argmax. top_k keeps the k largest logits (and any tied with the k-th);
    top_p keeps the smallest set of most likely tokens whose probabilities add up to top_p.
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # Shifted so the largest is 0 before dividing (the softmax is the same for any shift), and the
    # temperature kept within float32's range: 1e-300 then gives 0 and -inf, never inf - inf or 0 / 0.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop_sorted[:, 0] = False  # top_p below float32's smallest (5e-324) would compare as 0
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()  # like no_grad, with less bookkeeping per op: it adds up one token at a time
def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None,
                    use_cache: bool = True, window: str = "full",
                    prefill_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` next tokens, each (B, 1), continuing every row of `idx` (B, T).

    The model sees at most its last `block_size` tokens: with `window="full"` exactly those, as
    in the lecture; with "chunked" a window that, once full, drops to its last half and grows
    again (engine.py). With the cache (the decode engine) the prompt is processed once and each
    new token costs one position for the whole batch; the text is the same as without it.
    `prefill_dtype`: autocast the engine's prompt and refill forwards to it (see engine.py).
    """
    block = model.config.block_size
    if use_cache:
        engine = DecodeEngine(model, idx.shape[0], window=window, prefill_dtype=prefill_dtype)
        logits = engine.start_batch(idx)
    else:
        idx = idx[:, -block:]
        logits = model(idx)[0][:, -1]
    for i in range(max_new_tokens):
        next_id = sample_next_token(logits, generator, temperature, top_k, top_p)  # (B, 1)
        yield next_id
        if i == max_new_tokens - 1:
            break
        if use_cache:
            logits = engine.step_batch(next_id)
        else:  # every row's context follows the same rule, so the rows stay one tensor
            idx = torch.tensor([slide(row, t, block, window) for row, t in zip(idx.tolist(), next_id[:, 0].tolist())],
                               device=idx.device)
            logits = model(idx)[0][:, -1]


def sample_text(model, tokenizer, n_chars: int, seed: int, device: torch.device, dtype: torch.dtype) -> str:
    """`n_chars` characters from token 0 (the lecture's start), sampled with its own generator
    seeded `seed`: the same text for the same weights, and no draw from the global random state
    (a run's batches and dropout go on as if nothing was sampled). The model is put back in the
    mode it was in."""
    was_training = model.training
    model.eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    try:
        with autocast(device, dtype):
            ids = [int(t) for t in generate_stream(model, prompt, n_chars, generator=gen)]
    finally:
        model.train(was_training)
    return tokenizer.decode(ids)[:n_chars]  # BPE tokens spell >= 1 character each
