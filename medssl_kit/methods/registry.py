"""Method registry: ``get_method(name)`` and ``available_methods()``."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from importlib import import_module

from medssl_kit.errors import MedsslError
from medssl_kit.methods.base import PretrainMethod

# name -> "module:Class"; modules are imported on demand so one method's import cost or
# optional dependency never burdens another.
_METHODS: dict[str, str | type[PretrainMethod]] = {}


def register(name: str, target: str | type[PretrainMethod]) -> None:
    """Register ``target`` (a class, or ``"package.module:Class"``) under ``name``."""
    _METHODS[name] = target


def available_methods() -> list[str]:
    """Names of the registered pre-training methods."""
    return sorted(_METHODS)


def unknown_methods_message(names: Sequence[str]) -> str:
    """The one-line error for unregistered method ``names``: each with the closest registered
    name as a "did you mean" hint where one is close, then the available names."""
    known = available_methods()
    named = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        named.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    plural = "s" if len(named) > 1 else ""
    return f"unknown pre-training method{plural} {', '.join(named)}; available: {', '.join(known)}"


def get_method(name: str) -> type[PretrainMethod]:
    """The :class:`PretrainMethod` subclass registered as ``name``."""
    if name not in _METHODS:
        raise MedsslError(unknown_methods_message([name]))
    target = _METHODS[name]
    if not isinstance(target, str):
        return target
    module, _, cls = target.partition(":")
    return getattr(import_module(module), cls)


register("pixel_global", "medssl_kit.methods.pixel_global:PixelGlobal")
register("pcrlv2", "medssl_kit.methods.pcrlv2:PCRLv2")
register("mixcl", "medssl_kit.methods.mixcl:MixCL")
register("ssmtl", "medssl_kit.methods.ssmtl:SSMTL")
register("ssmtl_plus", "medssl_kit.methods.ssmtl:SSMTLPlus")
register("vox2vec", "medssl_kit.methods.hierarchical_dense:Vox2Vec")
register("hierarchical_dense", "medssl_kit.methods.hierarchical_dense:HierarchicalDense")
register("simsiam", "medssl_kit.methods.baselines:SimSiam")
register("byol", "medssl_kit.methods.baselines:BYOL")
register("mocov2", "medssl_kit.methods.baselines:MoCoV2")
register("models_genesis", "medssl_kit.methods.baselines:ModelsGenesis")
