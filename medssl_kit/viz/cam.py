"""Grad-CAM for segmentation networks and slice classifiers (DESIGN §7.2).

Both use MONAI's :class:`monai.visualize.GradCAM` (Selvaraju et al., 2017): for a class score
``y_c`` and the activations ``A_k`` of a target layer, ``α_k = mean_s ∂y_c/∂A_k(s)`` and the map is
``ReLU(Σ_k α_k A_k)``, upsampled (bilinear / trilinear) to the input size. Here every map is then
scaled to [0, 1] per image (min → 0, max → 1; a constant map becomes 0), high meaning "supports
class c" (MONAI's default post-processing inverts the scale, so it is replaced).

- **Segmentation** networks output per-pixel logits ``[B, K, *S]``; a wrapper turns them into
  per-class scores ``y_c = Σ_s m_c(s) logit_c(s) / Σ_s m_c(s)``, the mean of class c's logits over
  a class mask ``m_c``: the given label map's region of c, else the predicted one
  (``argmax == c``). A class whose mask is empty is averaged over the whole image instead.
- **Classification** networks output ``[B, K]`` logits directly (e.g. the slice classifier of
  ``finetune(mode="classify")``: encoder, global average pooling, linear layer).

The class index is always explicit. The default target layer is the encoder's bottleneck
(:func:`default_target_layer`): what the (transferred, possibly pre-trained) encoder looks at;
any module name of the network can be given instead (``dict(model.named_modules())``). The
network passed in is never modified: CAMs run on a copy, in eval mode.

Maps come back in the input's array order (``[D, H, W]`` like the volume); draw them with
:func:`medssl_kit.viz.viewer.render_slice` (``cam=``) or the viewer, which show every slice in the
package's one display convention (radiological; see :mod:`medssl_kit.viz.viewer`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from torch import Tensor, nn

from medssl_kit.data.datasets import SliceDataset, load_volumes
from medssl_kit.data.manifest import Manifest
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.report import split_classes
from medssl_kit.models.resunet import ResUNet
from medssl_kit.models.unet import UNet

TASKS = ("segmentation", "classification")


def default_target_layer(model: nn.Module) -> str:
    """Name of the encoder's bottleneck block in ``model`` (a backbone or a slice classifier).

    ``unet``: ``encoder.<last>``; ``resunet``: ``encoder.layer4``; a model holding such a
    backbone as ``model.backbone`` (the slice classifier): the same, prefixed ``backbone.``.
    """
    prefix, backbone = "", model
    if not isinstance(model, (UNet, ResUNet)) and isinstance(
        getattr(model, "backbone", None), (UNet, ResUNet)
    ):
        prefix, backbone = "backbone.", model.backbone
    if isinstance(backbone, UNet):
        return f"{prefix}encoder.{backbone.n_levels - 1}"
    if isinstance(backbone, ResUNet):
        return f"{prefix}encoder.layer4"
    raise ValueError(
        f"no default Grad-CAM layer for {type(model).__name__}; pass target_layer=NAME, one of "
        "the names in dict(model.named_modules())"
    )


class _MaskedClassScores(nn.Module):
    """Per-class scores ``[B, K]`` of a segmentation network: masked means of its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.mask: Tensor | None = None  # label map [B, *S] for the next call, or None

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        n_classes = logits.shape[1]
        classes = logits.detach().argmax(1) if self.mask is None else self.mask.long()
        masks = F.one_hot(classes.clamp(0, n_classes - 1), n_classes).movedim(-1, 1)
        masks = masks * (classes < n_classes).unsqueeze(1)  # e.g. ignore_index: in no mask
        masks = masks.to(logits.dtype).flatten(2)
        empty = masks.sum(2, keepdim=True) == 0
        masks = torch.where(empty, torch.ones_like(masks), masks)
        return (logits.flatten(2) * masks).sum(2) / masks.sum(2)


def _unit_range(maps: Tensor) -> Tensor:
    """Scale each map of ``[B, 1, *S]`` to [0, 1]; constant maps become 0."""
    flat = maps.flatten(1)
    low = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - low
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.reshape(maps.shape)


class GradCAMExplainer:
    """Grad-CAM maps of one network for one task, reusable over many images.

    Args:
        model: the network (not modified: a copy is explained, in eval mode).
        task: ``"segmentation"`` (logits ``[B, K, *S]``) or ``"classification"``
            (logits ``[B, K]``).
        target_layer: module name in ``model``; default :func:`default_target_layer`.
    """

    def __init__(self, model: nn.Module, task: str, target_layer: str | None = None):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        layer = target_layer or default_target_layer(model)
        if layer not in dict(model.named_modules()):
            raise ValueError(
                f"target_layer {layer!r} is not a module of {type(model).__name__}; choose one "
                "of dict(model.named_modules())"
            )
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(True)  # frozen (probed) layers still need gradients for Grad-CAM
        self.task = task
        self.target_layer = layer
        self._scores = _MaskedClassScores(net) if task == "segmentation" else None
        wrapped = self._scores if self._scores is not None else net
        name = f"model.{layer}" if self._scores is not None else layer
        self._cam = GradCAM(nn_module=wrapped, target_layers=name, postprocessing=_unit_range)

    def __call__(self, image: Tensor, class_idx: int, mask: Tensor | None = None) -> Tensor:
        """Maps ``[B, 1, *S]`` in [0, 1] for ``image`` ``[B, C, *S]`` and class ``class_idx``.

        ``mask`` (segmentation only): a label map ``[B, *S]`` (or ``[B, 1, *S]``) whose region of
        ``class_idx`` defines the score; ``None`` uses the predicted region.
        """
        if isinstance(class_idx, bool) or not isinstance(class_idx, int) or class_idx < 0:
            raise ValueError(f"class_idx must be a non-negative int, got {class_idx!r}")
        if self._scores is not None:
            if mask is not None and mask.ndim == image.ndim:
                mask = mask[:, 0]
            if mask is not None and tuple(mask.shape) != (image.shape[0], *image.shape[2:]):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not match the image's batch and "
                    f"spatial shape {(image.shape[0], *image.shape[2:])}"
                )
            self._scores.mask = mask
        elif mask is not None:
            raise ValueError("mask is for segmentation networks; a classifier scores the image")
        with torch.enable_grad():
            maps = self._cam(image, class_idx=class_idx)
        return maps.detach()

    def volume(
        self,
        volume: Tensor,
        class_idx: int,
        mask: Tensor | None = None,
        batch_size: int = 16,
    ) -> Tensor:
        """Axial-slice maps ``[D, H, W]`` of a 2D network over ``volume`` ``[C, D, H, W]``.

        ``mask`` (segmentation): a label volume ``[D, H, W]`` or ``[1, D, H, W]``. Each slice's
        map is scaled to [0, 1] on its own.
        """
        if volume.ndim != 4:
            raise ValueError(f"volume must be [C, D, H, W], got shape {tuple(volume.shape)}")
        if mask is not None and mask.ndim == 4:
            mask = mask[0]
        maps = []
        for start in range(0, volume.shape[1], batch_size):
            stop = min(start + batch_size, volume.shape[1])
            chunk = volume[:, start:stop].transpose(0, 1)
            part = None if mask is None else mask[start:stop]
            maps.append(self(chunk, class_idx, part)[:, 0])
        return torch.cat(maps)


def segmentation_cam(
    model: nn.Module,
    image: Tensor,
    class_idx: int,
    mask: Tensor | None = None,
    target_layer: str | None = None,
) -> Tensor:
    """Grad-CAM ``[B, 1, *S]`` in [0, 1] of a segmentation network for class ``class_idx``.

    The score is the mean logit of the class over ``mask``'s region of it (a label map
    ``[B, *S]``), or over the predicted region when ``mask`` is ``None``.
    """
    return GradCAMExplainer(model, "segmentation", target_layer)(image, class_idx, mask)


def classification_cam(
    model: nn.Module, image: Tensor, class_idx: int, target_layer: str | None = None
) -> Tensor:
    """Grad-CAM ``[B, 1, *S]`` in [0, 1] of a classifier (logits ``[B, K]``) for ``class_idx``."""
    return GradCAMExplainer(model, "classification", target_layer)(image, class_idx)


def choose_target_class(manifest: Manifest, splits: Sequence[str] = ("train", "test")) -> str:
    """The class a slice-level "class present" classifier should predict on ``manifest``.

    A class qualifies when every split in ``splits`` has annotated slices with and without it
    (counting non-empty axial slices, as the classifier does, of the cases that label the class).
    A lesion class is preferred; otherwise the qualifying class whose share of positive slices in
    the first split is closest to one half. Raises :class:`MedsslError` when none qualifies.
    """
    volumes = {s: [v for v in load_volumes(manifest, [s]) if v.label is not None] for s in splits}
    counts: dict[int, list[tuple[int, int]]] = {}
    for class_id in manifest.foreground_classes:
        per_split = []
        for split in splits:
            cases = [
                v
                for v in volumes[split]
                if class_id in manifest.labelled_classes(manifest.get_case(v.case_id))
            ]
            if not cases:
                break
            data = SliceDataset(cases, context=0, skip_empty=True, with_label=True)
            positive = sum(bool((data[i]["label"] == class_id).any()) for i in range(len(data)))
            per_split.append((positive, len(data) - positive))
        if len(per_split) == len(splits) and all(p and n for p, n in per_split):
            counts[class_id] = per_split
    if not counts:
        raise MedsslError(
            f"no class of manifest '{manifest.display_path}' has slices with and without it in "
            f"every split of {list(splits)}"
        )
    names = dict(manifest.labels)
    lesions = [c for c in split_classes(names)[1] if c in counts]
    if lesions:
        return names[lesions[0]]

    def imbalance(class_id: int) -> float:
        positive, negative = counts[class_id][0]
        return abs(positive / (positive + negative) - 0.5)

    return names[min(counts, key=imbalance)]
