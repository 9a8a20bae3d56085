"""Medical Segmentation Decathlon import: a manifest for an MSD task folder (§2.2).

:func:`import_msd` only reads the task folder and writes the one new manifest file it is asked for.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medssl_kit.atomic import atomic_write_text
from medssl_kit.data.manifest import (
    DEFAULT_CT_WINDOW,
    DEFAULT_IGNORE_INDEX,
    DEFAULT_MR_PERCENTILES,
    SPLITS,
    _is_int,
    parse_manifest,
)
from medssl_kit.errors import ManifestError

MSD_SPLIT_FRACTIONS: dict[str, float] = {"pretrain": 0.5, "train": 0.2, "val": 0.1, "test": 0.2}


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ManifestError(
            "exists already; choose another output path or pass overwrite=True (--overwrite)",
            path=path,
        )


def _write_json_new(path: Path, data: Any, overwrite: bool) -> None:
    """Write JSON atomically; refuse to replace an existing file unless ``overwrite``."""
    _refuse_existing(path, overwrite)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _msd_rel(entry: Any, task_dir: Path, what: str) -> str:
    """Normalise an MSD path ("./imagesTr/x.nii.gz") to a task-relative POSIX path."""
    if not isinstance(entry, str) or not entry:
        raise ManifestError(
            f"dataset.json: {what} must be a path string, got {entry!r}", path=task_dir
        )
    return Path(os.path.normpath(entry)).as_posix()


def _case_id(rel: str) -> str:
    name = Path(rel).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Case counts per split: each non-pretrain split gets round(f·n), at least 1 if f > 0."""
    counts = {
        s: (max(1, round(fractions.get(s, 0.0) * n)) if fractions.get(s, 0.0) > 0 else 0)
        for s in ("test", "val", "train")
    }
    counts["pretrain"] = n - sum(counts.values())
    if counts["pretrain"] < 0:
        raise ManifestError(
            f"{n} labelled training cases are too few for the split fractions {dict(fractions)}; "
            "each of train/val/test with a non-zero fraction needs at least one case"
        )
    return counts


def import_msd(
    task_dir: str | Path,
    out_manifest: str | Path,
    seed: int = 0,
    fractions: Mapping[str, float] = MSD_SPLIT_FRACTIONS,
    window: tuple[float, float] = DEFAULT_CT_WINDOW,
    overwrite: bool = False,
) -> Path:
    """Write a manifest for a Medical Segmentation Decathlon task folder; return its path.

    The task folder holds ``dataset.json`` (name, modality, labels, training [{image, label}],
    test [paths]) and imagesTr / labelsTr / imagesTs; it is only read. Labelled training cases are
    shuffled with ``seed`` and split by ``fractions`` (default 50 % pretrain, 20 % train, 10 % val,
    20 % test; train/val/test get at least one case each, pretrain the remainder); imagesTs cases
    become unlabelled "pretrain" cases. CT tasks get an intensity window (``window``, HU), MR
    tasks 0.5–99.5 percentile scaling; multi-modal tasks (4D images) record their channel names.
    ``base_dir`` points at the task folder, relative to the manifest when possible. An existing
    ``out_manifest`` is never replaced unless ``overwrite``.
    """
    task_dir = Path(os.path.abspath(Path(task_dir).expanduser()))
    out_manifest = Path(os.path.abspath(Path(out_manifest).expanduser()))
    dataset_json = task_dir / "dataset.json"
    if not dataset_json.is_file():
        raise ManifestError(
            "no dataset.json here; is this a Medical Segmentation Decathlon task folder?",
            path=task_dir,
        )
    if out_manifest.is_relative_to(task_dir):
        raise ManifestError(
            "the manifest would be written inside the task folder, which import-msd never "
            "modifies; choose an output path outside it",
            path=out_manifest,
        )
    if set(fractions) - set(SPLITS) or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"fractions must map splits {SPLITS} to shares that sum to 1, got {fractions}"
        )
    _refuse_existing(out_manifest, overwrite)
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ManifestError(
            f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", path=dataset_json
        ) from err
    if not isinstance(meta, dict):
        raise ManifestError("dataset.json must hold a JSON object", path=dataset_json)
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise ManifestError(f"dataset.json lacks the key '{key}'", path=dataset_json)

    modality_map = meta["modality"]
    if not isinstance(modality_map, dict) or not modality_map:
        raise ManifestError("dataset.json 'modality' must be an object", path=dataset_json)
    channel_names = [str(modality_map[k]) for k in sorted(modality_map, key=lambda k: int(k))]
    is_ct = [name.upper() == "CT" for name in channel_names]
    if any(is_ct) and not all(is_ct):
        raise ManifestError(
            f"mixes CT with other channels ({', '.join(channel_names)}), which one intensity "
            "rule cannot handle",
            path=dataset_json,
        )
    modality = "CT" if all(is_ct) else "MR"

    raw_labels = meta["labels"]
    if isinstance(raw_labels, dict) and raw_labels and all(_is_int(v) for v in raw_labels.values()):
        raw_labels = {str(v): k for k, v in raw_labels.items()}  # nnU-Net v2 style {name: index}
    if not isinstance(raw_labels, dict) or not all(str(k).isdigit() for k in raw_labels):
        raise ManifestError(
            "dataset.json 'labels' must map class indices to names", path=dataset_json
        )
    labels = {str(int(k)): str(v) for k, v in sorted(raw_labels.items(), key=lambda kv: int(kv[0]))}

    training = []
    for i, item in enumerate(meta["training"]):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise ManifestError(
                f"dataset.json 'training[{i}]' must be an object with 'image' and 'label'",
                path=dataset_json,
            )
        image = _msd_rel(item["image"], task_dir, f"training[{i}].image")
        training.append((_case_id(image), image, _msd_rel(item["label"], task_dir, "label")))
    tests = [_msd_rel(p, task_dir, "test entry") for p in meta.get("test", [])]

    missing = [
        rel
        for _, image, label in training
        for rel in (image, label)
        if not (task_dir / rel).exists()
    ] + [rel for rel in tests if not (task_dir / rel).exists()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ManifestError(
            f"dataset.json lists files that do not exist: {', '.join(missing[:3])}{more}",
            path=task_dir,
        )
    if len({cid for cid, _, _ in training}) != len(training):
        raise ManifestError("dataset.json lists a training image twice", path=dataset_json)

    training.sort()
    counts = _split_counts(len(training), fractions)
    order = np.random.default_rng(seed).permutation(len(training))
    split_of: dict[str, str] = {}
    start = 0
    for split in ("test", "val", "train", "pretrain"):
        for idx in order[start : start + counts[split]]:
            split_of[training[idx][0]] = split
        start += counts[split]

    cases: list[dict[str, Any]] = [
        {"id": cid, "image": image, "label": label, "split": split_of[cid]}
        for cid, image, label in training
    ]
    taken = {c["id"] for c in cases}
    for rel in sorted(tests):
        cid = _case_id(rel)
        if cid in taken:
            cid = f"ts_{cid}"
        taken.add(cid)
        cases.append({"id": cid, "image": rel, "split": "pretrain"})

    try:
        base_dir = Path(os.path.relpath(task_dir, out_manifest.parent)).as_posix()
    except ValueError:  # different drives on Windows
        base_dir = task_dir.as_posix()
    intensity = (
        {"window": [float(window[0]), float(window[1])]}
        if modality == "CT"
        else {"percentiles": list(DEFAULT_MR_PERCENTILES)}
    )
    manifest: dict[str, Any] = {"name": str(meta.get("name") or task_dir.name)}
    if meta.get("description"):
        manifest["description"] = str(meta["description"])
    manifest["modality"] = modality
    if len(channel_names) > 1:
        manifest["channels"] = channel_names
    manifest.update(
        {
            "base_dir": base_dir,
            "labels": labels,
            "ignore_index": DEFAULT_IGNORE_INDEX,
            "intensity": intensity,
            "generator": {
                "tool": "medssl import-msd",
                "task_dir": task_dir.as_posix(),
                "seed": seed,
                "fractions": dict(fractions),
            },
            "cases": cases,
        }
    )
    parse_manifest(manifest, out_manifest.parent, path=out_manifest)  # never write an invalid one
    _write_json_new(out_manifest, manifest, overwrite)
    return out_manifest
