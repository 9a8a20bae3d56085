"""PCRLv2: multi-scale pixel restoration and siamese feature comparison on a non-skip UNet
(Zhou et al., "A Unified Visual Information Preservation Framework for Self-supervised
Pre-training in Medical Image Analysis", TPAMI 2023; DESIGN §4.2). 2D and 3D.

Per step, for a batch of images:

1. **Views.** 2D: multi-crop of one axial slice (:func:`~medssl_kit.data.views.multi_crop`),
   two global views (scale 0.3–1, resized to ``crop_size``) and ``n_local`` = 6 local views
   (scale 0.05–0.3, resized to ``local_size``), with random flips and rotation up to 10°.
   3D: sub-crop of the whole volume (:func:`~medssl_kit.data.views.sub_crop`): two global crops
   of the paper's sizes {64²×32, 96²×64, 96³, 112²×64} with IoU ≥ 0.3, flipped and rotated,
   resized to ``patch_size`` (paper 64²×32), and six local crops of {8³, 16³, 32²×16, 32³}
   inside the minimum bounding box of the global crops, resized to ``local_size_3d`` (16³).
   These views, spatially augmented but un-corrupted, are the restoration targets x̄1, x̄2.
2. **Corruption** (the paper's "local augmentation", inputs only): gamma, Gaussian blur and
   Gaussian noise on every view, plus cutout (2D) / patch swapping (3D) on the global views
   (:mod:`~medssl_kit.data.augment`; settings in :data:`CORRUPTION`).
3. **One pyramid level** ``i`` is drawn per step (uniformly, from the step's generator in
   :meth:`PCRLv2.make_batch`, so a resumed run draws the same levels). The non-skip UNet
   (``skips=False``: PCRLv2's nsUNet, eq. 1) runs on each view; at level ``i`` a restoration head
   (Conv-BN-ReLU-Conv, eqs. 2–3; :func:`restoration_head`) restores the corrupted global views, and
   ``v = BN(GAP(F_i))`` (eq. 5) with a predictor FC-BN-ReLU-FC of hidden width 2C (eq. 6) feeds
   the SimSiam comparison (eq. 9).
4. **Loss** (eq. 10): ``R(g1, g2) + C(g1, g2) + Σ_m Σ_k C(l_k, g_m)`` — see
   :mod:`medssl_kit.losses.pcrlv2`. With ``deep_supervision`` (the public code's objective, on by
   default) the restoration part is ``R_out(g1, g2) + β(step) · R(g1, g2)``: the full-resolution
   level restores through an extra output head at weight 1, and the level-``i`` restoration is
   weighted by ``β = ½(1 + cos(π · step / steps))``. Off, it is the paper's ``R(g1, g2)``.

Settings (``cfg``; defaults from :meth:`PCRLv2.default_config`):

``restoration`` / ``comparison`` (bool)
    ablations: restoration only (``comparison=False``) or comparison only (``restoration=False``).
``scales`` (int or None)
    number of pyramid levels used — the highest-resolution ``scales`` decoder levels (paper
    ablation: 3 vs 5). ``None``: 2D all levels up to 5 (paper), 3D three (public code).
``crop`` ("multi", "sub" or None)
    ablation multi-crop vs sub-crop; ``None``: multi-crop in 2D, sub-crop in 3D (paper). 3D
    multi-crop draws all views anywhere in the volume by scale (random resized crops, global
    0.3–1, local 0.05–0.3 of the volume); 2D sub-crop redraws the two global crops until their
    IoU ≥ ``iou_min`` and takes the local crops (same scale range, relative to the box) inside
    their bounding box.
``deep_supervision`` (bool), ``n_local``, ``global_scale``, ``local_scale``, ``iou_min``,
``crop_size`` / ``local_size`` (2D view sizes), ``patch_size`` / ``local_size_3d`` (3D),
``corruption`` (bool: off gives inputs equal to targets), ``remap_prob`` (not in the paper, 0 by
default: the probability that a view's input first goes through a random non-monotone intensity
lookup table, :func:`~medssl_kit.data.augment.intensity_lookup`, which restoration must then undo
from structure, since brightness no longer names a tissue), ``local_reduction`` ("mean" over
the 12 global–local pairs as in the public code, the default, or "sum" as eq. 10 is written;
see "Weight of the global–local comparison" below).
``transfer`` ("encoder" or "encoder_decoder")
    what fine-tuning starts from: the encoder (the paper) or the whole non-skip UNet, its
    decoder entering the UNet with skips with the skip inputs at zero, so the fine-tuned network
    starts as the pre-trained one (not in the paper; SSMTL's gain here comes mostly from its
    pre-trained decoder, see docs/results.md).

Choices where the paper is silent or ambiguous, and deviations (with reasons):

- **Predictor and BN per level.** The paper's Fig. 4 caption: "each pair of siamese feature maps
  share one pixel restoration head and one feature comparison head, while different feature
  scales employ distinct task heads"; the public code agrees. So each level has its own
  restoration head, BN and predictor (width C → 2C → C), shared by the global and local views.
- **Backbone.** Our ``unet`` with ``skips=False`` and the profile's fine-tuning widths (cpu
  16…256, gpu 32…512), so that the network fine-tuned from this run is exactly the one ``scratch``
  and every other method fine-tune (fair comparison, BasicUNet export). Its five levels give a
  1/16 bottleneck and four decoder levels (1/8 … 1/1). The paper's 2D nsUNet has a ResNet-18
  encoder with a 1/32 bottleneck and five decoder levels of widths 256, 128, 64, 32, 16: pass
  ``backbone_kwargs={"channels": (16, 32, 64, 128, 256, 512)}`` for exactly that pyramid
  (plain convolutional encoder). ``resunet`` with ``skips=False`` has the same five levels, but
  fine-tuning re-enables skips only for ``unet``, and a method's backbone options cannot depend
  on the chosen backbone or dimensionality, so it is not the default. The paper's 3D encoder
  (Models Genesis style, 32…512) corresponds to the gpu widths 32…512; of its four decoder
  levels the default ``scales`` uses the top three (1/4, 1/2, 1/1), the resolutions of the
  public code's three 3D levels.
- **Restoration heads end in a 1×1 convolution** (Conv3×3-BN-ReLU-Conv1×1, the public code's
  2D head); the paper says 3×3 for every convolution, which diverges at lr 1e-2 on the deep levels
  (see :func:`restoration_head`).
- **Restoration on both global views** (eq. 4); the public code restores view 1 only.
- **Weight of the global–local comparison: the mean over the 12 pairs** (the public code), not
  eq. 10's plain sum. With the sum, twelve negative cosines (down to −12) outweigh the
  restoration MSE (≈ 0.1) on the shared network and restoration never learns: at the cpu
  profile, after 1000 steps the restoration MSE of the two global views was 0.119–0.137 at every
  level, no better than predicting each view's mean (0.127), against 0.05 after 300 steps with
  restoration alone and 0.08 after 300 steps with the mean (comparison still falling, −0.61).
  ``local_reduction="sum"`` keeps the literal form.
- **The deep-supervision weight** runs over optimizer steps (public code: over 240 epochs).
- **One level per step for every term**, global–local pairs included (paper §3.2–3.3; the public
  code draws a fresh level for each global–local pair).
- **Views per step in 2D**: the loop draws volumes (``dataset_kind = "volumes"``, needed by 3D
  sub-crop) and one non-empty axial slice is drawn per volume, so slices are sampled per volume
  rather than uniformly over all slices; slice items (``SliceDataset``) are accepted as well.
  Local views are ``local_size`` (public code: 96² next to 224² global views; the paper's text
  says 224² for both).
- **Corruption** follows the public code's pipelines (:data:`CORRUPTION`): cutout (2D) and patch
  swapping (3D) on the global views only; grey CT has no colour, so the 2D colour jitter and
  grayscale become gamma and noise.
- **Flips** act on every axis with probability ½ (paper 2D: horizontal flips only); the 3D
  "random affine" is the in-plane rotation of ``sub_crop`` (up to 10°).
- **Intensities** stay in [0, 1] (the public 3D code z-normalises after its TorchIO transforms).
- **Learning rate.** 1e-2 in 2D (the paper, §4.3, for all experiments); 1e-3 in 3D, as the
  public code's 3D script (the paper's single value is for 2D and 3D alike: pass ``lr=1e-2``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import Tensor, nn

from medssl_kit.config import get_profile
from medssl_kit.data import augment
from medssl_kit.data.augment import Box, randint, uniform
from medssl_kit.data.datasets import SliceDataset
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.views import (
    PCRLV2_GLOBAL_OUT,
    ViewSpec,
    apply_spatial,
    multi_crop,
    sample_spatial,
    sub_crop,
)
from medssl_kit.errors import MedsslError
from medssl_kit.losses.pcrlv2 import (
    deep_supervision_weight,
    local_comparison_loss,
    restoration_loss,
    siamese_comparison_loss,
)
from medssl_kit.methods.base import PretrainMethod
from medssl_kit.models.base import batch_statistics
from medssl_kit.models.heads import MLPHead

CROPS = ("multi", "sub")
TRANSFERS = ("encoder", "encoder_decoder")

# Method settings and their profile-independent defaults (see the module docstring).
METHOD_DEFAULTS: dict[str, Any] = {
    "restoration": True,
    "comparison": True,
    "scales": None,
    "crop": None,
    "deep_supervision": True,
    "n_local": 6,
    "global_scale": (0.3, 1.0),
    "local_scale": (0.05, 0.3),
    "iou_min": 0.3,
    "corruption": True,
    "remap_prob": 0.0,
    "local_reduction": "mean",
    "local_size": (48, 48),
    "local_size_3d": (16, 16, 16),
    "transfer": "encoder",
}
# The global view sizes are the loop's crop_size (2D) and patch_size (3D), which run_pretraining
# passes to the method; these defaults serve a method built directly.
VIEW_DEFAULTS: dict[str, Any] = {"crop_size": (96, 96), "patch_size": PCRLV2_GLOBAL_OUT}

# 2D local view size per profile: about the public code's 96/224 of the global view, rounded up
# to a multiple of 2**4 so that every level of the profile's UNet halves it exactly.
_LOCAL_SIZE = {"smoke": (24, 24), "cpu": (48, 48), "gpu": (96, 96)}
# 3D global view size (the loop's patch_size): the paper's 64²×32 (D, H, W = 32, 64, 64).
_PATCH_SIZE = {"smoke": (16, 32, 32), "cpu": PCRLV2_GLOBAL_OUT, "gpu": PCRLV2_GLOBAL_OUT}

_MAX_IOU_TRIES = 100


@dataclass(frozen=True)
class Corruption:
    """PCRLv2's local (corrupting) augmentation of the network inputs, on [0, 1] intensities.

    Each operation applies with its probability, in this order: gamma ``x ** γ`` (γ uniform in
    ``gamma``), Gaussian blur (σ uniform in ``blur_sigma`` voxels), Gaussian noise (σ uniform in
    ``noise_std``); then, on the global views only, ``cutout_boxes`` boxes of ``cutout_fraction``
    of each side set to 0 (2D) or ``swap_iterations`` swaps of ``swap_patch`` voxel patches (3D;
    the count scales with the view's volume relative to the paper's 64²×32). Before all of them,
    with ``remap_prob`` (not in the paper), a random lookup table of ``remap_knots`` knots.
    """

    gamma_prob: float
    gamma: tuple[float, float]
    blur_prob: float
    blur_sigma: tuple[float, float]
    noise_prob: float
    noise_std: tuple[float, float]
    cutout_prob: float = 0.0
    cutout_boxes: int = 3
    cutout_fraction: tuple[float, float] = (0.1, 0.2)
    swap_prob: float = 0.0
    swap_iterations: int = 100
    swap_patch: tuple[int, int, int] = (4, 4, 8)
    remap_prob: float = 0.0
    remap_knots: int = 8


CORRUPTION: dict[int, Corruption] = {
    # 2D (public code: blur p=0.5 with σ 0.1–2, colour jitter, 3 cutout holes of 32/224 of the
    # side on the global views); grey CT has no colour, so jitter becomes gamma and noise.
    2: Corruption(
        gamma_prob=0.5,
        gamma=(0.7, 1.5),
        blur_prob=0.5,
        blur_sigma=(0.1, 2.0),
        noise_prob=0.5,
        noise_std=(0.01, 0.05),
        cutout_prob=1.0,
    ),
    # 3D (public code: TorchIO RandomBlur, RandomNoise, RandomGamma at p=1, RandomSwap with
    # 8×4×4 (x, y, z) patches and 100 iterations on the global views); ranges for [0, 1] data.
    3: Corruption(
        gamma_prob=1.0,
        gamma=(math.exp(-0.3), math.exp(0.3)),
        blur_prob=1.0,
        blur_sigma=(0.0, 2.0),
        noise_prob=1.0,
        noise_std=(0.0, 0.05),
        swap_prob=1.0,
    ),
}


@dataclass
class _Views:
    """One image's clean views (``Tensor[C, *V]``) and crop boxes (voxels of the image)."""

    globals_: list[Tensor]
    locals_: list[Tensor]
    global_boxes: list[Box]
    local_boxes: list[Box]


def _box_tensor(boxes: Sequence[Box]) -> Tensor:
    """``[n, 2, dims]`` int64: per box its start and size."""
    return torch.tensor([[b.start, b.size] for b in boxes], dtype=torch.int64)


def restoration_head(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """``Conv3×3 → BN → ReLU → Conv1×1``: one pyramid level's restoration head (eq. 2).

    The public code's head. Its 1×1 output convolution has fan-in C; a 3×3 one (fan-in 9C, 27C
    in 3D, as in :class:`~medssl_kit.models.heads.RestorationHead`) diverges under SGD at lr 1e-2
    on the wide, batch-normalised deep levels (measured at the cpu widths: level-0 MSE 0.2 →
    1400 within six steps in 2D, → 750 in 3D; with the 1×1 output it falls steadily).
    """
    conv = Conv["conv", spatial_dims]
    return nn.Sequential(
        conv(in_channels, in_channels, kernel_size=3, padding=1, bias=False),
        Norm["batch", spatial_dims](in_channels),
        nn.ReLU(inplace=True),
        conv(in_channels, out_channels, kernel_size=1),
    )


def _gap(x: Tensor) -> Tensor:
    """Global average pooling ``[B, C, *S] → [B, C]``."""
    return x.flatten(2).mean(dim=2)


class PCRLv2(PretrainMethod):
    """PCRLv2 (2D and 3D). See the module docstring for the method, settings and deviations.

    Args:
        backbone: a backbone with ``encode`` / ``decode`` and ``decoder_channels`` (``unet``
            with ``skips=False`` by default; ``resunet`` works too).
        cfg: settings; missing keys take :data:`METHOD_DEFAULTS` and :data:`VIEW_DEFAULTS`.
    """

    name = "pcrlv2"
    spatial_dims = (2, 3)
    dataset_kind = "volumes"
    default_backbone = "unet"

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        c = self.resolve_settings({**METHOD_DEFAULTS, **VIEW_DEFAULTS})
        self.dims = int(backbone.spatial_dims)
        self.restoration = bool(c["restoration"])
        self.comparison = bool(c["comparison"])
        if not (self.restoration or self.comparison):
            raise MedsslError("pcrlv2: restoration and comparison are both off; nothing to learn")
        self.deep_supervision = bool(c["deep_supervision"]) and self.restoration
        self.crop = c["crop"] or ("multi" if self.dims == 2 else "sub")
        if self.crop not in CROPS:
            raise MedsslError(f"pcrlv2: crop must be one of {CROPS}, got {self.crop!r}")
        if c["local_reduction"] not in ("sum", "mean"):
            raise MedsslError(
                f"pcrlv2: local_reduction must be 'sum' or 'mean', got {c['local_reduction']!r}"
            )
        self.local_reduction = c["local_reduction"]
        if c["transfer"] not in TRANSFERS:
            raise MedsslError(f"pcrlv2: transfer must be one of {TRANSFERS}, got {c['transfer']!r}")
        self.transfer = c["transfer"]
        self.n_local = int(c["n_local"]) if self.comparison else 0
        self.iou_min = float(c["iou_min"])
        if not 0.0 <= float(c["remap_prob"]) <= 1.0:
            raise MedsslError(f"pcrlv2: remap_prob must be in [0, 1], got {c['remap_prob']}")
        self.corruption = (
            replace(CORRUPTION[self.dims], remap_prob=float(c["remap_prob"]))
            if c["corruption"]
            else None
        )
        sizes = (
            (c["crop_size"], c["local_size"])
            if self.dims == 2
            else (c["patch_size"], c["local_size_3d"])
        )
        self.global_size, self.local_size = (tuple(int(s) for s in size) for size in sizes)
        if len(self.global_size) != self.dims or len(self.local_size) != self.dims:
            raise MedsslError(
                f"pcrlv2: {self.dims}D view sizes need {self.dims} entries, got global "
                f"{self.global_size} and local {self.local_size}"
            )
        flips_rotation = {"flip_prob": 0.5, "rot90_prob": 0.0, "max_rotation_deg": 10.0}
        self.global_spec = ViewSpec(self.global_size, tuple(c["global_scale"]), **flips_rotation)
        self.local_spec = ViewSpec(self.local_size, tuple(c["local_scale"]), **flips_rotation)

        widths = list(backbone.decoder_channels)  # deepest decoder level first
        scales = c["scales"] or min(5 if self.dims == 2 else 3, len(widths))
        if not 1 <= scales <= len(widths):
            raise MedsslError(
                f"pcrlv2: scales={scales}, but the backbone's decoder has {len(widths)} levels "
                f"(widths {widths}); use 1…{len(widths)} or a deeper backbone"
            )
        # decoder indices of the levels used: the `scales` highest resolutions, deepest first
        self.levels = list(range(len(widths) - scales, len(widths)))
        used = [widths[j] for j in self.levels]
        image_channels = backbone.in_channels
        if self.restoration:
            self.restoration_heads = nn.ModuleList(
                restoration_head(self.dims, w, image_channels) for w in used
            )
        if self.deep_supervision:
            self.output_head = restoration_head(self.dims, widths[-1], image_channels)
        if self.comparison:
            self.pool_norms = nn.ModuleList(nn.BatchNorm1d(w) for w in used)
            self.predictors = nn.ModuleList(MLPHead(w, 2 * w, w, n_layers=2) for w in used)
        # total optimizer steps, for the deep-supervision weight; set by on_step_end and
        # checkpointed with the method, so a resumed run continues the same schedule
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.int64))

    @property
    def level_strides(self) -> list[int]:
        """Downsampling factor of each used level w.r.t. the view (1: full resolution)."""
        n = len(self.backbone.decoder_channels)
        return [2 ** (n - 1 - j) for j in self.levels]

    # --- configuration ---------------------------------------------------------------------

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """The paper's optimizer (SGD, momentum 0.9, cosine, weight decay 1e-5; lr 1e-2 in 2D,
        1e-3 in 3D as the public 3D script) and the method settings, with view sizes for
        ``profile``. At ``cpu`` in 3D the batch is 2 volumes and the run 500 steps, to stay within
        the profile's 10-minute budget (benchmarks/RESULTS.md: 0.96 s/step at batch 2, 5.3 s at
        batch 8; 1000 steps would take 16 minutes)."""
        name = get_profile(profile).name
        loop = {"batch_size": 2, "steps": 500} if spatial_dims == 3 and name == "cpu" else {}
        return {
            **loop,
            "optimizer": "sgd",
            "lr": 1e-2 if spatial_dims == 2 else 1e-3,
            "momentum": 0.9,
            "weight_decay": 1e-5,
            "schedule": "cosine",
            "warmup_steps": 0,
            **METHOD_DEFAULTS,
            "local_size": _LOCAL_SIZE[name],
            "patch_size": _PATCH_SIZE[name],
        }

    @classmethod
    def backbone_kwargs(cls, profile: str, spatial_dims: int, backbone: str) -> dict[str, Any]:
        """The non-skip UNet (nsUNet): the profile's fine-tuning ``unet`` or ``resunet`` (the
        paper's 2D pyramid is a ResNet-18: the ``resunet`` of the CPU profiles; ``gpu`` builds
        the ResNet-50 that every method is fine-tuned in there) with its skips off."""
        return {"skips": False}

    # --- batches -----------------------------------------------------------------------------

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """Views of each item, corrupted inputs and clean targets, and the level of this step.

        Items are whole volumes (:class:`~medssl_kit.data.io.CaseVolume`) or dataset items with
        an ``"image"`` (a slice ``[C, H, W]`` in 2D, a volume or patch ``[C, D, H, W]`` in 3D).

        Returns ``level`` (index into :attr:`levels`), ``global_inputs`` / ``global_targets``
        ``[B, 2, C, *V]`` (corrupted / clean global views), ``local_inputs`` ``[B, n, C, *v]``
        (corrupted local views; ``n = 0`` without comparison), and the crop boxes in voxels of
        each image as ``[start, size]`` rows: ``global_boxes`` ``[B, 2, 2, dims]``,
        ``local_boxes`` ``[B, n, 2, dims]``, ``bounding_box`` ``[B, 2, dims]`` (the minimum box
        around the two global crops).

        Draw order: the level, then per item its slice (2D volumes), views, and one seed for its
        corruption, which has a generator of its own; so targets never depend on the corruption
        settings.
        """
        level = randint(generator, 0, len(self.levels) - 1)
        inputs, targets, local_inputs = [], [], []
        global_boxes, local_boxes, bounding = [], [], []
        for item in items:
            views = self._views(self._image(item, generator), generator)
            corrupt = torch.Generator().manual_seed(randint(generator, 0, 2**62))
            targets.append(torch.stack(views.globals_))
            inputs.append(torch.stack([self._corrupt(v, corrupt, True) for v in views.globals_]))
            local_inputs.append(
                torch.stack([self._corrupt(v, corrupt, False) for v in views.locals_])
                if views.locals_
                else targets[-1].new_zeros((0, *targets[-1].shape[1:2], *self.local_size))
            )
            global_boxes.append(_box_tensor(views.global_boxes))
            local_boxes.append(_box_tensor(views.local_boxes).reshape(-1, 2, self.dims))
            box1, box2 = views.global_boxes
            bounding.append(_box_tensor([box1.bounding_box(box2)])[0])
        return {
            "level": torch.tensor(level),
            "global_inputs": torch.stack(inputs),
            "global_targets": torch.stack(targets),
            "local_inputs": torch.stack(local_inputs),
            "global_boxes": torch.stack(global_boxes),
            "local_boxes": torch.stack(local_boxes),
            "bounding_box": torch.stack(bounding),
        }

    def _image(self, item: Any, generator: torch.Generator) -> Tensor:
        """The image an item contributes: the volume (3D) or one non-empty axial slice (2D)."""
        if isinstance(item, CaseVolume):
            if self.dims == 3:
                return item.image
            slices = SliceDataset([item], context=0, skip_empty=True, with_label=False)
            if len(slices) == 0:
                raise MedsslError(f"case '{item.case_id}': no axial slice contains body")
            return slices[randint(generator, 0, len(slices) - 1)]["image"]
        image = item["image"] if isinstance(item, Mapping) else item
        if image.ndim != self.dims + 1:
            raise MedsslError(
                f"pcrlv2 ({self.dims}D) needs [C, {', '.join('DHW'[3 - self.dims :])}] images, "
                f"got shape {tuple(image.shape)}"
            )
        return image

    def _views(self, image: Tensor, generator: torch.Generator) -> _Views:
        if self.crop == "sub" and self.dims == 3:
            sc = sub_crop(
                image,
                generator,
                global_out=self.global_size,
                iou_min=self.iou_min,
                local_out=self.local_size,
                n_local=self.n_local,
            )
            return _Views(sc.global_views, sc.local_views, sc.global_boxes, sc.local_boxes)
        if self.crop == "sub":
            return self._sub_crop_2d(image, generator)
        if self.dims == 2:
            crops = multi_crop(image, self.global_spec, self.local_spec, self.n_local, generator)
        else:  # views.multi_crop is 2D only; the same draws, in 3D
            specs = [self.global_spec] * 2 + [self.local_spec] * self.n_local
            params = [sample_spatial(tuple(image.shape[1:]), s, generator) for s in specs]
            crops = [(apply_spatial(image, p)[0], None, p) for p in params]
        views = [v for v, _, _ in crops]
        boxes = [p.crop_box for _, _, p in crops]
        return _Views(views[:2], views[2:], boxes[:2], boxes[2:])

    def _sub_crop_2d(self, image: Tensor, generator: torch.Generator) -> _Views:
        """Sub-crop in 2D: global crops redrawn until IoU ≥ ``iou_min``, local crops inside
        their bounding box (scale relative to the box)."""
        shape = tuple(image.shape[1:])
        for _ in range(_MAX_IOU_TRIES):
            p1 = sample_spatial(shape, self.global_spec, generator)
            p2 = sample_spatial(shape, self.global_spec, generator)
            if p1.crop_box.iou(p2.crop_box) >= self.iou_min:
                break
        else:
            raise MedsslError(
                f"pcrlv2 sub-crop: no pair of global crops with IoU >= {self.iou_min} in "
                f"{_MAX_IOU_TRIES} tries for a slice of shape {shape}; lower iou_min or raise "
                "the lower end of global_scale"
            )
        bbox = p1.crop_box.bounding_box(p2.crop_box)
        inside = image[(slice(None), *bbox.slices)]
        local_params = [
            sample_spatial(tuple(inside.shape[1:]), self.local_spec, generator)
            for _ in range(self.n_local)
        ]
        local_boxes = [
            Box(tuple(a + s for a, s in zip(bbox.start, p.crop_start, strict=True)), p.crop_size)
            for p in local_params
        ]
        return _Views(
            [apply_spatial(image, p)[0] for p in (p1, p2)],
            [apply_spatial(inside, p)[0] for p in local_params],
            [p1.crop_box, p2.crop_box],
            local_boxes,
        )

    def _corrupt(self, view: Tensor, generator: torch.Generator, is_global: bool) -> Tensor:
        """Apply :data:`CORRUPTION` (every value is drawn, applied or not: a stable stream; the
        lookup table's values only when ``remap_prob > 0``, so runs without it keep theirs)."""
        spec = self.corruption
        if spec is None:
            return view.clone()

        def draw(prob: float, low: float, high: float) -> float | None:
            applied = uniform(generator, 0.0, 1.0) < prob
            value = uniform(generator, low, high)
            return value if applied else None

        out = view
        gamma = draw(spec.gamma_prob, *spec.gamma)
        sigma = draw(spec.blur_prob, *spec.blur_sigma)
        std = draw(spec.noise_prob, *spec.noise_std)
        if spec.remap_prob > 0:
            remap = uniform(generator, 0.0, 1.0) < spec.remap_prob
            table = augment.random_lookup_table(generator, spec.remap_knots)
            if remap:
                out = augment.intensity_lookup(out, table)
        if gamma is not None:
            out = augment.gamma(out, gamma)
        if sigma is not None and sigma > 0:
            out = augment.gaussian_blur(out, sigma)
        if std is not None:
            out = augment.gaussian_noise(out, generator, std)
        if is_global and self.dims == 2 and uniform(generator, 0.0, 1.0) < spec.cutout_prob:
            out = augment.cutout(out, generator, spec.cutout_boxes, spec.cutout_fraction)
        if is_global and self.dims == 3 and uniform(generator, 0.0, 1.0) < spec.swap_prob:
            share = out[0].numel() / math.prod(PCRLV2_GLOBAL_OUT)
            n_swaps = max(1, round(spec.swap_iterations * share))
            out = augment.swap(out, generator, n_swaps, spec.swap_patch)
        return out

    # --- training ----------------------------------------------------------------------------

    def _pyramid(self, x: Tensor) -> list[Tensor]:
        """The decoder's feature maps of ``x`` (deepest first), through the non-skip UNet."""
        return self.backbone.decode(self.backbone.encode(x))[0]

    def _compare(self, i: int, feature: Tensor) -> tuple[Tensor, Tensor]:
        """``(p, z) = (f_P(v), v)`` with ``v = BN(GAP(F_i))`` (eqs. 5–6) at used level ``i``."""
        z = self.pool_norms[i](_gap(feature))
        return self.predictors[i](z), z

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """PCRLv2's loss (eq. 10) at the batch's level; every term is returned for logging.

        Terms: ``restoration`` (eq. 4 at the level; with deep supervision also
        ``restoration_output`` and its weight ``ds_weight``), ``comparison`` (eq. 9 between the
        global views), ``comparison_local`` (global–local pairs), ``level`` and ``loss``.
        """
        i = int(batch["level"])
        level = self.levels[i]
        targets = batch["global_targets"].unbind(1)
        pyramids = [self._pyramid(x) for x in batch["global_inputs"].unbind(1)]
        terms: dict[str, Tensor] = {}
        loss = batch["global_inputs"].new_zeros(())
        if self.restoration:
            head = self.restoration_heads[i]
            restored = [head(p[level]) for p in pyramids]
            r = restoration_loss(restored[0], targets[0], restored[1], targets[1])
            terms["restoration"] = r
            if self.deep_supervision:
                beta = deep_supervision_weight(step, int(self.total_steps))
                full = [self.output_head(p[-1]) for p in pyramids]
                r_out = restoration_loss(full[0], targets[0], full[1], targets[1])
                terms["restoration_output"] = r_out
                terms["ds_weight"] = torch.tensor(beta)
                loss = loss + r_out + beta * r
            else:
                loss = loss + r
        if self.comparison:
            (p1, z1), (p2, z2) = (self._compare(i, p[level]) for p in pyramids)
            c = siamese_comparison_loss(p1, z1, p2, z2)
            terms["comparison"] = c
            loss = loss + c
            local = batch["local_inputs"]
            if local.shape[1]:
                b, n = local.shape[:2]
                # local-major order: row k * B + b is local view k of image b
                p_l, z_l = self._compare(
                    i, self._pyramid(local.transpose(0, 1).flatten(0, 1))[level]
                )
                c_local = local_comparison_loss(
                    torch.stack([p1, p2]),
                    torch.stack([z1, z2]),
                    p_l.reshape(n, b, -1),
                    z_l.reshape(n, b, -1),
                    self.local_reduction,
                )
                terms["comparison_local"] = c_local
                loss = loss + c_local
        terms["level"] = torch.tensor(float(i))
        return {"loss": loss, **terms}

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Remember the run's length for the deep-supervision weight."""
        self.total_steps.fill_(max_steps)

    def transferable_state(self) -> dict[str, Tensor]:
        """The encoder's weights (the paper: the encoder is fine-tuned inside a UNet with skips),
        or with ``transfer="encoder_decoder"`` the whole non-skip UNet, whose decoder then
        enters the skip UNet with zero-initialised skip inputs (``train.transfer``)."""
        if self.transfer == "encoder_decoder":
            return self.backbone.state_dict()
        return self.backbone.encoder_state_dict()

    # --- inspection --------------------------------------------------------------------------

    @torch.no_grad()
    def restore(self, inputs: Tensor, level: int | None = None) -> Tensor:
        """Restored images ``[B, C, *V]`` of ``inputs`` ``[B, C, *V]`` from one used level.

        ``level`` indexes :attr:`levels` (default: the highest resolution). Batch norm uses the
        statistics of ``inputs``, as the loss saw them, and leaves its running statistics as they
        were (:func:`~medssl_kit.models.base.batch_statistics`); the running statistics also
        average the local views, and in 3D (16³ local views, 1³ at the deepest level) they turned
        the restorations of global views into noise: MSE 8–19 against 0.06 with the batch's
        (cpu profile, 500 steps). Upsamples to the input size as the loss does.
        """
        if not self.restoration:
            raise MedsslError("this pcrlv2 run has no restoration heads (restoration=False)")
        i = len(self.levels) - 1 if level is None else int(level)
        training = self.training
        self.eval()
        try:
            with batch_statistics(self):
                out = self.restoration_heads[i](self._pyramid(inputs)[self.levels[i]])
        finally:
            self.train(training)
        mode = "bilinear" if self.dims == 2 else "trilinear"
        return F.interpolate(out, size=inputs.shape[2:], mode=mode, align_corners=False)

    @torch.no_grad()
    def restoration_error(
        self, items: list[Any], generator: torch.Generator, draws: int = 1
    ) -> dict[str, float]:
        """How well the global views are restored: mean squared error per used level.

        Each of ``draws`` rounds makes one batch per item (:meth:`make_batch`, so views and
        corruption as in pre-training) and restores its two corrupted global views together
        (:meth:`restore`, batch statistics of those two). Returns ``"level i"`` for every used
        level (0 = the coarsest) and ``"view mean"``, the error of predicting each clean view's
        own mean intensity: a restoration no better than that has learned nothing about the
        image. The errors are averaged over the ``draws × len(items)`` batches.
        """
        if not items or draws < 1:
            raise MedsslError("restoration_error needs at least one item and one draw")
        errors = torch.zeros(len(self.levels) + 1, dtype=torch.float64)
        for _ in range(draws):
            for item in items:
                batch = self.make_batch([item], generator)
                inputs = batch["global_inputs"].flatten(0, 1)
                targets = batch["global_targets"].flatten(0, 1)
                for i in range(len(self.levels)):
                    errors[i] += F.mse_loss(self.restore(inputs, i), targets).item()
                view_mean = targets.mean(dim=tuple(range(1, targets.ndim)), keepdim=True)
                errors[-1] += F.mse_loss(view_mean.expand_as(targets), targets).item()
        errors /= draws * len(items)
        names = [f"level {i}" for i in range(len(self.levels))] + ["view mean"]
        return dict(zip(names, errors.tolist(), strict=True))
