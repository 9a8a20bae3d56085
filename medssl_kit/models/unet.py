"""Our UNet (2D and 3D) with switchable skip connections, decoder dropout and exposed pyramids.

One class serves pixel_global, pcrlv2, ssmtl, models_genesis and fine-tuning (DESIGN §3.1).

Structure (``n = len(channels)`` levels, built from MONAI ``Convolution`` and ``UpSample`` blocks;
every ``Convolution`` is conv3×3 → norm → [dropout] → activation):

- ``encoder[0]``: two convolutions at full resolution, ``in_channels → channels[0]``;
- ``encoder[i]`` (``i ≥ 1``): 2× max-pooling, then two convolutions ``channels[i-1] → channels[i]``;
  ``encoder[-1]`` is the bottleneck (downsampling factor ``2**(n-1)``);
- ``decoder[j]`` (``j = 0 … n-2``, deepest first): 2× transposed convolution (kernel 2, stride 2)
  that halves the width (the top block keeps it), optional concatenation with the encoder
  feature of the same resolution (the skip), then two convolutions — with dropout when
  ``dropout > 0``; ``decoder[-1]`` is at full resolution with ``channels[0]`` channels;
- ``head``: a 1×1 convolution to ``out_channels`` (the logits).

``skips=False`` is PCRLv2's non-skip UNet (nsUNet, PCRLv2 §3.1, eq. 1): every decoder block sees
only the upsampled deeper feature — no concatenation and no addition from the encoder anywhere —
so pixel restoration cannot short-cut through high-resolution encoder features.

With ``skips=True`` and five levels the module tree is, key for key, MONAI's ``BasicUNet``
(``encoder.0 ↔ conv_0``, ``encoder.i ↔ down_i``, ``decoder.j ↔ upcat_{4-j}``,
``head ↔ final_conv``); :func:`medssl_kit.models.export.to_monai` relies on this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers.factories import Conv, Pool
from torch import Tensor, nn

from medssl_kit.models.base import (
    BackboneMixin,
    LevelStackMixin,
    check_group_norm,
    monai_norm,
    pad_to_match,
)


class DoubleConv(nn.Sequential):
    """Two 3×3 ``Convolution`` blocks (conv → norm → [dropout] → act), ``conv_0`` and ``conv_1``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        act: str | tuple,
        norm: str | tuple,
        dropout: float | None,
    ) -> None:
        super().__init__()
        for i, c_in in enumerate((in_channels, out_channels)):
            conv = Convolution(
                spatial_dims,
                c_in,
                out_channels,
                act=act,
                norm=norm,
                dropout=dropout,
                bias=True,
                padding=1,
            )
            self.add_module(f"conv_{i}", conv)


class DownBlock(nn.Sequential):
    """2× max-pooling then :class:`DoubleConv` (keys ``max_pooling``, ``convs``)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        act: str | tuple,
        norm: str | tuple,
    ) -> None:
        super().__init__()
        self.add_module("max_pooling", Pool["MAX", spatial_dims](kernel_size=2))
        self.add_module(
            "convs", DoubleConv(spatial_dims, in_channels, out_channels, act, norm, dropout=None)
        )


class UpBlock(nn.Module):
    """2× transposed-conv upsampling, optional skip concatenation, then :class:`DoubleConv`.

    ``skip_channels=0`` builds the non-skip block: its convolutions take only the upsampled
    feature. The upsampled map is padded (replicate, high end) to the encoder level's size when
    max-pooling floored an odd side.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        act: str | tuple,
        norm: str | tuple,
        dropout: float | None,
        halves: bool,
    ) -> None:
        super().__init__()
        up_channels = in_channels // 2 if halves else in_channels
        self.upsample = UpSample(spatial_dims, in_channels, up_channels, 2, mode="deconv")
        self.convs = DoubleConv(
            spatial_dims, skip_channels + up_channels, out_channels, act, norm, dropout
        )
        self.skip_channels = skip_channels
        self.has_skip = skip_channels > 0

    def forward(self, x: Tensor, skip: Tensor | None, size: Sequence[int]) -> Tensor:
        """Upsample ``x`` to ``size`` (spatial), concatenate ``[skip, up]`` when skips are on."""
        up = pad_to_match(self.upsample(x), size)
        if self.has_skip:
            if skip is None:
                raise ValueError("this decoder block has a skip connection and needs its feature")
            return self.convs(torch.cat([skip, up], dim=1))
        return self.convs(up)


class UNet(LevelStackMixin, BackboneMixin, nn.Module):
    """UNet for 2D/3D with switchable skips, decoder-only dropout and exposed feature pyramids.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: logits channels of ``head``.
        channels: width per level, highest resolution first; the depth is ``len(channels)``
            (≥ 2). The default five levels are the shape MONAI's ``BasicUNet`` has, so the
            weights export to it (§5.5); for 2D 128² inputs the bottleneck is 8².
        skips: ``False`` builds PCRLv2's non-skip UNet (no encoder → decoder path at all).
        norm: ``"batch"``, ``"instance"`` (affine) or ``"group"`` (``norm_groups`` groups).
        norm_groups: groups for group norm; every width must be divisible by it.
        act: MONAI activation name or ``(name, kwargs)``, e.g. ``("leakyrelu",
            {"negative_slope": 0.1})``.
        dropout: element-wise dropout probability inside every decoder convolution (after the
            norm, before the activation); ``0`` puts no dropout module anywhere. Used for MC
            dropout (see :attr:`dropout_layers`, :meth:`set_mc_dropout`).
        dropout_levels: how many decoder blocks, nearest the output, carry that dropout
            (``None``: every block). Fewer makes MC dropout cheaper: :meth:`pass_decoder`
            computes everything before the first dropout once for all passes.

    Inputs may have any spatial size with every side ≥ ``2**(len(channels)-1)``; the output
    has the input's size.
    """

    name = "unet"
    encoder_prefixes = ("encoder.",)
    decoder_prefixes = ("decoder.",)

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        *,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        skips: bool = True,
        norm: str = "batch",
        norm_groups: int = 8,
        act: str | tuple = "relu",
        dropout: float = 0.0,
        dropout_levels: int | None = None,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_group_norm(norm, norm_groups, channels)
        norm_arg = monai_norm(norm, norm_groups)
        self.config: dict[str, Any] = {
            "name": self.name,
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "channels": channels,
            "skips": skips,
            "norm": norm,
            "norm_groups": norm_groups,
            "act": act,
            "dropout": dropout,
            "dropout_levels": dropout_levels,
        }
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.skips = skips
        n = len(channels)
        self.encoder_channels = list(channels)
        self.decoder_channels = [channels[i] for i in range(n - 2, -1, -1)]

        levels: list[nn.Module] = [
            DoubleConv(spatial_dims, in_channels, channels[0], act, norm_arg, dropout=None)
        ]
        levels += [
            DownBlock(spatial_dims, channels[i - 1], channels[i], act, norm_arg)
            for i in range(1, n)
        ]
        self.encoder = nn.ModuleList(levels)

        drop = dropout if dropout > 0 else None
        blocks = []
        for level in range(n - 2, -1, -1):  # deepest decoder block first
            blocks.append(
                UpBlock(
                    spatial_dims,
                    in_channels=channels[level + 1],
                    skip_channels=channels[level] if skips else 0,
                    out_channels=channels[level],
                    act=act,
                    norm=norm_arg,
                    dropout=drop,
                    halves=level > 0,
                )
            )
        self.decoder = nn.ModuleList(blocks)
        self._keep_dropout_in_last(self.decoder, dropout_levels)
        self.head = Conv["conv", spatial_dims](channels[0], out_channels, kernel_size=1)

    def decode(self, encoder_feats: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Run the decoder and head on the encoder's features.

        Returns the decoder features (lowest resolution first, full resolution last) and the
        logits. With ``skips=False`` only ``encoder_feats[-1]`` is read (the other entries give
        nothing but their spatial sizes). The encoder can thus run once and the dropout-bearing
        decoder many times (MC dropout), e.g. on the features repeated along the batch axis.
        """
        if len(encoder_feats) != self.n_levels:
            raise ValueError(
                f"decode() needs {self.n_levels} encoder features, got {len(encoder_feats)}"
            )
        x = encoder_feats[-1]
        decoded = []
        for j, block in enumerate(self.decoder):
            ref = encoder_feats[self.n_levels - 2 - j]
            x = block(x, ref if self.skips else None, ref.shape[2:])
            decoded.append(x)
        return decoded, self.head(x)

    def pass_decoder(
        self, encoder_feats: Sequence[Tensor], shared: Tensor | None = None
    ) -> Callable[[int], Tensor]:
        """For Monte-Carlo dropout, where only the decoder's dropout makes passes differ: what
        is the same in every pass, computed once, and a function ``passes → [passes · N, C, *S]``,
        the last decoder map of that many repetitions of the features' rows (pass-major), as
        ``decode`` of the features repeated along the batch axis would give.

        Computed once on the ``N`` rows: the blocks before the first dropout (see
        ``dropout_levels``), that block's first convolution and norm, and in every later block
        the part of the first convolution that reads the encoder's skip feature (a convolution
        of ``[skip, up]`` is one of ``skip`` plus one of ``up``), so skip features are never
        copied. The function may be called many times (a chunk of passes per call). Equal to
        ``decode`` up to the order of floating-point sums.

        ``shared``, where given, is that norm's output for these rows — the input of the first
        dropout layer (``dropout_layers[0]``) — as a pass that already ran the decoder computed
        it (e.g. captured with a forward pre-hook on that layer); the blocks before it are then
        not run again.
        """
        if len(encoder_feats) != self.n_levels:
            raise ValueError(
                f"pass_decoder() needs {self.n_levels} encoder features, got {len(encoder_feats)}"
            )
        blocks = list(self.decoder)
        refs = [encoder_feats[self.n_levels - 2 - j] for j in range(len(blocks))]
        dropping = [any(isinstance(m, nn.Dropout) for m in b.modules()) for b in blocks]
        start = dropping.index(True) if any(dropping) else len(blocks)
        if start == len(blocks):  # no dropout anywhere: every pass is the same
            x = self.decode(encoder_feats)[0][-1]
            return lambda passes: x.repeat(passes, *([1] * (x.ndim - 1)))
        block, ref = blocks[start], refs[start]
        first = block.convs.conv_0
        if shared is not None:
            normed = shared
        else:
            x = encoder_feats[-1]
            for earlier, earlier_ref in zip(blocks[:start], refs, strict=False):
                x = earlier(x, earlier_ref if self.skips else None, earlier_ref.shape[2:])
            up = pad_to_match(block.upsample(x), ref.shape[2:])
            normed = first.adn.N(first.conv(torch.cat([ref, up], 1) if self.skips else up))
        skip_parts = {}
        if self.skips:
            for j in range(start + 1, len(blocks)):
                conv = blocks[j].convs.conv_0.conv
                weight = conv.weight[:, : blocks[j].skip_channels]
                skip_parts[j] = conv._conv_forward(refs[j], weight, conv.bias)

        def passes_of(passes: int) -> Tensor:
            y = normed.repeat(passes, *([1] * (normed.ndim - 1)))
            h = block.convs.conv_1(first.adn.A(first.adn.D(y)))
            for j in range(start + 1, len(blocks)):
                later = blocks[j]
                up = pad_to_match(later.upsample(h), refs[j].shape[2:])
                if not self.skips:
                    h = later.convs(up)
                    continue
                conv = later.convs.conv_0.conv
                moving = conv._conv_forward(up, conv.weight[:, later.skip_channels :], None)
                y = (moving.unflatten(0, (passes, -1)) + skip_parts[j]).flatten(0, 1)
                h = later.convs.conv_1(later.convs.conv_0.adn(y))
            return h

        return passes_of

    def embed_nonskip_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A non-skip UNet's weights fitted to this UNet with skips, computing the same function.

        Only the first convolution of each decoder block differs in shape: here it reads
        ``[skip, up]`` (the encoder feature concatenated before the upsampled one), in the
        non-skip UNet ``up`` alone. Its weights go to the ``up`` input channels and the ``skip``
        input channels start at zero, so before any training this network's output equals the
        non-skip network's; fine-tuning then learns how much of each skip to use. Every other
        key is returned unchanged.
        """
        if not self.skips:
            raise ValueError("embed_nonskip_state needs a UNet with skips=True")
        own = self.state_dict()
        out = dict(state)
        for j, block in enumerate(self.decoder):
            key = f"decoder.{j}.convs.conv_0.conv.weight"
            if key not in state:
                continue
            target, source = own[key], state[key]
            skip = block.skip_channels
            expected = (target.shape[0], target.shape[1] - skip, *target.shape[2:])
            if tuple(source.shape) != expected:
                raise ValueError(
                    f"{key}: a non-skip weight of shape {tuple(source.shape)} does not fit "
                    f"{tuple(target.shape)} with skip channels in front"
                )
            widened = source.new_zeros(target.shape)
            widened[:, skip:] = source
            out[key] = widened
        return out
