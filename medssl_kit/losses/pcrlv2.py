"""PCRLv2 loss terms (Zhou et al., "A Unified Visual Information Preservation Framework for
Self-supervised Pre-training in Medical Image Analysis", TPAMI 2023), as pure functions.

Notation of the paper: ``F_i`` is the feature map of pyramid level ``i`` of the non-skip UNet,
``f_i^R`` the level's restoration head, ``v_i = BN(GAP(F_i))`` its pooled vector (eq. 5) and
``f_P`` the level's predictor (eq. 6); a superscript ``s`` marks the siamese view. ``x̄1, x̄2`` are
the un-corrupted, spatially augmented global views (the restoration targets), ``g1, g2`` the two
global views and ``l_1 … l_N̂`` the local views of multi-crop / sub-crop.

In the SimSiam notation used here, ``p = f_P(v)`` is a prediction and ``z = v`` its target; a
target is always detached (``sg``, stop-gradient), so no gradient reaches the target branch.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "deep_supervision_weight",
    "local_comparison_loss",
    "negative_cosine",
    "restoration_loss",
    "siamese_comparison_loss",
]


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """``D(p, z) = −cos(p, sg(z))`` averaged over the batch (SimSiam's criterion, eqs. 7–8).

    ``p`` and ``z`` are ``[..., D]``; the cosine is taken over the last axis and averaged over all
    others. ``z`` is detached. Ranges from −1 (same direction) to 1 (opposite).
    """
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def siamese_comparison_loss(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """Siamese feature comparison at one pyramid level (PCRLv2 eq. 9, SimSiam form)::

        C = ½ [ D(f_P(v_i), sg(v_i^s)) + D(f_P(v_i^s), sg(v_i)) ],   D(p, z) = −cos(p, z)

    with ``p1 = f_P(v_i)``, ``z1 = v_i`` (view 1) and ``p2 = f_P(v_i^s)``, ``z2 = v_i^s`` (view 2),
    each ``[B, D]`` (or with more leading axes, averaged). The targets ``z1``, ``z2`` are detached.
    ``C = −1`` when each prediction points exactly along the other view's vector.
    """
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def local_comparison_loss(
    p_global: Tensor,
    z_global: Tensor,
    p_local: Tensor,
    z_local: Tensor,
    reduction: str = "sum",
) -> Tensor:
    """Global–local comparison, the last term of PCRLv2 eq. 10::

        Σ_{m∈{1,2}} Σ_{k=1..N̂} C(l_k, g_m),   C as in eq. 9 (:func:`siamese_comparison_loss`)

    ``p_global``, ``z_global``: ``[M, B, D]`` (M global views, here 2); ``p_local``, ``z_local``:
    ``[K, B, D]`` (K = N̂ local views). Each pair (l_k, g_m) is compared as in eq. 9, both
    targets detached. ``reduction="sum"`` is eq. 10; ``"mean"`` divides by ``M·K``, as the
    public code does. Returns 0 when there are no local views.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    n_global, n_local = p_global.shape[0], p_local.shape[0]
    if n_local == 0:
        return p_global.new_zeros(())
    pg, zg = p_global[:, None], z_global[:, None]  # [M, 1, B, D]
    pl, zl = p_local[None], z_local[None]  # [1, K, B, D]
    # per (m, k): ½[D(p_l, sg z_g) + D(p_g, sg z_l)], each D averaged over the batch
    cos_local = F.cosine_similarity(pl, zg.detach(), dim=-1).mean(-1)  # [M, K]
    cos_global = F.cosine_similarity(pg, zl.detach(), dim=-1).mean(-1)  # [M, K]
    total = -0.5 * (cos_local + cos_global).sum()
    return total / (n_global * n_local) if reduction == "mean" else total


def restoration_loss(
    restored1: Tensor, target1: Tensor, restored2: Tensor, target2: Tensor
) -> Tensor:
    """Multi-scale pixel restoration at one pyramid level (PCRLv2 eq. 4)::

        R = MSE(f_i^R(F_i), x̄1) + MSE(f_i^R(F_i^s), x̄2)

    ``restored1/2``: ``[B, C, *S']`` the restoration head's outputs at the level's resolution;
    ``target1/2``: ``[B, C, *S]`` the un-corrupted, spatially augmented views. A restored map
    whose size differs from its target's is first resized to it (bilinear / trilinear,
    ``align_corners=False``: a stride-``2^j`` feature pixel covers ``2^j`` view pixels).
    """
    return _mse_resized(restored1, target1) + _mse_resized(restored2, target2)


def _mse_resized(restored: Tensor, target: Tensor) -> Tensor:
    if restored.shape[2:] != target.shape[2:]:
        mode = "bilinear" if target.ndim == 4 else "trilinear"
        restored = F.interpolate(restored, size=target.shape[2:], mode=mode, align_corners=False)
    return F.mse_loss(restored, target)


def deep_supervision_weight(step: int, steps: int) -> float:
    """``β = ½ (1 + cos(π · step / steps))``, 1 at the start, 0 at the end.

    The public PCRLv2 code weights its per-level ("deep supervision") restoration term this way,
    per epoch out of 240; here per optimizer step. ``steps <= 0`` (unknown) gives 1.
    """
    if steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), steps) / steps))
