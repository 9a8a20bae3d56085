"""What a run's frozen pixel features group by: organ, position or intensity.

The features of a pre-trained (or fine-tuned, or random) network, read exactly as the kNN mode of
fine-tuning reads them (``knn_features``: the last decoder map, or every encoder level), are
clustered without labels over the body pixels of a split's slices (spherical k-means,
:mod:`medssl_kit.evaluate.clustering`), and each clustering is compared by normalised mutual
information with three maps of the same pixels:

- ``organ``: the label (pixels of classes their case does not label, and ignored pixels, are
  left out);
- ``position``: the pixel's cell in a ``grid × grid`` partition of the slice (where it lies);
- ``intensity``: its quantile bin of the (first channel's) intensity (how bright it is).

Features that encode organs give clusters with a high ``organ`` NMI; the two other factors say
what a representation follows instead. ``reference`` holds the NMI of ``position`` and
``intensity`` with the organ label itself: how much a representation of either would already
tell about organs on these slices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medssl_kit.data.datasets import SliceDataset, known_labels, load_volumes
from medssl_kit.data.manifest import Manifest, load_manifest
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.clustering import (
    assign_clusters,
    grid_cells,
    normalized_mutual_information,
    quantile_bins,
    spherical_kmeans,
)
from medssl_kit.train.checkpoint import write_json
from medssl_kit.train.finetune_config import KNN_FEATURES, FinetuneConfig
from medssl_kit.train.finetune_models import build_model

FACTORS = ("organ", "position", "intensity")


@dataclass
class ClusterConfig:
    """How the features are read and clustered.

    ``k`` clusters, fitted ``restarts`` times from different draws (the NMIs are averaged);
    ``pixel_fraction`` of the body pixels (intensity above ``body_threshold`` in any channel, the
    slice dataset's body) enter, drawn once with ``seed``, which also seeds a scratch network's
    weights. ``grid`` and ``intensity_bins`` set the two comparison factors.
    """

    profile: str | None = None
    features: str = "decoder"
    backbone: str = "unet"
    split: str = "test"
    k: int = 16
    restarts: int = 3
    pixel_fraction: float = 0.08
    grid: int = 4
    intensity_bins: int = 8
    body_threshold: float = 0.05
    seed: int = 0

    def check(self) -> None:
        if self.features not in KNN_FEATURES:
            raise MedsslError(f"features must be one of {KNN_FEATURES}, got {self.features!r}")
        if self.k < 2 or self.restarts < 1 or self.grid < 1 or self.intensity_bins < 2:
            raise MedsslError("need k >= 2, restarts >= 1, grid >= 1 and intensity_bins >= 2")
        if not 0 < self.pixel_fraction <= 1:
            raise MedsslError(f"pixel_fraction must be in (0, 1], got {self.pixel_fraction}")


def feature_clusters(
    init: str | Path,
    manifest: str | Path | Manifest,
    cfg: ClusterConfig | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Cluster ``init``'s frozen pixel features (see the module docstring); the result as a dict,
    also written to the JSON file ``out`` when given.

    ``init``: ``"scratch"`` (a random network, seeded) or a run folder, as ``finetune --init``.
    """
    cfg = cfg or ClusterConfig()
    cfg.check()
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    ft = FinetuneConfig(
        profile=cfg.profile, mode="knn", backbone=cfg.backbone, knn_features=cfg.features
    ).resolved()
    torch.manual_seed(cfg.seed)
    reader, method, _ = build_model(init, m, ft)  # its backbone is in eval mode
    images, labels = _slices(m, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    body = (images > cfg.body_threshold).any(1)
    keep = body & (labels >= 0) & (torch.rand(body.shape, generator=g) < cfg.pixel_fraction)
    if int(keep.sum()) < cfg.k:
        raise MedsslError(
            f"only {int(keep.sum())} labelled body pixels in split '{cfg.split}' for k={cfg.k} "
            f"clusters; raise pixel_fraction or lower k"
        )
    with torch.no_grad():
        feats = torch.cat(
            [
                reader.pixel_features(x).movedim(1, -1)[kept]
                for x, kept in zip(images.split(8), keep.split(8), strict=True)
            ]
        )
    cells = grid_cells(tuple(images.shape[-2:]), cfg.grid).expand_as(keep)[keep]
    factors = {
        "organ": labels[keep],
        "position": cells,
        "intensity": quantile_bins(images[:, 0][keep], cfg.intensity_bins),
    }
    runs = []
    for r in range(cfg.restarts):
        centroids = spherical_kmeans(feats, cfg.k, torch.Generator().manual_seed(cfg.seed + r))
        clusters = assign_clusters(feats, centroids)
        runs.append({f: normalized_mutual_information(clusters, v) for f, v in factors.items()})
    result = {
        "init": str(init),
        "method": method,
        "config": asdict(cfg),
        "slices": len(images),
        "pixels": int(keep.sum()),
        "nmi": {f: sum(r[f] for r in runs) / len(runs) for f in FACTORS},
        "nmi_per_restart": runs,
        "reference": {
            f: normalized_mutual_information(factors[f], factors["organ"])
            for f in ("position", "intensity")
        },
    }
    if out is not None:
        write_json(out, result)
    return result


def _slices(m: Manifest, cfg: ClusterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, H, W]`` and labels ``[N, H, W]`` (−1 where unknown) of the split's slices
    that hold a body; every volume of the split must share one slice size."""
    vols = load_volumes(m, [cfg.split])
    if not vols:
        raise MedsslError(f"the manifest's split '{cfg.split}' has no case")
    data = SliceDataset(vols, skip_empty=True, with_label=True, body_threshold=cfg.body_threshold)
    items = [data[i] for i in range(len(data))]
    sizes = {tuple(item["image"].shape[1:]) for item in items}
    if len(sizes) != 1:
        raise MedsslError(
            f"split '{cfg.split}' mixes slice sizes {sorted(sizes)}; resample the cases to one "
            "grid (the manifest's target spacing) before clustering their features"
        )
    labels = [known_labels(item["label"][0], m, item["case_id"]) for item in items]
    return torch.stack([item["image"] for item in items]), torch.stack(labels)
