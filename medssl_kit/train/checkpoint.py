"""Atomic checkpoints, safe loading and run-folder files (DESIGN §5.3).

Every file is written to a temporary name in the destination folder, flushed, fsync'ed and renamed
over the target, so a run killed mid-write leaves the previous checkpoint intact. Every load uses
``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot execute code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medssl_kit import __version__
from medssl_kit.atomic import atomic_path, atomic_write_text
from medssl_kit.errors import MedsslError

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts) with ``torch.save``.

    The package version is added under ``"version"``.
    """
    state = {**state, "version": __version__}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; clear error if unusable.

    Tensors land on ``map_location`` (default the CPU, whatever device wrote them), so a run
    moves between machines (GPU to CPU and back): the loops copy them to their device.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsslError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise MedsslError(
            f"checkpoint '{path}' cannot be loaded safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            "it may be truncated or contain objects other than tensors and plain data"
        ) from exc


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (metrics logs); flushed so a killed run keeps what it logged."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by :func:`append_jsonl`.

    A torn last line (a run killed mid-write) is dropped; a malformed line elsewhere is an error.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise MedsslError(f"'{path}' line {number} is not valid JSON: {err}") from err
    return records


def prepare_run_folder(out_dir: Path, resume: bool) -> bool:
    """Create ``out_dir``; refuse to overwrite a run unless resuming. True if a checkpoint exists.

    A folder holding ``config.json`` or a checkpoint holds a run: without ``resume`` it is never
    written into, so a finished run cannot be overwritten by mistake.
    """
    checkpoint = (out_dir / CHECKPOINT_NAME).exists()
    if not resume and (checkpoint or (out_dir / "config.json").exists()):
        raise MedsslError(
            f"run folder '{out_dir}' already holds a run; pass resume=True (--resume) to continue "
            "it, or choose another folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return resume and checkpoint


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records up to ``step``: what a killed run logged after its checkpoint goes."""
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
