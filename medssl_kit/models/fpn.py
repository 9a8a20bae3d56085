"""vox2vec-style feature pyramid network (2D and 3D) with per-level features.

vox2vec (Goncharov et al., MICCAI 2023), as summarised in the hierarchical dense SSL paper (§1,
§2.2, §3.2): a voxel is represented by the concatenation of its feature vectors from *all* levels
of an FPN; six levels with base width 16 doubling per level give 16+32+…+512 = 1008 dimensions.
The hierarchical dense SSL variant uses one level fewer and doubled widths
(``n_levels=5, base_channels=32``). The papers give no layer-by-layer description, so this is our
reading (documented choice):

- bottom-up (``encoder``): level 0 is a 3×3 stem convolution ``in_channels → c0`` followed by
  ``blocks_per_level`` pre-activation residual blocks; level ``i ≥ 1`` is a 2× strided
  convolution (kernel 2, stride 2) ``c_{i-1} → c_i`` followed by residual blocks. Widths
  ``c_i = base_channels · 2**i``.
- residual block (He et al., pre-activation): ``x + conv(act(norm(conv(act(norm(x))))))`` with
  3×3 convolutions.
- top-down (``decoder``): the deepest level's map is the top of the pyramid; every shallower level
  ``i`` gets ``p_i = blocks(e_i + up(p_{i+1}))``, where ``up`` is a 2× transposed convolution
  (kernel 2, stride 2) ``c_{i+1} → c_i`` and ``e_i`` the bottom-up map (lateral addition, no
  lateral 1×1 convolution since the widths already agree).
- pyramid levels: ``p_0 … p_{L-1}``, level ``i`` at ``1/2**i`` resolution with ``c_i`` channels.
- ``head`` (``head="linear"``, the default): the papers' linear evaluation head — a 1×1
  convolution per level to ``out_channels``, each upsampled (linear interpolation) to full
  resolution, summed (:class:`LevelSumHead`). ``head="nonlinear"``: the papers' fine-tuning head,
  a light top-down pathway of 1×1 convolutions and residual units over the pyramid
  (:class:`NonLinearHead`). The head never transfers (it is not the backbone's structure).

MONAI has no FPN of this kind: a run's FPN weights load only into this class (``build_backbone
(**header["backbone"])`` on a ``transferable.pt`` header, see the README's export section).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from monai.networks.blocks import ADN, ResidualUnit
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from medssl_kit.models.base import (
    BackboneFeatures,
    BackboneMixin,
    LevelStackMixin,
    check_group_norm,
    monai_norm,
    pad_to_match,
)


@dataclass
class FPNFeatures(BackboneFeatures):
    """:class:`BackboneFeatures` of the FPN; ``decoder`` is the pyramid, coarsest level first."""

    @property
    def levels(self) -> list[Tensor]:
        """Pyramid levels ``p_0 … p_{L-1}``, highest resolution first."""
        return self.decoder[::-1]


class PreActResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv3(act(norm(conv3(act(norm(x))))))``."""

    def __init__(
        self, spatial_dims: int, channels: int, norm: str | tuple, act: str | tuple
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2):
            layers.append(
                ADN(ordering="NA", in_channels=channels, act=act, norm=norm, norm_dim=spatial_dims)
            )
            layers.append(Conv["conv", spatial_dims](channels, channels, kernel_size=3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Identity plus the residual branch (same shape as ``x``)."""
        return x + self.body(x)


class TopDownBlock(nn.Module):
    """Upsample the deeper pyramid level, add the lateral bottom-up map, refine with res blocks."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        n_blocks: int,
        norm: str | tuple,
        act: str | tuple,
    ) -> None:
        super().__init__()
        up = Conv["convtrans", spatial_dims]
        self.up = up(in_channels, out_channels, kernel_size=2, stride=2)
        self.blocks = nn.Sequential(
            *[PreActResBlock(spatial_dims, out_channels, norm, act) for _ in range(n_blocks)]
        )

    def forward(self, deeper: Tensor, lateral: Tensor) -> Tensor:
        """``blocks(lateral + up(deeper))``; ``up`` is padded to the lateral map's size."""
        return self.blocks(lateral + pad_to_match(self.up(deeper), lateral.shape[2:]))


class LevelSumHead(nn.Module):
    """Per-level 1×1 convolution, linear upsampling to full resolution, sum (a linear head)."""

    def __init__(self, spatial_dims: int, level_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [Conv["conv", spatial_dims](c, out_channels, kernel_size=1) for c in level_channels]
        )
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        """Sum of the upsampled per-level logits; ``levels`` highest resolution first."""
        size = levels[0].shape[2:]
        out = self.convs[0](levels[0])
        for conv, level in zip(self.convs[1:], levels[1:], strict=True):
            out = out + F.interpolate(conv(level), size=size, mode=self.mode, align_corners=False)
        return out


class NonLinearHead(nn.Module):
    """The non-linear fine-tuning head on the pyramid (vox2vec's, as the hierarchical paper uses).

    From the coarsest level down: ``x = unit_i(lateral_i(p_i) + up(reduce_i(x)))``, where
    ``reduce_i`` is a 1×1 convolution ``c_{i+1} → c_i``, ``up`` nearest-neighbour upsampling to
    level ``i``'s size, ``lateral_i`` a 1×1 convolution and ``unit_i`` a MONAI ``ResidualUnit``
    of 1×1 convolutions (the coarsest level gets a unit alone); then a 1×1 convolution of the
    full-resolution map to ``out_channels``. Every convolution is 1×1, so the head mixes levels
    and channels but adds no spatial context of its own.
    """

    def __init__(
        self,
        spatial_dims: int,
        level_channels: Sequence[int],
        out_channels: int,
        norm: str | tuple,
        act: str | tuple,
    ) -> None:
        super().__init__()
        conv = Conv["conv", spatial_dims]
        channels = list(level_channels)

        def unit(c: int) -> nn.Module:
            return ResidualUnit(spatial_dims, c, c, kernel_size=1, subunits=2, norm=norm, act=act)

        self.units = nn.ModuleList(unit(c) for c in channels)
        self.reduce = nn.ModuleList(
            conv(channels[i + 1], channels[i], kernel_size=1) for i in range(len(channels) - 1)
        )
        self.lateral = nn.ModuleList(conv(c, c, kernel_size=1) for c in channels[:-1])
        self.out = conv(channels[0], out_channels, kernel_size=1)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        """Logits at the resolution of ``levels[0]`` (``levels`` highest resolution first)."""
        x = self.units[-1](levels[-1])
        for i in range(len(levels) - 2, -1, -1):
            up = F.interpolate(self.reduce[i](x), size=levels[i].shape[2:], mode="nearest")
            x = self.units[i](self.lateral[i](levels[i]) + up)
        return self.out(x)


HEADS = ("linear", "nonlinear")


class FPN(LevelStackMixin, BackboneMixin, nn.Module):
    """vox2vec-style FPN with pre-activation residual blocks (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: logits channels of the level-sum head.
        n_levels: pyramid levels (vox2vec: 6; hierarchical dense SSL: 5).
        base_channels: width of level 0, doubled per level (vox2vec: 16; hierarchical: 32).
        blocks_per_level: residual blocks per level, in each pathway.
        norm: ``"batch"``, ``"instance"`` (affine) or ``"group"`` (``norm_groups`` groups).
        norm_groups: groups for group norm.
        act: MONAI activation name or ``(name, kwargs)``.
        head: ``"linear"`` (:class:`LevelSumHead`, the linear probe) or ``"nonlinear"``
            (:class:`NonLinearHead`, the fine-tuning head).

    Inputs may have any spatial size with every side ≥ ``2**(n_levels-1)``.
    """

    name = "fpn"
    features_type = FPNFeatures
    encoder_prefixes = ("encoder.",)
    decoder_prefixes = ("decoder.",)

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        *,
        n_levels: int = 6,
        base_channels: int = 16,
        blocks_per_level: int = 1,
        norm: str = "batch",
        norm_groups: int = 8,
        act: str | tuple = "relu",
        head: str = "linear",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if n_levels < 1 or base_channels < 1 or blocks_per_level < 0:
            raise ValueError(
                "n_levels and base_channels must be >= 1 and blocks_per_level >= 0, got "
                f"{n_levels}, {base_channels}, {blocks_per_level}"
            )
        channels = [base_channels * 2**i for i in range(n_levels)]
        check_group_norm(norm, norm_groups, channels)
        norm_arg = monai_norm(norm, norm_groups)
        self.config: dict[str, Any] = {
            "name": self.name,
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "n_levels": n_levels,
            "base_channels": base_channels,
            "blocks_per_level": blocks_per_level,
            "norm": norm,
            "norm_groups": norm_groups,
            "act": act,
            "head": head,
        }
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.level_channels = channels
        self.encoder_channels = list(channels)
        self.decoder_channels = channels[::-1]

        def res_blocks(c: int) -> list[nn.Module]:
            return [PreActResBlock(spatial_dims, c, norm_arg, act) for _ in range(blocks_per_level)]

        conv = Conv["conv", spatial_dims]
        stem = conv(in_channels, channels[0], 3, padding=1)
        levels = [nn.Sequential(stem, *res_blocks(channels[0]))]
        levels += [
            nn.Sequential(conv(channels[i - 1], channels[i], 2, stride=2), *res_blocks(channels[i]))
            for i in range(1, n_levels)
        ]
        self.encoder = nn.ModuleList(levels)
        self.decoder = nn.ModuleList(
            [
                TopDownBlock(
                    spatial_dims, channels[i + 1], channels[i], blocks_per_level, norm_arg, act
                )
                for i in range(n_levels - 2, -1, -1)  # deepest first
            ]
        )
        if head == "linear":
            self.head: nn.Module = LevelSumHead(spatial_dims, channels, out_channels)
        else:
            self.head = NonLinearHead(spatial_dims, channels, out_channels, norm_arg, act)

    def decode(self, encoder_feats: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Top-down pathway: pyramid ``p_{L-1} … p_0`` (coarsest first) and the head's logits."""
        if len(encoder_feats) != self.n_levels:
            raise ValueError(
                f"decode() needs {self.n_levels} encoder features, got {len(encoder_feats)}"
            )
        x = encoder_feats[-1]
        pyramid = [x]
        for j, block in enumerate(self.decoder):
            x = block(x, encoder_feats[self.n_levels - 2 - j])
            pyramid.append(x)
        return pyramid, self.head(pyramid[::-1])
