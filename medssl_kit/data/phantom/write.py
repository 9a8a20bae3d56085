"""Writing phantom cases, their splits and manifest to a folder (and reusing one already there)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
from concurrent.futures import ProcessPoolExecutor

import nibabel as nib
import numpy as np

from medssl_kit.atomic import atomic_path, atomic_write_text
from medssl_kit.config import get_profile
from medssl_kit.data.phantom.case import DEFAULT_SHAPE, _check_shape_spacing, case_id, generate_case
from medssl_kit.data.phantom.splits import SPLITS, _assign_splits, _check_split, default_split
from medssl_kit.data.phantom.tissues import LABELS, SOURCE_CLASSES
from medssl_kit.errors import ManifestError

GENERATOR_TOOL = "medssl_kit.data.phantom"
GENERATOR_VERSION = 2


def _atomic_write_nifti(array: np.ndarray, spacing, path: pathlib.Path) -> None:
    """Write a ``(D, H, W)`` array as NIfTI ``(x, y, z)`` with affine diag(sx, sy, sz, 1)."""
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _write_case(job: tuple) -> None:
    out, index, seed, shape, spacing, modality, source = job
    case = generate_case(index, seed, shape, spacing, modality, source)
    image = case.image.astype(np.int16) if modality == "ct" else case.image
    _atomic_write_nifti(image, case.spacing, out / "imagesTr" / f"{case.case_id}.nii.gz")
    _atomic_write_nifti(case.label, case.spacing, out / "labelsTr" / f"{case.case_id}.nii.gz")


def _previous_phantom(out: pathlib.Path, new_files: list[pathlib.Path]) -> list[pathlib.Path]:
    """Check that writing into ``out`` overwrites nothing but an earlier phantom; return the old
    phantom's case files that the new one does not rewrite."""
    manifest = out / "manifest.json"
    if not manifest.exists():
        existing = [f for f in new_files if f.exists()]
        if existing:
            raise ManifestError(
                "the output folder holds image/label files but no phantom manifest.json; refusing"
                " to overwrite them - choose an empty folder",
                path=existing[0],
            )
        return []
    try:
        old = json.loads(manifest.read_text())
        ours = old.get("generator", {}).get("tool") == GENERATOR_TOOL
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ManifestError(
            "the output folder already holds a manifest.json that the phantom generator did not"
            " write; choose an empty folder (or move that manifest) - nothing was changed",
            path=manifest,
        )
    keep = {f.resolve() for f in new_files}
    stale = []
    for entry in old.get("cases", []):
        for key in ("image", "label"):
            f = (out / str(entry.get(key, "") if isinstance(entry, dict) else "")).resolve()
            inside = f.parent.parent == out.resolve() and f.parent.name in ("imagesTr", "labelsTr")
            if inside and f.name.endswith(".nii.gz") and f not in keep and f.is_file():
                stale.append(f)
    return stale


def make_phantom(
    out_dir: str | os.PathLike,
    cases: int = 40,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] | None = None,
    modality: str = "ct",
    sources: list[str] | None = None,
    split: dict[str, int] | None = None,
    workers: int = 2,
    source_splits: list[str] | None = None,
) -> pathlib.Path:
    """Write ``cases`` phantom cases and their manifest into ``out_dir``; return the manifest path.

    Files: ``imagesTr/case_XXX.nii.gz`` (CT: int16 HU; MRI: float32), ``labelsTr/case_XXX.nii.gz``
    (uint8) and ``manifest.json`` (DESIGN §2.2, ``base_dir`` "."). ``shape`` / ``spacing`` (mm)
    as in :func:`generate_case`. Splits get the counts of ``split`` (default
    :func:`default_split`) in a seeded random order. With ``sources`` (e.g. ``["A", "B", "C"]``)
    cases are assigned to sources round-robin and only carry their source's classes; the manifest
    lists each source's classes under ``"sources"``. ``source_splits`` (e.g. ``["pretrain"]``, as
    MixCL needs: a partially labelled pool, a fully labelled fine-tuning task) restricts this to
    the cases of those splits, assigned round-robin in case order; cases of other splits keep all
    labels and get no ``"source"``. Default: every split (every case gets a source).

    ``workers`` processes generate cases in parallel (the files do not depend on it); as with any
    multiprocessing, a script calling this with ``workers > 1`` needs the
    ``if __name__ == "__main__":`` guard. Every file is written atomically and the manifest last
    (until then the folder holds an empty placeholder manifest, so an interrupted run leaves no
    dataset that looks complete). A folder holding a manifest or case files that this generator
    did not write is refused with :class:`~medssl_kit.errors.ManifestError`; an earlier phantom is
    replaced, its surplus case files removed.
    """
    shape, spacing = _check_shape_spacing(shape, spacing)
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    if sources is not None:
        sources = [str(s) for s in sources]
        bad = [s for s in sources if s not in SOURCE_CLASSES]
        if bad or not sources or len(set(sources)) != len(sources):
            raise ValueError(
                f"sources must be distinct names from {sorted(SOURCE_CLASSES)}, got {sources}"
            )
    if source_splits is not None:
        source_splits = [str(s) for s in source_splits]
        if sources is None:
            raise ValueError("source_splits needs sources (e.g. sources=['A', 'B', 'C'])")
        unknown = [s for s in source_splits if s not in SPLITS]
        if unknown or not source_splits or len(set(source_splits)) != len(source_splits):
            raise ValueError(
                f"source_splits must be distinct split names from {list(SPLITS)}, "
                f"got {source_splits}"
            )
    counts = _check_split(split, cases) if split is not None else default_split(cases)
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ManifestError("the output path exists and is not a folder", path=out)
    ids = [case_id(i) for i in range(cases)]
    new_files = [out / d / f"{i}.nii.gz" for i in ids for d in ("imagesTr", "labelsTr")]
    stale = _previous_phantom(out, new_files) if out.exists() else []

    mri = modality == "mri"
    manifest: dict = {
        "name": "phantom-abdomen-mri" if mri else "phantom-abdomen",
        "modality": "MR" if mri else "CT",
        "base_dir": ".",
        "labels": {str(k): v for k, v in LABELS.items()},
        "ignore_index": 255,
        "intensity": {"percentiles": [0.5, 99.5]} if mri else {"window": [-200, 300]},
        "generator": {
            "tool": GENERATOR_TOOL,
            "version": GENERATOR_VERSION,
            "cases": cases,
            "seed": seed,
            "shape": list(shape),
            "spacing": None if spacing is None else list(spacing),
            "modality": modality,
            "sources": sources,
            "split": counts,
        },
    }
    partial = source_splits is not None and set(source_splits) != set(SPLITS)
    if partial:  # recorded only when it changes the data, so earlier phantoms stay reusable
        manifest["generator"]["source_splits"] = [s for s in SPLITS if s in source_splits]
    if sources:
        manifest["sources"] = {s: SOURCE_CLASSES[s] for s in sources}
    path = out / "manifest.json"
    for d in ("imagesTr", "labelsTr"):
        (out / d).mkdir(parents=True, exist_ok=True)
    placeholder = {**manifest, "generator": {**manifest["generator"], "status": "incomplete"}}
    atomic_write_text(path, json.dumps({**placeholder, "cases": []}, indent=2) + "\n")
    for f in stale:
        f.unlink(missing_ok=True)

    split_of = _assign_splits(cases, counts, seed)
    case_sources: list[str | None] = [None] * cases
    if sources:  # round-robin, in case order, over the cases of the source splits
        eligible = [i for i in range(cases) if not partial or split_of[i] in (source_splits or ())]
        for k, i in enumerate(eligible):
            case_sources[i] = sources[k % len(sources)]
    jobs = [(out, i, seed, shape, spacing, modality, case_sources[i]) for i in range(cases)]
    n_proc = max(1, min(int(workers), cases))
    if n_proc == 1:
        for job in jobs:
            _write_case(job)
    else:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        with ProcessPoolExecutor(n_proc, mp_context=context) as pool:
            list(pool.map(_write_case, jobs))

    entries = []
    for i, (cid, split_name) in enumerate(zip(ids, split_of, strict=True)):
        entry = {
            "id": cid,
            "image": f"imagesTr/{cid}.nii.gz",
            "label": f"labelsTr/{cid}.nii.gz",
            "split": split_name,
        }
        if case_sources[i] is not None:
            entry["source"] = case_sources[i]
        entries.append(entry)
    manifest["cases"] = entries
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def ensure_phantom(
    out_dir: str | os.PathLike,
    profile: str | None = None,
    seed: int = 0,
    modality: str = "ct",
    sources: list[str] | None = None,
    workers: int = 2,
    source_splits: list[str] | None = None,
) -> pathlib.Path:
    """The manifest of ``profile``'s default phantom in ``out_dir``, generated only if needed.

    An existing phantom is reused when its manifest records exactly these generator arguments
    (cases, shape, split from the profile; ``seed``, ``modality``, ``sources``,
    ``source_splits``) and every case
    file is present; otherwise :func:`make_phantom` (re)generates it. Notebooks and the pipeline
    call this so that re-running them does not regenerate data.
    """
    settings = get_profile(profile).phantom
    out = pathlib.Path(out_dir)
    path = out / "manifest.json"
    expected = {
        "tool": GENERATOR_TOOL,
        "version": GENERATOR_VERSION,
        "cases": settings.cases,
        "seed": seed,
        "shape": list(settings.shape),
        "spacing": None,
        "modality": modality,
        "sources": None if sources is None else [str(s) for s in sources],
        "split": dict(settings.split),
    }
    if source_splits is not None and set(source_splits) != set(SPLITS):
        expected["source_splits"] = [s for s in SPLITS if s in source_splits]
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            existing = {}
        cases = existing.get("cases", [])
        complete = len(cases) == settings.cases and all(
            (out / c[key]).is_file() for c in cases for key in ("image", "label")
        )
        if existing.get("generator") == expected and complete:
            return path
    return make_phantom(
        out,
        cases=settings.cases,
        seed=seed,
        shape=settings.shape,
        modality=modality,
        sources=sources,
        split=dict(settings.split),
        workers=workers,
        source_splits=source_splits,
    )
