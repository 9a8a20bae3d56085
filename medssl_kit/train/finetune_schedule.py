"""Fine-tuning rates: parameter groups, the poly / warm-up schedule, nonlinear mode's ramp."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LinearLR, LRScheduler, PolynomialLR, SequentialLR

from medssl_kit.models.base import NORM_TYPES
from medssl_kit.train.finetune_config import FinetuneConfig
from medssl_kit.train.finetune_models import model_backbone
from medssl_kit.train.transfer import KeyReport


def frozen_trunk(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """nonlinear mode: the parameters frozen before :func:`unfreeze_step` and ramped after it —
    every backbone parameter except the head's and the normalisation layers'. As Lightning's
    ``BackboneFinetuning`` (``train_bn=True``), which the hierarchical paper's code uses, the
    normalisation layers train from the first step in training mode (batch statistics), so that
    unfreezing changes no activation; putting them in eval mode while frozen made the features
    jump at the unfreezing step (a 3D fpn's loss 0.47 → 2.24)."""
    norm = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, NORM_TYPES)
        for name, _ in module.named_parameters(recurse=False)
    }
    return [
        (n, p) for n, p in model.named_parameters() if not n.startswith("head.") and n not in norm
    ]


def _param_groups(
    model: nn.Module, key_report: KeyReport | None, cfg: FinetuneConfig
) -> list[dict[str, Any]]:
    """Trainable parameters at the base rate, then those loaded from the init run at
    ``cfg.pretrained_lr_scale`` × the base rate."""
    if cfg.mode == "nonlinear":  # head and norms, then the trunk (its own rate, _lr_schedule)
        trunk = {id(p) for _, p in frozen_trunk(model)}
        every = list(model.parameters())
        return [
            {"params": [p for p in every if id(p) not in trunk]},
            {"params": [p for p in every if id(p) in trunk]},
        ]
    loaded_names = set(key_report.matched) if key_report else set()
    loaded = {id(p) for name, p in model_backbone(model).named_parameters() if name in loaded_names}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.pretrained_lr_scale in (0, 1):  # 0: build_model froze the loaded weights
        return [{"params": trainable}]
    groups = [
        {"params": [p for p in trainable if id(p) not in loaded]},
        {
            "params": [p for p in trainable if id(p) in loaded],
            "lr": cfg.lr * cfg.pretrained_lr_scale,
        },
    ]
    return [g for g in groups if g["params"]]


def _lr_schedule(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig) -> LRScheduler:
    """nnU-Net's poly decay (power 0.9) to zero at ``cfg.steps``, after ``cfg.warmup_steps`` of
    linear warm-up (rate × (step + 1) / warmup_steps), when there are any."""
    if cfg.mode == "nonlinear":
        head, backbone = nonlinear_schedule(cfg)
        return LambdaLR(optimizer, [head, backbone])
    decay = PolynomialLR(optimizer, total_iters=cfg.steps - cfg.warmup_steps, power=0.9)
    if not cfg.warmup_steps:
        return decay
    warmup = LinearLR(
        optimizer, start_factor=1 / cfg.warmup_steps, total_iters=cfg.warmup_steps - 1
    )
    return SequentialLR(optimizer, [warmup, decay], milestones=[cfg.warmup_steps])


def unfreeze_step(cfg: FinetuneConfig) -> int:
    """nonlinear mode: the first step (counting from 0) at which the backbone trains."""
    return round(cfg.unfreeze_at * cfg.steps)


def nonlinear_schedule(
    cfg: FinetuneConfig,
) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """nonlinear mode's rate factors of the head (and the backbone's normalisation layers) and
    of the rest of the backbone (:func:`frozen_trunk`) at step ``s`` (from 0).

    Head: nnU-Net's poly decay ``(1 − s/S)^0.9``, as every mode. Backbone: 0 before
    :func:`unfreeze_step` ``U``; then ``ramp_from^(1 − (s − U)/R)`` — exponential from
    ``ramp_from`` to 1 over ``R = max(1, round(ramp_fraction · S))`` steps — times the poly
    decay (the hierarchical paper raises the backbone's rate exponentially after 15K of 45K
    frozen steps over 1.2K steps).
    """
    start, ramp = unfreeze_step(cfg), max(1, round(cfg.ramp_fraction * cfg.steps))

    def poly(s: int) -> float:
        return (1.0 - min(s, cfg.steps) / cfg.steps) ** 0.9

    def backbone(s: int) -> float:
        if s < start:
            return 0.0
        return cfg.ramp_from ** max(0.0, 1.0 - (s - start) / ramp) * poly(s)

    return poly, backbone
