"""Baselines (DESIGN §4.6): ``simsiam``, ``byol``, ``mocov2`` and ``models_genesis``.

Every baseline runs on the same backbone family as the methods — our ``unet`` with the profile's
fine-tuning widths, so the network fine-tuned from a baseline is exactly the one ``scratch`` and
every method fine-tune — and with the same budgets: the profile's steps, batch size and view size,
and the loop's optimiser (Adam 1e-3, cosine, weight decay 1e-5). The papers' own optimisers are
tuned for ImageNet batches of 256–4096 over hundreds of epochs (SimSiam: SGD 0.05·B/256; BYOL: LARS
0.2·B/256; MoCo v2: SGD 0.03; Models Genesis: SGD lr 1 with plateau decay); at batch 8 and 10³
steps they are not the papers' settings either, and the SSMTL paper itself trains its MoCo v2
baseline with its own Adam 1e-3 "for a fair comparison". Loss terms are in
:mod:`medssl_kit.losses.contrastive` and :mod:`medssl_kit.losses.restoration`.

Siamese / contrastive baselines (2D, axial slices; ``dataset_kind = "slices"``)
------------------------------------------------------------------------------
Each slice gives two views (:func:`~medssl_kit.data.views.sample_view_pair`, ``crop_size``
pixels; :data:`VIEW_DEFAULTS`): random resized crop of 20–100 % of the slice (MoCo v2 / SimSiam /
BYOL use 0.08–1 or 0.2–1 of ImageNet images), flips of each axis with p 0.5, no rotation; the
colour jitter of MoCo v2 (p 0.8) becomes contrast ×0.6–1.4 and a brightness shift of ±0.1 (p 0.8
each) plus gamma 0.7–1.5 (p 0.5) on grey CT; Gaussian blur with p 0.5 and σ = 0.1–2.0 pixels at
224² views, scaled with the view size (MoCo v2 / SimSiam); no grayscale or solarisation (grey
images). Override per run with the ``view`` setting (:class:`~medssl_kit.data.views.ViewSpec`
fields). The representation is the global average pooling of the encoder bottleneck (the ResNet's
pooled 2048-d feature in the papers; here ``C`` = the bottleneck width). The decoder is never
used, so **only the encoder transfers** (:meth:`~_TwoViewMethod.transferable_state`; the online /
query encoder, as in the papers).

- ``simsiam`` (Chen & He, 2021): projector ``Linear-BN-ReLU ×2, Linear-BN`` (3 layers, BN on the
  output, no affine), predictor ``Linear-BN-ReLU, Linear`` with a 4× bottleneck; loss
  ``½D(p1, sg z2) + ½D(p2, sg z1)``. Widths: paper 2048 / 2048 / 512 (``gpu``); CPU profiles
  256 / 256 / 64. Logged: ``loss`` and ``z_std``, the per-dimension standard deviation of the
  L2-normalised projections (SimSiam §4.1: ``1/√d`` without collapse, 0 when collapsed).
- ``byol`` (Grill et al., 2020): online encoder → projector → predictor (both ``Linear-BN-ReLU,
  Linear``); a target network (encoder + projector) that is the EMA of the online one (no
  gradient), with BYOL's momentum schedule ``τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2``,
  ``τ_base = 0.996`` at ``gpu`` (the paper's, for ~10^5 steps) and the profile's ``ema_momentum``
  (0.99) on the CPU profiles, where 0.996 would leave 13 % of the random initialisation in the
  target after 1000 steps (0.7 % with 0.99; :func:`~medssl_kit.methods.ema.init_share`), lower
  for a shorter run (:func:`~medssl_kit.methods.ema.ema_base`); ``k``
  the steps completed before the update (:func:`~medssl_kit.methods.ema.teacher_momentum`);
  loss ``‖p̄1 − sg z̄′2‖² + ‖p̄2 − sg z̄′1‖²``.
  Widths: paper 4096 → 256 (``gpu``); CPU 512 → 128. Logged: ``loss``, ``z_std``.
- ``mocov2`` (He et al., 2020; Chen et al., 2020): query encoder → MLP head ``Linear(C, C)-ReLU-
  Linear(C, 128)`` (MoCo v2's head, no BN); key encoder + head = EMA of the query ones with a
  constant momentum ``m``; InfoNCE of each query against its key and the ``K`` keys of a queue,
  ``τ = 0.2`` (MoCo v2); after each step the batch's keys replace the oldest queue entries (FIFO,
  wrapping around; the queue starts as random unit vectors, as in MoCo). Settings:

  * ``queue_size`` ``K``: MoCo uses 65536 for ImageNet's 1.28 M images; the SSMTL paper uses 1024
    for its ~5 000 CT slices, about a fifth of the data set. Scaled the same way to the phantom's
    pre-training slices (``pretrain`` + ``train`` cases): 16 at ``smoke`` (~80 slices), 256 at
    ``cpu`` (~1 300), 1024 at ``gpu`` (~9 600). A queue longer than the data set holds several
    stale copies of each slice, so for another data set set ``K`` to about a fifth of its slices.
  * ``key_momentum`` ``m``: 0.999 (MoCo) at ``gpu``; 0.99 on the CPU profiles, whose 10³ steps are
    too few for a key encoder averaging over ~1/(1 − m) = 1000 steps (MoCo's ablation: 0.99 works
    nearly as well as 0.999).
  * shuffling BN (MoCo §3.3) emulated on one process: the queries run through the encoder in
    ``shuffle_bn_groups`` (2) sub-batches, the keys in as many sub-batches of a random permutation
    of the batch (drawn in ``make_batch``), so a query and its key are normalised with different
    batch statistics; 1 turns it off.
  * ``in_batch_negatives`` (default off, MoCo): also contrast each query with the other samples'
    keys and queries (SimCLR's NT-Xent; see :func:`~medssl_kit.losses.contrastive.info_nce`).

  Logged: ``loss``, ``pos_cos`` (mean query–key cosine) and ``neg_cos`` (mean query–queue cosine).

Across processes (DDP, ``--nproc N``; :mod:`medssl_kit.distributed`): SimSiam's and BYOL's
projector and predictor batch norms (BYOL's target projector too) normalise over the global batch
(``SyncBatchNorm`` on CUDA, :class:`~medssl_kit.distributed.GatheredBatchNorm` on the CPU), as the
papers train them across GPUs; MoCo v2's queue takes the keys of every rank after each step, and
its in-batch negatives are every rank's (:func:`~medssl_kit.losses.contrastive.info_nce`). The
shuffled-BN emulation stays within each rank's share; the backbone's batch norm is per rank.

The projector / predictor batch norms need several samples: at the ``smoke`` profile's batch of 2
they normalise each feature to ±1 and the losses mean little (smoke runs test the plumbing only);
at the ``cpu`` batch of 8 (checked for 400 steps on the smoke phantom) SimSiam, BYOL and MoCo v2
all lower their losses without collapse (``z_std`` stays near ``1/√d``).

Restoration baseline (2D and 3D; ``dataset_kind = "volumes"``)
---------------------------------------------------------------
- ``models_genesis`` (Zhou et al., MedIA 2021): the loop draws volumes; a random crop of one of
  their non-empty axial slices (``crop_size``, 2D: slices are thus drawn per volume, as in PCRLv2's
  2D setting) or of the volume (``patch_size``, 3D), flipped along random axes (up to three
  flips, each with ``flip_rate`` 0.4, input and target alike), is the clean target; the input is
  corrupted as in the public code: local pixel shuffling (p ``local_rate`` 0.5; blocks up to 1/10
  of each side, as many per voxel as its 10 000 blocks per 64²×32 cube), a non-linear Bézier
  intensity curve (p ``nonlinear_rate`` 0.9, reversed half the time), then with p ``paint_rate``
  0.9 either in-painting (``inpaint_rate`` 0.2: up to five noise boxes of 1/6–1/3 of each side,
  each one drawn with p 0.95) or out-painting (0.8: noise everywhere but one to five boxes of
  3/7–4/7 of each side). The full UNet (skips on) and a restoration head — a 1×1 convolution on the
  decoder's last map followed by a sigmoid, Models Genesis' output layer (targets lie in [0, 1]) —
  restore the clean crop; loss ``MSE(g(f(x)), x)``. **Encoder and decoder transfer.** Logged:
  ``loss`` and ``input_mse`` (MSE of the corrupted input itself: what restoring must beat).
  In 3D at ``cpu`` the batch is 2 patches (as PCRLv2's 3D setting).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl_kit.config import get_profile
from medssl_kit.data import augment
from medssl_kit.data.augment import randint, uniform
from medssl_kit.data.datasets import SliceDataset
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.views import ViewSpec, sample_view_pair
from medssl_kit.distributed import all_gather_rows
from medssl_kit.errors import MedsslError
from medssl_kit.losses.contrastive import byol_loss, info_nce, simsiam_loss
from medssl_kit.losses.restoration import restoration_mse
from medssl_kit.methods.base import PretrainMethod
from medssl_kit.methods.ema import ema_update_, frozen_copy, teacher_momentum
from medssl_kit.models.heads import MLPHead

VIEW_DEFAULTS: dict[str, Any] = {
    "scale": (0.2, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "flip_prob": 0.5,
    "rot90_prob": 0.0,
    "max_rotation_deg": 0.0,
    "gamma": (0.7, 1.5),
    "gamma_prob": 0.5,
    "contrast": (0.6, 1.4),
    "contrast_prob": 0.8,
    "brightness": 0.1,
    "brightness_prob": 0.8,
    "blur_sigma": (0.1, 2.0),  # pixels of a 224² view; scaled with the view size
    "blur_prob": 0.5,
    "noise_prob": 0.0,
}
_BLUR_REFERENCE_SIZE = 224

SIMSIAM_SETTINGS: dict[str, Any] = {"proj_hidden": 256, "proj_dim": 256, "pred_hidden": 64}
BYOL_SETTINGS: dict[str, Any] = {
    "proj_hidden": 512,
    "proj_dim": 128,
    "pred_hidden": 512,
    "base_momentum": 0.996,
}
MOCO_SETTINGS: dict[str, Any] = {
    "proj_hidden": None,  # None: the bottleneck width C (MoCo v2: 2048 → 2048 → 128)
    "proj_dim": 128,
    "temperature": 0.2,
    "key_momentum": 0.99,  # not "momentum": that name is the loop's (SGD)
    "queue_size": 256,
    "in_batch_negatives": False,
    "shuffle_bn_groups": 2,
}
MOCO_QUEUE_SIZE = {"smoke": 16, "cpu": 256, "gpu": 1024}
GENESIS_SETTINGS: dict[str, Any] = {
    "flip_rate": 0.4,
    "local_rate": 0.5,
    "nonlinear_rate": 0.9,
    "paint_rate": 0.9,
    "inpaint_rate": 0.2,
}
# Models Genesis shuffles 10 000 blocks per 64×64×32 cube; the same number per voxel here.
SHUFFLE_BLOCKS_PER_VOXEL = 10_000 / (64 * 64 * 32)


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    """Lists (e.g. read back from config.json) as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _gap(x: Tensor) -> Tensor:
    """Global average pooling ``[B, C, *S] → [B, C]``."""
    return x.flatten(2).mean(2)


def _z_std(z: Tensor) -> Tensor:
    """Mean per-dimension standard deviation of L2-normalised ``z[B, D]`` (SimSiam §4.1)."""
    return F.normalize(z.detach(), dim=1).std(0).mean()


# --- siamese / contrastive ----------------------------------------------------------------------


class _TwoViewMethod(PretrainMethod):
    """Two augmented views of each slice; the encoder's pooled bottleneck as representation."""

    spatial_dims = (2,)
    dataset_kind = "slices"
    default_backbone = "unet"
    settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        self.cfg = self.resolve_settings({**self.settings, "view": {}})
        crop = tuple(self.cfg.get("crop_size") or get_profile(None).pretrain.crop_size)
        scale = min(crop) / _BLUR_REFERENCE_SIZE
        blur = tuple(s * scale for s in VIEW_DEFAULTS["blur_sigma"])
        view = {**VIEW_DEFAULTS, "blur_sigma": blur, **_tuples(self.cfg["view"])}
        self.view_spec = ViewSpec(size=crop, **view)
        self.width = int(backbone.encoder_channels[-1])

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """The method's settings (its paper's widths at ``gpu``); the loop's optimiser."""
        return {**cls.settings, "view": {}}

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """``view1``, ``view2`` ``[B, C, h, w]``: two views of each item's slice."""
        pairs = [sample_view_pair(item["image"], self.view_spec, generator) for item in items]
        return {
            "view1": torch.stack([p.view1 for p in pairs]),
            "view2": torch.stack([p.view2 for p in pairs]),
        }

    @staticmethod
    def embed(backbone: nn.Module, x: Tensor) -> Tensor:
        """The representation ``[B, C]``: the pooled bottleneck of ``backbone``'s encoder."""
        return _gap(backbone.encode(x)[-1])

    def transferable_state(self) -> dict[str, Tensor]:
        """The (online / query) encoder: these baselines never train the decoder."""
        return self.backbone.encoder_state_dict()


class SimSiam(_TwoViewMethod):
    """SimSiam on the pooled bottleneck (see the module docstring)."""

    name = "simsiam"
    settings = SIMSIAM_SETTINGS
    sync_batchnorm = ("projector", "predictor")

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        c = self.cfg
        self.projector = MLPHead(
            self.width, c["proj_hidden"], c["proj_dim"], n_layers=3, last_norm=True
        )
        self.predictor = MLPHead(c["proj_dim"], c["pred_hidden"], c["proj_dim"], n_layers=2)

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """Widths 2048 / 2048 / 512 at ``gpu`` (the paper), else :data:`SIMSIAM_SETTINGS`."""
        widths = {"proj_hidden": 2048, "proj_dim": 2048, "pred_hidden": 512}
        base = super().default_config(profile, spatial_dims)
        return {**base, **widths} if get_profile(profile).name == "gpu" else base

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``{"loss", "z_std"}``: SimSiam's symmetrised negative cosine."""
        z1 = self.projector(self.embed(self.backbone, batch["view1"]))
        z2 = self.projector(self.embed(self.backbone, batch["view2"]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return {"loss": simsiam_loss(p1, z1, p2, z2), "z_std": _z_std(z1)}


class BYOL(_TwoViewMethod):
    """BYOL: online network with predictor, EMA target network (see the module docstring)."""

    name = "byol"
    settings = BYOL_SETTINGS
    sync_batchnorm = ("projector", "predictor", "target.projector")

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        c = self.cfg
        self.projector = MLPHead(self.width, c["proj_hidden"], c["proj_dim"], n_layers=2)
        self.predictor = MLPHead(c["proj_dim"], c["pred_hidden"], c["proj_dim"], n_layers=2)
        online = nn.ModuleDict({"backbone": backbone, "projector": self.projector})
        self.target = frozen_copy(online)  # EMA of the online encoder and projector

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """Widths 4096 → 256 at ``gpu`` (the paper), else :data:`BYOL_SETTINGS`; the profile's
        EMA base momentum."""
        widths = {"proj_hidden": 4096, "proj_dim": 256, "pred_hidden": 4096}
        base = super().default_config(profile, spatial_dims)
        base["base_momentum"] = None  # the run's (methods.ema.ema_base)
        return {**base, **widths} if get_profile(profile).name == "gpu" else base

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``{"loss", "z_std"}``: BYOL's symmetrised normalised MSE."""
        v1, v2 = batch["view1"], batch["view2"]
        z1 = self.projector(self.embed(self.backbone, v1))
        z2 = self.projector(self.embed(self.backbone, v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target["projector"](self.embed(self.target["backbone"], v1))
            t2 = self.target["projector"](self.embed(self.target["backbone"], v2))
        return {"loss": byol_loss(p1, t1, p2, t2), "z_std": _z_std(z1)}

    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA of the target: ``ξ ← τ ξ + (1 − τ) θ``, ``τ = teacher_momentum(step − 1, …)``."""
        tau = teacher_momentum(step - 1, max_steps, float(self.cfg["base_momentum"]))
        ema_update_(self.target["backbone"], self.backbone, tau)
        ema_update_(self.target["projector"], self.projector, tau)


class MoCoV2(_TwoViewMethod):
    """MoCo v2: momentum key encoder and a queue of keys (see the module docstring)."""

    name = "mocov2"
    settings = MOCO_SETTINGS

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        c = self.cfg
        hidden = int(c["proj_hidden"] or self.width)
        dim, size = int(c["proj_dim"]), int(c["queue_size"])
        if size < 1 or int(c["shuffle_bn_groups"]) < 1:
            raise MedsslError("mocov2: queue_size and shuffle_bn_groups must be >= 1")
        if not 0.0 <= float(c["key_momentum"]) <= 1.0 or float(c["temperature"]) <= 0:
            raise MedsslError("mocov2: key_momentum must lie in [0, 1] and temperature be > 0")
        self.projector = MLPHead(self.width, hidden, dim, n_layers=2, norm="none")
        query = nn.ModuleDict({"backbone": backbone, "projector": self.projector})
        self.key_encoder = frozen_copy(query)  # momentum encoder for the keys
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))
        self._pending_keys: Tensor | None = None

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """Queue size per profile (:data:`MOCO_QUEUE_SIZE`); momentum 0.999 at ``gpu``."""
        name = get_profile(profile).name
        base = super().default_config(profile, spatial_dims)
        base["queue_size"] = MOCO_QUEUE_SIZE[name]
        if name == "gpu":
            base["key_momentum"] = 0.999
        return base

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """The two views and ``key_order``, the permutation the keys are encoded in (BN)."""
        batch = super().make_batch(items, generator)
        batch["key_order"] = torch.randperm(len(items), generator=generator)
        return batch

    def _encode(self, parts: nn.ModuleDict | None, x: Tensor) -> Tensor:
        """Projections of ``x`` through the query (``parts=None``) or key network, in
        ``shuffle_bn_groups`` sub-batches (each with its own batch-norm statistics)."""
        backbone = self.backbone if parts is None else parts["backbone"]
        projector = self.projector if parts is None else parts["projector"]
        groups = int(self.cfg["shuffle_bn_groups"])
        return torch.cat([projector(self.embed(backbone, chunk)) for chunk in x.chunk(groups)])

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``{"loss", "pos_cos", "neg_cos"}``: InfoNCE of view-1 queries against view-2 keys
        and the queue. The keys (every rank's) are kept for :meth:`on_step_end` to enqueue."""
        q = F.normalize(self._encode(None, batch["view1"]), dim=1)
        order = batch["key_order"]
        with torch.no_grad():
            shuffled = self._encode(self.key_encoder, batch["view2"][order])
            k = F.normalize(shuffled[torch.argsort(order)], dim=1)
        cfg = self.cfg
        loss = info_nce(
            q, k, self.queue, float(cfg["temperature"]), bool(cfg["in_batch_negatives"])
        )
        with torch.no_grad():
            self._pending_keys = all_gather_rows(k)[0]  # one process: k itself
        qd = q.detach()
        return {
            "loss": loss,
            "pos_cos": (qd * k).sum(1).mean(),
            "neg_cos": (qd @ self.queue.T).mean(),
        }

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys[n, D]`` over the oldest queue entries (FIFO, wrapping around); with
        ``n > K`` only the last ``K`` keys stay."""
        size, n = self.queue.shape[0], keys.shape[0]
        ptr = int(self.queue_ptr)
        kept = keys[-size:]
        start = (ptr + n - kept.shape[0]) % size
        index = (start + torch.arange(kept.shape[0], device=keys.device)) % size
        self.queue[index] = kept.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Momentum update of the key encoder (``θ_k ← m θ_k + (1 − m) θ_q``), then the
        batch's keys enter the queue."""
        m = float(self.cfg["key_momentum"])
        ema_update_(self.key_encoder["backbone"], self.backbone, m)
        ema_update_(self.key_encoder["projector"], self.projector, m)
        if self._pending_keys is not None:
            self.enqueue(self._pending_keys)
            self._pending_keys = None


# --- restoration --------------------------------------------------------------------------------


class ModelsGenesis(PretrainMethod):
    """Models Genesis: restore crops corrupted by its four transformations (module docstring).

    Args:
        backbone: a ``unet`` (2D or 3D, skips on) or any backbone whose last decoder map has the
            input's resolution.
        cfg: :data:`GENESIS_SETTINGS` keys plus ``crop_size`` (2D) / ``patch_size`` (3D).
    """

    name = "models_genesis"
    spatial_dims = (2, 3)
    dataset_kind = "volumes"
    default_backbone = "unet"

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        self.cfg = self.resolve_settings(GENESIS_SETTINGS)
        self.dims = int(backbone.spatial_dims)
        prof = get_profile(None).pretrain
        key = "crop_size" if self.dims == 2 else "patch_size"
        size = self.cfg.get(key) or getattr(prof, key)
        self.crop = tuple(int(s) for s in size)
        if len(self.crop) != self.dims:
            raise MedsslError(f"models_genesis ({self.dims}D) needs a {self.dims}D {key}")
        for rate in GENESIS_SETTINGS:
            if not 0.0 <= float(self.cfg[rate]) <= 1.0:
                raise MedsslError(f"models_genesis: {rate} must lie in [0, 1]")
        conv = nn.Conv2d if self.dims == 2 else nn.Conv3d
        self.restoration_head = conv(backbone.decoder_channels[-1], backbone.in_channels, 1)
        self._body_slices: dict[str, list[int]] = {}

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """The public code's rates; batch 2 in 3D at ``cpu``."""
        loop = {"batch_size": 2} if spatial_dims == 3 and get_profile(profile).name == "cpu" else {}
        return {**loop, **GENESIS_SETTINGS}

    # --- batches ------------------------------------------------------------------------------

    def _image(self, item: Any, generator: torch.Generator) -> Tensor:
        """The image an item contributes: a non-empty axial slice (2D) or the volume (3D)."""
        if isinstance(item, CaseVolume):
            if self.dims == 3:
                return item.image
            if item.case_id not in self._body_slices:
                rows = SliceDataset([item], context=0, skip_empty=True, with_label=False).index
                self._body_slices[item.case_id] = rows[:, 1].tolist()
            slices = self._body_slices[item.case_id]
            if not slices:
                raise MedsslError(f"case '{item.case_id}': no axial slice contains body")
            return item.image[:, slices[randint(generator, 0, len(slices) - 1)]]
        image = item["image"] if isinstance(item, Mapping) else item
        if image.ndim != self.dims + 1:
            raise MedsslError(
                f"models_genesis ({self.dims}D) needs [C, {', '.join('DHW'[3 - self.dims :])}] "
                f"images, got shape {tuple(image.shape)}"
            )
        return image

    def _random_crop(self, image: Tensor, generator: torch.Generator) -> Tensor:
        shape = tuple(image.shape[1:])
        if any(n < c for n, c in zip(shape, self.crop, strict=True)):
            raise MedsslError(
                f"models_genesis: an image of {'x'.join(map(str, shape))} voxels is smaller than "
                f"the crop {'x'.join(map(str, self.crop))}; use a smaller crop_size / patch_size"
            )
        start = [randint(generator, 0, n - c) for n, c in zip(shape, self.crop, strict=True)]
        box = tuple(slice(a, a + c) for a, c in zip(start, self.crop, strict=True))
        return image[(slice(None), *box)].clone()

    def _flip(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Up to three flips along random axes, each further one with p ``flip_rate``."""
        for _ in range(3):
            if uniform(generator, 0.0, 1.0) >= float(self.cfg["flip_rate"]):
                break
            x = x.flip(1 + randint(generator, 0, self.dims - 1))
        return x

    def corrupt(self, clean: Tensor, generator: torch.Generator) -> Tensor:
        """Models Genesis' input: local shuffling, non-linear intensity, in- or out-painting.

        ``clean`` ``[C, *S]`` in [0, 1] is never modified; every operation is one of
        :mod:`medssl_kit.data.augment`, applied with its rate, drawing from ``generator``.
        """
        cfg = self.cfg
        x = clean
        if uniform(generator, 0.0, 1.0) < float(cfg["local_rate"]):
            blocks = max(1, round(SHUFFLE_BLOCKS_PER_VOXEL * clean[0].numel()))
            x = augment.local_pixel_shuffle(x, generator, n_blocks=blocks, max_fraction=0.1)
        if uniform(generator, 0.0, 1.0) < float(cfg["nonlinear_rate"]):
            x = augment.nonlinear_intensity(x, generator)
        if uniform(generator, 0.0, 1.0) < float(cfg["paint_rate"]):
            if uniform(generator, 0.0, 1.0) < float(cfg["inpaint_rate"]):
                boxes = self._count(generator, 5)
                if boxes:
                    x = augment.inpaint(x, generator, n_boxes=boxes)
            else:
                x = augment.outpaint(x, generator, n_boxes=1 + self._count(generator, 4))
        return x if x is not clean else clean.clone()

    @staticmethod
    def _count(generator: torch.Generator, most: int, p: float = 0.95) -> int:
        """How many of ``most`` further boxes are drawn: each next one with probability ``p``."""
        n = 0
        while n < most and uniform(generator, 0.0, 1.0) < p:
            n += 1
        return n

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """``inputs`` (corrupted) and ``targets`` (clean) ``[B, C, *crop]``.

        Items are volumes (:class:`~medssl_kit.data.io.CaseVolume`) or dataset items with an
        ``"image"`` (a slice in 2D, a volume or patch in 3D). Per item: its slice (2D volumes),
        the crop, the flips (shared by input and target), then the corruption of the input.
        """
        targets = [
            self._flip(self._random_crop(self._image(item, generator), generator), generator)
            for item in items
        ]
        inputs = [self.corrupt(t, generator) for t in targets]
        return {"inputs": torch.stack(inputs), "targets": torch.stack(targets)}

    # --- the loss -----------------------------------------------------------------------------

    def _restore(self, inputs: Tensor) -> Tensor:
        top = self.backbone.decode(self.backbone.encode(inputs))[0][-1]
        return torch.sigmoid(self.restoration_head(top))

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``{"loss", "input_mse"}``: the restoration MSE, and that of the input itself."""
        restored = self._restore(batch["inputs"])
        return {
            "loss": restoration_mse(restored, batch["targets"]),
            "input_mse": F.mse_loss(batch["inputs"], batch["targets"]).detach(),
        }

    @torch.no_grad()
    def restore(self, inputs: Tensor) -> Tensor:
        """Restored images ``[B, C, *S]`` of corrupted ``inputs``, in eval mode."""
        training = self.training
        self.eval()
        try:
            return self._restore(inputs)
        finally:
            self.train(training)

    def transferable_state(self) -> dict[str, Tensor]:
        """Encoder and decoder weights (Models Genesis fine-tunes the whole encoder–decoder);
        not the restoration head nor the backbone's untrained segmentation head."""
        source = self.backbone
        prefixes = tuple(source.encoder_prefixes) + tuple(source.decoder_prefixes)
        return {k: v for k, v in source.state_dict().items() if k.startswith(prefixes)}
