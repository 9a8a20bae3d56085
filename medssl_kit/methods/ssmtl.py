"""ssmtl / ssmtl_plus — self-supervised multi-task learning on slice sequences (DESIGN §4.4).

"Self-Supervised Multi-Task Representation Learning for Sequential Medical Images". A scan is a
sequence of slices ``x^1 … x^n``; neighbouring slices show the same anatomy a little further on.

- **SSMTL** (§3.2): from slice ``j`` the encoder–decoder ``f_θ`` (our ``unet``, skips on) and two
  heads predict slice ``j − t`` (``g_φ−``) and slice ``j + t`` (``g_φ+``); eq. 1,
  ``L_pretext = MSE(g_φ−(f_θ(x^j)), x^{j−t}) + MSE(g_φ+(f_θ(x^j)), x^{j+t})``. Encoder *and*
  decoder learn, and both transfer.
- **SSMTL+** (§3.3) adds instance discrimination with a *natural* positive pair: slice ``k``, drawn
  uniformly from ``[j − 2t, j − t − 1] ∪ [j + t + 1, j + 2t]`` (never inside ``[j − t, j + t]``),
  encoded by the same encoder ``q`` (global average pooling of the bottleneck) under a
  stop-gradient; an MLP ``h`` predicts it from ``q(x^j)``; eq. 2, ``L_sim = −cos(h(q(x^j)),
  sg(q(x^k)))``; eq. 3, ``L = L_pretext + λ L_sim`` with ``λ = 1``.

The slices come from :class:`~medssl_kit.data.datasets.SliceSequenceDataset` (``dataset_kind =
"sequences"``; the loop builds it with this method's ``t`` and ``plus`` and ``ends="skip"``: only
slices ``j`` whose neighbours ``j ± t`` lie inside the volume are drawn, so a target is never a
clamped copy; with ``plus`` a ``j`` without any valid ``k`` is left out too). Logged terms:
``loss``, ``pretext`` (eq. 1), ``prev`` and ``next`` (its two MSEs) and, for SSMTL+, ``sim``
(eq. 2).

Settings (``cfg``; :data:`SETTINGS`)
------------------------------------
``t`` (int, slices; default 5, the paper's best of 5 / 10 / 15)
    the distance of the predicted slices. It counts **slices**, so its physical meaning is
    ``t · Δz`` mm and changes with the slice spacing ``Δz`` of the (resampled) volumes: the paper
    notes that "the choice of t depends on the thickness of the slice". A manifest's
    ``target_spacing`` resamples every case to one ``Δz``, making ``t`` the same distance in every
    case; without it (the phantom jitters each case's spacing by ±15 %), ``t`` slices are a
    slightly different distance per case. To keep a distance of ``d`` mm, set
    ``t = round(d / Δz)``. The phantom spans 240 mm in z: ``Δz`` = 15 mm at ``smoke`` (16 slices),
    5 mm at ``cpu`` (48), 2.5 mm at ``gpu`` (96), so ``t = 5`` is about 75, 25 and 12.5 mm.
``normalize`` ("none" or "instance"; default "none")
    ``"none"``: the slices as the manifest normalises them (windowed to [0, 1], §2.3), which is
    what fine-tuning feeds the transferred network, so pre-training and fine-tuning see the same
    inputs. ``"instance"`` is the paper's "each image is pre-processed by instance normalization":
    every slice — the input ``x^j`` and each target / partner slice on its own — z-scored per
    channel over its pixels, ``(x − mean) / max(std, 0.01)`` (the floor keeps air-only slices from
    amplifying noise). It was the default until an independent review found the mismatch: the
    network learned on per-slice z-scores and was fine-tuned on [0, 1] slices (batch norm absorbs a
    shift and scale shared by a batch, not one per slice). A run pre-trained with ``"instance"``
    records it (:attr:`input_normalization`) and fine-tuning refuses it. The paper's scale also
    set the balance of SSMTL+: on [0, 1] slices (variance about 0.06) ``L_pretext`` is about 15×
    smaller than on z-scored ones, so ``λ L_sim`` with the paper's ``λ = 1`` weighs more.
``image_size`` ((H, W) or None; default None)
    the paper resizes every slice to 256² (bilinear); ``None`` uses the slices as they are. Slices
    of one batch with different sizes are zero-padded (centred, after normalisation) to the
    largest height and width; for ``resunet`` the size is rounded up to a multiple of 32 the same
    way (the padding is part of the loss: it is equally zero in input and targets).
``lambda_sim`` (SSMTL+; default 1.0), ``predictor_hidden`` (SSMTL+; default ``C // 4``)
    ``λ`` of eq. 3, and the hidden width of ``h``.

Choices the paper leaves open, and deviations (with reasons)
------------------------------------------------------------
- **Heads.** Each head is one 1×1 convolution from the decoder's last (full-resolution) feature
  map to the image channels, as the paper's "two 1×1 convolutional layers with 64 channels for
  the input and 1 channel for the output" (64 = the paper's top UNet width; ours is the profile's
  ``channels[0]``); linear outputs. The backbone's own segmentation head is not used and does not
  transfer; neither do the two pretext heads nor ``h``.
- **``h`` (SSMTL+)**: ``Linear(C, C/4) → BN → ReLU → Linear(C/4, C)``, the paper's 2048 → 512 →
  2048 for ResNet-50's ``C = 2048`` (SimSiam's predictor shape); ``C`` is the bottleneck width.
  ``q`` is the bottleneck's global average pooling (ResNet-50 "without the final fully-connected
  layer"); there is no projector. ``x^k`` goes through the encoder under ``no_grad`` (eq. 2's
  stop-gradient), in training mode (batch statistics), after ``x^j``.
- **Batch mean** instead of the sum over scans of eq. 1 (see :func:`~medssl_kit.losses.ssmtl.
  pretext_loss`).
- **Backbone.** The paper's SSMTL runs on a U-Net (its best result, Tables 2–5), SSMTL+ on an FCN
  with a ResNet-50 encoder. Both default to our ``unet`` with the profile's fine-tuning widths, so
  that the network fine-tuned from the run is the one every other method fine-tunes; pass
  ``backbone="resunet"`` for the paper's SSMTL+ encoder (ResNet-50 at ``gpu``, ResNet-18 on CPU;
  a UNet-style decoder, not the FCN's).
- **Optimisation.** Adam with the paper's fixed learning rate 1e-3 (``schedule="constant"``) and no
  weight decay (the paper names none). Batch 16 at ``gpu`` (the paper); the ``cpu`` and ``smoke``
  profiles keep their batch sizes (8 and 2), for time. No augmentation (the paper uses none).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl_kit.config import get_profile
from medssl_kit.errors import MedsslError
from medssl_kit.losses.ssmtl import pretext_loss, similarity_loss, total_loss
from medssl_kit.methods.base import PretrainMethod
from medssl_kit.models.heads import MLPHead

NORMALIZATIONS = ("none", "instance")

SETTINGS: dict[str, Any] = {
    "t": 5,
    "plus": False,
    "normalize": "none",
    "image_size": None,
    "lambda_sim": 1.0,
    "predictor_hidden": None,
}
# Floor of the per-slice standard deviation in instance normalisation ([0, 1] intensity units).
MIN_STD = 0.01


def instance_normalize(x: Tensor, min_std: float = MIN_STD) -> Tensor:
    """Z-score each channel of ``x[C, H, W]`` over its pixels: ``(x − mean) / max(std, min_std)``.

    Population standard deviation; ``min_std`` in the intensity units of ``x``.
    """
    flat = x.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1)
    std = flat.std(1, unbiased=False).clamp_min(min_std).view(-1, 1, 1)
    return (x - mean) / std


def _pad_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad ``x[C, H, W]`` to ``size``, centred (an odd margin's extra pixel at the end)."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if not dh and not dw:
        return x
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def _gap(x: Tensor) -> Tensor:
    """Global average pooling ``[B, C, *S] → [B, C]``."""
    return x.flatten(2).mean(2)


class SSMTL(PretrainMethod):
    """SSMTL (``plus=False``) — see the module docstring for the method, settings and choices.

    Args:
        backbone: a 2D ``unet`` or ``resunet`` (anything with ``encode`` / ``decode`` whose last
            decoder map has the input's resolution).
        cfg: :data:`SETTINGS` keys (unknown keys are an error); ``plus`` must match the class.
    """

    name = "ssmtl"
    spatial_dims = (2,)
    dataset_kind = "sequences"
    default_backbone = "unet"
    plus: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        self.cfg = self.resolve_settings({**SETTINGS, "plus": self.plus})
        cfg = self.cfg
        if bool(cfg["plus"]) != self.plus:
            other = "ssmtl_plus" if cfg["plus"] else "ssmtl"
            raise MedsslError(
                f"{self.name} runs with plus={self.plus}; for plus={bool(cfg['plus'])} use "
                f"the method '{other}'"
            )
        if int(cfg["t"]) < 1:
            raise MedsslError(f"{self.name}: t must be a whole number of slices >= 1")
        if cfg["normalize"] not in NORMALIZATIONS:
            raise MedsslError(
                f"{self.name}: normalize must be one of {NORMALIZATIONS}, got {cfg['normalize']!r}"
            )
        size = cfg["image_size"]
        self.image_size = None if size is None else tuple(int(s) for s in size)
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 2):
            raise MedsslError(f"{self.name}: image_size must be (H, W) or None, got {size}")
        self.size_multiple = 32 if backbone.name == "resunet" else 1
        width, channels = backbone.decoder_channels[-1], backbone.in_channels
        self.head_prev = nn.Conv2d(width, channels, kernel_size=1)  # g_φ−, predicts x^{j−t}
        self.head_next = nn.Conv2d(width, channels, kernel_size=1)  # g_φ+, predicts x^{j+t}
        if self.plus:
            c = backbone.encoder_channels[-1]
            hidden = int(cfg["predictor_hidden"] or max(1, c // 4))
            self.predictor = MLPHead(c, hidden, c, n_layers=2, norm="batch")  # h of eq. 2

    # --- settings -----------------------------------------------------------------------------

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """The paper's Adam 1e-3 at a fixed learning rate, no weight decay, batch 16 at ``gpu``;
        ``t = 5`` and ``plus`` (which the loop passes on to the sequence dataset)."""
        loop: dict[str, Any] = {
            "optimizer": "adam",
            "lr": 1e-3,
            "schedule": "constant",
            "weight_decay": 0.0,
            "warmup_steps": 0,
        }
        if get_profile(profile).name == "gpu":
            loop["batch_size"] = 16
        return {**loop, **SETTINGS, "plus": cls.plus}

    # --- batches ------------------------------------------------------------------------------

    def _prepare(self, x: Tensor) -> Tensor:
        """Resize (``image_size``) and normalise (``normalize``) one slice ``[C, H, W]``."""
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(
                x[None], size=self.image_size, mode="bilinear", align_corners=False, antialias=True
            )[0]
        return instance_normalize(x) if self.cfg["normalize"] == "instance" else x

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """Stack :class:`~medssl_kit.data.datasets.SliceSequenceDataset` items.

        Returns ``image`` (slices ``x^j``), ``prev`` (``x^{j−t}``), ``next`` (``x^{j+t}``), each
        ``[B, C, H, W]`` after resizing, normalisation and padding (see the module docstring),
        and ``slice`` (``j``, int64 ``[B]``); with ``plus`` also ``other`` (``x^k``) and ``k``.
        Nothing is random here (``k`` is the dataset's draw); ``generator`` is unused.
        """
        keys = ["image", "prev", "next"] + (["other"] if self.plus else [])
        for item in items:
            missing = [k for k in keys if k not in item]
            if missing:
                raise MedsslError(
                    f"{self.name} needs slice-sequence items with {', '.join(keys)} "
                    f"(SliceSequenceDataset{'(plus=True)' if self.plus else ''}); "
                    f"an item lacks {', '.join(missing)}"
                )
        slices = {k: [self._prepare(item[k]) for item in items] for k in keys}
        every = [x for group in slices.values() for x in group]
        m = self.size_multiple
        size = tuple(-(-max(int(x.shape[d]) for x in every) // m) * m for d in (-2, -1))
        batch = {k: torch.stack([_pad_to(x, size) for x in group]) for k, group in slices.items()}
        batch["slice"] = torch.tensor([int(item["slice"]) for item in items])
        if self.plus:
            batch["k"] = torch.tensor([int(item["k"]) for item in items])
        return batch

    # --- the loss -----------------------------------------------------------------------------

    def _neighbours(self, enc: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The two heads on the decoder's last feature map of encoder features ``enc``."""
        top = self.backbone.decode(enc)[0][-1]
        return self.head_prev(top), self.head_next(top)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``{"loss", "pretext", "prev", "next"[, "sim"]}`` (eq. 1–3) for one batch."""
        x = batch["image"]
        enc = self.backbone.encode(x)
        pred_prev, pred_next = self._neighbours(enc)
        if pred_prev.shape != batch["prev"].shape:
            raise MedsslError(
                f"{self.name} needs the backbone's last decoder map at the input resolution; got "
                f"predictions {list(pred_prev.shape)} for slices {list(batch['prev'].shape)}"
            )
        pretext, minus, plus = pretext_loss(pred_prev, batch["prev"], pred_next, batch["next"])
        terms = {"pretext": pretext, "prev": minus, "next": plus}
        sim = None
        if self.plus:
            prediction = self.predictor(_gap(enc[-1]))  # h(q(x^j))
            with torch.no_grad():  # eq. 2's stop-gradient: q(x^k) is a constant
                target = _gap(self.backbone.encode(batch["other"])[-1])
            sim = similarity_loss(prediction, target)
            terms["sim"] = sim
        return {"loss": total_loss(pretext, sim, float(self.cfg["lambda_sim"])), **terms}

    @torch.no_grad()
    def predict_neighbours(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted slices ``(x̂^{j−t}, x̂^{j+t})`` for prepared slices ``images[B, C, H, W]``
        (a batch's ``"image"``), in eval mode, in the units of the batch's targets."""
        training = self.training
        self.eval()
        try:
            return self._neighbours(self.backbone.encode(images))
        finally:
            self.train(training)

    @property
    def input_normalization(self) -> str:
        """``"instance"`` with per-slice z-scores, else the manifest's ``"window"``."""
        return "instance" if self.cfg["normalize"] == "instance" else "window"

    def transferable_state(self) -> dict[str, Tensor]:
        """Encoder and decoder weights (SSMTL pre-trains both); not the heads or ``h``."""
        source = self.backbone
        prefixes = tuple(source.encoder_prefixes) + tuple(source.decoder_prefixes)
        return {k: v for k, v in source.state_dict().items() if k.startswith(prefixes)}


class SSMTLPlus(SSMTL):
    """SSMTL+ (``plus=True``): SSMTL plus the SimSiam-style term between slices ``j`` and ``k``."""

    name = "ssmtl_plus"
    plus = True
