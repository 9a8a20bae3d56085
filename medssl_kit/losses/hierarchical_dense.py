"""Losses of vox2vec and hierarchical dense SSL (DESIGN §4.5), as pure functions.

Embeddings are the projected, L2-normalised voxel vectors ``z`` of the positive pairs: row ``i``
of ``z1`` and row ``i`` of ``z2`` are the same physical voxel seen in the two crops.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from medssl_kit.losses.contrastive import info_nce


def voxel_info_nce(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """The symmetric voxel-level InfoNCE of vox2vec and the hierarchical paper (eq. 1)::

        ℓ(i) = −log  exp(z1_i·z2_i/τ) / Σ_{v ≠ z1_i} exp(z1_i·v/τ)

    where ``v`` runs over every sampled voxel of both crops and of every pair of the batch (the
    positive ``z2_i`` included, the anchor itself not), averaged over the anchors of both crops
    (``z1_i`` and, symmetrically, ``z2_i``). ``τ`` = 0.1 in both papers. Vectors are
    L2-normalised here (the papers' projector already normalises). Both crops keep their
    gradient (one network for both). Several processes: the negatives are every rank's voxels
    (:func:`~medssl_kit.losses.contrastive.info_nce` gathers them).
    """
    forward = info_nce(z1, z2, None, temperature, in_batch_negatives=True, detach_keys=False)
    backward = info_nce(z2, z1, None, temperature, in_batch_negatives=True, detach_keys=False)
    return 0.5 * (forward + backward)


def reconstruction_loss(restored: Tensor, clean: Tensor) -> Tensor:
    """The restorative term (eq. 2): ``ℓ_MSE = mean (x̂ − x)²`` of the clean crop ``x`` and its
    reconstruction ``x̂`` from the corrupted crop's highest-resolution level."""
    return F.mse_loss(restored, clean)


def hybrid_loss(contrastive: Tensor, mse: Tensor | None, weight: float = 10.0) -> Tensor:
    """The total (eq. 3): ``ℓ = ℓ_InfoNCE + w·ℓ_MSE`` (``w`` = 10, the public code's weight;
    ``mse`` ``None``: the contrastive term alone, vox2vec)."""
    return contrastive if mse is None else contrastive + weight * mse
