"""``mode="knn"``: a frozen backbone whose pixel features are labelled by kNN voting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl_kit.data.datasets import SliceDataset, known_labels
from medssl_kit.data.manifest import Manifest
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.knn import balanced_reference, knn_vote
from medssl_kit.train.finetune_config import FinetuneConfig


class _KnnSegmenter(nn.Module):
    """A frozen backbone whose pixel features are labelled by kNN voting against a reference set
    of labelled pixels (:meth:`fit`); ``forward`` returns log class probabilities."""

    def __init__(self, backbone: nn.Module, n_classes: int, cfg: FinetuneConfig):
        super().__init__()
        self.backbone = backbone.eval()
        self.n_classes, self.k, self.features = n_classes, cfg.knn_k, cfg.knn_features
        self.per_class, self.seed = cfg.knn_per_class, cfg.seed
        self.reference: Tensor | None = None
        self.reference_labels: Tensor | None = None

    def pixel_features(self, x: Tensor) -> Tensor:
        """``[B, F, H, W]`` features of every input pixel."""
        feats = self.backbone.forward_features(x)
        maps = [feats.decoder[-1]] if self.features == "decoder" else feats.encoder
        size = tuple(x.shape[2:])
        return torch.cat(
            [
                F.interpolate(F.normalize(m, dim=1), size=size, mode="bilinear")
                if tuple(m.shape[2:]) != size
                else F.normalize(m, dim=1)
                for m in maps
            ],
            1,
        )

    @torch.no_grad()
    def fit(self, slices: SliceDataset, manifest: Manifest, batch_size: int = 16) -> None:
        """Draw the reference set: up to ``per_class`` pixels of each class labelled in the
        slices' cases (ignored pixels, and classes a case does not label, are left out)."""
        self.backbone.eval()
        items = [slices[i] for i in range(len(slices))]  # read each slice once
        labels = []
        labels = torch.stack(
            [known_labels(item["label"].flatten(), manifest, item["case_id"]) for item in items]
        )  # [slices, pixels]
        flat = labels.flatten()
        valid = (flat >= 0).nonzero().flatten()
        g = torch.Generator().manual_seed(self.seed)
        chosen = valid[balanced_reference(flat[valid], self.per_class, g)]
        if len(chosen) == 0:
            raise MedsslError("knn mode found no labelled pixel in the labelled cases")
        rows, cols = chosen // labels.shape[1], chosen % labels.shape[1]  # chosen is sorted
        reference = []
        for start in range(0, len(items), batch_size):
            stop = min(start + batch_size, len(items))
            x = torch.stack([item["image"] for item in items[start:stop]])
            feats = self.pixel_features(x).flatten(2)  # [b, F, pixels]
            inside = (rows >= start) & (rows < stop)
            reference.append(feats[rows[inside] - start, :, cols[inside]])
        self.reference, self.reference_labels = torch.cat(reference), flat[chosen]

    def forward(self, x: Tensor) -> Tensor:
        if self.reference is None:
            raise MedsslError("the kNN segmenter has no reference set; call fit() first")
        feats = self.pixel_features(x)
        query = feats.movedim(1, -1).reshape(-1, feats.shape[1])
        probs = knn_vote(self.reference, self.reference_labels, query, self.n_classes, k=self.k)
        probs = probs.reshape(*feats.shape[:1], *feats.shape[2:], self.n_classes).movedim(-1, 1)
        return probs.clamp_min(1e-12).log()
