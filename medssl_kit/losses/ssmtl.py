"""Losses of self-supervised multi-task learning on slice sequences (SSMTL / SSMTL+), as pure
functions (the method :mod:`medssl_kit.methods.ssmtl`, DESIGN §4.4).

Notation of the paper: ``x^j`` is slice ``j`` of a scan, ``f_θ`` the encoder–decoder backbone,
``g_φ−`` / ``g_φ+`` the two heads that predict slices ``j − t`` and ``j + t`` (eq. 1), ``q`` the
encoder followed by global pooling and ``h`` the MLP predictor of SSMTL+ (eq. 2), ``λ`` the weight
of the similarity term (eq. 3).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from medssl_kit.losses.contrastive import negative_cosine

__all__ = ["pretext_loss", "similarity_loss", "total_loss"]


def pretext_loss(
    pred_prev: Tensor, prev: Tensor, pred_next: Tensor, next_: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The two neighbour-prediction tasks (SSMTL eq. 1)::

        L_pretext = ‖g_φ−(f_θ(x^j)) − x^{j−t}‖ + ‖g_φ+(f_θ(x^j)) − x^{j+t}‖

    with ``‖·‖`` the mean squared error, as the paper specifies ("a standard Euclidean distance
    (i.e. mean squared error)"), averaged over batch, channels and pixels (the paper's sum over
    scans ``Σ_i`` becomes a batch mean, so that the balance with ``λ L_sim`` does not depend on
    the batch size). All four tensors are ``[B, C, H, W]``. Returns ``(L_pretext, L−, L+)``.
    """
    for name, pred, target in (("prev", pred_prev, prev), ("next", pred_next, next_)):
        if pred.shape != target.shape:
            raise ValueError(
                f"{name}: prediction {list(pred.shape)} and target {list(target.shape)} differ"
            )
    minus = F.mse_loss(pred_prev, prev)
    plus = F.mse_loss(pred_next, next_)
    return minus + plus, minus, plus


def similarity_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """SSMTL+'s similarity of a natural positive pair (eq. 2)::

        L_sim = − q(x^k)/‖q(x^k)‖₂ · h(q(x^j))/‖h(q(x^j))‖₂

    ``prediction`` = ``h(q(x^j))`` and ``target`` = ``q(x^k)``, both ``[B, D]``; the target is
    detached (the paper's stop-gradient on the ``x^k`` branch; only ``q(x^j)`` is updated).
    Averaged over the batch; −1 at best. Not symmetrised: eq. 2 has one direction only.
    """
    return negative_cosine(prediction, target)


def total_loss(pretext: Tensor, similarity: Tensor | None, lam: float = 1.0) -> Tensor:
    """``L_self = L_pretext + λ L_sim`` (eq. 3; ``λ = 1`` in the paper); SSMTL (no ``L_sim``,
    ``similarity=None``) optimises ``L_pretext`` alone."""
    return pretext if similarity is None else pretext + lam * similarity
