"""Heads the methods put on top of a backbone (DESIGN §3.2).

- :class:`MLPHead` — projection / prediction MLPs on vectors: ``Linear-BN-ReLU … Linear``
  (SimSiam / BYOL / MoCo v2 projectors and predictors; PCRLv2's predictor ``FC-BN-ReLU-FC``
  with hidden width 2C, eq. 6; SSMTL+'s 2-layer predictor; vox2vec's 3-layer projector).
- :class:`PixelProjectionHead` — the same idea per pixel with 1×1 convolutions (the pixel-global
  paper's pixel projection; MixCL's 3-layer projector with widths c, c, 2c; the hierarchical
  per-level projection to 32 channels with ``n_layers=1``).
- :class:`RestorationHead` — ``Conv-BN-ReLU-Conv`` with 3×3 kernels (PCRLv2 eq. 2; the
  hierarchical dense SSL reconstruction head of two convolutions).
- :class:`SegmentationHead` — a 1×1 convolution to class logits.
- :class:`ClassificationHead` — global average pooling and a linear layer (slice-level tasks).
"""

from __future__ import annotations

from monai.networks.layers.factories import Conv, Norm
from torch import Tensor, nn

HEAD_NORMS = ("batch", "instance", "none")


def _check_norm(norm: str, allowed: tuple[str, ...]) -> None:
    if norm not in allowed:
        raise ValueError(f"norm must be one of {allowed}, got {norm!r}")


class MLPHead(nn.Module):
    """``n_layers`` fully-connected layers on ``[B, in_dim]`` vectors.

    Every layer but the last is ``Linear → BatchNorm1d → ReLU`` (``norm="batch"``) or
    ``Linear → ReLU`` (``norm="none"``); the last is a plain ``Linear`` to ``out_dim``, followed
    by a ``BatchNorm1d`` *without* learnable affine when ``last_norm`` (SimSiam's projector puts
    BN on its output). Linear layers followed by a BN carry no bias (the BN's shift replaces it).
    ``n_layers=1`` is a single linear layer (``hidden_dim`` unused). Batch norm needs more than
    one sample per batch in training mode.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        n_layers: int = 2,
        norm: str = "batch",
        last_norm: bool = False,
    ) -> None:
        super().__init__()
        _check_norm(norm, ("batch", "none"))
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        batch_norm = norm == "batch"
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(n_layers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim, bias=not last_norm))
        if last_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_dim] → [B, out_dim]``."""
        return self.net(x)


class PixelProjectionHead(nn.Module):
    """``n_layers`` 1×1 convolutions applied at every pixel of ``[B, in_channels, *spatial]``.

    Every layer but the last is ``conv1×1 → norm → ReLU`` (norm ``"batch"``, ``"instance"``
    (affine) or ``"none"``); the last is a plain 1×1 convolution to ``out_channels``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        n_layers: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        _check_norm(norm, HEAD_NORMS)
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        conv = Conv["conv", spatial_dims]
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(n_layers - 1):
            layers.append(conv(width, hidden_channels, kernel_size=1, bias=norm == "none"))
            if norm == "batch":
                layers.append(Norm["batch", spatial_dims](hidden_channels))
            elif norm == "instance":
                layers.append(Norm["instance", spatial_dims](hidden_channels, affine=True))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_channels
        layers.append(conv(width, out_channels, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_channels, *S] → [B, out_channels, *S]``."""
        return self.net(x)


class RestorationHead(nn.Module):
    """``Conv3 → BN → ReLU → Conv3`` restoring an image from a feature map (PCRLv2 eq. 2).

    Stride 1 throughout, so the output has the feature map's resolution; a method upsamples it
    (or the target) when restoring from a coarse pyramid level. ``hidden_channels`` defaults to
    ``in_channels``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        hidden_channels: int | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden_channels or in_channels
        conv = Conv["conv", spatial_dims]
        self.net = nn.Sequential(
            conv(in_channels, hidden, kernel_size=3, padding=1, bias=False),
            Norm["batch", spatial_dims](hidden),
            nn.ReLU(inplace=True),
            conv(hidden, out_channels, kernel_size=3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_channels, *S] → [B, out_channels, *S]``."""
        return self.net(x)


class SegmentationHead(nn.Module):
    """A 1×1 convolution from features to per-pixel class logits."""

    def __init__(self, spatial_dims: int, in_channels: int, n_classes: int) -> None:
        super().__init__()
        self.conv = Conv["conv", spatial_dims](in_channels, n_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_channels, *S] → [B, n_classes, *S]``."""
        return self.conv(x)


class ClassificationHead(nn.Module):
    """Global average pooling over all spatial axes, then a linear layer to class logits.

    Works for 2D and 3D feature maps alike.
    """

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_channels, *S] → [B, n_classes]``."""
        if x.ndim < 3:
            raise ValueError(f"expected [B, C, *spatial] features, got shape {list(x.shape)}")
        return self.fc(x.flatten(2).mean(dim=2))
