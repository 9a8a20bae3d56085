"""What every backbone shares: the feature contract, MC-dropout control, and small helpers.

Every backbone of the family (§3.1) is an ``nn.Module`` whose ``forward(x)`` returns logits and
whose ``forward_features(x)`` returns a :class:`BackboneFeatures`:

- ``encoder``: the encoder's feature maps, highest resolution first, bottleneck last;
- ``decoder``: the decoder's (or top-down pathway's) feature maps, lowest resolution first, full
  resolution last;
- ``output``: the logits, identical to ``forward(x)``.

Every backbone also carries ``name``, ``config`` (the arguments that rebuild it through
``build_backbone(**config)``), ``spatial_dims``, ``in_channels``, ``out_channels``,
``encoder_channels``, ``decoder_channels`` and ``encoder_prefixes`` (the ``state_dict`` key
prefixes that make up "the encoder", the part most methods transfer).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("batch", "instance", "group")

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Every normalisation layer a backbone may hold (batch, instance, group, layer norm).
NORM_TYPES = (
    *_BATCH_NORM_TYPES,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)


@dataclass
class BackboneFeatures:
    """The feature maps of one forward pass (all tensors are ``[B, C, *spatial]``).

    ``encoder`` runs from the highest resolution to the bottleneck, ``decoder`` from the lowest
    resolution to full resolution, ``output`` holds the logits.
    """

    encoder: list[Tensor]
    decoder: list[Tensor]
    output: Tensor


class BackboneMixin:
    """Helpers shared by the backbones; mixed into ``nn.Module`` subclasses.

    Subclasses set ``name``, ``encoder_prefixes`` and ``decoder_prefixes`` (``state_dict`` key
    prefixes) and the attributes listed in the module docstring.
    """

    name: ClassVar[str]
    encoder_prefixes: ClassVar[tuple[str, ...]]
    decoder_prefixes: ClassVar[tuple[str, ...]]
    features_type: ClassVar[type[BackboneFeatures]] = BackboneFeatures
    config: dict[str, Any]

    def forward_features(self, x: Tensor) -> BackboneFeatures:
        """Encoder features, decoder features and logits of one pass through ``encode`` and
        ``decode`` (backbones with that pair; the others override this and ``forward``)."""
        encoded = self.encode(x)  # type: ignore[attr-defined]
        decoded, logits = self.decode(encoded)  # type: ignore[attr-defined]
        return self.features_type(encoder=encoded, decoder=decoded, output=logits)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, out_channels, *spatial]`` at the input's resolution."""
        return self.decode(self.encode(x))[1]  # type: ignore[attr-defined]

    @property
    def dropout_layers(self) -> list[nn.Module]:
        """The dropout modules of the decoder, in registration order (empty without dropout).

        These are what Monte-Carlo dropout switches on (Gal & Ghahramani; the pixel-global
        paper's uncertainty map, eq. 6). The encoder never holds dropout.
        """
        return [
            module
            for name, module in self.named_modules()  # type: ignore[attr-defined]
            if isinstance(module, _DROPOUT_TYPES) and name.startswith(self.decoder_prefixes)
        ]

    @staticmethod
    def _keep_dropout_in_last(blocks: nn.ModuleList, levels: int | None) -> None:
        """Leave dropout in the last ``levels`` of the decoder ``blocks`` (deepest first) only:
        every dropout module of the earlier blocks becomes an identity. ``None`` keeps all."""
        if levels is None:
            return
        if not 1 <= levels <= len(blocks):
            raise ValueError(f"dropout_levels must be in 1..{len(blocks)} or None, got {levels}")
        for block in list(blocks)[: len(blocks) - levels]:
            for name, module in list(block.named_modules()):
                if isinstance(module, _DROPOUT_TYPES):
                    parent, _, leaf = name.rpartition(".")
                    setattr(block.get_submodule(parent), leaf, nn.Identity())

    def set_mc_dropout(self, active: bool) -> None:
        """Switch the decoder's dropout on (``True``) or off without touching any other layer.

        Call it *after* ``.eval()`` (which switches dropout off again): the usual MC-dropout
        recipe is ``net.eval(); net.set_mc_dropout(True)`` so that normalisation layers use
        their running statistics while dropout keeps sampling masks.
        """
        for module in self.dropout_layers:
            module.train(active)

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The ``state_dict`` entries whose keys start with one of ``encoder_prefixes``."""
        state = self.state_dict()  # type: ignore[attr-defined]
        return {k: v for k, v in state.items() if k.startswith(self.encoder_prefixes)}


class LevelStackMixin:
    """``n_levels`` and ``encode`` for backbones whose encoder is an ``nn.ModuleList`` of levels,
    the first at full resolution and each next one 2× smaller (``unet``, ``fpn``)."""

    encoder: nn.ModuleList
    spatial_dims: int
    in_channels: int
    name: ClassVar[str]

    @property
    def n_levels(self) -> int:
        """Number of resolution levels (encoder blocks)."""
        return len(self.encoder)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Encoder features, full resolution first, bottleneck (``2**(n-1)``× smaller) last."""
        check_input(x, self.spatial_dims, self.in_channels, 2 ** (self.n_levels - 1), self.name)
        feats = []
        for level in self.encoder:
            x = level(x)
            feats.append(x)
        return feats


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Inside the block, every batch-norm layer of ``module`` normalises with the statistics of
    the batch it is given, as in training, and every other layer keeps its mode.

    The running statistics (and ``num_batches_tracked``) are restored on exit, so inspecting a
    network this way changes nothing in it. For networks whose running statistics do not describe
    the inputs at hand, e.g. PCRLv2's, which also see 16³ local views (1³ at the deepest level).
    """
    norms = [m for m in module.modules() if isinstance(m, _BATCH_NORM_TYPES)]
    saved = [(m, m.training, [b.clone() for b in m.buffers(recurse=False)]) for m in norms]
    for m in norms:
        m.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mode, buffers in saved:
                m.train(mode)
                for b, kept in zip(m.buffers(recurse=False), buffers, strict=True):
                    b.copy_(kept)


class RecordedBatchStatistics:
    """The batch statistics a module's batch-norm layers normalised with in one train-mode pass,
    replayed as fixed statistics in later passes.

    :meth:`recording` notes each layer's per-channel mean and (biased) variance of its input;
    within :meth:`replaying` those layers run in eval mode with the noted values as their running
    statistics, so a replayed pass normalises every row exactly as the recorded pass did, and
    however its rows are batched. The layers' own buffers and modes are restored afterwards.
    With ``after``, only the layers called after that module (in call order within the
    recording) are noted: those a replayed pass starting there runs.
    """

    def __init__(self, module: nn.Module, after: nn.Module | None = None) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, _BATCH_NORM_TYPES)]
        self.after = after
        self.stats: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._armed = after is None

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if not self._armed:
            return
        x = inputs[0].detach().float()  # in float32, as the layer's own statistics (amp)
        dims = [0, *range(2, x.ndim)]
        self.stats[module] = (x.mean(dims), x.var(dims, unbiased=False))

    def _arm(self, *_: Any) -> None:
        self._armed = True

    @contextmanager
    def recording(self) -> Iterator[None]:
        self._armed = self.after is None
        handles = [m.register_forward_pre_hook(self._record) for m in self.layers]
        if self.after is not None:
            handles.append(self.after.register_forward_hook(self._arm))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        saved = [(m, m.training, m.running_mean, m.running_var) for m in self.stats]
        try:
            for m, (mean, var) in self.stats.items():
                m.eval()
                m.running_mean, m.running_var = mean, var
            yield
        finally:
            for m, training, mean, var in saved:
                m.training, m.running_mean, m.running_var = training, mean, var


def monai_norm(norm: str, groups: int = 8) -> str | tuple[str, dict[str, Any]]:
    """Translate a norm name (``"batch"``, ``"instance"``, ``"group"``) into MONAI's norm argument.

    Instance norm gets learnable affine parameters (as in MONAI's ``BasicUNet``); group norm uses
    ``groups`` groups.
    """
    if norm == "batch":
        return "batch"
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "group":
        return ("group", {"num_groups": groups})
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def check_group_norm(norm: str, groups: int, channels: Sequence[int]) -> None:
    """Raise ``ValueError`` when group norm cannot split every width in ``channels`` evenly."""
    if norm != "group":
        return
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"group norm with {groups} groups needs widths divisible by {groups}; "
            f"got {list(bad)} (change channels or norm_groups)"
        )


def check_input(x: Tensor, spatial_dims: int, in_channels: int, min_size: int, who: str) -> None:
    """Raise ``ValueError`` unless ``x`` is ``[B, in_channels, *S]`` with every side >= min_size."""
    if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
        raise ValueError(
            f"{who} expects input of shape [B, {in_channels}, {', '.join('S' * spatial_dims)}] "
            f"({spatial_dims}D), got {list(x.shape)}"
        )
    if min(x.shape[2:]) < min_size:
        raise ValueError(
            f"{who} needs every spatial side >= {min_size} voxels (one per downsampling), "
            f"got {list(x.shape[2:])}"
        )


def pad_to_match(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Pad ``x`` at the high end of each spatial axis (replicate) up to ``shape``.

    After a 2× downsampling that floored an odd side, 2× upsampling comes back one voxel short;
    this restores the size of the matching encoder level, as MONAI's ``UpCat`` does.
    """
    missing = [int(s) - int(c) for s, c in zip(shape, x.shape[2:], strict=True)]
    if not any(missing):
        return x
    pad: list[int] = []
    for m in reversed(missing):  # F.pad lists the last axis first
        pad += [0, m]
    return F.pad(x, pad, mode="replicate")
