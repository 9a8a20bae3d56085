"""MONAI ``UNETR`` exposing every transformer layer's tokens and feature maps (MixCL, §4.3).

MixCL (§2.1) applies its identity-consistency loss to the output of *every* layer of the UNETR
encoder, and its label-consistency loss to the second layer; :meth:`UNETRBackbone.forward_features`
therefore returns all twelve hidden states, as tokens ``[B, N, hidden]`` and reshaped to feature
maps ``[B, hidden, *grid]`` with ``grid = img_size / 16`` (UNETR's fixed 16-voxel patches).

``UNETRBackbone`` *is* a ``monai.networks.nets.UNETR`` (a subclass adding no parameters), so its
``state_dict`` loads unchanged into a ``UNETR`` built with the same arguments (§5.5). The paper
setting is UNETR's own (hidden 768, MLP 3072, 12 heads); the CPU default is a narrow ViT (hidden
96, MLP 384, 4 heads) with the same 12 layers, which is all UNETR supports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monai.networks.nets import UNETR
from monai.utils import ensure_tuple_rep
from torch import Tensor

from medssl_kit.models.base import BackboneFeatures, BackboneMixin, check_input


@dataclass
class UNETRFeatures(BackboneFeatures):
    """UNETR features: ``encoder`` holds the hidden-state maps of all transformer layers
    (``[B, hidden, *grid]``, first layer first, all at patch-grid resolution), ``tokens`` the same
    states as ``[B, N, hidden]``; ``decoder`` runs from 1/8 to full resolution."""

    tokens: list[Tensor]


class UNETRBackbone(BackboneMixin, UNETR):
    """UNETR (Hatamizadeh et al., 2022) for 2D/3D with exposed transformer layers.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: logits channels.
        img_size: input size (required; every side a multiple of 16). Inputs must have exactly
            this size, because the ViT's position embedding is fixed.
        feature_size: width of the convolutional decoder's top level (decoder widths are
            ``8f, 4f, 2f, f``).
        hidden_size: ViT width (divisible by ``num_heads``).
        mlp_dim: ViT MLP width.
        num_heads: attention heads.
        norm: decoder norm name as MONAI accepts it (``"instance"``, ``"batch"``).
        dropout_rate: ViT dropout (MONAI's; inside the encoder, so not MC-dropout's
            :attr:`dropout_layers`, which is empty for UNETR).
        qkv_bias: bias in the attention's qkv projection.

    ``encoder_prefixes`` is ``("vit.",)``: the transformer is the encoder MixCL transfers; the
    convolutional ``encoder1…4`` blocks belong to UNETR's skip decoder.
    """

    name = "unetr"
    encoder_prefixes = ("vit.",)
    decoder_prefixes = ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "decoder", "out.")

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        *,
        img_size: Sequence[int] | int,
        feature_size: int = 16,
        hidden_size: int = 96,
        mlp_dim: int = 384,
        num_heads: int = 4,
        norm: str = "instance",
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        size = [int(s) for s in ensure_tuple_rep(img_size, spatial_dims)]
        if any(s % 16 or s < 16 for s in size):
            raise ValueError(f"unetr needs img_size sides that are multiples of 16, got {size}")
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=size,
            feature_size=feature_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            norm_name=norm,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
        )
        self.config: dict[str, Any] = {
            "name": self.name,
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "img_size": size,
            "feature_size": feature_size,
            "hidden_size": hidden_size,
            "mlp_dim": mlp_dim,
            "num_heads": num_heads,
            "norm": norm,
            "dropout_rate": dropout_rate,
            "qkv_bias": qkv_bias,
        }
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.img_size = size
        self.encoder_channels = [hidden_size] * self.num_layers
        self.decoder_channels = [feature_size * 8, feature_size * 4, feature_size * 2, feature_size]

    def forward_features(self, x: Tensor) -> UNETRFeatures:
        """All layers' tokens and maps, the decoder pyramid and the logits of one pass.

        The computation is ``UNETR.forward``'s (skips from layers 3, 6, 9 and the final normed
        tokens), keeping the intermediates; the tests pin ``output`` to ``UNETR.forward``.
        """
        check_input(x, self.spatial_dims, self.in_channels, 16, "unetr")
        if list(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"unetr was built for img_size {self.img_size}, got input {list(x.shape[2:])}"
            )
        last, hidden = self.vit(x)
        maps = [self.proj_feat(h) for h in hidden]
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(maps[3])
        enc3 = self.encoder3(maps[6])
        enc4 = self.encoder4(maps[9])
        dec3 = self.decoder5(self.proj_feat(last), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        top = self.decoder2(dec1, enc1)
        return UNETRFeatures(
            encoder=maps,
            decoder=[dec3, dec2, dec1, top],
            output=self.out(top),
            tokens=list(hidden),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, out_channels, *img_size]``."""
        return self.forward_features(x).output
