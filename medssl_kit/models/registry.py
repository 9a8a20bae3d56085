"""Build a backbone of the family by name (DESIGN §3.1).

``build_backbone(name, spatial_dims, in_channels, out_channels, **kw)``; every backbone's
``config`` attribute holds exactly these arguments, so ``build_backbone(**net.config)`` rebuilds
an identical (freshly initialised) network, e.g. from a checkpoint's stored config.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from medssl_kit.models.fpn import FPN
from medssl_kit.models.resunet import ResUNet
from medssl_kit.models.unet import UNet
from medssl_kit.models.unetr import UNETRBackbone

_BACKBONES: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "resunet": ResUNet,
    "fpn": FPN,
    "unetr": UNETRBackbone,
}

_POSITIONAL = ("spatial_dims", "in_channels", "out_channels")


def available_backbones() -> list[str]:
    """Names ``build_backbone`` accepts, sorted."""
    return sorted(_BACKBONES)


def backbone_options(name: str) -> list[str]:
    """The keyword arguments backbone ``name`` accepts besides the three positional ones."""
    params = inspect.signature(_lookup(name).__init__).parameters
    return [p for p in params if p not in ("self", *_POSITIONAL)]


def _lookup(name: str) -> type[nn.Module]:
    try:
        return _BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}"
        ) from None


def build_backbone(
    name: str, spatial_dims: int, in_channels: int, out_channels: int, **kw: Any
) -> nn.Module:
    """Build backbone ``name`` (``"unet"``, ``"resunet"``, ``"fpn"``, ``"unetr"``).

    ``kw`` are the backbone's own options (see :func:`backbone_options`); the defaults are small
    CPU-sized networks, the papers' sizes are documented on each class. Raises ``ValueError`` for
    an unknown name and ``TypeError`` for an option the backbone does not have.
    """
    cls = _lookup(name)
    allowed = backbone_options(name)
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise TypeError(
            f"backbone {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"it accepts {', '.join(allowed)}"
        )
    return cls(spatial_dims, in_channels, out_channels, **kw)
