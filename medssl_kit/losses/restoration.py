"""Restoration loss of Models Genesis (Zhou et al., "Models Genesis", MedIA 2021), a pure function.

Models Genesis corrupts an image ``x`` by a transformation ``f(·)`` (non-linear intensity, local
pixel shuffling, in-painting or out-painting) and trains an encoder–decoder ``g`` to restore it:
``L = ‖g(f(x)) − x‖²``, the mean squared error to the *clean* image (§2 of the paper).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["restoration_mse"]


def restoration_mse(restored: Tensor, clean: Tensor) -> Tensor:
    """``mean((g(f(x)) − x)²)`` over the batch, channels and voxels (Models Genesis' loss).

    ``restored``: the network's output for the corrupted input, ``clean``: the un-corrupted
    image, both ``[B, C, *S]`` of one shape (a mismatch is an error, never a broadcast).
    """
    if restored.shape != clean.shape:
        raise ValueError(
            f"restored {list(restored.shape)} and clean {list(clean.shape)} differ in shape"
        )
    return F.mse_loss(restored, clean)
