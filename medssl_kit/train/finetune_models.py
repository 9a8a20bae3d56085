"""The network a fine-tuning run trains: built from its settings, loaded from its init run."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from medssl_kit.data.manifest import Manifest
from medssl_kit.errors import MedsslError
from medssl_kit.models.heads import ClassificationHead
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.finetune_config import FPN_HEAD_MODES, FinetuneConfig
from medssl_kit.train.knn_segmenter import _KnnSegmenter
from medssl_kit.train.transfer import (
    KeyReport,
    architecture_kwargs_of,
    check_transferable_fits,
    load_transferable,
    read_transferable,
)


class _Classifier(nn.Module):
    """A backbone's encoder followed by a global-pooling classification head."""

    def __init__(self, backbone: nn.Module, n_classes: int = 2):
        super().__init__()
        self.backbone = backbone
        self.head = ClassificationHead(backbone.encoder_channels[-1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.encode(x)[-1])


def model_backbone(model: nn.Module) -> nn.Module:
    """The backbone inside a fine-tuned model (the model itself for segmentation)."""
    return model.backbone if isinstance(model, (_Classifier, _KnnSegmenter)) else model


def build_model(
    init: str | Path, manifest: Manifest, cfg: FinetuneConfig
) -> tuple[nn.Module, str, KeyReport | None]:
    """The model a run of ``cfg`` (resolved) starts from: ``(model, method, key_report)``.

    The network is a function of the fine-tuning settings alone (``cfg.backbone`` and its
    resolved ``backbone_kwargs``: the profile's :func:`~medssl_kit.config.architecture_kwargs`
    and the user's), so that scratch and every pre-trained start are the same network. ``init``
    is ``"scratch"`` or a run folder whose transferable weights are loaded (``method`` names where
    they come from, ``key_report`` what matched); a run of another structure is refused
    (:func:`~medssl_kit.train.transfer.check_transferable_fits`). Only where the user asks for
    it, ``cfg.architecture_from`` (a run folder) builds that run's network instead, e.g. scratch
    like an init of another size; ``method`` then says so (``"scratch [pixel_global's
    network]"``), and so does every report. ``model`` is the segmentation backbone, or for
    ``mode`` ``classify`` / ``knn`` the classifier / frozen kNN segmenter around it.
    """
    in_channels = manifest.num_channels * (2 * cfg.context + 1 if cfg.dims == 2 else 1)
    out_channels = manifest.num_classes
    name, kwargs = cfg.backbone, dict(cfg.backbone_kwargs)
    if cfg.architecture_from:
        name, kwargs = architecture_kwargs_of(cfg.architecture_from)
    if cfg.mode in FPN_HEAD_MODES:
        if name != "fpn":
            raise MedsslError(f"{cfg.mode} mode needs an fpn network, not '{name}'")
        kwargs["head"] = cfg.mode
    backbone = build_backbone(name, cfg.dims, in_channels, out_channels, **kwargs)
    method, report = "scratch", None
    if str(init) != "scratch":
        header = read_transferable(init)
        method = header["method"]
        check_transferable_fits(header, backbone.config, init)
        report = load_transferable(backbone, Path(init), encoder_only=cfg.transfer == "encoder")
        if cfg.pretrained_lr_scale == 0:
            for key, p in backbone.named_parameters():
                p.requires_grad = p.requires_grad and key not in report.matched
    if cfg.architecture_from:
        method = f"{method} [{read_transferable(cfg.architecture_from)['method']}'s network]"
    if cfg.train_split != "train":  # trained on the pool's labels: not a scratch run any more
        method = "supervised" if method == "scratch" else f"{method}+supervised"
    if cfg.mode in ("probe", "linear"):
        _freeze_all_but_head(backbone)
    if cfg.mode == "knn":
        return _KnnSegmenter(backbone, out_channels, cfg), method, report
    model = _Classifier(backbone) if cfg.mode == "classify" else backbone
    return model, method, report


def _freeze_all_but_head(backbone: nn.Module) -> None:
    head = [n for n, _ in backbone.named_parameters() if n.startswith("head.")]
    if not head:
        raise MedsslError(f"backbone '{backbone.name}' has no 'head' to train in probe mode")
    for name, p in backbone.named_parameters():
        p.requires_grad = name.startswith("head.")
