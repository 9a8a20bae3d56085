"""Atomic checkpoints, safe loading and run-folder files (DESIGN §5.3).

Every file is written to a temporary name in the destination folder, flushed, fsync'ed and renamed
over the target, so a run killed mid-write leaves the previous checkpoint intact. Every load uses
``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot execute code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medssl_kit import __version__
from medssl_kit.errors import MedsslError

CHECKPOINT_NAME = "checkpoint.pt"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts) with ``torch.save``.

    The package version is added under ``"version"``.
    """
    state = {**state, "version": __version__}
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` onto the CPU; clear error if unusable."""
    path = Path(path)
    if not path.is_file():
        raise MedsslError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise MedsslError(
            f"checkpoint '{path}' cannot be loaded safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            "it may be truncated or contain objects other than tensors and plain data"
        ) from exc


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text), mode="w")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (metrics logs); flushed so a killed run keeps what it logged."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by :func:`append_jsonl` (a torn last line is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
