"""Profiles (smoke / laptop / cpu / gpu).

A profile fixes the sizes and budgets of every stage so that one switch takes the whole workbench
from a seconds-long smoke test to the papers' settings. The active profile is the ``--profile``
argument where a command has one, else the ``MEDSSL_PROFILE`` environment variable, else ``cpu``.

- ``smoke``: tiny shapes and a handful of steps; proves the code runs (CI, nbval).
- ``laptop``: the main job (``make run``), sized for an hour on 2 cores: the ``cpu`` phantom and
  every method's ``cpu`` recipe at a fifth of its pre-training steps, the ``cpu`` fine-tuning
  recipe (800 steps) at one labelled case × two seeds for every start (and all labels for
  scratch at the first seed, the reference), in bfloat16 on a CPU that computes it natively
  (docs/results/i35/2026-12-07-laptop-costs.md).
- ``cpu``: the full matrix at a laptop's sizes — every budget × three seeds; the settings behind
  every recorded result (docs/results.md).
- ``gpu``: the papers' sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

PROFILE_ENV = "MEDSSL_PROFILE"
DEFAULT_PROFILE = "cpu"


@dataclass(frozen=True)
class PhantomSettings:
    """Size of the default phantom a profile generates, and its benchmark split (case counts)."""

    cases: int
    shape: tuple[int, int, int]  # (D, H, W) voxels: axial slices first
    split: dict[str, int] = field(default_factory=dict)  # pretrain / train / val / test counts


@dataclass(frozen=True)
class FinetuneSettings:
    """Budgets of one fine-tuning run (optimizer steps, not epochs)."""

    steps: int
    batch_size: int
    val_every: int  # steps between validations (early stopping, model selection)
    patience: int  # validations without improvement before stopping
    checkpoint_every: int
    channels: tuple[int, ...]  # widths of the ``unet`` backbone
    crop_size: tuple[int, int]  # 2D training crops (H, W); inference runs on whole slices
    patch_size: tuple[int, int, int]  # 3D training patches / sliding-window ROI (D, H, W)
    batch_size_3d: int
    budgets: tuple[int | str, ...]  # default label budgets of a label-efficiency curve
    seeds: tuple[int, ...]  # default seeds of each budget (mean ± sd over them)
    lr: float = 1e-3
    resnet: str = "resnet18"  # the ResNet encoder of the ``resunet`` backbone
    # Budgets scratch also runs in the pipeline, at the first seed: the reference a profile that
    # compares the methods at few labels alone keeps (what all labels reach).
    reference_budgets: tuple[int | str, ...] = ()


@dataclass(frozen=True)
class PretrainSettings:
    """Budgets of one pre-training run; a method's own per-profile defaults refine them."""

    steps: int
    batch_size: int
    checkpoint_every: int
    crop_size: tuple[int, ...]  # 2D view size (H, W); 3D methods use patch_size
    patch_size: tuple[int, int, int]  # 3D crops (D, H, W)
    # Base momentum of the EMA teachers / target networks (pixel_global, BYOL), rising on BYOL's
    # cosine to 1. The papers' 0.996 is made for ~10^5 steps: after K steps the teacher still
    # holds about exp(−(1 − base)·K/2) of its random initialisation (0.996: 0.13 at 1000 steps,
    # 0.45 at 400), so the short profiles use 0.99 (0.007 at 1000 steps; methods.ema
    # :func:`~medssl_kit.methods.ema.init_share`). A method with a shorter budget lowers it.
    ema_momentum: float = 0.996
    # Pre-training steps as a share of the method recipe's (``methods_as``); the methods'
    # EMA bases follow the shorter runs (methods.ema.base_momentum_for).
    step_scale: float = 1.0


@dataclass(frozen=True)
class Profile:
    name: str
    phantom: PhantomSettings
    finetune: FinetuneSettings
    pretrain: PretrainSettings
    # The profile whose method recipes (each method's steps, view sizes, batches, queue sizes)
    # apply; ``None``: this one's.
    methods_as: str | None = None
    # Train in bfloat16 autocast on a CPU that computes it natively when a run leaves ``amp``
    # unset (train.distributed.default_amp); CUDA always uses mixed precision.
    cpu_amp: bool = False

    @property
    def recipes(self) -> str:
        """The profile name the methods' ``default_config`` is asked for."""
        return self.methods_as or self.name


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        phantom=PhantomSettings(
            cases=8, shape=(16, 64, 64), split={"pretrain": 3, "train": 2, "val": 1, "test": 2}
        ),
        finetune=FinetuneSettings(
            steps=6,
            batch_size=4,
            val_every=3,
            patience=2,
            checkpoint_every=3,
            channels=(8, 16, 32, 64, 128),
            crop_size=(48, 48),
            patch_size=(16, 32, 32),
            batch_size_3d=2,
            budgets=(1, "all"),
            seeds=(0,),
        ),
        pretrain=PretrainSettings(
            steps=4,
            batch_size=2,
            checkpoint_every=2,
            crop_size=(48, 48),
            patch_size=(16, 32, 32),
            ema_momentum=0.99,
        ),
    ),
    "cpu": Profile(
        name="cpu",
        phantom=PhantomSettings(
            cases=40, shape=(48, 128, 128), split={"pretrain": 20, "train": 8, "val": 4, "test": 8}
        ),
        finetune=FinetuneSettings(
            # 800 steps at Adam 3e-3 with batch Dice: all-labels organ Dice 0.90 in ~110 s. At
            # 1e-3 (with per-sample Dice) some seeds left an organ unlearned until ~1600 steps.
            steps=800,
            batch_size=8,
            val_every=200,
            patience=3,
            checkpoint_every=200,
            channels=(16, 32, 64, 128, 256),
            crop_size=(96, 96),
            patch_size=(32, 64, 64),
            batch_size_3d=2,
            budgets=(1, 2, 4, "all"),
            seeds=(0, 1, 2),
            lr=3e-3,
        ),
        pretrain=PretrainSettings(
            steps=1000,
            batch_size=8,
            checkpoint_every=100,
            crop_size=(96, 96),
            patch_size=(32, 64, 64),
            ema_momentum=0.99,
        ),
    ),
    "gpu": Profile(
        name="gpu",
        phantom=PhantomSettings(
            cases=120,
            shape=(96, 256, 256),
            split={"pretrain": 80, "train": 20, "val": 5, "test": 15},
        ),
        finetune=FinetuneSettings(
            steps=5000,
            batch_size=8,
            val_every=250,
            patience=6,
            checkpoint_every=250,
            channels=(32, 64, 128, 256, 512),
            crop_size=(224, 224),
            patch_size=(64, 128, 128),
            batch_size_3d=2,
            budgets=(1, 2, 5, 10, "all"),
            seeds=(0, 1, 2),
            resnet="resnet50",
        ),
        pretrain=PretrainSettings(
            steps=20000,
            batch_size=8,
            checkpoint_every=1000,
            crop_size=(224, 224),
            patch_size=(64, 128, 128),
        ),
    ),
}

# The main job (make run), sized for an hour on 2 cores: the cpu profile's phantom, method recipes
# at a fifth of their pre-training steps, and its fine-tuning recipe (800 steps: at 400 the
# all-labels reference fell below one case, 0.494 against 0.581) validated once, at the end, one
# labelled case x two seeds for every start and scratch at all labels, seed 0, as the reference
# (a quarter of the pre-training, a validation at 400 and the reference at both seeds took
# 60 min 6 s end to end, and with only the first two changed 59 min 48 s), in
# bfloat16 where the CPU computes it natively (a fine-tuning step in 0.54 of the float32 time;
# one case 0.675, all labels 0.889 at 800 steps). docs/results/i35/2026-12-07-laptop-costs.md.
_CPU = PROFILES["cpu"]
PROFILES["laptop"] = replace(
    _CPU,
    name="laptop",
    finetune=replace(
        _CPU.finetune, val_every=800, budgets=(1,), seeds=(0, 1), reference_budgets=("all",)
    ),
    pretrain=replace(_CPU.pretrain, step_scale=0.2),
    methods_as="cpu",
    cpu_amp=True,
)


def architecture_kwargs(profile: str | None, backbone: str, dims: int = 2) -> dict[str, object]:
    """The structure of a profile's fine-tuned ``backbone``: the ``unet`` widths, the ``resunet``
    ResNet (ResNet-18 on CPU, the pixel-global paper's ResNet-50 at ``gpu``), the ``unetr``'s
    fixed input size (the fine-tuning patch in 3D, crop in 2D; inference tiles whole slices and
    volumes with it), the ``fpn``'s depth and width at ``smoke``; nothing for the others (their
    defaults).

    Fine-tuning builds this network for every start, scratch included, and every pre-training
    method starts from it (adding only what training needs, e.g. decoder dropout), so that a
    comparison differs in the start alone; fine-tuning refuses a run of another structure.
    """
    ft = get_profile(profile).finetune
    if backbone == "unet":
        return {"channels": list(ft.channels)}
    if backbone == "resunet":
        return {"backbone": ft.resnet}
    if backbone == "unetr":
        return {"img_size": list(ft.patch_size if dims == 3 else ft.crop_size)}
    if backbone == "fpn" and get_profile(profile).name == "smoke":
        # vox2vec's six levels need 32-voxel sides; smoke's patches have 16 slices
        return {"n_levels": 4, "base_channels": 8}
    return {}


def get_profile(name: str | None = None) -> Profile:
    """Return the named profile, or the one ``MEDSSL_PROFILE`` selects (default ``cpu``)."""
    name = name or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile '{name}'; choose one of {sorted(PROFILES)}") from None
