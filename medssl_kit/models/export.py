"""Export a backbone's weights into the matching standard MONAI network (DESIGN §5.5).

Targets:

- ``"monai-unet"``: our :class:`~medssl_kit.models.unet.UNet` → ``monai.networks.nets.BasicUNet``.
  With skips on and five levels the two have the same modules, so the mapping is a pure renaming
  of key prefixes: ``encoder.0.`` → ``conv_0.``, ``encoder.{i}.`` → ``down_{i}.`` (i = 1…4),
  ``decoder.{j}.`` → ``upcat_{4-j}.`` (j = 0…3, deepest first), ``head.`` → ``final_conv.``;
  ``BasicUNet`` is built with ``features = (*channels, channels[0])``, the same ``act`` and
  ``norm``, ``upsample="deconv"`` and ``dropout=0`` (dropout has no weights; it only matters in
  training). MONAI's ``UNet`` cannot be matched: its first block already downsamples and its
  output layer is fed by a skip concatenation. A non-skip UNet has no MONAI counterpart at all
  (every MONAI UNet concatenates skips), nor does a depth other than five levels for
  ``BasicUNet``; both raise ``ValueError``.
- ``"flexible-unet"``: :class:`~medssl_kit.models.resunet.ResUNet` (a ``FlexibleUNet`` subclass)
  → ``FlexibleUNet`` with the same arguments; keys are unchanged (skips must be on).
- ``"unetr"``: :class:`~medssl_kit.models.unetr.UNETRBackbone` (a ``UNETR`` subclass) →
  ``UNETR``; keys are unchanged.

The FPN has no MONAI counterpart; save its ``state_dict`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monai.networks.nets import UNETR, BasicUNet, FlexibleUNet
from torch import Tensor, nn

from medssl_kit.models.base import monai_norm
from medssl_kit.models.resunet import ResUNet
from medssl_kit.models.unet import UNet
from medssl_kit.models.unetr import UNETRBackbone

EXPORT_TARGETS: dict[str, type[nn.Module]] = {
    "monai-unet": UNet,
    "flexible-unet": ResUNet,
    "unetr": UNETRBackbone,
}

_MONAI_CLASSES: dict[str, type[nn.Module]] = {
    "monai-unet": BasicUNet,
    "flexible-unet": FlexibleUNet,
    "unetr": UNETR,
}


@dataclass
class KeyReport:
    """How a ``state_dict`` fits a network: which keys loaded, which are missing or unexpected.

    ``matched``: keys present in both with equal shapes; ``missing``: keys the network has but
    the state lacks; ``unexpected``: keys of the state the network does not have;
    ``mismatched``: keys in both whose tensor shapes differ (not loaded).
    """

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @classmethod
    def compare(cls, expected: Mapping[str, Tensor], provided: Mapping[str, Tensor]) -> KeyReport:
        """Compare a network's ``state_dict()`` (``expected``) with a state to load into it."""
        report = cls()
        for key, value in expected.items():
            if key not in provided:
                report.missing.append(key)
            elif tuple(provided[key].shape) != tuple(value.shape):
                report.mismatched.append(key)
            else:
                report.matched.append(key)
        report.unexpected = [k for k in provided if k not in expected]
        return report

    @property
    def complete(self) -> bool:
        """True when every key matched (a ``strict=True`` load succeeds)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line of counts, followed by the first few offending keys of each kind."""
        lines = [
            f"{len(self.matched)} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched keys"
        ]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape-mismatched", self.mismatched),
        ):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                lines.append(f"  {label}: {', '.join(keys[:5])}{more}")
        return "\n".join(lines)


@dataclass(frozen=True)
class MonaiSpec:
    """A MONAI network class and the constructor arguments that match a backbone."""

    network: type[nn.Module]
    kwargs: dict[str, Any]

    @property
    def qualified_name(self) -> str:
        """Import path of the network class, e.g. ``monai.networks.nets.BasicUNet``."""
        return f"monai.networks.nets.{self.network.__name__}"

    def build(self) -> nn.Module:
        """A freshly initialised MONAI network."""
        return self.network(**self.kwargs)


def _check_target(backbone: nn.Module, target: str) -> None:
    if target not in EXPORT_TARGETS:
        raise ValueError(
            f"unknown export target {target!r}; choose one of {', '.join(EXPORT_TARGETS)}"
        )
    expected = EXPORT_TARGETS[target]
    if not isinstance(backbone, expected):
        got = getattr(backbone, "name", type(backbone).__name__)
        raise ValueError(
            f"export target {target!r} takes a {expected.name!r} backbone, got {got!r}"
        )
    if getattr(backbone, "skips", True) is False:
        raise ValueError(
            f"a {expected.name} without skip connections cannot be exported to {target!r}: every "
            "MONAI UNet concatenates encoder features in its decoder, so the decoder weights "
            "have no counterpart. Export a skip UNet (e.g. load encoder_state_dict() into "
            "one, as PCRLv2 fine-tuning does) or save the state_dict as is."
        )
    if isinstance(backbone, UNet) and backbone.n_levels != 5:
        raise ValueError(
            f"'monai-unet' exports to MONAI BasicUNet, which has exactly 5 levels; this unet has "
            f"{backbone.n_levels} (channels={backbone.config['channels']})"
        )


def monai_spec(backbone: nn.Module, target: str) -> MonaiSpec:
    """The MONAI network class and arguments structurally identical to ``backbone``."""
    _check_target(backbone, target)
    cfg = backbone.config
    if target == "monai-unet":
        kwargs: dict[str, Any] = {
            "spatial_dims": cfg["spatial_dims"],
            "in_channels": cfg["in_channels"],
            "out_channels": cfg["out_channels"],
            "features": (*cfg["channels"], cfg["channels"][0]),
            "act": cfg["act"],
            "norm": monai_norm(cfg["norm"], cfg["norm_groups"]),
            "bias": True,
            "dropout": 0.0,
            "upsample": "deconv",
        }
    elif target == "flexible-unet":
        kwargs = {
            "in_channels": cfg["in_channels"],
            "out_channels": cfg["out_channels"],
            "backbone": cfg["backbone"],
            "pretrained": False,
            "decoder_channels": tuple(cfg["decoder_channels"]),
            "spatial_dims": cfg["spatial_dims"],
            "norm": monai_norm(cfg["norm"], cfg["norm_groups"]),
            "act": cfg["act"],
            "dropout": cfg["dropout"],
        }
    else:
        kwargs = {
            "in_channels": cfg["in_channels"],
            "out_channels": cfg["out_channels"],
            "img_size": tuple(cfg["img_size"]),
            "feature_size": cfg["feature_size"],
            "hidden_size": cfg["hidden_size"],
            "mlp_dim": cfg["mlp_dim"],
            "num_heads": cfg["num_heads"],
            "norm_name": cfg["norm"],
            "dropout_rate": cfg["dropout_rate"],
            "spatial_dims": cfg["spatial_dims"],
            "qkv_bias": cfg["qkv_bias"],
        }
    return MonaiSpec(_MONAI_CLASSES[target], kwargs)


_UNET_RENAMES = (
    (re.compile(r"^encoder\.0\."), lambda m: "conv_0."),
    (re.compile(r"^encoder\.(\d+)\."), lambda m: f"down_{m.group(1)}."),
    (re.compile(r"^decoder\.(\d+)\."), lambda m: f"upcat_{4 - int(m.group(1))}."),
    (re.compile(r"^head\."), lambda m: "final_conv."),
)


def _basic_unet_key(key: str) -> str:
    for pattern, replace in _UNET_RENAMES:
        new, n = pattern.subn(replace, key)
        if n:
            return new
    return key


def monai_state_dict(backbone: nn.Module, target: str) -> dict[str, Tensor]:
    """``backbone``'s ``state_dict`` with keys named as in the MONAI network of ``target``."""
    _check_target(backbone, target)
    state = backbone.state_dict()
    if target == "monai-unet":
        return {_basic_unet_key(k): v for k, v in state.items()}
    return dict(state)


def to_monai(backbone: nn.Module, target: str) -> tuple[nn.Module, KeyReport]:
    """Build the MONAI network of ``target`` and load ``backbone``'s weights into it.

    Returns the network (in ``backbone``'s train/eval mode) and the key report; the weights
    are loaded only when every key matches (a ``strict=True`` load), otherwise a
    ``RuntimeError`` carries the report.
    """
    spec = monai_spec(backbone, target)
    net = spec.build()
    state = monai_state_dict(backbone, target)
    report = KeyReport.compare(net.state_dict(), state)
    if not report.complete:
        raise RuntimeError(f"weights do not fit {spec.qualified_name}:\n{report.summary()}")
    net.load_state_dict(state, strict=True)
    net.train(backbone.training)
    return net, report
