"""Fine-tuning settings: the modes and :class:`FinetuneConfig`, resolved against a profile."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from medssl_kit.config import architecture_kwargs, get_profile
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.knn import DEFAULT_K

MODES = ("full", "probe", "classify", "knn", "linear", "nonlinear")
# Modes that put their own head on an ``fpn`` (the vox2vec / hierarchical papers' evaluation).
FPN_HEAD_MODES = ("linear", "nonlinear")
KNN_FEATURES = ("decoder", "encoder")
TRAIN_SPLITS = ("train", "pretrain")
NONLINEAR_LR = 3e-4  # nonlinear mode's default rate (see FinetuneConfig)


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on. ``None`` budgets come from the profile."""

    profile: str | None = None
    mode: str = "full"
    labeled: int | float | str = "all"
    seed: int = 0
    backbone: str = "unet"
    dims: int = 2
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    context: int = 0  # 2D: neighbouring slices on each side stacked as input channels
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-5
    val_every: int | None = None
    patience: int | None = None
    checkpoint_every: int | None = None
    crop_size: tuple[int, int] | None = None  # 2D training crops (inference: whole slices)
    patch_size: tuple[int, int, int] | None = None  # 3D training patch and inference ROI
    augment: bool = True
    batch_dice: bool = True  # Dice sums pooled over the batch (nnU-Net); False: per sample
    target_class: str | None = None  # classify: the class whose presence is predicted
    transfer: str = "all"  # "all" transferable weights, or "encoder" only (decoder re-initialised)
    # Learning-rate multiplier for the weights loaded from the init run (discriminative
    # fine-tuning); 1.0: one rate for every weight, 0.0: the loaded weights stay frozen (their
    # batch-norm statistics still follow the fine-tuning data).
    pretrained_lr_scale: float = 1.0
    # Steps of linear learning-rate warm-up before the poly decay; 0 (the profiles' recipe): the
    # decay starts at the full rate on the first step.
    warmup_steps: int = 0
    # knn mode: neighbours per vote, reference pixels drawn per class from the labelled cases,
    # and the features: "decoder" (the last, full-resolution decoder map) or "encoder" (every
    # encoder level, each L2-normalised and upsampled to full resolution, concatenated).
    knn_k: int = DEFAULT_K
    knn_per_class: int = 1000
    knn_features: str = "decoder"
    # nonlinear mode (the hierarchical paper's fine-tuning: 15K of 45K steps frozen, then the
    # backbone's rate raised exponentially over 1.2K steps): the share of the steps the backbone
    # stays frozen, the share over which its rate then rises, and the factor of the base rate
    # it rises from (Lightning's BackboneFinetuning, which the public code uses: 1/10).
    # The mode's rate is the papers' (Adam 3e-4, the public code's) unless ``lr`` is set; the
    # profiles' 3e-3, made for the 2D unet, made a 3D fpn's loss diverge in this mode (to 93
    # from scratch by step 40; to 9258 after unfreezing a vox2vec start).
    unfreeze_at: float = 1 / 3
    ramp_fraction: float = 1.2 / 45
    ramp_from: float = 0.1
    # A run folder whose network to build instead of the one these settings give (e.g. scratch
    # built like a pre-trained init of another size); the run's method name then says so.
    architecture_from: str | None = None
    # The split whose labelled cases are trained on: "train", or "pretrain" to train on the
    # pre-training pool's labels (a supervised start, the upper bound for what SSL on that pool
    # could transfer: `--init` a run made this way).
    train_split: str = "train"
    device: str = "auto"  # auto (CUDA where available) | cpu | cuda
    # Mixed precision in training; None: on CUDA, and on a CPU with native bfloat16 where the
    # profile asks for it (train.distributed.default_amp: the laptop profile).
    amp: bool | None = None
    workers: int | None = None  # batch-building processes; None: 0 on the CPU, up to 4 on CUDA
    channels_last: bool | None = None  # NHWC 2D convolutions; None: on CUDA for 2D

    def resolved(self) -> FinetuneConfig:
        """A copy with every ``None`` budget filled in from the profile."""
        prof = get_profile(self.profile)
        ft = prof.finetune
        out = copy.deepcopy(self)
        out.profile = prof.name
        if out.mode not in MODES:
            raise MedsslError(f"unknown fine-tuning mode '{out.mode}'; choose one of {MODES}")
        if out.dims not in (2, 3):
            raise MedsslError(f"dims must be 2 or 3, got {out.dims}")
        if out.transfer not in ("all", "encoder"):
            raise MedsslError(f"transfer must be 'all' or 'encoder', got {out.transfer!r}")
        if out.mode == "knn" and (out.dims != 2 or out.knn_features not in KNN_FEATURES):
            raise MedsslError(
                f"knn mode works on 2D slices with knn_features in {KNN_FEATURES}; got dims "
                f"{out.dims}, knn_features {out.knn_features!r}"
            )
        if out.train_split not in TRAIN_SPLITS:
            raise MedsslError(
                f"train_split must be one of {TRAIN_SPLITS} (val and test stay held out), "
                f"got {out.train_split!r}"
            )
        if out.mode in FPN_HEAD_MODES and out.backbone != "fpn" and not out.architecture_from:
            raise MedsslError(
                f"{out.mode} mode puts its head on the fpn's pyramid levels; pass --backbone fpn"
            )
        if not (0 <= out.unfreeze_at < 1 and out.ramp_fraction >= 0 and 0 < out.ramp_from <= 1):
            raise MedsslError(
                "unfreeze_at must be in [0, 1), ramp_fraction >= 0 and ramp_from in (0, 1]; got "
                f"{out.unfreeze_at!r}, {out.ramp_fraction!r}, {out.ramp_from!r}"
            )
        if not out.pretrained_lr_scale >= 0:
            raise MedsslError(f"pretrained_lr_scale must be >= 0, got {out.pretrained_lr_scale!r}")
        out.steps = 0 if out.mode == "knn" else out.steps or ft.steps
        if out.steps and not 0 <= out.warmup_steps < out.steps:
            raise MedsslError(
                f"warmup_steps must be >= 0 and below the {out.steps} training steps, "
                f"got {out.warmup_steps!r}"
            )
        out.batch_size = out.batch_size or (ft.batch_size if out.dims == 2 else ft.batch_size_3d)
        out.lr = out.lr or (NONLINEAR_LR if out.mode == "nonlinear" else ft.lr)
        out.val_every = out.val_every or ft.val_every
        out.patience = out.patience or ft.patience
        out.checkpoint_every = out.checkpoint_every or ft.checkpoint_every
        out.patch_size = tuple(out.patch_size or ft.patch_size)
        out.crop_size = tuple(out.crop_size or ft.crop_size)
        out.backbone_kwargs = {
            **architecture_kwargs(prof.name, out.backbone, out.dims),
            **out.backbone_kwargs,
        }
        return out
