"""What the model believes about a text: each token's log-probability given the tokens before it.

    lp = token_logprobs(model, ids, top=5)
    lp.chosen[i]   # log p(ids[i] | ids[:i]), None for i = 0 (nothing predicts the first token)
    lp.top[i]      # the `top` most likely tokens at position i, {id: log p}, (empty for i = 0)

The numbers are the model's own: the float32 log-softmax of the logits `tinygpt eval` scores,
with the lecture's context rule. Within the first `block_size` tokens one forward pass scores
them all; past it each token is predicted from the `block_size` tokens just before it (the
window `generate` slides), so a text of T > block_size tokens costs T - block_size more windows of
block_size tokens, batched. The server's `logprobs`/`echo`, `/v1/inspect` and
`tinygpt sample --show-probs` all read them from here.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class TokenLogprobs:
    ids: list[int]
    chosen: list[float | None]
    top: list[dict[int, float]] = field(default_factory=list)


@torch.no_grad()
def token_logprobs(model, ids: list[int], top: int = 0, batch_size: int = 32) -> TokenLogprobs:
    """Every token's log-probability under `model` given what comes before it (see the module)."""
    block = model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []  # log-probs predicting ids[1], ids[2], ...
    head = torch.tensor([ids[:block]], device=device)
    rows.append(_log_softmax(model, head)[0, : len(ids[:block]) - 1])
    later = range(block, len(ids))  # ids[i] predicted from ids[i - block : i]
    for start in range(0, len(later), batch_size):
        ends = later[start : start + batch_size]
        windows = torch.tensor([ids[i - block : i] for i in ends], device=device)
        rows.append(_log_softmax(model, windows)[:, -1])
    model.train(was_training)
    lp = torch.cat(rows) if rows else torch.empty(0)
    target = torch.tensor(ids[1:], device=lp.device)
    chosen = [None] + lp.gather(1, target[:, None])[:, 0].tolist() if len(ids) > 1 else [None]
    out = TokenLogprobs(list(ids), chosen)
    if top:
        k = min(top, lp.shape[-1])
        values, indices = lp.topk(k, dim=-1)
        out.top = [{}] + [dict(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return out


def _log_softmax(model, idx: torch.Tensor) -> torch.Tensor:
    logits, _ = model(idx)
    return F.log_softmax(logits.float(), dim=-1)


def logprobs_of_next(logits: torch.Tensor, token: int, top: int) -> tuple[float, dict[int, float]]:
    """The log-probability of `token` under next-token `logits` (vocab,), and the `top` most likely."""
    lp = F.log_softmax(logits.float(), dim=-1)
    if not top:
        return float(lp[token]), {}
    values, indices = lp.topk(min(top, lp.shape[-1]))
    return float(lp[token]), dict(zip(indices.tolist(), values.tolist()))


@torch.no_grad()
def inspect(model, ids: list[int], top: int = 5, attention: bool = True) -> dict:
    """What the model does with a text of at most `block_size` tokens, from one forward pass:
    each position's log-probability of the token that follows and its `top` alternatives
    (`logprobs[i]`, `top[i]` predict ids[i + 1]; the last predicts what would come next), and
    with `attention` every layer's and head's attention probabilities, as the forward computed
    them: `attention[layer][head][i]` is query i's weights over keys 0..i."""
    from tinygpt.kernels import recording_attention

    if len(ids) > model.config.block_size:
        raise ValueError(f"{len(ids)} tokens exceed block_size {model.config.block_size}")
    blocks = getattr(model, "blocks", [])
    kernels = [b.attn.kernel for b in blocks]
    was_training = model.training
    model.eval()
    try:
        if attention and blocks:  # the kernels that expose their probabilities (sdpa does not)
            model.set_attention("manual")
        with recording_attention() as records:
            logits, _ = model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        for b, k in zip(blocks, kernels):
            b.attn.kernel = k
        model.train(was_training)
    lp = F.log_softmax(logits[0].float(), dim=-1)  # (T, vocab)
    values, indices = lp.topk(min(top, lp.shape[-1]), dim=-1)
    nxt = torch.tensor(ids[1:], device=lp.device)
    following = lp[:-1].gather(1, nxt[:, None])[:, 0].tolist() + [None]
    out = {"ids": list(ids), "logprobs": following, "top": [list(zip(i, v)) for i, v in
                                                            zip(indices.tolist(), values.tolist())]}
    if attention:
        out["attention"] = [[[row[: q + 1] for q, row in enumerate(head)] for head in layer[0].float().tolist()]
                            for layer in records]
    return out
