"""The backbone family (DESIGN §3.1), heads (§3.2) and weight export to MONAI networks (§5.5).

The models layer depends on torch and MONAI only.
"""

from medssl_kit.models.base import BackboneFeatures
from medssl_kit.models.export import EXPORT_TARGETS, KeyReport, MonaiSpec, monai_spec, to_monai
from medssl_kit.models.fpn import FPN, FPNFeatures
from medssl_kit.models.heads import (
    ClassificationHead,
    MLPHead,
    PixelProjectionHead,
    RestorationHead,
    SegmentationHead,
)
from medssl_kit.models.registry import available_backbones, backbone_options, build_backbone
from medssl_kit.models.resunet import ResUNet
from medssl_kit.models.unet import UNet
from medssl_kit.models.unetr import UNETRBackbone, UNETRFeatures

__all__ = [
    "EXPORT_TARGETS",
    "FPN",
    "BackboneFeatures",
    "ClassificationHead",
    "FPNFeatures",
    "KeyReport",
    "MLPHead",
    "MonaiSpec",
    "PixelProjectionHead",
    "ResUNet",
    "RestorationHead",
    "SegmentationHead",
    "UNETRBackbone",
    "UNETRFeatures",
    "UNet",
    "available_backbones",
    "backbone_options",
    "build_backbone",
    "monai_spec",
    "to_monai",
]
