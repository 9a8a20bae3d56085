"""hierarchical_dense — hierarchical dense SSL, with vox2vec as its baseline (DESIGN §4.5).

vox2vec (Goncharov et al., MICCAI 2023) and "Self-supervised learning of dense hierarchical
representations for medical image segmentation" (the hierarchical paper), which builds on it.
Per step and pair:

- **views**: two overlapping crops of one volume (:func:`~medssl_kit.data.views.overlapping_crops`:
  both hold an anchor body voxel; plain crops, no resampling); in 2D, of one body slice;
- **positives**: up to ``voxels_per_pair`` (1024) voxels of the overlap that lie in the body
  (clean intensity above ``body_threshold``), each with the same physical voxel in the other
  crop (:func:`~medssl_kit.data.views.shared_voxels`); **negatives**: every other sampled voxel
  of both crops and of every pair of the batch (every rank's, with several processes);
- **voxel embedding**: the backbone's pyramid (the ``fpn``'s levels; a UNet's decoder maps)
  read at the voxel — trilinear (bilinear in 2D) where a level is coarser — and concatenated
  (vox2vec: 16+32+…+512 = 1008 channels); a 3-layer MLP projector (hidden width = the
  embedding's) to 128-d, L2-normalised;
- **loss**: the symmetric voxel InfoNCE at τ = 0.1 (eq. 1,
  :func:`~medssl_kit.losses.hierarchical_dense.voxel_info_nce`).

``hierarchical_dense`` adds three switches (:data:`SWITCHES`), all off in ``vox2vec``:

- ``aug``: each crop gets its own local augmentation (:func:`local_augmentation`: Models Genesis
  local pixel shuffling, a non-linear intensity curve and local in-painting, the transforms of
  :mod:`medssl_kit.data.augment`), §2.1;
- ``arch``: the balanced pyramid, every level projected by its own 1×1 convolution to
  ``balanced_width`` (32) channels before the concatenation, §2.2 (registered modules:
  trained, in the checkpoint — the public code keeps them in a plain list the optimiser never
  sees). The paper's architecture change also takes one level fewer with doubled widths: that is
  a backbone setting (``fpn``'s ``n_levels`` / ``base_channels``), see below;
- ``recon``: a reconstruction head (two 3×3 convolutions, BN + ReLU between) on the
  highest-resolution level restores the clean crop; ``ℓ = ℓ_InfoNCE + w·ℓ_MSE``, ``w = 10``
  (eqs. 2–3), §2.3.

Logged terms: ``loss``, ``infonce``, ``positives`` (positive pairs per step) and, with
``recon``, ``mse``.

Choices and deviations (with reasons)
-------------------------------------
- **Pyramid size.** The backbone is the profile's ``fpn`` for both methods (vox2vec's 6 levels,
  base width 16 at ``cpu`` / ``gpu``; 4 levels of 8 at ``smoke``), so that every start is
  fine-tuned in the same network as scratch. The hierarchical paper's variant (one level fewer,
  doubled widths: 5 levels of 32) is ``--set backbone_kwargs='{"n_levels": 5, "base_channels":
  32}'`` — pass the same to every fine-tuning run of the comparison, scratch included.
- **Crops** are the profile's ``patch_size`` (3D) / ``crop_size`` (2D); the papers crop
  128×128×32 voxels at 1×1×2 mm. Every side must hold the coarsest level (``2**(n_levels-1)``).
- **Coarse levels** are read by linear interpolation at the voxel's centre (the public code
  takes the coarse cell holding the voxel); the issue asks for trilinear reading.
- **Local augmentation** as the public code: shuffling with probability 0.8 (5000 blocks of
  exactly 1/20 of each side, rounded down; 1×3×3 voxels in the cpu profile's 32×64×64 crops,
  where a quarter of the voxels change), a non-linear curve with 0.9, in-painting always with
  up to 30 boxes, each next with probability 0.95, of 1/10–1/5 of each side. The public code's
  curve is always increasing (it sorts both coordinates of the Bézier samples). Until
  2026-12-07 this method took Models Genesis' transforms unchanged: the curve reversed half the
  time (a voxel bright in one crop could be dark in the other; ``invert_rate=0.5`` brings that
  back) and shuffle blocks of 1 voxel up to 1/20 of each side, 1250 of them in the cpu crop
  (3% of its voxels changed); with those the InfoNCE stayed near chance at the cpu budget
  (docs/results.md). No other augmentation (vox2vec's global intensity augmentation is left
  out, as the issue specifies).
- **Projector**: one MLP over both crops' voxels (its batch norm sees both).
- **Optimisation**: Adam 3e-4, constant rate, gradient clipping at norm 1.0; 3D batches of 2
  pairs on CPU (the papers: 10 pairs on a GPU).
- **Transfer**: the backbone without its head (the linear / non-linear probe heads of fine-tuning
  are new); the balanced projections, projector and reconstruction head stay in the checkpoint.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl_kit.data import augment
from medssl_kit.data.augment import randint, uniform
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.views import overlapping_crops, shared_voxels
from medssl_kit.errors import MedsslError
from medssl_kit.losses.hierarchical_dense import hybrid_loss, reconstruction_loss, voxel_info_nce
from medssl_kit.methods.base import PretrainMethod
from medssl_kit.models.heads import MLPHead, PixelProjectionHead, RestorationHead

SWITCHES = ("aug", "arch", "recon")
SETTINGS: dict[str, Any] = {
    "aug": True,
    "arch": True,
    "recon": True,
    "temperature": 0.1,
    "voxels_per_pair": 1024,
    "proj_dim": 128,
    "balanced_width": 32,
    "recon_weight": 10.0,
    "body_threshold": 0.05,
    "shuffle_rate": 0.8,
    "nonlinear_rate": 0.9,
    "invert_rate": 0.0,
    "inpaint_boxes": 30,
}
# The public code shuffles 5000 blocks of 1/20 of each side (rounded down) of its patch.
SHUFFLE_BLOCKS = 5000
SHUFFLE_BLOCK_FRACTION = 1 / 20
INPAINT_FRACTION = (1 / 10, 1 / 5)
INPAINT_CONTINUE = 0.95


def local_augmentation(
    clean: Tensor,
    generator: torch.Generator,
    shuffle_rate: float = 0.8,
    nonlinear_rate: float = 0.9,
    inpaint_boxes: int = 30,
    invert_rate: float = 0.0,
) -> Tensor:
    """The hierarchical paper's local augmentation of a crop ``[C, *S]`` in [0, 1] (§2.1).

    With probability ``shuffle_rate`` local pixel shuffling (``augment.block_pixel_shuffle``:
    5000 blocks of 1/20 of each side), with ``nonlinear_rate`` a random
    Bézier intensity curve (increasing; reversed with probability ``invert_rate``), then
    in-painting of ``k`` noise boxes, ``k`` counting how many of ``inpaint_boxes`` successive
    draws pass probability 0.95 (Models Genesis transforms of :mod:`medssl_kit.data.augment`).
    ``clean`` is never modified.
    """
    x = clean
    if uniform(generator, 0.0, 1.0) < shuffle_rate:
        x = augment.block_pixel_shuffle(x, generator, SHUFFLE_BLOCKS, SHUFFLE_BLOCK_FRACTION)
    if uniform(generator, 0.0, 1.0) < nonlinear_rate:
        x = augment.nonlinear_intensity(x, generator, invert_prob=invert_rate)
    boxes = 0
    while boxes < inpaint_boxes and uniform(generator, 0.0, 1.0) < INPAINT_CONTINUE:
        boxes += 1
    if boxes:
        x = augment.inpaint(x, generator, n_boxes=boxes, size_fraction=INPAINT_FRACTION)
    return x if x is not clean else clean.clone()


def sample_pyramid(levels: list[Tensor], positions: Tensor, size: tuple[int, ...]) -> Tensor:
    """``[N, Σ C_i]``: every level of ``levels`` (``[B, C_i, *s_i]``, each covering the whole
    crop of ``size`` voxels) read at ``positions`` (``[N, 1 + dims]``: sample index, then voxel
    indices ordered like ``size``), concatenated in level order.

    A level ``s_i`` voxels wide covers the crop with cells of ``size / s_i`` voxels (strided
    convolutions), so a voxel's centre sits at ``(p + 0.5) / size`` of the map
    (``align_corners=False``): the full-resolution level is read exactly, coarser ones by linear
    interpolation (trilinear in 3D).
    """
    dims = len(size)
    extent = torch.tensor(size, dtype=torch.float32, device=positions.device)
    grid = ((positions[:, 1:] + 0.5) / extent * 2 - 1).flip(-1)  # (x, y[, z]) for grid_sample
    sample = positions[:, 0].long()
    out = []
    for level in levels:
        # grid_sample reads in float32 under autocast (amp), whatever the level's dtype
        rows = level.new_zeros(
            len(positions), level.shape[1], dtype=torch.promote_types(level.dtype, torch.float32)
        )
        for b in range(level.shape[0]):
            chosen = (sample == b).nonzero()[:, 0]
            if not len(chosen):
                continue
            where = grid[chosen].to(level.dtype).view(1, -1, *([1] * (dims - 1)), dims)
            read = F.grid_sample(level[b : b + 1], where, mode="bilinear", align_corners=False)
            rows = rows.index_put((chosen,), read.reshape(level.shape[1], -1).t().to(rows.dtype))
        out.append(rows)
    return torch.cat(out, 1)


class HierarchicalDense(PretrainMethod):
    """Hierarchical dense SSL (see the module docstring); :class:`Vox2Vec` is it with every
    switch off.

    Args:
        backbone: ``fpn`` (the papers), or another backbone with a decoder pyramid (``unet``,
            ``resunet``), 2D or 3D.
        cfg: :data:`SETTINGS` keys (unknown keys are an error) plus ``crop_size`` (2D) and
            ``patch_size`` (3D).
    """

    name = "hierarchical_dense"
    # The cpu profile's 10-minute budget on 2 cores: a 3D step (fpn, 2 pairs of the profile's
    # patches) took 3.84 s of wall time (benchmarks/RESULTS.md, 2026-12-06), so 156 steps.
    cpu_steps_3d: ClassVar[int] = 156
    spatial_dims = (3, 2)
    dataset_kind = "volumes"
    default_backbone = "fpn"
    sync_batchnorm = ("projector",)
    defaults: ClassVar[dict[str, Any]] = SETTINGS

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        self.cfg = cfg = self.resolve_settings(self.defaults)
        self.dims = backbone.spatial_dims
        self.crop = self.view_size()
        levels = getattr(backbone, "n_levels", None)
        if levels is not None and min(self.crop) < 2 ** (levels - 1):
            raise MedsslError(
                f"{self.name}: crops of {list(self.crop)} voxels are smaller than the "
                f"{backbone.name}'s coarsest level needs ({levels} levels: 2**{levels - 1} = "
                f"{2 ** (levels - 1)} voxels per side); raise patch_size / crop_size or lower "
                "the backbone's n_levels"
            )
        if int(cfg["voxels_per_pair"]) < 1 or float(cfg["temperature"]) <= 0:
            raise MedsslError(f"{self.name}: voxels_per_pair must be >= 1 and temperature > 0")
        widths = list(backbone.decoder_channels)[::-1]  # highest resolution first
        if cfg["arch"]:
            width = int(cfg["balanced_width"])
            self.balance = nn.ModuleList(
                PixelProjectionHead(self.dims, c, c, width, n_layers=1) for c in widths
            )
            widths = [width] * len(widths)
        embed = sum(widths)
        self.projector = MLPHead(embed, embed, int(cfg["proj_dim"]), n_layers=3)
        if cfg["recon"]:
            finest = int(backbone.decoder_channels[-1])
            self.recon_head = RestorationHead(self.dims, finest, backbone.in_channels)

    # --- settings -----------------------------------------------------------------------------

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """Adam 3e-4 at a constant rate, gradient clipping 1.0 (both papers); off the GPU, 2048
        sampled voxels a batch: 3D batches of 2 pairs (× 1024), 2D batches of the profile's 8
        pairs × 256 (at 1024 a 2D pair, the loss's 16384² logits alone take ≈ 10 s a step on 2
        cores); at ``cpu`` in 3D, ``cpu_steps_3d`` steps (its 10-minute budget)."""
        loop: dict[str, Any] = {}
        if spatial_dims == 3 and profile != "gpu":
            loop["batch_size"] = 2
        if spatial_dims == 2 and profile != "gpu":
            loop["voxels_per_pair"] = 256
        if spatial_dims == 3 and profile == "cpu":
            loop["steps"] = cls.cpu_steps_3d
        return {
            **cls.defaults,
            **loop,
            "optimizer": "adam",
            "lr": 3e-4,
            "weight_decay": 0.0,
            "schedule": "constant",
            "grad_clip": 1.0,
        }

    # --- batches ------------------------------------------------------------------------------

    def _image(self, volume: CaseVolume, generator: torch.Generator) -> Tensor:
        """The volume (3D) or one of its slices holding body voxels (2D), ``[C, *S]``."""
        image = volume.image
        if self.dims == 2:
            body = (image[0] > float(self.cfg["body_threshold"])).flatten(1).any(1)
            slices = body.nonzero()[:, 0].tolist() or list(range(image.shape[1]))
            image = image[:, slices[randint(generator, 0, len(slices) - 1)]]
        if any(n < s for n, s in zip(image.shape[1:], self.crop, strict=True)):
            raise MedsslError(
                f"case '{volume.case_id}': its {'slices' if self.dims == 2 else 'volume'} "
                f"{list(image.shape[1:])} are smaller than {self.name}'s crops {list(self.crop)}"
            )
        return image

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """Crops and positive pairs of each item (a :class:`~medssl_kit.data.io.CaseVolume`).

        Returns ``v1``, ``v2`` (the network's inputs ``[B, C, *crop]``: locally augmented with
        ``aug``, else the crops), ``p1``, ``p2`` (the clean crops) and ``pos1``, ``pos2``
        (``[N, 1 + dims]``: pair index, then the voxel index in crop 1 / crop 2 of the same
        physical voxel; row ``i`` of both is one positive pair).
        """
        cfg = self.cfg
        threshold = float(cfg["body_threshold"])
        out: dict[str, list[Tensor]] = {k: [] for k in ("v1", "v2", "p1", "p2", "pos1", "pos2")}
        for b, volume in enumerate(items):
            image = self._image(volume, generator)
            pair = overlapping_crops(image, self.crop, generator, image[0] > threshold)
            index1, index2 = shared_voxels(
                pair, pair.view1[0] > threshold, int(cfg["voxels_per_pair"]), generator
            )
            rows = torch.full((len(index1), 1), float(b))
            out["pos1"].append(torch.cat([rows, index1], 1))
            out["pos2"].append(torch.cat([rows, index2], 1))
            for key, clean in (("1", pair.view1), ("2", pair.view2)):
                out[f"p{key}"].append(clean)
                out[f"v{key}"].append(self._augment(clean, generator) if cfg["aug"] else clean)
        return {k: torch.cat(v) if k.startswith("pos") else torch.stack(v) for k, v in out.items()}

    def _augment(self, clean: Tensor, generator: torch.Generator) -> Tensor:
        cfg = self.cfg
        return local_augmentation(
            clean,
            generator,
            float(cfg["shuffle_rate"]),
            float(cfg["nonlinear_rate"]),
            int(cfg["inpaint_boxes"]),
            float(cfg["invert_rate"]),
        )

    # --- the loss -----------------------------------------------------------------------------

    def pyramid(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """The levels the voxel embedding reads (highest resolution first; balanced with
        ``arch``) and the raw highest-resolution level (what the reconstruction head sees)."""
        levels = self.backbone.forward_features(images).decoder[::-1]
        if self.cfg["arch"]:
            return [proj(x) for proj, x in zip(self.balance, levels, strict=True)], levels[0]
        return list(levels), levels[0]

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``{"loss", "infonce", "positives"[, "mse"]}`` (eqs. 1–3)."""
        n = batch["v1"].shape[0]
        levels, finest = self.pyramid(torch.cat([batch["v1"], batch["v2"]]))
        pos2 = batch["pos2"].clone()
        pos2[:, 0] += n  # crop 2 of pair b is sample n + b of the joint pass
        rows = sample_pyramid(levels, torch.cat([batch["pos1"], pos2]), self.crop)
        z = F.normalize(self.projector(rows), dim=-1)
        m = batch["pos1"].shape[0]
        terms = {
            "infonce": voxel_info_nce(z[:m], z[m:], float(self.cfg["temperature"])),
            "positives": torch.tensor(float(m)),
        }
        mse = None
        if self.cfg["recon"]:
            restored = self.recon_head(finest)
            mse = terms["mse"] = reconstruction_loss(
                restored, torch.cat([batch["p1"], batch["p2"]])
            )
        loss = hybrid_loss(terms["infonce"], mse, float(self.cfg["recon_weight"]))
        return {"loss": loss, **terms}

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """The reconstruction head's restoration of ``images [B, C, *crop]`` (eval mode)."""
        if not self.cfg["recon"]:
            raise MedsslError(f"{self.name} was trained without recon: it has no reconstruction")
        training = self.training
        self.eval()
        try:
            return self.recon_head(self.pyramid(images)[1])
        finally:
            self.train(training)

    @torch.no_grad()
    def slice_embeddings(self, image: Tensor, z: int | None = None) -> Tensor:
        """``[Σ C_i, H, W]``: the voxel embeddings (before the projector; balanced with
        ``arch``) of every pixel of ``image [C, H, W]`` (2D), or of axial slice ``z`` of
        ``image [C, D, H, W]`` (3D), read from the pyramid as in training (eval mode)."""
        training = self.training
        self.eval()
        try:
            levels, _ = self.pyramid(image[None])
            size = tuple(image.shape[1:])
            axes = [torch.arange(n, dtype=torch.float32) for n in size[-2:]]
            plane = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
            depth = [] if self.dims == 2 else [torch.full((len(plane), 1), float(z))]
            positions = torch.cat([torch.zeros(len(plane), 1), *depth, plane], 1)
            rows = sample_pyramid(levels, positions.to(image.device), size)
            return rows.t().reshape(-1, *size[-2:])
        finally:
            self.train(training)

    def transferable_state(self) -> dict[str, Tensor]:
        """The backbone without its head (fine-tuning puts its own on the pyramid)."""
        return {k: v for k, v in self.backbone.state_dict().items() if not k.startswith("head.")}


class Vox2Vec(HierarchicalDense):
    """vox2vec: :class:`HierarchicalDense` with ``aug``, ``arch`` and ``recon`` off (the
    switches stay settings, e.g. for the paper's ablation on top of vox2vec)."""

    name = "vox2vec"
    cpu_steps_3d: ClassVar[int] = 185  # 3.25 s of wall time per 3D step at cpu: 10 minutes
    defaults: ClassVar[dict[str, Any]] = {**SETTINGS, "aug": False, "arch": False, "recon": False}
