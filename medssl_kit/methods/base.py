"""The interface every pre-training method implements (DESIGN §4.0).

The loop (:func:`medssl_kit.train.pretrain.pretrain`) knows nothing method-specific: it draws
dataset items, asks the method to turn them into a batch, calls ``forward`` for a dict of named
loss terms (``"loss"`` is optimised, every term is logged), steps the optimizer, then calls
``on_step_end`` (EMA teachers, schedules). After training it saves ``transferable_state()``.

A method declares which dataset it consumes (``dataset_kind``):

- ``"slices"``: :class:`~medssl_kit.data.datasets.SliceDataset` items (2D methods);
- ``"sequences"``: :class:`~medssl_kit.data.datasets.SliceSequenceDataset` items (SSMTL);
- ``"patches"``: :class:`~medssl_kit.data.datasets.PatchDataset` items (3D methods);
- ``"volumes"``: whole :class:`~medssl_kit.data.io.CaseVolume` objects (methods that crop
  themselves, e.g. PCRLv2's sub-crop or two overlapping crops of one volume);
- ``"pooled_volumes"``: the *labelled* volumes, each with the other volumes of its source
  (``{"volume", "partners", "ignore_index"}``; MixCL).

and its defaults: ``default_config(profile, dims)`` returns the method's own settings plus
overrides of the loop's settings (optimizer, lr, steps, ...), following its paper; deviations are
documented in the method's docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from medssl_kit.errors import MedsslError

DATASET_KINDS = ("slices", "sequences", "patches", "volumes", "pooled_volumes")
# Keys the pre-training loop adds to every method's settings (the view and patch sizes).
LOOP_KEYS = ("crop_size", "patch_size")


class PretrainMethod(nn.Module):
    """Base class of the pre-training methods.

    Args:
        backbone: a backbone of the family (``build_backbone``); the method owns it as
            ``self.backbone`` and may wrap it with heads, teachers, predictors.
        cfg: the method's settings (``default_config(profile)`` merged with user overrides).
    """

    name: ClassVar[str]
    spatial_dims: ClassVar[tuple[int, ...]]
    dataset_kind: ClassVar[str] = "slices"
    default_backbone: ClassVar[str] = "unet"
    # Submodules (dotted paths) whose batch norm defines the objective and must normalise over
    # the global batch when training in several processes (SimSiam's projector and predictor,
    # ...); the loop converts them (medssl_kit.distributed.convert_sync_batchnorm).
    sync_batchnorm: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__()
        if backbone.spatial_dims not in self.spatial_dims:
            raise ValueError(
                f"method '{self.name}' supports {self.spatial_dims}-D backbones, "
                f"got a {backbone.spatial_dims}-D one"
            )
        self.backbone = backbone
        self.cfg: dict[str, Any] = dict(cfg or {})

    def resolve_settings(self, known: Mapping[str, Any]) -> dict[str, Any]:
        """``known`` (the method's settings and their defaults) updated with the given ``cfg``;
        a key that is neither known nor one the loop adds (:data:`LOOP_KEYS`) is an error that
        lists the known ones."""
        unknown = sorted(set(self.cfg) - set(known) - set(LOOP_KEYS))
        if unknown:
            raise MedsslError(
                f"{self.name}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return {**known, **self.cfg}

    def view_size(self) -> tuple[int, ...]:
        """The spatial size of the views the loop cuts for this method: ``patch_size`` for a 3D
        backbone, ``crop_size`` for a 2D one (:data:`LOOP_KEYS`), as ``spatial_dims`` ints."""
        dims = self.backbone.spatial_dims
        size = self.cfg.get("patch_size" if dims == 3 else "crop_size")
        if size is None:
            key = "patch_size" if dims == 3 else "crop_size"
            raise MedsslError(f"{self.name} ({dims}D) needs the view size: set {key}")
        return tuple(int(s) for s in size)[-dims:]

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """Settings for ``profile`` and dims: the method's own keys and loop overrides
        (optimizer, lr, batch_size, ``backbone``, ...; see ``train.pretrain.PretrainConfig``)."""
        return {}

    @classmethod
    def backbone_kwargs(cls, profile: str, spatial_dims: int, backbone: str) -> dict[str, Any]:
        """Options the method needs from ``backbone`` (e.g. decoder dropout, skips off), on top of
        the profile's fine-tuning network (:func:`~medssl_kit.config.architecture_kwargs`)."""
        return {}

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """Turn dataset items into the tensors ``forward`` consumes (views, targets...)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Return ``{"loss": scalar, <term>: scalar, ...}``; every entry is logged."""
        raise NotImplementedError

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called after each optimizer step (``step`` counts from 1)."""

    @property
    def input_normalization(self) -> str:
        """How the images the backbone trains on are normalised: ``"window"``, the manifest's
        intensity normalisation (§2.3), which fine-tuning feeds too. A method that feeds its
        backbone otherwise names its scheme; fine-tuning refuses such a run rather than transfer
        weights to inputs they never saw (recorded in ``transferable.pt``)."""
        return "window"

    def transferable_state(self) -> dict[str, Tensor]:
        """The backbone weights a fine-tuning run starts from (default: all of them)."""
        return self.backbone.state_dict()
