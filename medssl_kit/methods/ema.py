"""Exponential moving averages of networks: the teachers / target / key encoders of SSL methods.

Shared by pixel_global (EMA teacher), BYOL (target network) and MoCo v2 (momentum key encoder).
Every EMA here is the same update of parameters,

    θ_target ← m · θ_target + (1 − m) · θ_online,

with a momentum ``m`` that is either constant (MoCo, ``m = 0.999``) or follows BYOL's cosine
schedule from a base value to 1 (:func:`teacher_momentum`). The base is a profile setting
(:attr:`~medssl_kit.config.PretrainSettings.ema_momentum`): the papers' 0.996 at ``gpu``, lower
(0.99) on the CPU profiles, and lower still for a run too short for it (:func:`ema_base`), whose
teacher would otherwise still hold a large share of its random initialisation when the run ends
(:func:`init_share`). Only *parameters* are averaged: a
target network's buffers (batch-norm running statistics) are its own, updated by its own forward
passes (Mean-Teacher / BYOL / MoCo practice).
"""

from __future__ import annotations

import copy
import math
from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def teacher_momentum(k: int, total: int, base: float = 0.996) -> float:
    """EMA momentum after ``k`` of ``total`` steps: ``1 − (1 − base)(cos(π k / K) + 1) / 2``.

    ``base`` at ``k = 0``, rising on a cosine to 1 at ``k = total`` (BYOL's τ schedule, the
    pixel-global paper's λ).
    """
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total) + 1.0) / 2.0


SHORT_RUN_SHARE_EXPONENT = 4.0  # a short run's teacher keeps exp(−4) ≈ 0.018 of its init


def ema_base(steps: int, cap: float) -> float:
    """The base momentum of a run of ``steps``: the profile's ``cap``, or ``1 − 8 / steps`` when
    that is lower, so that the teacher keeps about ``exp(−4)`` ≈ 0.018 of its initialisation at
    the end (:func:`init_share` ≈ ``exp(−(1 − base) · steps / 2)``) however short the run.

    ``cap`` 0.99 gives 0.99 from 800 steps on (1000: a share of 0.007), 0.98 at 400, 0.96 at 200;
    ``cap`` 0.996 (the papers') holds from 2000 steps on.
    """
    return max(0.0, min(cap, 1.0 - 2 * SHORT_RUN_SHARE_EXPONENT / max(steps, 1)))


def init_share(total: int, base: float) -> float:
    """The share of its initial weights an EMA target still holds after ``total`` updates with
    :func:`teacher_momentum` (``∏_k m_k``; the target of a constant online network moves to
    it by ``1 −`` this). About ``exp(−(1 − base) · total / 2)``.
    """
    return math.prod(teacher_momentum(k, total, base) for k in range(total))


def frozen_copy(module: ModuleT) -> ModuleT:
    """A deep copy of ``module`` whose parameters never require gradients (an EMA target)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: ``θ_target ← momentum · θ_target + (1 − momentum) · θ_online`` per parameter.

    ``target`` and ``online`` must have the same parameters in the same order (``target`` built
    by :func:`frozen_copy` of ``online``); buffers are left alone.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}")
    for p_t, p_o in zip(target.parameters(), online.parameters(), strict=True):
        p_t.mul_(momentum).add_(p_o.detach(), alpha=1.0 - momentum)
