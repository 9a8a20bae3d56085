"""Instance-discrimination losses of the siamese / contrastive baselines, as pure functions.

- SimSiam (Chen & He, CVPR 2021): negative cosine similarity with a stop-gradient on the target,
  symmetrised over the two views (:func:`negative_cosine`, :func:`simsiam_loss`);
- BYOL (Grill et al., NeurIPS 2020): the normalised mean squared error between the online
  prediction and the target projection, symmetrised (:func:`normalized_mse`, :func:`byol_loss`);
- MoCo v2 (He et al., CVPR 2020; Chen et al., 2020): InfoNCE over one positive key and the
  negatives of a queue (:func:`info_nce`), optionally with in-batch negatives, which makes it
  SimCLR's NT-Xent (see :func:`info_nce` for when it equals ``monai.losses.ContrastiveLoss``).

Across processes (DDP, :mod:`medssl_kit.distributed`): with in-batch negatives, :func:`info_nce`
contrasts each query with the keys and queries of *every* rank (gathered; the other ranks'
queries with their gradient), so the mean of the ranks' losses is the loss of the global batch
on one process, and so is its gradient. With one process nothing is gathered.

Conventions: vectors are ``[B, D]`` (more leading axes are averaged like the batch);
*targets* — SimSiam's ``z`` of the other view, BYOL's target projections, MoCo's keys and queue —
are detached here (``sg``, stop-gradient), so no gradient reaches the branch that produced them,
whatever the caller passes. Every loss is averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medssl_kit.distributed import all_gather_rows

__all__ = ["byol_loss", "info_nce", "negative_cosine", "normalized_mse", "simsiam_loss"]


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """``D(p, z) = −(p / ‖p‖₂) · (sg(z) / ‖sg(z)‖₂)`` averaged over the batch (SimSiam eq. 1).

    −1 when ``p`` points along ``z``, +1 when opposite. ``z`` is detached (SimSiam eq. 3).
    """
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """SimSiam's symmetrised loss (eq. 2–3)::

        L = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1))

    ``z_i`` is the projector output of view ``i``, ``p_i`` the predictor output on ``z_i``.
    Minimum −1.
    """
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def normalized_mse(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's ``‖p̄ − z̄‖²₂ = 2 − 2 · cos(p, z)`` with ``v̄ = v / ‖v‖₂`` (BYOL eq. 2), ``z``
    detached, averaged over the batch. 0 when aligned, 4 when opposite."""
    return (F.normalize(p, dim=-1) - F.normalize(z.detach(), dim=-1)).pow(2).sum(-1).mean()


def byol_loss(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """BYOL's symmetrised loss ``L + L̃`` (BYOL §3.1)::

        L_total = ‖p̄1 − sg(z̄′2)‖² + ‖p̄2 − sg(z̄′1)‖²

    ``p_i``: the online network's prediction for view ``i``; ``z_i``: the *target* network's
    projection of view ``i`` (``z′`` in the paper). The two terms are summed, as in the paper
    (range 0 … 8).
    """
    return normalized_mse(p1, z2) + normalized_mse(p2, z1)


def info_nce(
    query: Tensor,
    key: Tensor,
    queue: Tensor | None = None,
    temperature: float = 0.2,
    in_batch_negatives: bool = False,
    detach_keys: bool = True,
) -> Tensor:
    """InfoNCE with a queue of negatives (MoCo eq. 1), averaged over the batch::

        L_q = −log  exp(q·k₊/τ) / ( exp(q·k₊/τ) + Σ_n exp(q·n/τ) )

    All vectors are L2-normalised first. ``query`` ``[B, D]`` are the queries ``q``, ``key``
    ``[B, D]`` their positive keys ``k₊`` (row ``i`` of each is one positive pair). Negatives
    ``n``: every row of ``queue`` ``[K, D]`` (MoCo's dictionary; ``None`` or ``K = 0`` rows: none),
    and with ``in_batch_negatives`` the other samples of the batch, both their keys ``k_j`` and
    their queries ``q_j`` (``j ≠ i``; SimCLR's 2(B−1) negatives). ``key`` and ``queue`` are
    detached (MoCo's keys are constants to the query encoder); the other queries are not.
    ``detach_keys=False`` keeps the keys' gradient (one encoder for both views, as SimCLR and
    vox2vec's voxel InfoNCE, :mod:`medssl_kit.losses.hierarchical_dense`).

    Relation to ``monai.losses.ContrastiveLoss(temperature=τ)`` (SimCLR's NT-Xent, which takes
    both views as anchors and every other vector of the 2B as a negative): with an empty queue
    and ``in_batch_negatives=True``, ::

        ContrastiveLoss(τ)(z1, z2) == ½ [info_nce(z1, z2, None, τ, True)
                                        + info_nce(z2, z1, None, τ, True)]

    exactly (MONAI normalises by cosine similarity as well, and its denominator leaves out only
    the anchor itself). With a queue, or without in-batch negatives, the two differ.

    Several processes: the in-batch negatives are those of the global batch — the keys and the
    queries of every rank (:func:`~medssl_kit.distributed.all_gather_rows`), so the loss of each
    rank is its queries' mean over the global batch's negatives.
    """
    q = F.normalize(query, dim=-1)
    k = F.normalize(key.detach() if detach_keys else key, dim=-1)
    logits = [(q * k).sum(-1, keepdim=True)]  # [B, 1], the positives first
    if queue is not None and queue.shape[0]:
        logits.append(q @ F.normalize(queue.detach(), dim=-1).T)  # [B, K]
    if in_batch_negatives:
        all_k, start = all_gather_rows(k)  # every rank's (one process: k itself)
        all_q, _ = all_gather_rows(q)
        own = torch.arange(start, start + q.shape[0], device=q.device)
        off_diagonal = own[:, None] != torch.arange(all_q.shape[0], device=q.device)[None, :]
        logits.append((q @ all_k.T)[off_diagonal].view(q.shape[0], -1))  # other keys
        logits.append((q @ all_q.T)[off_diagonal].view(q.shape[0], -1))  # other queries
    scores = torch.cat(logits, dim=1) / temperature
    return F.cross_entropy(scores, scores.new_zeros(scores.shape[0], dtype=torch.long))
