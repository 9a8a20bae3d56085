"""What a fine-tuning task trains on and how it is scored: segmentation, slice classification."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from torch import Tensor, nn

from medssl_kit.atomic import atomic_write_text
from medssl_kit.data.datasets import PatchDataset, SliceDataset
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.manifest import Manifest
from medssl_kit.data.views import (
    ViewSpec,
    apply_intensity,
    apply_spatial,
    sample_intensity,
    sample_spatial,
)
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.inference import predict_volume
from medssl_kit.evaluate.metrics import auroc, segmentation_metrics, summarise
from medssl_kit.evaluate.report import split_classes
from medssl_kit.losses.segmentation import PartialDiceCELoss
from medssl_kit.train.distributed import rank_share
from medssl_kit.train.finetune_config import FinetuneConfig
from medssl_kit.train.finetune_schedule import frozen_trunk, unfreeze_step


class _Task:
    """What differs between segmentation (2D / 3D) and slice classification."""

    def __init__(self, cfg: FinetuneConfig, manifest: Manifest):
        self.cfg = cfg
        self.manifest = manifest
        self.classes = dict(manifest.labels)
        self.n_classes = manifest.num_classes

    @staticmethod
    def make(cfg: FinetuneConfig, manifest: Manifest, model: nn.Module) -> _Task:
        if cfg.mode == "classify":
            return _ClassifyTask(cfg, manifest)
        return _SegmentTask(cfg, manifest)

    def set_train_modes(self, model: nn.Module, step: int) -> None:
        """Frozen parts keep their normalisation statistics (eval mode) while probing; in
        nonlinear mode the backbone's trunk (:func:`frozen_trunk`) is frozen before
        :func:`unfreeze_step`, then trains, while its normalisation layers train throughout."""
        if self.cfg.mode == "nonlinear":
            frozen = step < unfreeze_step(self.cfg)
            for _, p in frozen_trunk(model):
                p.requires_grad = not frozen
        if self.cfg.mode in ("probe", "linear"):
            for name, module in model.named_modules():
                if name and not name.startswith("head"):
                    module.eval()

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)


class _SegmentTask(_Task):
    def __init__(self, cfg: FinetuneConfig, manifest: Manifest):
        super().__init__(cfg, manifest)
        self.criterion = PartialDiceCELoss(ignore_index=manifest.ignore_index, batch=cfg.batch_dice)
        self.organs, self.lesions = split_classes(self.classes)

    def labelled_mask(self, vol: CaseVolume) -> Tensor:
        mask = torch.zeros(self.n_classes, dtype=torch.bool)
        mask[[0, *self.manifest.labelled_classes(self.manifest.get_case(vol.case_id))]] = True
        return mask

    def batch_source(
        self, vols: list[CaseVolume]
    ) -> Callable[[int], tuple[Tensor, Tensor, Tensor]]:
        cfg = self.cfg
        masks = {v.case_id: self.labelled_mask(v) for v in vols}
        if cfg.dims == 2:
            data = SliceDataset(vols, context=cfg.context, skip_empty=True, with_label=True)
            spec = _crop_spec(cfg.crop_size, tuple(vols[0].image.shape[-2:]), cfg.augment)
        else:
            data = PatchDataset(vols, cfg.patch_size, samples_per_volume=8, seed=cfg.seed)
            spec = None

        def batch(step: int) -> tuple[Tensor, Tensor, Tensor]:
            g = self.generator(step)
            idx = torch.randint(len(data), (cfg.batch_size,), generator=g).tolist()
            idx, own = rank_share(idx, step, cfg.seed)  # one process: idx, None
            g = g if own is None else own
            images, labels, labelled = [], [], []
            for i in idx:
                item = data[i]
                image, label = item["image"], item["label"]
                if spec is not None:
                    spatial = sample_spatial(tuple(image.shape[1:]), spec, g)
                    image, _ = apply_spatial(image, spatial)
                    label, _ = apply_spatial(label.float(), spatial, mode="nearest")
                    image = apply_intensity(image, sample_intensity(spec, g))
                images.append(image)
                labels.append(label.long())
                labelled.append(masks[item["case_id"]])
            return torch.stack(images), torch.stack(labels), torch.stack(labelled)

        return batch

    def loss(self, logits: Tensor, target: Tensor, labelled: Tensor) -> Tensor:
        return self.criterion(logits, target, labelled)

    def _predict(self, model: nn.Module, vol: CaseVolume) -> Tensor:
        cfg = self.cfg
        probs = predict_volume(
            model,
            vol.image,
            cfg.dims,
            roi_size=cfg.patch_size if cfg.dims == 3 else getattr(model, "img_size", None),
            context=cfg.context,
        )
        return probs.argmax(0)

    def validate(self, model: nn.Module, vols: list[CaseVolume]) -> float:
        """Mean Dice over the labelled foreground classes present in each validation volume."""
        scores = []
        for vol in vols:
            target = vol.label[0]
            valid = target != self.manifest.ignore_index
            dice = compute_dice(
                self._onehot(self._predict(model, vol), valid),
                self._onehot(target, valid),
                include_background=False,
                ignore_empty=True,
            )[0]
            labelled = self.manifest.labelled_classes(self.manifest.get_case(vol.case_id))
            scores += [float(dice[c - 1]) for c in labelled if not torch.isnan(dice[c - 1])]
        return sum(scores) / max(len(scores), 1)

    def _onehot(self, classes: Tensor, valid: Tensor) -> Tensor:
        """[1, K, *S] one-hot of a class map, zero on ignored voxels."""
        onehot = F.one_hot(torch.where(valid, classes, 0), self.n_classes).movedim(-1, 0)
        return (onehot * valid)[None]

    def evaluate(self, model: nn.Module, vols: list[CaseVolume], out_dir: Path):
        rows = []
        for vol in vols:
            pred = self._predict(model, vol)
            case = self.manifest.get_case(vol.case_id)
            for r in segmentation_metrics(
                pred.numpy(),
                vol.label[0].numpy(),
                self.classes,
                vol.spacing,
                ignore_index=self.manifest.ignore_index,
                labelled_classes=self.manifest.labelled_classes(case),
                empty="nan",
            ):
                rows.append({"case": vol.case_id, **r})
        return rows, summarise(rows, self.organs, self.lesions)


class _ClassifyTask(_Task):
    """Slice-level "target class present" classification (AUROC), balanced sampling."""

    def __init__(self, cfg: FinetuneConfig, manifest: Manifest):
        super().__init__(cfg, manifest)
        if cfg.dims != 2:
            raise MedsslError("classify mode works on 2D slices; pass --dims 2")
        names = {name: c for c, name in self.classes.items()}
        lesions = split_classes(self.classes)[1]
        wanted = cfg.target_class or (self.classes[lesions[0]] if lesions else None)
        if wanted not in names:
            raise MedsslError(
                f"classify: no class named {wanted!r} in manifest '{manifest.display_path}' "
                f"(classes: {sorted(names)}); pass --set target_class=NAME"
            )
        self.target = names[wanted]
        self.target_name = wanted
        self.criterion = nn.CrossEntropyLoss()

    def _slices(self, vols: list[CaseVolume]) -> tuple[SliceDataset, Tensor]:
        data = SliceDataset(vols, context=self.cfg.context, skip_empty=True, with_label=True)
        present = torch.tensor(
            [bool((data[i]["label"] == self.target).any()) for i in range(len(data))]
        )
        return data, present

    def batch_source(self, vols):
        data, present = self._slices(vols)
        pos, neg = present.nonzero()[:, 0], (~present).nonzero()[:, 0]
        if len(pos) == 0 or len(neg) == 0:
            raise MedsslError(
                f"classify: the labelled train cases need slices with and without "
                f"'{self.target_name}' (got {len(pos)} with, {len(neg)} without); raise the budget"
            )

        def batch(step: int):
            g = self.generator(step)
            half = self.cfg.batch_size // 2
            idx = torch.cat(
                [
                    pos[torch.randint(len(pos), (half,), generator=g)],
                    neg[torch.randint(len(neg), (self.cfg.batch_size - half,), generator=g)],
                ]
            ).tolist()
            idx, _ = rank_share(idx, step, self.cfg.seed)  # one process: idx
            images = torch.stack([data[i]["image"] for i in idx])
            target = present[idx].long()
            return images, target, None

        return batch

    def loss(self, logits: Tensor, target: Tensor, labelled: Tensor | None) -> Tensor:
        return self.criterion(logits, target)

    def _scores(self, model: nn.Module, vols: list[CaseVolume]):
        data, present = self._slices(vols)
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            scores = torch.cat(
                [
                    torch.softmax(
                        model(torch.stack([data[i]["image"] for i in chunk]).to(device)), 1
                    )[:, 1].cpu()
                    for chunk in torch.arange(len(data)).split(32)
                ]
            )
        return data, present, scores

    def validate(self, model: nn.Module, vols: list[CaseVolume]) -> float:
        _, present, scores = self._scores(model, vols)
        value = auroc(scores.numpy(), present.numpy())
        return 0.0 if math.isnan(value) else value

    def evaluate(self, model: nn.Module, vols: list[CaseVolume], out_dir: Path):
        data, present, scores = self._scores(model, vols)
        lines = ["case,slice,score,target"] + [
            f"{data[i]['case_id']},{data[i]['slice']},{float(scores[i]):.9g},{int(present[i])}"
            for i in range(len(data))
        ]
        atomic_write_text(out_dir / "predictions.csv", "\n".join(lines) + "\n")
        return [], {
            "target_class": self.target_name,
            "auroc": auroc(scores.numpy(), present.numpy()),
            "test_slices": len(data),
            "positive_slices": int(present.sum()),
        }


def _crop_spec(crop: tuple[int, int], image: tuple[int, int], augment: bool) -> ViewSpec:
    """2D training crops of ``crop`` pixels at about the native scale.

    With ``augment``: zoom ±15 %, aspect 0.85–1.18, rotation ≤ 10°, and the view module's
    intensity jitter; never flips nor 90° rotations (left and right organs would swap meaning).
    Without: plain random crops at the native scale.
    """
    crop = (min(crop[0], image[0]), min(crop[1], image[1]))
    fraction = crop[0] * crop[1] / (image[0] * image[1])
    jitter = (0.75, 1.3) if augment else (1.0, 1.0)
    ratio = crop[1] / crop[0]
    return ViewSpec(
        size=crop,
        scale=(fraction * jitter[0], min(1.0, fraction * jitter[1])),
        ratio=(ratio * 0.85, ratio * 1.18) if augment else (ratio, ratio),
        flip_prob=0.0,
        rot90_prob=0.0,
        max_rotation_deg=10.0 if augment else 0.0,
        **({} if augment else _NO_INTENSITY),
    )


_NO_INTENSITY = dict(
    gamma_prob=0.0, contrast_prob=0.0, brightness_prob=0.0, blur_prob=0.0, noise_prob=0.0
)
