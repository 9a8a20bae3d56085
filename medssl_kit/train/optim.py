"""Optimizers and learning-rate schedules for pre-training (DESIGN §5.1).

SGD, Adam and AdamW come from torch; LARS (You et al., 2017), which the pixel-global paper uses,
is not in torch and is written here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

OPTIMIZERS = ("sgd", "adam", "adamw", "lars")


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling on SGD with momentum (You et al., 2017).

    For a parameter ``w`` with gradient ``g`` (weight decay β, trust coefficient η):

        g ← g + β w,    λ = η ‖w‖ / ‖g‖  (1 when either norm is 0),
        v ← m v + λ g,  w ← w − lr · v.

    As in BYOL/DINO practice, 1-D parameters (biases, normalisation weights) get neither weight
    decay nor adaptation (``λ = 1``).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's Optimizer.step
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> Optimizer:
    """``name`` in :data:`OPTIMIZERS`; ``momentum`` applies to SGD and LARS."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; choose one of {OPTIMIZERS}")


def warmup_cosine(step: int, total: int, warmup: int, final: float = 0.0) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 to ``final``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: Optimizer, schedule: str, total: int, warmup: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """``"cosine"`` (with warm-up), ``"poly"`` (power 0.9) or ``"constant"`` (with warm-up)."""
    if schedule == "cosine":
        fn = lambda s: warmup_cosine(s, total, warmup)  # noqa: E731
    elif schedule == "poly":
        fn = lambda s: (1.0 - min(s, total) / total) ** 0.9  # noqa: E731
    elif schedule == "constant":
        fn = lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0  # noqa: E731
    else:
        raise ValueError(f"unknown schedule '{schedule}'; choose cosine, poly or constant")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
