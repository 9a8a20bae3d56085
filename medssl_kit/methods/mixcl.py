"""mixcl — mixed contrastive learning on pooled, differently labelled datasets (DESIGN §4.3).

Li, Quan & Zhou, "MixCL: Pixel label matters to contrastive learning in medical image
segmentation". Pre-training pools datasets that each annotate other structures (the paper: MSD
Liver, Lung and Pancreas, NIH Pancreas-CT and KiTS) and uses their labels as well as their
images. Per step and batch sample:

- a patch ``P_1`` with its labels ``S_1`` is cropped from an image ``I_1`` of the pool and put
  through a random spatial augmentation (elastic deformation and an affine map, each with
  probability 0.5, the labels following by nearest-neighbour); two **views** ``V_1, V_1'`` of it
  differ in intensity only (intensity range shift, gamma, Gaussian smoothing and Gaussian noise,
  each with probability 0.2, §3.1), so pixel ``m`` of one view is pixel ``m`` of the other;
- an **auxiliary patch** ``P_2`` with labels ``S_2``, cropped from ``I_1`` or from another image
  of the same source with equal chance (§2.3.1), augmented the same way, one view ``V_2``;
- the backbone encodes ``V_1, V_1', V_2``; every encoder layer ``l`` has its own projector
  ``σ^l``, three 1×1 convolutions with widths ``(c, c, 2c)`` and batch norm + ReLU between them;
- **identity consistency** (eqs. 4–5, :func:`~medssl_kit.losses.mixcl.identity_consistency_loss`):
  Barlow Twins between ``Z_1^l`` and ``Z_1'^l`` with the pixels as the batch, summed over layers;
- **label consistency** (eq. 6, :func:`~medssl_kit.losses.mixcl.label_consistency_loss`):
  up to ``pixels_per_class`` pixels of each class of ``S_1`` and of ``S_2`` are drawn with
  eq. 7's boundary weights (``μ = 8``, ``ε = 0.05``), their layer-2 projections (``Z_1^1`` of
  ``V_1``, ``Z_2^1``; trilinear / bilinear samples at the pixel's position) enter a supervised
  contrastive loss at ``τ = 0.1`` with the label relation matrix ``𝒜`` (positives: the same
  class of one source, or the same foreground class; pairs of a source's background with
  another source's pixels are ignored);
- **reconstruction** (eq. 3): a 1×1 convolution on the decoder's full-resolution map restores
  the un-distorted patch (``P_1`` from both its views, ``P_2`` from ``V_2``), mean squared error;
- ``ℓ = ℓ_id + α ℓ_label + β ℓ_recon`` (eq. 2), ``α = β = 0.01``.

Logged terms: ``loss``, ``identity``, and with their switches ``label`` (with ``label_pixels``,
the pixels drawn) and ``recon``. Ablation switches (the paper's Table 2; :data:`ABLATIONS`):
``label`` and ``recon`` (``Id`` has neither).

Data: the method needs labels, and only the **pre-training pool's** (the ``pretrain`` split: the
fine-tuning split's labels are the budgeted ones and never enter pre-training). Each case's
``source`` (the manifest's ``sources``; a manifest without sources is one source) says which
classes its label annotates; the rest of its label is background to this method, as in the
pooled datasets. Unlabelled cases are left out. The phantom's partially labelled pool is
``medssl phantom --sources A,B,C --source-splits pretrain``.

Choices the paper leaves open, and deviations (with reasons)
------------------------------------------------------------
- **Backbone.** 3D UNETR (the paper; ``unetr``, the profile's small ViT on CPU) by default; the
  same objective runs on ``unet`` (2D or 3D) with its encoder levels as the layers, for the
  common-backbone comparison. UNETR's layers are its twelve transformer blocks, all at the
  16-voxel token grid; the ``unet``'s are its five levels at falling resolution.
- **Barlow Twins.** Channels standardised over the pixels before eq. 5 (as Barlow Twins does);
  ``λ = 5e-3`` (Barlow Twins' value; MixCL names none); ``monai.losses.BarlowTwinsLoss``.
- **Eq. 6** is read per anchor (supervised contrastive learning's form) and averaged over the
  anchors with a positive; ``pixels_per_class`` ``r`` = 64 per class and patch (the paper gives
  no value); eq. 7's distance is in pixels of the patch.
- **Augmentations** (the paper names them, not their ranges): elastic deformation (3D: σ 5–8,
  magnitude 50–100 voxels; 2D: control points every 16 pixels, magnitude 1–2), affine map
  (rotation ±15° about the axial axis, scale ±10 %), intensity range shift ±0.1, gamma 0.7–1.5,
  smoothing σ 0.5–1 pixel, noise σ 0.03 (intensities in [0, 1]); MONAI transforms, seeded from
  the step's generator, so runs are reproducible and resume exactly.
- **Optimisation**: AdamW, lr 1e-4 with cosine decay, weight decay 1e-5 (§3.1).
- **Transfer**: the encoder only (the paper initialises the UNETR encoder), so the fine-tuned
  decoder starts as scratch's does.
- **Several processes** (the paper trains on six GPUs, one patch each): the label-consistency
  loss contrasts each rank's sampled pixels with those of every rank (gathered with their
  gradient; sources compared by ``source_key``, fixed by the source name); the identity term
  (Barlow Twins over a rank's pixels), the projectors' batch norm and the reconstruction use the
  rank's own share. The logged ``label_pixels`` is then the mean count per rank.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrast,
    RandAffined,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandShiftIntensity,
)
from monai.utils import convert_to_tensor
from torch import Tensor, nn

from medssl_kit.data.augment import randint
from medssl_kit.data.io import CaseVolume
from medssl_kit.errors import MedsslError
from medssl_kit.losses.mixcl import (
    identity_consistency_loss,
    label_consistency_loss,
    sample_class_pixels,
)
from medssl_kit.methods.base import PretrainMethod
from medssl_kit.models.heads import PixelProjectionHead

# The paper's Table 2 as settings (identity consistency is always on).
ABLATIONS: dict[str, dict[str, bool]] = {
    "Id": {"label": False, "recon": False},
    "Id+Label": {"label": True, "recon": False},
    "Id+Label+Recon": {"label": True, "recon": True},
}

SETTINGS: dict[str, Any] = {
    **ABLATIONS["Id+Label+Recon"],
    "alpha": 0.01,
    "beta": 0.01,
    "lambd": 5e-3,
    "temperature": 0.1,
    "pixels_per_class": 64,
    "mu": 8.0,
    "eps": 0.05,
    "label_layer": 1,
    "other_image_prob": 0.5,
    "spatial_prob": 0.5,
    "intensity_prob": 0.2,
}
# The cpu profile's 10-minute pre-training budget on 2 cores (benchmarks/RESULTS.md): a 2D step
# (batch 8, 96² patches, unet) takes ≈ 1.23 s of wall time, so 480 steps; a 3D step (UNETR, two
# 32×64×64 patches) ≈ 4.8 s, so 120 steps.
CPU_STEPS = {2: 480, 3: 120}
ROTATION = 15 * 3.141592653589793 / 180


def _spatial_transform(dims: int, prob: float) -> Compose:
    """Elastic deformation, then an affine map, of ``{"image", "label"}`` (labels nearest)."""
    keys, modes = ("image", "label"), ("bilinear", "nearest")
    if dims == 3:
        elastic = Rand3DElasticd(
            keys, sigma_range=(5, 8), magnitude_range=(50, 100), prob=prob, mode=modes,
            padding_mode="border",
        )  # fmt: skip
        rotate = (ROTATION, 0.0, 0.0)  # about the axial (first, z) axis
    else:
        elastic = Rand2DElasticd(
            keys, spacing=(16, 16), magnitude_range=(1, 2), prob=prob, mode=modes,
            padding_mode="border",
        )  # fmt: skip
        rotate = (ROTATION,)
    affine = RandAffined(
        keys, prob=prob, rotate_range=rotate, scale_range=0.1, mode=modes, padding_mode="border"
    )
    return Compose([elastic, affine])


def _intensity_transform(prob: float) -> Compose:
    """One view's intensity distortion (§3.1), each part with probability ``prob``."""
    return Compose(
        [
            RandShiftIntensity(offsets=0.1, prob=prob),
            RandAdjustContrast(gamma=(0.7, 1.5), prob=prob),
            RandGaussianSmooth(
                sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=prob
            ),
            RandGaussianNoise(mean=0.0, std=0.03, prob=prob),
        ]
    )


def source_key(name: str) -> int:
    """A non-negative int64 fixed by a source name (SHA-256): the same in every process, so the
    label relation of pixels gathered from several ranks compares sources correctly."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


class MixCL(PretrainMethod):
    """MixCL (see the module docstring).

    Args:
        backbone: ``unetr`` (the paper) or ``unet``, 2D or 3D.
        cfg: :data:`SETTINGS` keys (unknown keys are an error) plus ``crop_size`` (2D patches)
            and ``patch_size`` (3D patches).
    """

    name = "mixcl"
    spatial_dims = (3, 2)
    dataset_kind = "pooled_volumes"
    default_backbone = "unetr"

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        self.cfg = cfg = self.resolve_settings(SETTINGS)
        self.dims = backbone.spatial_dims
        self.patch = self.view_size()
        fixed = getattr(backbone, "img_size", None)
        if fixed is not None and list(self.patch) != list(fixed):
            raise MedsslError(
                f"mixcl's patches {list(self.patch)} must be the {backbone.name}'s input size "
                f"{list(fixed)} (set crop_size / patch_size, or the backbone's img_size)"
            )
        layers = list(backbone.encoder_channels)
        if not 0 <= int(cfg["label_layer"]) < len(layers):
            raise MedsslError(f"mixcl: label_layer must index one of {len(layers)} encoder layers")
        if int(cfg["pixels_per_class"]) < 1 or float(cfg["temperature"]) <= 0:
            raise MedsslError("mixcl: pixels_per_class must be >= 1 and temperature > 0")
        self.projectors = nn.ModuleList(
            PixelProjectionHead(self.dims, c, c, 2 * c, n_layers=3) for c in layers
        )
        conv = nn.Conv3d if self.dims == 3 else nn.Conv2d
        self.recon_head = conv(backbone.decoder_channels[-1], backbone.in_channels, kernel_size=1)
        self.spatial = _spatial_transform(self.dims, float(cfg["spatial_prob"]))
        self.intensity = _intensity_transform(float(cfg["intensity_prob"]))
        self._body_slices: dict[str, list[int]] = {}

    # --- settings -----------------------------------------------------------------------------

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """AdamW 1e-4, cosine, weight decay 1e-5 (§3.1); ``unetr`` in 3D, ``unet`` in 2D; the
        pre-training pool only (its labels are used); 3D batches of 2 patches on CPU (the paper:
        one per GPU on six GPUs) and, at ``cpu``, :data:`CPU_STEPS` steps (its 10-minute budget)."""
        loop: dict[str, Any] = {}
        if spatial_dims == 3 and profile != "gpu":
            loop["batch_size"] = 2
        if profile == "cpu":
            loop["steps"] = CPU_STEPS[spatial_dims]
        return {
            **loop,
            **SETTINGS,
            "optimizer": "adamw",
            "lr": 1e-4,
            "weight_decay": 1e-5,
            "schedule": "cosine",
            "backbone": "unetr" if spatial_dims == 3 else "unet",
            "splits": ("pretrain",),
        }

    # --- batches ------------------------------------------------------------------------------

    def _crop(self, volume: CaseVolume, generator: torch.Generator) -> dict[str, Tensor]:
        """A random ``patch`` of the volume (3D) or of one of its body slices (2D), with labels."""
        if volume.label is None:
            raise MedsslError(f"mixcl needs labelled cases; case '{volume.case_id}' has none")
        image, label = volume.image, volume.label
        if self.dims == 2:
            slices = self._body_slices.get(volume.case_id)
            if slices is None:
                body = (image > 0.05).flatten(2).any(2).any(0)
                slices = body.nonzero().flatten().tolist() or list(range(image.shape[1]))
                self._body_slices[volume.case_id] = slices
            z = slices[randint(generator, 0, len(slices) - 1)]
            image, label = image[:, z], label[:, z]
        shape = image.shape[1:]
        if any(s < p for s, p in zip(shape, self.patch, strict=True)):
            raise MedsslError(
                f"case '{volume.case_id}': its {'slices' if self.dims == 2 else 'volume'} "
                f"{list(shape)} are smaller than mixcl's patch {list(self.patch)}"
            )
        start = [randint(generator, 0, s - p) for s, p in zip(shape, self.patch, strict=True)]
        box = tuple(slice(a, a + p) for a, p in zip(start, self.patch, strict=True))
        return {"image": image[(slice(None), *box)], "label": label[(slice(None), *box)].float()}

    def _augmented(self, patch: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        self.spatial.set_random_state(seed=seed)
        out = self.spatial(patch)
        return {k: convert_to_tensor(out[k], track_meta=False) for k in ("image", "label")}

    def _view(self, image: Tensor, seed: int) -> Tensor:
        self.intensity.set_random_state(seed=seed)
        return convert_to_tensor(self.intensity(image), track_meta=False).float()

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """Patches, views, labels and the sampled pixels of each item (a ``"volume"`` and the
        ``"partners"`` of its source, :class:`~medssl_kit.train.pretrain.build_dataset`).

        Returns ``v1``, ``v1p``, ``v2`` (views ``[B, C, *P]``), ``p1``, ``p2`` (the un-distorted
        patches), ``s1``, ``s2`` (labels ``[B, *P]``), ``source`` (``[B]``, an index per source
        name of the batch), ``source_key`` (``[B]``, a number fixed by the source name, the same
        in every process: what the label loss compares), and per patch ``pix1`` / ``pix2``
        (``[N, 1 + dims]``: sample index and voxel position of each drawn pixel) with ``cls1`` /
        ``cls2`` (their classes).
        """
        names = sorted({str(item["volume"].source) for item in items})
        out: dict[str, list[Tensor]] = {k: [] for k in ("v1", "v1p", "v2", "p1", "p2", "s1", "s2")}
        pixels: dict[str, list[Tensor]] = {k: [] for k in ("pix1", "pix2", "cls1", "cls2")}
        sources, keys = [], []
        for b, item in enumerate(items):
            volume, partners = item["volume"], item["partners"]
            other = volume
            if partners and torch.rand((), generator=generator) < self.cfg["other_image_prob"]:
                other = partners[randint(generator, 0, len(partners) - 1)]
            for key, vol in (("1", volume), ("2", other)):
                patch = self._augmented(
                    self._crop(vol, generator), randint(generator, 0, 2**31 - 1)
                )
                label = patch["label"][0].round().long()
                out[f"p{key}"].append(patch["image"])
                out[f"s{key}"].append(label)
                if self.cfg["label"]:
                    idx, cls = sample_class_pixels(
                        label, int(self.cfg["pixels_per_class"]), generator,
                        float(self.cfg["mu"]), float(self.cfg["eps"]), item["ignore_index"],
                    )  # fmt: skip
                    position = torch.stack(torch.unravel_index(idx, label.shape), 1)
                    rows = torch.full((len(idx), 1), b, dtype=torch.long)
                    pixels[f"pix{key}"].append(torch.cat([rows, position], 1))
                    pixels[f"cls{key}"].append(cls)
            out["v1"].append(self._view(out["p1"][-1], randint(generator, 0, 2**31 - 1)))
            out["v1p"].append(self._view(out["p1"][-1], randint(generator, 0, 2**31 - 1)))
            out["v2"].append(self._view(out["p2"][-1], randint(generator, 0, 2**31 - 1)))
            sources.append(names.index(str(volume.source)))
            keys.append(source_key(str(volume.source)))
        batch = {k: torch.stack(v) for k, v in out.items()}
        batch["source"] = torch.tensor(sources, dtype=torch.long)
        batch["source_key"] = torch.tensor(keys, dtype=torch.long)
        if self.cfg["label"]:
            batch.update({k: torch.cat(v) for k, v in pixels.items()})
        return batch

    # --- the loss -----------------------------------------------------------------------------

    def _pixel_features(self, maps: Tensor, pixels: Tensor) -> Tensor:
        """``[N, F]`` features of ``maps [B, F, *s]`` at full-resolution voxel positions
        (``pixels[:, 0]`` the sample, the rest the position; rows in ``pixels``' order),
        interpolated (align_corners=False: a map pixel covers ``patch / s`` voxels)."""
        size = torch.tensor(self.patch, dtype=torch.float32, device=maps.device)
        # grid_sample wants (x, y[, z]) in [-1, 1], the reverse of our (z,) y, x order
        coords = ((pixels[:, 1:].float() + 0.5) / size * 2 - 1).flip(-1)
        # grid_sample reads in float32 under autocast (amp), whatever the maps' dtype
        rows = maps.new_zeros(
            len(pixels), maps.shape[1], dtype=torch.promote_types(maps.dtype, torch.float32)
        )
        for b in range(maps.shape[0]):
            chosen = pixels[:, 0] == b
            grid = coords[chosen].view(1, -1, *([1] * (self.dims - 1)), self.dims)
            sampled = F.grid_sample(maps[b : b + 1], grid, mode="bilinear", align_corners=False)
            read = sampled.reshape(maps.shape[1], -1).t().to(rows.dtype)
            rows = rows.index_put((chosen.nonzero()[:, 0],), read)
        return rows

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``{"loss", "identity"[, "label", "label_pixels"][, "recon"]}`` (eq. 2)."""
        cfg = self.cfg
        n = batch["v1"].shape[0]
        feats = self.backbone.forward_features(torch.cat([batch["v1"], batch["v1p"], batch["v2"]]))
        z = [proj(f) for proj, f in zip(self.projectors, feats.encoder, strict=True)]
        terms = {
            "identity": identity_consistency_loss(
                [m[:n] for m in z], [m[n : 2 * n] for m in z], float(cfg["lambd"])
            )
        }
        loss = terms["identity"]
        if cfg["label"]:
            layer = z[int(cfg["label_layer"])]
            features = torch.cat(
                [
                    self._pixel_features(layer[:n], batch["pix1"]),
                    self._pixel_features(layer[2 * n :], batch["pix2"]),
                ]
            )
            source = batch.get("source_key", batch["source"])
            terms["label"] = label_consistency_loss(
                features,
                torch.cat([batch["cls1"], batch["cls2"]]),
                torch.cat([source[batch["pix1"][:, 0]], source[batch["pix2"][:, 0]]]),
                float(cfg["temperature"]),
            )
            terms["label_pixels"] = torch.tensor(float(features.shape[0]))
            loss = loss + float(cfg["alpha"]) * terms["label"]
        if cfg["recon"]:
            restored = self.recon_head(feats.decoder[-1])
            target = torch.cat([batch["p1"], batch["p1"], batch["p2"]])
            terms["recon"] = F.mse_loss(restored, target)
            loss = loss + float(cfg["beta"]) * terms["recon"]
        return {"loss": loss, **terms}

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """The reconstruction head's restoration of ``images [B, C, *P]`` (eval mode)."""
        training = self.training
        self.eval()
        try:
            return self.recon_head(self.backbone.forward_features(images).decoder[-1])
        finally:
            self.train(training)

    def transferable_state(self) -> dict[str, Tensor]:
        """The encoder (UNETR's ViT; the ``unet``'s encoder levels), as the paper transfers."""
        return self.backbone.encoder_state_dict()
