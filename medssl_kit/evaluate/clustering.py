"""What frozen pixel features group together: spherical k-means and normalised mutual information.

The kNN reading (:mod:`medssl_kit.evaluate.knn`) asks whether pixels of one organ lie nearer each
other than pixels of another. When they do not, the next question is what the features group by
instead. Cluster the pixel features without labels (k-means on the unit sphere, i.e. cosine
similarity, as DINO analyses its features) and measure how much each candidate factor explains
the clusters with the normalised mutual information

    NMI(A, B) = 2 I(A; B) / (H(A) + H(B)),

the arithmetic-mean normalisation (scikit-learn's default): 1 when the two partitions are the
same up to relabelling, 0 when they are independent. The factors here are discrete maps of the
same pixels: the organ label, the pixel's cell in a coarse grid over the slice (where it lies),
and its intensity quantile (how bright it is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalized_mutual_information(a: Tensor, b: Tensor) -> float:
    """``2 I(A; B) / (H(A) + H(B))`` of two equally long integer labelings (any values).

    Invariant to relabelling either side; 1.0 when both labelings are constant (nothing to
    disagree on), as scikit-learn's ``normalized_mutual_info_score``.
    """
    a, b = a.flatten(), b.flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"need two non-empty labelings of one length, got {a.numel()} and {b.numel()}"
        )
    _, a = a.unique(return_inverse=True)
    _, b = b.unique(return_inverse=True)
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    h_a, h_b = _entropy(pa), _entropy(pb)
    if h_a + h_b == 0:
        return 1.0
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum()
    return float((2 * mi / (h_a + h_b)).clamp(0.0, 1.0))


def _entropy(p: Tensor) -> Tensor:
    p = p[p > 0]
    return -(p * p.log()).sum()


def spherical_kmeans(
    x: Tensor, k: int, generator: torch.Generator, *, iters: int = 50, sample: int = 30_000
) -> Tensor:
    """Centroids ``[k, F]`` (unit norm) of k-means with cosine similarity on the rows of ``x``.

    Lloyd's iterations on at most ``sample`` rows drawn with ``generator``, started by k-means++
    seeding (each next centroid drawn with probability proportional to its cosine distance
    ``1 − s`` from the nearest centroid so far); a cluster that empties keeps its centroid.
    """
    if x.ndim != 2 or len(x) < k or k < 1:
        raise ValueError(f"need x [N, F] with N >= k >= 1, got {tuple(x.shape)} and k={k}")
    rows = F.normalize(x.float(), dim=1)
    rows = rows[torch.randperm(len(rows), generator=generator)[:sample]]
    centroids = rows[:1].clone()  # rows are in random order: the first is a uniform draw
    nearest = rows @ centroids[0]
    for _ in range(1, k):
        distance = (1 - nearest).clamp_min(0)
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        pick = torch.multinomial(weights, 1, generator=generator)
        centroids = torch.cat([centroids, rows[pick]])
        nearest = torch.maximum(nearest, rows @ rows[pick][0])
    for _ in range(iters):
        assign = (rows @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, rows)
        filled = torch.bincount(assign, minlength=k) > 0
        moved = F.normalize(sums[filled], dim=1)
        if torch.equal(moved, centroids[filled]):
            break
        centroids[filled] = moved
    return centroids


def assign_clusters(x: Tensor, centroids: Tensor, chunk: int = 65_536) -> Tensor:
    """The nearest (cosine) centroid of each row of ``x``: ``[N]`` cluster ids."""
    c = F.normalize(centroids.float(), dim=1)
    return torch.cat([(F.normalize(r.float(), dim=1) @ c.T).argmax(1) for r in x.split(chunk)])


def quantile_bins(values: Tensor, bins: int) -> Tensor:
    """Each value's quantile bin in ``[0, bins)`` (equal-count bins over ``values`` itself)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    v = values.flatten().float()
    edges = torch.quantile(v[:: max(1, len(v) // 1_000_000)], torch.linspace(0, 1, bins + 1)[1:-1])
    return torch.bucketize(v, edges).reshape(values.shape)


def grid_cells(shape: tuple[int, int], cells: int) -> Tensor:
    """``[H, W]`` map of each pixel's cell in a ``cells × cells`` grid over the slice."""
    h, w = shape
    rows = torch.arange(h) * cells // h
    cols = torch.arange(w) * cells // w
    return rows[:, None] * cells + cols[None, :]
