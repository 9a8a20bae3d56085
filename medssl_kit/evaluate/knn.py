"""Non-parametric dense label transfer: weighted k-nearest-neighbour voting over pixel features.

A pre-trained network's pixel features can be judged without training anything on top of them:
each query pixel takes the labels of its ``k`` most similar reference pixels (cosine similarity
of the feature vectors), each vote weighted by ``exp(s / T)`` — the weighted kNN classifier of
Wu et al. (2018) that DINO evaluates with, at its ``k = 20`` and ``T = 0.07``. Unlike a trained
probe it has no optimisation to get wrong and no preference for linearly separable features:
it asks only whether pixels of one organ lie nearer each other than pixels of another.

The reference set is drawn class-balanced (:func:`balanced_reference`) so that small organs are
not outvoted by background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def balanced_reference(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of up to ``per_class`` randomly chosen entries of each class in ``labels``.

    ``labels``: ``[N]`` integer class ids (filter out ignored entries beforehand). A class with
    fewer than ``per_class`` entries contributes all of them. Returns a sorted ``[M]`` tensor.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    chosen = []
    for c in labels.unique():
        where = (labels == c).nonzero().flatten()
        pick = torch.randperm(len(where), generator=generator)[:per_class]
        chosen.append(where[pick])
    if not chosen:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(chosen).sort().values


def knn_vote(
    reference: Tensor,
    reference_labels: Tensor,
    query: Tensor,
    n_classes: int,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 2048,
) -> Tensor:
    """Class probabilities ``[M, n_classes]`` of each query row by weighted kNN voting.

    score_c(q) = Σ_{r ∈ N_k(q)} exp(s(q, r) / T) · [y_r = c] / Σ_{r ∈ N_k(q)} exp(s(q, r) / T),
    with s the cosine similarity and N_k(q) the ``k`` reference rows most similar to q.

    ``reference``: ``[N, F]`` features of labelled pixels, ``reference_labels``: their ``[N]``
    classes in ``[0, n_classes)``, ``query``: ``[M, F]``. Queries are processed ``chunk`` rows at
    a time, so memory stays ``O(chunk · N)``; ``k`` is capped at ``N``.
    """
    if reference.ndim != 2 or query.ndim != 2 or reference.shape[1] != query.shape[1]:
        raise ValueError(
            f"reference [N, F] and query [M, F] must share F; got {tuple(reference.shape)} "
            f"and {tuple(query.shape)}"
        )
    if len(reference) == 0:
        raise ValueError("the reference set is empty: no labelled pixel to vote with")
    k = min(k, len(reference))
    reference = F.normalize(reference.float(), dim=1)
    out = torch.empty(len(query), n_classes)
    for start in range(0, len(query), chunk):
        q = F.normalize(query[start : start + chunk].float(), dim=1)
        sim, idx = (q @ reference.T).topk(k, dim=1)
        weights = ((sim - 1.0) / temperature).exp()  # exp(s / T) up to a common factor
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, reference_labels[idx], weights)
        out[start : start + chunk] = votes / votes.sum(1, keepdim=True)
    return out
