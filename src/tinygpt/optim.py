"""The optimizers, written out: AdamW (Loshchilov & Hutter) and Muon (Keller Jordan's), and the
learning-rate schedules.

Why not `torch.optim.AdamW`? Its first use imports `torch._dynamo` (about 2.3 s here), which
was a fifth of the 12 s budget of the `cpu-quick` preset and half of the bigram's 5 s. The update
is torch's, bit for bit (tests check it step by step): written out below with one `foreach` call
per operation over all parameters, and on CPU and CUDA handed to the same fused kernel
`torch.optim.AdamW(fused=True)` calls (4x faster here than the `foreach` version). The state
dict has torch's layout, holds tensors and numbers only, and loads with
`torch.load(weights_only=True)`.

Muon (`--optimizer muon`) takes the blocks' weight matrices: their update is the momentum of the
gradient made (nearly) orthogonal by five Newton-Schulz iterations, so every direction of the
matrix moves by about the same amount. Embeddings, the head, norms and biases stay with AdamW, as
in the speedrun records. `torch.optim.Muon` runs the iteration in bfloat16, which is emulated,
and ~10x slower than float32, on CPUs without native bf16; here the iteration's dtype is the
run's choice (bfloat16 where the run computes in it, float32 otherwise). The update is
`torch.optim.Muon`'s otherwise, to rounding (a test compares them).
"""

import math
from contextlib import contextmanager

import torch

from tinygpt.errors import UserError

# Where torch's fused AdamW kernel exists; elsewhere (MPS) the foreach ops below do the same update.
FUSED_DEVICES = ("cpu", "cuda")


class _Optimizer:
    """What AdamW and Muon share: parameter groups, per-parameter state, and a state dict in
    torch's layout (tensors and numbers only). `STATE` names each parameter's state tensors; a
    "step" among them is a counter, the rest have the parameter's shape."""

    STATE: tuple[str, ...] = ()

    def __init__(self, param_groups, defaults: dict):
        if isinstance(param_groups, torch.Tensor) or not isinstance(next(iter(param_groups), None), dict):
            param_groups = [{"params": list(param_groups)}]
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in param_groups]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _index(self) -> dict:
        ids, n = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                ids[p] = n
                n += 1
        return ids

    def state_dict(self) -> dict:
        ids = self._index()
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                  | {"params": [ids[p] for p in g["params"]]} for g in self.param_groups]
        return {"state": {ids[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)
        ):
            raise ValueError("optimizer state does not match the model's parameter groups")
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = {}
        for idx, s in state_dict["state"].items():
            p = params[int(idx)]
            if set(s) != set(self.STATE):
                raise ValueError(f"optimizer state for parameter {idx} holds {sorted(s)}, not {sorted(self.STATE)} "
                                 f"(a checkpoint of another optimizer?)")
            for k in self.STATE:
                if k != "step" and s[k].shape != p.shape:
                    raise ValueError(f"optimizer state for parameter {idx} has shape {tuple(s[k].shape)}, "
                                     f"the model's is {tuple(p.shape)}")
            self.state[p] = {k: s[k].float().to(p.device) if k == "step" else s[k].to(p) for k in self.STATE}
        for mine, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = tuple(v) if isinstance(mine.get(k), tuple) else v


class AdamW(_Optimizer):
    STATE = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, param_groups, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool | None = None):
        super().__init__(param_groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.fused = hasattr(torch, "_fused_adamw_") if fused is None else fused

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p not in self.state:
                    self.state[p] = {"step": torch.tensor(0.0, device=p.device), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            m = [s["exp_avg"] for s in states]
            v = [s["exp_avg_sq"] for s in states]
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            if self.fused and params[0].device.type in FUSED_DEVICES:
                torch._fused_adamw_(params, grads, m, v, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                    weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
                continue
            step = float(steps[0])  # a group's parameters always step together
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay
            torch._foreach_lerp_(m, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)  # v = beta2 v + (1 - beta2) g^2
            bias1 = 1 - beta1**step
            bias2_sqrt = (1 - beta2**step) ** 0.5
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bias2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, -lr / bias1)  # p -= lr m_hat / (sqrt(v_hat) + eps)


# Newton-Schulz: the quintic whose coefficients push small singular values up fastest (Keller
# Jordan's; torch.optim.Muon's too). Five steps leave them in about [0.7, 1.2], which is enough.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.float32, steps: int = NS_STEPS,
                  eps: float = 1e-7) -> torch.Tensor:
    """`g` with its singular values pushed towards 1 (U S V^T -> ~U V^T), computed in `dtype`.
    `g` is a matrix, or a stack (n, rows, cols) of same-shape matrices done together."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix x x^T is the smaller one
        x = x.mT
    # Frobenius norm >= spectral norm: every singular value <= 1
    norm = x.norm() if x.dim() == 2 else x.norm(dim=(-2, -1), keepdim=True)
    x = x / norm.clamp(min=eps)
    mm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        poly = mm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = mm(x, poly, x, beta=a)  # a x + (b A + c A^2) x
    return x.mT if tall else x


def orthogonalize_all(gs: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """`orthogonalize` of each matrix, those of one shape (once turned wide) stacked into one call:
    on a CPU a small model's iteration is mostly per-call overhead (cpu-quick's 8 matrices: 5.5 ms
    a step in bf16 one by one, 3.0 ms in 3 stacks, `benchmarks/muon_stack.py`). A shape met once
    goes alone, exactly as before."""
    out: list[torch.Tensor | None] = [None] * len(gs)
    by_shape: dict[tuple, list[int]] = {}
    for i, g in enumerate(gs):
        by_shape.setdefault((min(g.shape), max(g.shape)), []).append(i)
    for idx in by_shape.values():
        if len(idx) == 1:
            out[idx[0]] = orthogonalize(gs[idx[0]], dtype)
            continue
        wide = torch.stack([gs[i] if gs[i].size(0) <= gs[i].size(1) else gs[i].T for i in idx])
        for i, x in zip(idx, orthogonalize(wide, dtype)):
            out[i] = x if gs[i].size(0) <= gs[i].size(1) else x.T
    return out


class Muon(_Optimizer):
    """Muon for 2-D weight matrices: Nesterov momentum, orthogonalised, scaled by
    sqrt(max(1, rows / cols)) so tall and wide matrices move alike; decoupled weight decay."""

    STATE = ("momentum_buffer",)

    def __init__(self, param_groups, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype = torch.float32, splits: dict | None = None):
        super().__init__(param_groups, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.ns_dtype = ns_dtype
        # parameter -> k: its rows are k matrices stacked (a fused q/k/v projection), each orthogonalised
        # and scaled on its own (modded-nanogpt's separate Q, K and V); not in the state dict
        self.splits = splits or {}
        for p in (p for g in self.param_groups for p in g["params"]):
            if p.dim() != 2:
                raise ValueError(f"Muon takes matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self) -> None:
        todo = []  # (parameter, its group, the Nesterov look-ahead to orthogonalise)
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {"momentum_buffer": torch.zeros_like(p)})
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # buf = mu buf + (1 - mu) g
                todo.append((p, group, p.grad.lerp(buf, mu)))  # Nesterov: look one step ahead
        pieces = [ahead.chunk(self.splits.get(p, 1)) for p, _, ahead in todo]
        updates = iter(orthogonalize_all([m for ms in pieces for m in ms], self.ns_dtype))
        for (p, group, _), ms in zip(todo, pieces):
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                p.mul_(1 - lr * wd)
            rows, cols = ms[0].shape
            update = torch.cat([next(updates) for _ in ms]) if len(ms) > 1 else next(updates)
            p.add_(update, alpha=-lr * max(1.0, rows / cols) ** 0.5)


class MuonAdamW:
    """Muon for some parameters and AdamW for the rest, stepped as one optimizer (the loss
    scaler and the schedule see all their groups in `param_groups`)."""

    def __init__(self, muon: Muon, adamw: AdamW):
        self.muon, self.adamw = muon, adamw
        self.param_groups = muon.param_groups + adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad()
        self.adamw.zero_grad()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("this optimizer state is not Muon's and AdamW's (a checkpoint of --optimizer adamw?)")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


FUSED_QKV = ".attn.c_attn.weight"  # a block's query, key and value projections, stacked (3C, C)


def make_optimizer(model, cfg, ns_dtype: torch.dtype = torch.float32):
    """The optimizer a `TrainConfig` asks for. AdamW: weight decay only on matrices that multiply
    activations (not biases, norms or embedding tables). Muon: the blocks' weight matrices, at
    `muon_lr` (the schedule scales both by the same factor); AdamW for everything else."""
    muon, decay, no_decay, embeddings = [], [], [], []
    splits = {}  # --muon-split-qkv: the fused projections, each orthogonalised as its three blocks
    apart = cfg.embed_lr_mult != 1.0  # their own group only then: older runs' optimizer state keeps its layout
    for name, p in model.named_parameters():
        is_embedding = "embedding_table" in name
        if cfg.optimizer == "muon" and name.startswith("blocks.") and p.dim() == 2:
            muon.append(p)
            if cfg.muon_split_qkv and name.endswith(FUSED_QKV):
                splits[p] = 3
        elif is_embedding and apart:
            embeddings.append(p)
        else:
            (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if apart:
        groups.append({"params": embeddings, "weight_decay": 0.0, "lr_scale": cfg.embed_lr_mult})
    adamw = AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    if cfg.optimizer == "adamw":
        return adamw
    if not muon:
        raise UserError("--optimizer muon trains the transformer blocks' matrices, and this model has none "
                        "(the bigram): use --optimizer adamw")
    lr_scale = cfg.muon_lr / cfg.learning_rate
    return MuonAdamW(Muon([{"params": muon, "lr_scale": lr_scale}], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                          weight_decay=cfg.weight_decay, ns_dtype=ns_dtype, splits=splits), adamw)


def set_lr(optimizer, lr: float) -> None:
    """Every group at `lr`, times its `lr_scale` (Muon's groups: muon_lr / learning_rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


MUON_MOMENTUM_START = 0.85  # where --muon-momentum-warmup starts (modded-nanogpt's record 9)


def momentum_at(step: int, cfg) -> float:
    """Muon's momentum at `step`: from MUON_MOMENTUM_START to `muon_momentum` over the first
    `muon_momentum_warmup` steps, then `muon_momentum`."""
    if step >= cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    return MUON_MOMENTUM_START + step / cfg.muon_momentum_warmup * (cfg.muon_momentum - MUON_MOMENTUM_START)


def set_momentum(optimizer, momentum: float) -> None:
    """Every Muon group at `momentum` (AdamW's groups have betas, not a momentum)."""
    for group in optimizer.param_groups:
        if "momentum" in group:
            group["momentum"] = momentum


def lr_at(step: int, cfg, horizon: int | None = None) -> float:
    """The learning rate of `step`: linear warm-up, then constant, cosine down to min_lr, or wsd:
    constant until the last `cooldown_frac` of the steps, then linear down to min_lr. The steps
    are `max_iters`, or `horizon` where --max-time allows fewer (`fit_horizon`)."""
    total = cfg.max_iters if horizon is None or horizon >= cfg.max_iters else max(horizon, cfg.warmup_iters + 1)
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if cfg.lr_schedule == "wsd":
        cooldown = max(1, round(cfg.cooldown_frac * total))
        progress = min(1.0, max(0, step - (total - cooldown)) / cooldown)
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    span = max(1, total - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def fit_horizon(cfg, step: int, remaining_s: float, seconds_per_step: float) -> int | None:
    """The steps a --max-time run will reach: this step plus those that fit in the time left at
    the pace measured so far (a 2% margin for the loss reports); None when max_iters fits."""
    reachable = step + int(0.98 * max(0.0, remaining_s) / seconds_per_step)
    return reachable if reachable < cfg.max_iters else None


def clip_grad_norm(model, clip: float) -> float:
    """The gradients' total norm, after clipping it to `clip` where `clip` > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))


class WeightAverage:
    """An exponential moving average of a model's weights (--ema-decay), the run's model when on.

    After optimizer step t, average_t = average_{t-1} + (w_t - average_{t-1}) * (1 - d) / (1 - d^t):
    the bias-corrected EMA, so step 1's average is w_1 and every later one is a d-weighted mean
    of the weights seen so far, never pulled towards the initialisation. It holds the other set
    of weights: the average while the model trains, the training weights while `in_model()` has
    swapped the average in (reports, checkpoints, the final evaluation). Swapping exchanges the
    tensors' storage, no copies, and puts the training weights back in their own storage."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.named = [(name, p) for name, p in model.named_parameters()]
        self.held = [p.detach().clone() for _, p in self.named]  # before step 1: the weights themselves
        self.swapped = False

    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (counted from 1)."""
        assert not self.swapped, "update the average with the training weights in the model"
        weight = (1 - self.decay) / (1 - self.decay ** step)
        with torch.no_grad():
            torch._foreach_lerp_(self.held, [p.detach() for _, p in self.named], weight)

    def swap(self) -> None:
        with torch.no_grad():
            for i, (_, p) in enumerate(self.named):
                p.data, self.held[i] = self.held[i], p.data
        self.swapped = not self.swapped

    @contextmanager
    def in_model(self):
        """A context in which the model holds the average (re-entrant: inside another, nothing changes)."""
        outer = not self.swapped
        if outer:
            self.swap()
        try:
            yield
        finally:
            if outer:
                self.swap()

    def training_weights(self) -> dict:
        """The training weights by name (the model holds the average)."""
        assert self.swapped
        return {name: t for (name, _), t in zip(self.named, self.held)}
