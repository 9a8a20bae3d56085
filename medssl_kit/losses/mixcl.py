"""MixCL's loss terms (Li, Quan & Zhou, "MixCL: Pixel label matters to contrastive learning in
medical image segmentation"), as pure functions; the method is
:class:`medssl_kit.methods.mixcl.MixCL` (DESIGN §4.3).

Notation of the paper: ``Z_1^l`` and ``Z_1'^l`` are the projected layer-``l`` feature maps of two
views of a patch ``P_1``, ``Z_2^l`` that of an auxiliary patch ``P_2`` of the same source; ``M =
B·H·W·D`` counts the pixels of a batch; ``𝒜`` is the label relation matrix of Fig. 2d.

- :func:`identity_consistency_loss` — eqs. 4–5, Barlow Twins with pixels as the batch, summed
  over layers (each layer by ``monai.losses.BarlowTwinsLoss``);
- :func:`boundary_weight_map`, :func:`sample_class_pixels` — eq. 7's pixel sampling;
- :func:`label_relation`, :func:`label_consistency_loss` — eq. 6 on the sampled pixels;
- the reconstruction term (eq. 3) is a plain mean squared error.

Across processes (DDP, :mod:`medssl_kit.distributed`), :func:`label_consistency_loss` takes the
sampled pixels of every rank: each rank's pixels are anchors against all ranks' pixels, and the
ranks' losses average to the loss over all anchors of the global batch (as on one process).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import BarlowTwinsLoss
from monai.transforms.utils import distance_transform_edt
from torch import Tensor

from medssl_kit.distributed import all_gather_rows, all_reduce_sum, world_size

__all__ = [
    "boundary_weight_map",
    "identity_consistency_loss",
    "label_consistency_loss",
    "label_relation",
    "pixel_barlow_twins",
    "sample_class_pixels",
]

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


def pixel_barlow_twins(z1: Tensor, z2: Tensor, lambd: float = 5e-3) -> Tensor:
    """Eqs. 4–5 at one layer: Barlow Twins over the ``M`` pixels of ``z1, z2 [B, C, *S]``::

        ℒ = Σ_i (1 − 𝒞_ii)² + λ Σ_i Σ_{j≠i} 𝒞_ij²,
        𝒞_ij = Σ_M z_{M,i} z'_{M,j} / (‖z_{·,i}‖ ‖z'_{·,j}‖)

    Pixel ``m`` of ``z1`` is paired with pixel ``m`` of ``z2`` (the two views are spatially
    aligned). As in Barlow Twins (whose eq. 2 eq. 5 repeats, on features standardised over the
    batch), every channel is standardised over the pixels first; ``monai.losses.BarlowTwinsLoss``
    computes it on the ``[M, C]`` pixel rows. ``λ`` defaults to Barlow Twins' 5e-3 (MixCL names
    no value).
    """
    if z1.shape != z2.shape:
        raise ValueError(
            f"the two views' maps differ in shape: {list(z1.shape)} vs {list(z2.shape)}"
        )
    rows1 = z1.movedim(1, -1).reshape(-1, z1.shape[1])
    rows2 = z2.movedim(1, -1).reshape(-1, z2.shape[1])
    return BarlowTwinsLoss(lambd=lambd)(rows1, rows2)


def identity_consistency_loss(
    z1: Sequence[Tensor], z2: Sequence[Tensor], lambd: float = 5e-3
) -> Tensor:
    """Eq. 4's sum over layers ``l`` of :func:`pixel_barlow_twins` of ``Z_1^l`` and ``Z_1'^l``."""
    if len(z1) != len(z2) or not z1:
        raise ValueError(f"need the same non-zero number of layers, got {len(z1)} and {len(z2)}")
    return torch.stack([pixel_barlow_twins(a, b, lambd) for a, b in zip(z1, z2, strict=True)]).sum()


def boundary_weight_map(mask: Tensor, mu: float = 8.0, eps: float = 0.05) -> Tensor:
    """Eq. 7's sampling weight of the pixels of one class, 0 outside it::

        W = ½ √D · exp(−D / μ) + ε,   D = distance to the class boundary (pixels inside the class)

    ``mask`` is a boolean ``[*S]`` map of the class; ``D`` is the Euclidean distance, in pixels,
    to the nearest pixel outside the class (1 for a pixel on its edge; the edge of the array is
    not a boundary). ``W`` peaks at ``D = μ / 2`` — near the boundary, inside — and keeps ``ε``
    everywhere in the class.
    """
    inside = mask.detach().cpu().numpy().astype(bool)
    if inside.all():  # no boundary in the patch: every pixel is infinitely far from one
        return torch.full(mask.shape, eps, dtype=torch.float32, device=mask.device)
    dist = np.asarray(distance_transform_edt(inside[None]), dtype=np.float64)[0]
    weight = np.where(inside, 0.5 * np.sqrt(dist) * np.exp(-dist / mu) + eps, 0.0)
    return torch.as_tensor(weight, dtype=torch.float32, device=mask.device)


def sample_class_pixels(
    label: Tensor,
    budget: int,
    generator: torch.Generator,
    mu: float = 8.0,
    eps: float = 0.05,
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Up to ``budget`` pixels of each class of ``label [*S]``, drawn without replacement with
    probability ∝ :func:`boundary_weight_map` (eq. 7's sampling). Returns the flat pixel indices
    and their classes (a class with fewer pixels gives all of them); ``ignore_index`` pixels are
    never drawn. Classes in increasing order; draws from ``generator`` only.
    """
    flat = label.reshape(-1)
    indices, classes = [], []
    for value in torch.unique(flat).tolist():
        if value == ignore_index:
            continue
        weight = boundary_weight_map(label == value, mu, eps).reshape(-1).cpu()
        n = min(budget, int((weight > 0).sum()))
        picked = torch.multinomial(weight, n, replacement=False, generator=generator)
        indices.append(picked.to(label.device))
        classes.append(torch.full((n,), value, dtype=torch.long, device=label.device))
    if not indices:
        empty = torch.zeros(0, dtype=torch.long, device=label.device)
        return empty, empty
    return torch.cat(indices), torch.cat(classes)


def label_relation(
    classes: Tensor,
    sources: Tensor,
    other_classes: Tensor | None = None,
    other_sources: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """The label relation matrix ``𝒜`` (Fig. 2d) of sampled pixels: ``[N, M]`` int8 with
    ``1`` (positive), ``0`` (negative) or ``-1`` (ignored).

    ``classes [N]``: each pixel's class in the pooled label space (0 = background);
    ``sources [N]``: an identifier of the source (dataset) its label comes from (only equality
    counts). Column ``j`` is pixel ``j`` of ``other_classes`` / ``other_sources`` ``[M]``
    (default: the pixels themselves), in which pixel ``i`` itself is ``offset + i``. Two pixels
    are

    - positive when they have the same class, from the same source — or the same foreground
      class from two sources (one label space: a liver is a liver in every dataset that labels it);
    - ignored when they come from different sources and either is background: a source's
      background holds the organs the other sources label (the paper: "background pixel pairs
      are not considered ... the complex composition of background pixels would break the
      compatibility between different datasets");
    - negative otherwise (different classes of one source, different foreground classes).

    A pixel with itself (the diagonal, shifted by ``offset``) is ignored.
    """
    other_classes = classes if other_classes is None else other_classes
    other_sources = sources if other_sources is None else other_sources
    same_class = classes[:, None] == other_classes[None, :]
    same_source = sources[:, None] == other_sources[None, :]
    background = (classes == 0)[:, None] | (other_classes == 0)[None, :]
    relation = torch.full(same_class.shape, NEGATIVE, dtype=torch.int8, device=classes.device)
    relation[same_class & (same_source | ~background)] = POSITIVE
    relation[~same_source & background] = IGNORED
    own = torch.arange(classes.shape[0], device=classes.device)
    relation[own, own + offset] = IGNORED
    return relation


def label_consistency_loss(
    features: Tensor, classes: Tensor, sources: Tensor, temperature: float = 0.1
) -> Tensor:
    """Eq. 6, the supervised contrastive loss on sampled pixels (rows of ``features [N, F]``)::

        ℒ_label = mean_i −log( Σ_{j: 𝒜_ij = 1} e^{cos(z_i, z_j)/τ}
                               / Σ_{k: 𝒜_ik ∈ {0, 1}} e^{cos(z_i, z_k)/τ} )

    with ``𝒜`` from :func:`label_relation` (ignored pairs enter neither sum). Eq. 6 is written
    over all pairs at once; read per anchor ``i`` as in supervised contrastive learning (Khosla
    et al., the "log of the summed positives" form), averaged over the anchors that have a
    positive. ``τ = 0.1`` (the paper's). 0 when no anchor has a positive.

    Several processes: ``j`` and ``k`` run over the pixels of every rank (gathered, with their
    gradient), the anchors ``i`` are this rank's pixels, and the mean is taken over the anchors
    of all ranks (times the number of ranks, so that the ranks' mean — what DDP's averaged
    gradient follows — is the loss of the global batch).
    """
    all_features, start = all_gather_rows(features)  # one process: features itself
    all_classes, _ = all_gather_rows(classes)
    all_sources, _ = all_gather_rows(sources)
    relation = label_relation(classes, sources, all_classes, all_sources, start)
    logits = F.normalize(features, dim=1) @ F.normalize(all_features, dim=1).t() / temperature
    counted = relation >= 0
    positive = relation == POSITIVE
    anchors = positive.any(1)
    ranks = world_size()
    total = int(all_reduce_sum(anchors.sum())) if ranks > 1 else int(anchors.any())
    if not total:
        return all_features.sum() * 0.0
    masked = logits.masked_fill(~counted, float("-inf"))
    log_all = torch.logsumexp(masked, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    if ranks == 1:
        return (log_all - log_pos)[anchors].mean()
    return (log_all - log_pos)[anchors].sum() * (ranks / total)
