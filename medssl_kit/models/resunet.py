"""ResNet-encoder UNet: MONAI ``FlexibleUNet`` with exposed encoder and decoder pyramids.

The ResUNet50 of the pixel-global paper (``backbone="resnet50"``) and the ResNet encoder of SSMTL+;
``resnet18`` is the CPU default. ``ResUNet`` *is* a ``FlexibleUNet`` (a subclass adding no
parameters), so its ``state_dict`` loads unchanged into ``monai.networks.nets.FlexibleUNet`` built
with the same arguments (§5.5). Weights are never downloaded: ``pretrained=False`` always.

Pyramids: the ResNet encoder returns five maps at 1/2, 1/4, 1/8, 1/16 and 1/32 resolution
(``encoder_channels`` e.g. 64, 64, 128, 256, 512 for resnet18); the decoder's five ``UpCat``
blocks return maps at 1/16 … 1/1 resolution (``decoder_channels``). :meth:`ResUNet.decode` runs the
decoder blocks one by one — the same loop as MONAI's ``UNetDecoder.forward``, which the tests pin
against ``FlexibleUNet.forward`` — and keeps every block's output.

``skips=False`` replaces the decoder blocks by non-skip ones (the upsampled deeper feature only),
PCRLv2's 2D nsUNet on a ResNet-18 encoder with decoder widths 256, 128, 64, 32, 16 (PCRLv2 §3.1).
That variant has no MONAI counterpart to export to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.networks.nets import FlexibleUNet
from monai.networks.nets.basic_unet import UpCat
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import Tensor, nn

from medssl_kit.models.base import (
    BackboneMixin,
    check_group_norm,
    check_input,
    monai_norm,
)

RESNET_BACKBONES = (
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
)


class ResUNet(BackboneMixin, FlexibleUNet):
    """``FlexibleUNet`` with a ResNet encoder, 2D or 3D, exposing its feature pyramids.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: logits channels (3×3 conv segmentation head, as in ``FlexibleUNet``).
        backbone: one of ``RESNET_BACKBONES``; ``"resnet18"`` on CPU, ``"resnet50"`` for the
            pixel-global paper's ResUNet50.
        decoder_channels: widths of the five decoder blocks, deepest first.
        skips: ``False`` removes every encoder → decoder path (PCRLv2's non-skip decoder).
        norm: decoder norm, ``"batch"``, ``"instance"`` or ``"group"`` (``norm_groups``); the
            ResNet encoder always uses batch norm.
        norm_groups: groups for group norm.
        act: decoder activation (MONAI name or ``(name, kwargs)``).
        dropout: dropout probability in every decoder convolution (MC dropout); the encoder has
            none.
        dropout_levels: how many decoder blocks, nearest the output, carry that dropout
            (``None``: all five).

    Every spatial side of the input must be a multiple of 32 (five 2× downsamplings).
    """

    name = "resunet"
    encoder_prefixes = ("encoder.",)
    decoder_prefixes = ("decoder.",)

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        *,
        backbone: str = "resnet18",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        skips: bool = True,
        norm: str = "batch",
        norm_groups: int = 8,
        act: str | tuple = "relu",
        dropout: float = 0.0,
        dropout_levels: int | None = None,
    ) -> None:
        if backbone not in RESNET_BACKBONES:
            raise ValueError(f"backbone must be one of {RESNET_BACKBONES}, got {backbone!r}")
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != 5:
            raise ValueError(
                f"decoder_channels needs 5 widths (one per ResNet stage), got {decoder_channels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_group_norm(norm, norm_groups, decoder_channels)
        norm_arg = monai_norm(norm, norm_groups)
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            backbone=backbone,
            pretrained=False,
            decoder_channels=tuple(decoder_channels),
            spatial_dims=spatial_dims,
            norm=norm_arg,
            act=act,
            dropout=dropout,
        )
        self.config: dict[str, Any] = {
            "name": self.name,
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "backbone": backbone,
            "decoder_channels": decoder_channels,
            "skips": skips,
            "norm": norm,
            "norm_groups": norm_groups,
            "act": act,
            "dropout": dropout,
            "dropout_levels": dropout_levels,
        }
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.skips = skips
        self.encoder_channels = list(FLEXUNET_BACKBONE.register_dict[backbone]["feature_channel"])
        self.decoder_channels = decoder_channels
        if not skips:
            self._drop_skip_connections(norm_arg, act, dropout)
        self._keep_dropout_in_last(self.decoder.blocks, dropout_levels)

    def _drop_skip_connections(self, norm: str | tuple, act: str | tuple, dropout: float) -> None:
        """Rebuild the decoder blocks without skip inputs (same widths, same upsampling)."""
        in_channels = [self.encoder_channels[-1], *self.decoder_channels[:-1]]
        blocks = [
            UpCat(
                spatial_dims=self.spatial_dims,
                in_chns=c_in,
                cat_chns=0,
                out_chns=c_out,
                act=act,
                norm=norm,
                dropout=dropout,
                bias=False,
                upsample="nontrainable",
                pre_conv="default",
                interp_mode="nearest",
                align_corners=None,
                halves=i < len(self.decoder_channels) - 1,
                is_pad=True,
            )
            for i, (c_in, c_out) in enumerate(zip(in_channels, self.decoder_channels, strict=True))
        ]
        self.decoder.blocks = nn.ModuleList(blocks)
        self.skip_connect = 0

    def encode(self, x: Tensor) -> list[Tensor]:
        """The ResNet's five feature maps, 1/2 resolution first, 1/32 (bottleneck) last."""
        check_input(x, self.spatial_dims, self.in_channels, 32, "resunet")
        if any(s % 32 for s in x.shape[2:]):
            raise ValueError(
                f"resunet needs every spatial side to be a multiple of 32, got {list(x.shape[2:])}"
            )
        return list(self.encoder(x))

    def decode(self, encoder_feats: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Decoder block outputs (1/16 resolution first, full resolution last) and logits.

        Block ``i`` upsamples the previous output and, while ``i < skip_connect``, concatenates
        the encoder map of the same resolution (``FlexibleUNet``'s rule; never without skips).
        """
        if len(encoder_feats) != len(self.encoder_channels):
            raise ValueError(
                f"decode() needs {len(self.encoder_channels)} encoder features, "
                f"got {len(encoder_feats)}"
            )
        skips = list(encoder_feats[:-1])[::-1]
        x = encoder_feats[-1]
        decoded = []
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, skips[i] if i < self.skip_connect else None)
            decoded.append(x)
        return decoded, self.segmentation_head(x)
