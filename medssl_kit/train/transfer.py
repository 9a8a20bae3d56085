"""Transferable weights: the contract between a run folder and the runs initialised from it.

Every run (pre-training or fine-tuning) writes ``RUN_DIR/transferable.pt``: a dict with
``backbone`` (the config that rebuilds the backbone via ``build_backbone``), ``method`` (the
pre-training method's name, ``scratch`` for a model trained from random weights),
``state_dict`` (the backbone's weights that the method considers transferable) and
``input_normalization`` (how the inputs it trained on were normalised: ``"window"``, the
manifest's, unless a method says otherwise; files without it are ``"window"``). Fine-tuning from
``RUN_DIR`` builds the same backbone and loads the keys that match by name and shape, reporting
loaded / missing / unexpected keys; a file from which nothing loads is an error, not a silent
random initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from medssl_kit.errors import MedsslError
from medssl_kit.models.export import KeyReport, MonaiSpec, monai_spec, monai_state_dict
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import load_checkpoint, save_checkpoint

TRANSFERABLE_NAME = "transferable.pt"


def save_transferable(
    path: str | Path,
    backbone: nn.Module,
    method: str,
    state_dict: dict[str, Tensor] | None = None,
    input_normalization: str = "window",
) -> None:
    """Write ``backbone``'s config and ``state_dict`` (default: all its weights) atomically."""
    state = backbone.state_dict() if state_dict is None else state_dict
    save_checkpoint(
        path,
        {
            "backbone": dict(backbone.config),
            "method": method,
            "input_normalization": input_normalization,
            "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        },
    )


def read_transferable(path: str | Path) -> dict[str, Any]:
    """Load a transferable-weights file (``weights_only``), checking its structure."""
    path = Path(path)
    if path.is_dir():
        path = path / TRANSFERABLE_NAME
    if not path.is_file():
        raise MedsslError(
            f"'{path}' does not exist: an init must be 'scratch' or a run folder holding "
            f"{TRANSFERABLE_NAME} (written by `medssl pretrain` or `medssl finetune`)"
        )
    data = load_checkpoint(path)
    if not {"backbone", "method", "state_dict"} <= set(data):
        raise MedsslError(
            f"'{path}' is not a medssl_kit transferable-weights file "
            "(expected keys 'backbone', 'method', 'state_dict')"
        )
    return data


# Backbone options that are not structure: training-time dropout (pixel_global's MC dropout,
# and the decoder levels that carry it), the logits' width and the ``fpn``'s head kind (the
# head never transfers: the linear and non-linear fine-tuning modes put their own on any FPN
# run) and, for a non-skip ``unet``, ``skips`` (its weights embed into the skip UNet,
# :meth:`~medssl_kit.models.unet.UNet.embed_nonskip_state`).
_TRAINING_ONLY = ("dropout", "dropout_levels")
_NOT_STRUCTURE = (*_TRAINING_ONLY, "out_channels", "head")


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The structural part of a backbone config (``backbone.config`` or a run's record)."""
    plain = json.loads(json.dumps(dict(config)))  # tuples as lists, as read back from a file
    return {k: v for k, v in plain.items() if k not in _NOT_STRUCTURE}


def describe_architecture(config: dict[str, Any]) -> str:
    """``config``'s structure in one line, e.g. ``unet 2D (channels=[16, 32], norm='batch')``."""
    arch = architecture(config)
    options = ", ".join(
        f"{k}={v!r}" for k, v in sorted(arch.items()) if k not in ("name", "spatial_dims")
    )
    return f"{arch.get('name')} {arch.get('spatial_dims')}D ({options})"


def check_transferable_fits(header: dict[str, Any], built: dict[str, Any], run: Any) -> None:
    """Refuse an init whose network differs from the one fine-tuning built (``built``: its
    ``config``), or whose inputs were normalised otherwise; the error names both and the fix."""
    norm = header.get("input_normalization", "window")
    if norm != "window":
        raise MedsslError(
            f"run '{run}' was pre-trained on '{norm}'-normalised inputs, but fine-tuning feeds the "
            "manifest's windowed intensities: its weights would meet inputs they never saw; "
            "pre-train it again with the manifest's normalisation (e.g. ssmtl normalize=none)"
        )
    pre, own = architecture(header["backbone"]), architecture(built)
    if pre.get("skips") is False and own.get("skips") is True:
        pre["skips"] = True  # a non-skip encoder-decoder is fine-tuned inside the skip UNet
    if pre != own:
        raise MedsslError(
            f"run '{run}' pre-trained a {describe_architecture(pre)}, but these fine-tuning "
            f"settings build a {describe_architecture(own)}; every start must be fine-tuned in "
            "the same network as scratch. Fine-tune all starts (scratch too) with the run's "
            "structure (--backbone and --set backbone_kwargs=...), or, to build this one run "
            f"like '{run}', pass --set architecture_from={run}"
        )


def architecture_kwargs_of(run: str | Path) -> tuple[str, dict[str, Any]]:
    """``(backbone name, options)`` that build the network ``run`` trained, without its
    training-time dropout, and with skips (a non-skip ``unet`` embeds into a skip one)."""
    config = dict(read_transferable(run)["backbone"])
    name = config.pop("name")
    kwargs = {
        k: v
        for k, v in config.items()
        if k not in ("spatial_dims", "in_channels", "out_channels", *_TRAINING_ONLY)
    }
    if "skips" in kwargs:
        kwargs["skips"] = True
    return name, kwargs


def load_transferable(
    backbone: nn.Module, path: str | Path, encoder_only: bool = False
) -> KeyReport:
    """Load the matching weights of ``path`` into ``backbone``; fail when nothing matches.

    ``encoder_only`` keeps only the keys under the backbone's ``encoder_prefixes`` (the decoder
    starts from random weights, e.g. to measure what a pre-trained decoder adds). A non-skip
    ``unet``'s decoder loads into a ``unet`` with skips through
    :meth:`~medssl_kit.models.unet.UNet.embed_nonskip_state` (skip inputs start at zero).
    """
    data = read_transferable(path)
    state = data["state_dict"]
    if encoder_only:
        state = {k: v for k, v in state.items() if k.startswith(backbone.encoder_prefixes)}
    if data["backbone"].get("skips") is False and getattr(backbone, "skips", False):
        state = backbone.embed_nonskip_state(state)
    report = KeyReport.compare(backbone.state_dict(), state)
    if not report.matched:
        raise MedsslError(
            f"no weight of '{path}' fits the '{backbone.name}' backbone being fine-tuned "
            f"({report.summary().splitlines()[0]}); was it pre-trained with another backbone "
            "or input size?"
        )
    backbone.load_state_dict({k: state[k] for k in report.matched}, strict=False)
    return report


def export_run(run_dir: str | Path, target: str, out: str | Path) -> tuple[KeyReport, MonaiSpec]:
    """Write a run's transferable weights under the key names of the matching MONAI network.

    The run's backbone is rebuilt (a non-skip unet as a skip unet: every MONAI UNet has skips,
    and a non-skip encoder transfers into one, as PCRLv2 fine-tunes), its transferable weights
    are mapped onto ``target``'s network (:mod:`medssl_kit.models.export`) and loaded into a
    freshly built one to prove they fit. ``out`` holds ``network`` (import path), ``kwargs``
    (constructor arguments), ``state_dict`` and ``missing`` (the network's keys the run did not
    pre-train, e.g. the decoder of an encoder-only method): ::

        ckpt = torch.load(out, weights_only=True)
        net = BasicUNet(**ckpt["kwargs"])
        net.load_state_dict(ckpt["state_dict"], strict=not ckpt["missing"])

    Returns the key report against the MONAI network and its spec.
    """
    data = read_transferable(run_dir)
    cfg = dict(data["backbone"])
    name = cfg.pop("name")
    if "skips" in cfg:
        cfg["skips"] = True
    backbone = build_backbone(name, **cfg)
    source = KeyReport.compare(backbone.state_dict(), data["state_dict"])
    if not source.matched:
        raise MedsslError(f"no weight of '{run_dir}' fits its own '{name}' backbone config")
    backbone.load_state_dict({k: data["state_dict"][k] for k in source.matched}, strict=False)
    try:
        spec = monai_spec(backbone, target)
        renamed = monai_state_dict(backbone, target)
    except ValueError as err:
        raise MedsslError(f"cannot export '{run_dir}' to {target}: {err}") from err
    names = dict(zip(backbone.state_dict(), renamed, strict=True))
    exported = {names[k]: renamed[names[k]] for k in source.matched}
    net = spec.build()
    report = KeyReport.compare(net.state_dict(), exported)
    if report.unexpected or report.mismatched:
        raise MedsslError(
            f"weights of '{run_dir}' do not fit {spec.qualified_name}: {report.summary()}"
        )
    net.load_state_dict(exported, strict=False)
    save_checkpoint(
        out,
        {
            "network": spec.qualified_name,
            "kwargs": spec.kwargs,
            "state_dict": exported,
            "missing": report.missing,
        },
    )
    return report, spec
