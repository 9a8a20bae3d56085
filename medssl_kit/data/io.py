"""Reading and preprocessing of manifest cases (§2.3).

Files are read with MONAI ``LoadImage`` (NIfTI through nibabel, a folder as a DICOM series through
pydicom), made channel-first and reoriented to RAS, so the tensor is ``[C, x, y, z]``; it is then
permuted to the project's in-memory order ``[C, z, y, x]`` = ``[C, D, H, W]`` (axial slices first)
and spacings are reported as (z, y, x) in millimetres. :func:`load_case` additionally resamples to
a target spacing (bilinear for images, nearest for labels) and maps intensities to [0, 1] (CT:
clip to the manifest's HU window; MR: clip to per-volume percentiles) as float32, and returns the
label in the manifest's label space: a case of a source with a ``label_map`` (data pooled from
datasets that number their labels differently) has its file values mapped to the manifest's classes.

Every reader failure becomes a :class:`~medssl_kit.errors.ManifestError` naming the case and file.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.data.utils import compute_shape_offset
from monai.transforms import (
    LoadImage,
    Orientation,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
)
from pydicom.errors import InvalidDicomError

from medssl_kit.data.manifest import Case, Manifest, raise_problems
from medssl_kit.errors import ManifestError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Image / label affines must agree to within this fraction of the smallest voxel size.
AFFINE_TOLERANCE = 0.01
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_DICOM_REQUIRED_TAGS = ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient")


def _make_loader() -> LoadImage:
    """Build the shared ``LoadImage``; it instantiates every MONAI reader, and the GPU-codec
    DICOM reader announces that its optional codec is missing — noise for our users."""
    plugin_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_logger.level
    plugin_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(image_only=True, dtype=None, ensure_channel_first=True)
    finally:
        plugin_logger.setLevel(level)


_LOADER = _make_loader()
_TO_RAS = Orientation(axcodes="RAS", labels=_RAS_LABELS)


@dataclass
class RawCase:
    """A case as stored, reoriented to RAS but neither resampled nor rescaled.

    ``image`` is ``[C, D, H, W]`` and ``label`` ``[1, D, H, W]`` (or ``None``) in the files' dtypes;
    the label holds the file's values, *not* mapped by its source's ``label_map`` (so that
    :func:`check_raw` can report values the map lacks; :func:`load_case` applies the map).
    ``spacing`` is (z, y, x) in mm. ``affine`` / ``label_affine`` are the reoriented volumes' 4×4
    RAS affines (index order x, y, z, as in NIfTI); ``original_affine`` is the image file's own.
    """

    case_id: str
    image: torch.Tensor
    label: torch.Tensor | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    original_affine: np.ndarray
    label_affine: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (D, H, W) = (z, y, x) of the image."""
        return (int(self.image.shape[1]), int(self.image.shape[2]), int(self.image.shape[3]))


@dataclass
class RawCheck:
    """Problems found in one case by :func:`check_raw`, and its label voxel counts (value → n).

    The counts are in the manifest's label space: a mapped source's file values are counted as the
    classes they map to (values its map lacks are reported, not counted).
    """

    problems: list[ManifestError] = field(default_factory=list)
    label_counts: dict[int, int] | None = None


@dataclass
class CaseVolume:
    """A preprocessed case, ready for the datasets.

    ``image``: float32 ``[C, D, H, W]`` in [0, 1]; ``label``: int64 ``[1, D, H, W]`` or ``None``,
    in the manifest's label space (classes of ``labels``, or ``ignore_index``);
    ``spacing``: (z, y, x) mm after resampling. ``affine`` is the 4×4 RAS affine of the returned
    volume in NIfTI index order (x, y, z): ``image[0].permute(2, 1, 0)`` saved with it lies in
    register with the source. ``original_affine`` is the image file's own affine.
    """

    case_id: str
    image: torch.Tensor
    label: torch.Tensor | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    original_affine: np.ndarray
    split: str
    source: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (D, H, W) = (z, y, x)."""
        return (int(self.image.shape[1]), int(self.image.shape[2]), int(self.image.shape[3]))


def _reason(err: BaseException) -> str:
    """A one-line description of the innermost cause of ``err``."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _spacing_zyx(affine: np.ndarray) -> tuple[float, float, float]:
    sx, sy, sz = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(sz), float(sy), float(sx))


def _to_zyx(volume: torch.Tensor) -> torch.Tensor:
    """``[C, x, y, z]`` → ``[C, z, y, x]`` (a view)."""
    return volume.permute(0, 3, 2, 1)


def _check_dicom_series(folder: Path, case_id: str, role: str) -> None:
    """Check a DICOM series folder file by file, so that a bad slice is named, not skipped.

    MONAI's reader skips files it cannot parse and stacks slices by InstanceNumber; a missing,
    truncated or misnumbered slice would silently give a wrong volume.
    """
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for entry in entries:
        if not entry.is_file():
            raise ManifestError(
                f"{role} series folder holds '{entry.name}', which is not a file; a DICOM "
                "series folder must hold only its slice files",
                case_id=case_id,
                path=folder,
            )
    if len(entries) < 2:
        raise ManifestError(
            f"{role} series folder holds {len(entries)} file(s); a DICOM series needs one file "
            "per slice (at least 2)",
            case_id=case_id,
            path=folder,
        )
    slices = []
    for entry in entries:
        try:
            ds = pydicom.dcmread(entry)
        except InvalidDicomError:
            raise ManifestError(
                f"{role} series: not a DICOM file (no DICOM header); remove it from the series "
                "folder or replace it with the complete slice",
                case_id=case_id,
                path=entry,
            ) from None
        except Exception as err:
            raise ManifestError(
                f"cannot read {role} DICOM slice: {_reason(err)}; is the file complete?",
                case_id=case_id,
                path=entry,
            ) from err
        missing = [t for t in (*_DICOM_REQUIRED_TAGS, "PixelData") if t not in ds]
        if missing:
            raise ManifestError(
                f"{role} DICOM slice lacks {', '.join(missing)}, needed to build the volume",
                case_id=case_id,
                path=entry,
            )
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and not syntax.is_compressed:
            expected = (
                int(ds.Rows)
                * int(ds.Columns)
                * int(getattr(ds, "SamplesPerPixel", 1))
                * int(getattr(ds, "NumberOfFrames", 1) or 1)
                * int(ds.BitsAllocated)
                // 8
            )
            if len(ds.PixelData) < expected:
                raise ManifestError(
                    f"cannot read {role} DICOM slice: pixel data is truncated "
                    f"({len(ds.PixelData)} of {expected} bytes); is the file complete?",
                    case_id=case_id,
                    path=entry,
                )
        slices.append((int(ds.InstanceNumber), entry, ds))
    first = slices[0][2]
    for _, entry, ds in slices[1:]:
        for tag in ("SeriesInstanceUID", "Rows", "Columns", "ImageOrientationPatient"):
            if getattr(ds, tag, None) != getattr(first, tag, None):
                raise ManifestError(
                    f"{role} DICOM slice differs from '{slices[0][1].name}' in {tag}; a series "
                    "folder must hold the slices of one series only",
                    case_id=case_id,
                    path=entry,
                )
    slices.sort(key=lambda s: s[0])
    numbers = [s[0] for s in slices]
    if len(set(numbers)) != len(numbers):
        raise ManifestError(
            f"{role} DICOM slices repeat an InstanceNumber; each slice needs its own",
            case_id=case_id,
            path=folder,
        )
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array(
        [np.dot(normal, np.asarray(s[2].ImagePositionPatient, float)) for s in slices]
    )
    steps = np.diff(positions)
    if np.any(np.abs(steps) < 1e-3) or not (np.all(steps > 0) or np.all(steps < 0)):
        raise ManifestError(
            f"{role} DICOM slice positions do not follow their InstanceNumbers (or repeat); "
            "the series cannot be stacked reliably",
            case_id=case_id,
            path=folder,
        )
    gaps = np.abs(steps)
    if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
        raise ManifestError(
            f"{role} DICOM slices are unevenly spaced ({gaps.min():.2f} to {gaps.max():.2f} mm); "
            "is a slice missing?",
            case_id=case_id,
            path=folder,
        )


def read_volume(path: Path, *, case_id: str, role: str = "image") -> MetaTensor:
    """Read one image or label file (or DICOM series folder) as a ``[C, x, y, z]`` RAS MetaTensor.

    ``role`` ("image" or "label") only words the error messages.
    """
    if not path.exists():
        raise ManifestError(
            f"{role} file does not exist; check the case's '{role}' path and the manifest's "
            "'base_dir'",
            case_id=case_id,
            path=path,
        )
    if path.is_dir():
        _check_dicom_series(path, case_id, role)
        reader = PydicomReader()
    elif path.name.endswith(NIFTI_SUFFIXES):
        reader = NibabelReader()
    else:
        raise ManifestError(
            f"unsupported {role} file type; use NIfTI (.nii, .nii.gz) or a folder holding a "
            "DICOM series",
            case_id=case_id,
            path=path,
        )
    try:
        volume = _LOADER(str(path), reader=reader)
    except MemoryError:
        raise
    except Exception as err:  # readers raise a zoo of types for damaged files
        raise ManifestError(
            f"cannot read {role}: {_reason(err)}; is the file complete?", case_id=case_id, path=path
        ) from err
    if volume.ndim != 4:
        raise ManifestError(
            f"{role} has {volume.ndim - 1} spatial dimensions (shape {tuple(volume.shape[1:])}); "
            "medssl_kit reads 3-D volumes (a 4-D NIfTI's last axis is read as channels)",
            case_id=case_id,
            path=path,
        )
    try:
        return _TO_RAS(volume)
    except Exception as err:
        raise ManifestError(
            f"cannot reorient {role} to RAS: {_reason(err)}; is its affine valid?",
            case_id=case_id,
            path=path,
        ) from err


def _raw(
    case: Case, image: MetaTensor, label: MetaTensor | None, original_affine: np.ndarray
) -> RawCase:
    affine = image.affine.numpy().astype(np.float64)
    return RawCase(
        case_id=case.id,
        image=_to_zyx(image.as_tensor()),
        label=None if label is None else _to_zyx(label.as_tensor()),
        spacing=_spacing_zyx(affine),
        affine=affine,
        original_affine=original_affine,
        label_affine=None if label is None else label.affine.numpy().astype(np.float64),
    )


def _read_pair(case: Case) -> tuple[MetaTensor, MetaTensor | None, np.ndarray]:
    """Read image and label, reporting both when both fail."""
    problems: list[ManifestError] = []
    image = label = None
    try:
        image = read_volume(case.image_path, case_id=case.id, role="image")
    except ManifestError as err:
        problems.append(err)
    if case.label_path is not None:
        try:
            label = read_volume(case.label_path, case_id=case.id, role="label")
        except ManifestError as err:
            problems.append(err)
    raise_problems(problems)
    assert image is not None
    original = np.asarray(image.meta.get("original_affine", image.affine), dtype=np.float64)
    return image, label, original


def read_raw(case: Case, manifest: Manifest) -> RawCase:
    """Read a case as stored (reoriented to RAS, no resampling, no intensity scaling).

    Raises :class:`ManifestError` (a ``ManifestProblems`` if both files fail) for missing or
    unreadable files. ``manifest`` is accepted for symmetry with :func:`load_case`.
    """
    del manifest  # paths are already resolved in the case
    image, label, original = _read_pair(case)
    return _raw(case, image, label, original)


def _label_values(label: torch.Tensor) -> tuple[Counter, list[float]]:
    """Voxel count per integer label value and up to five example non-integer values.

    Works in slabs of slices so that a large volume is never copied whole.
    """
    counts: Counter = Counter()
    non_integer: set[float] = set()
    slabs = (slab for channel in label for slab in channel.split(16, dim=0))
    for slab in slabs:
        if slab.is_floating_point():
            bad = slab != torch.round(slab)  # also true for NaN
            if bool(bad.any()):
                non_integer.update(torch.unique(slab[bad])[:5].tolist())
                slab = slab[~bad]
        values, n = torch.unique(slab, return_counts=True)
        counts.update(dict(zip((int(v) for v in values.tolist()), n.tolist(), strict=True)))
    return counts, sorted(non_integer, key=lambda v: (v != v, v))[:5]


def check_raw(raw: RawCase, case: Case, manifest: Manifest) -> RawCheck:
    """Check a read case against the manifest; return every problem and the label voxel counts.

    Checks: channel count; NaN / infinite intensities; label channel count, shape and affine
    against the image; non-integer label values; for a source with a ``label_map``, file values
    that are neither keys of the map nor 0 or ``ignore_index`` (one problem for all of them); values
    (after the map) that are neither classes in ``labels`` nor ``ignore_index``; for a case with a
    source, classes that source does not annotate. The voxel counts are in the manifest's label
    space.
    """
    result = RawCheck()

    def problem(message: str, path: Path | None) -> None:
        result.problems.append(ManifestError(message, case_id=case.id, path=path))

    image_path, label_path = case.image_path, case.label_path
    channels = int(raw.image.shape[0])
    if channels != manifest.num_channels:
        problem(
            f"image has {channels} channels but the manifest expects {manifest.num_channels}"
            + (f" ({', '.join(manifest.channels)})" if manifest.channels else "")
            + "; list the channel names in the manifest's 'channels' for multi-channel images",
            image_path,
        )
    if raw.image.is_floating_point():
        n_nan = int(torch.isnan(raw.image).sum())
        n_inf = int(torch.isinf(raw.image).sum())
        if n_nan:
            problem(f"image holds {n_nan} NaN voxel(s); replace them before training", image_path)
        if n_inf:
            problem(
                f"image holds {n_inf} infinite voxel(s); replace them before training", image_path
            )
    if raw.label is None:
        return result
    label = raw.label
    image_name = case.image_path.name
    if label.shape[0] != 1:
        problem(f"label has {label.shape[0]} channels; a label map must have one", label_path)
    label_shape = tuple(int(s) for s in label.shape[1:])
    if label_shape != raw.shape:
        problem(
            f"label shape {'x'.join(map(str, label_shape))} (z, y, x) differs from the shape "
            f"{'x'.join(map(str, raw.shape))} of image '{image_name}'",
            label_path,
        )
    assert raw.label_affine is not None
    difference = np.abs(raw.label_affine - raw.affine)[:3]
    tolerance = AFFINE_TOLERANCE * min(raw.spacing)
    if difference.max() > tolerance:
        problem(
            f"label and image '{image_name}' are not in the same space: their affines differ by "
            f"up to {difference[:, 3].max():.3f} mm in origin and {difference[:, :3].max():.3f} "
            "in axes/spacing; re-save the label with the image's affine",
            label_path,
        )
    counts, non_integer = _label_values(label)
    label_map = manifest.label_map(case)
    if label_map is not None:
        counts = _map_counts(counts, label_map, case, manifest, problem)
    result.label_counts = dict(sorted(counts.items()))
    if non_integer:
        examples = ", ".join(f"{v:g}" for v in non_integer)
        problem(
            f"label holds non-integer values (e.g. {examples}); labels must be integer class "
            "indices (was an image given as label, or a label resampled with interpolation?)",
            label_path,
        )
    allowed = set(manifest.labels) | {manifest.ignore_index}
    unknown = sorted(v for v in counts if v not in allowed)
    if unknown:
        classes = ", ".join(str(k) for k in sorted(manifest.labels))
        values = ", ".join(map(str, unknown[:10]))
        what = (
            f"label values {values} are neither classes"
            if len(unknown) > 1
            else f"label value {values} is neither a class"
        )
        problem(
            f"{what} in the manifest's 'labels' ({classes}) nor its ignore_index "
            f"{manifest.ignore_index}",
            label_path,
        )
    if case.source is not None and manifest.sources is not None:
        annotated = set(manifest.sources[case.source]) | {0, manifest.ignore_index}
        foreign = sorted(v for v in counts if v not in annotated and v in manifest.labels)
        if foreign:
            problem(
                f"label holds classes {foreign} that source '{case.source}' does not annotate "
                f"(it annotates {manifest.sources[case.source]}); set them to 0 or ignore_index "
                f"{manifest.ignore_index}, or fix the case's source",
                label_path,
            )
    return result


def _map_counts(
    counts: Counter,
    label_map: Mapping[int, int],
    case: Case,
    manifest: Manifest,
    problem: Callable[[str, Path | None], None],
) -> Counter:
    """File-value voxel counts → manifest-class counts; report file values the map lacks."""
    kept = (0, manifest.ignore_index)
    unmapped = sorted(v for v in counts if v not in label_map and v not in kept)
    if unmapped:
        keys = ", ".join(str(k) for k in sorted(label_map))
        shown = ", ".join(map(str, unmapped[:10])) + (", ..." if len(unmapped) > 10 else "")
        problem(
            f"label values [{shown}] are not in source '{case.source}''s label_map ({keys}); "
            f"add them to 'sources.{case.source}.label_map' (a value may map to 0 for background "
            f"or to ignore_index {manifest.ignore_index} for unknown), or fix the case's source",
            case.label_path,
        )
    mapped: Counter = Counter()
    for value, n in counts.items():
        if value in label_map:
            mapped[label_map[value]] += n
        elif value in kept:
            mapped[value] += n
    return mapped


def remap_labels(label: torch.Tensor, label_map: Mapping[int, int]) -> torch.Tensor:
    """``label`` with every value ``k`` of ``label_map`` replaced by ``label_map[k]``.

    Values that are not keys (0, ``ignore_index``) are kept. Every replacement looks at the
    original values, so a map may swap classes. Returns a new tensor of the same kind (a
    MetaTensor keeps its metadata), widened to int32 if an integer dtype cannot hold a target;
    ``label`` itself is not changed. A map that changes nothing returns ``label``.
    """
    changes = {int(k): int(v) for k, v in label_map.items() if int(k) != int(v)}
    if not changes:
        return label
    out = label
    if not label.is_floating_point():
        info = torch.iinfo(label.dtype)
        if max(changes.values()) > info.max or min(changes.values()) < info.min:
            out = label.to(torch.int32)
    out = out.clone()
    for value, target in changes.items():
        out[label == value] = target
    return out


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Shape (z, y, x) that :func:`load_case` gives an axis-aligned volume at ``target_spacing``."""
    in_affine = np.diag([*map(float, spacing[::-1]), 1.0])
    out_affine = np.diag([*map(float, target_spacing[::-1]), 1.0])
    out, _ = compute_shape_offset(list(shape)[::-1], in_affine, out_affine)
    return tuple(int(s) for s in out[::-1])  # type: ignore[return-value]


def load_case(
    case: Case, manifest: Manifest, target_spacing: Sequence[float] | None = None
) -> CaseVolume:
    """Read, check and preprocess one case (§2.3).

    ``target_spacing`` (z, y, x) mm defaults to the manifest's ``target_spacing``; with neither,
    the volume keeps its own spacing. The label is returned in the manifest's label space: for a
    case of a source with a ``label_map``, file values are mapped to the manifest's classes
    (:func:`remap_labels`). Raises :class:`ManifestError` naming the case and file for unreadable
    files and for every problem :func:`check_raw` finds.
    """
    image, label, original_affine = _read_pair(case)
    raise_problems(check_raw(_raw(case, image, label, original_affine), case, manifest).problems)
    label_map = manifest.label_map(case)
    if label is not None and label_map is not None:
        label = remap_labels(label, label_map)
    image = image.to(torch.float32)
    target = target_spacing if target_spacing is not None else manifest.target_spacing
    if target is not None:
        pixdim = [float(s) for s in target[::-1]]
        image = Spacing(pixdim=pixdim, mode="bilinear")(image)
        if label is not None:
            label = Spacing(pixdim=pixdim, mode="nearest")(label.to(torch.float32))
    low, high = manifest.intensity.low, manifest.intensity.high
    if manifest.intensity.kind == "window":
        scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    else:
        scale = ScaleIntensityRangePercentiles(
            lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )
    image = scale(image)
    affine = image.affine.numpy().astype(np.float64)
    return CaseVolume(
        case_id=case.id,
        image=_to_zyx(image.as_tensor()).to(torch.float32).contiguous(),
        label=(
            None
            if label is None
            else _to_zyx(label.as_tensor()).round().to(torch.int64).contiguous()
        ),
        spacing=_spacing_zyx(affine),
        affine=affine,
        original_affine=original_affine,
        split=case.split,
        source=case.source,
    )
