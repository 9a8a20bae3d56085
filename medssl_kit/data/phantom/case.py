"""One phantom case: :func:`generate_case` draws its anatomy, scan and appearance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medssl_kit.data.phantom.acquisition import _acquisition
from medssl_kit.data.phantom.anatomy import _Anatomy
from medssl_kit.data.phantom.ct import _appearance_ct
from medssl_kit.data.phantom.mri import _appearance_mri
from medssl_kit.data.phantom.renderer import _Renderer
from medssl_kit.data.phantom.tissues import _TISSUE_LABEL, LABELS, SOURCE_CLASSES

DEFAULT_SHAPE: tuple[int, int, int] = (48, 128, 128)


@dataclass
class PhantomCase:
    """One generated case.

    ``image``: float32 ``(D, H, W)``, HU for CT, arbitrary non-negative units for MRI.
    ``label``: uint8 ``(D, H, W)`` with the values of :data:`LABELS`; in a source case, classes the
    source does not annotate are 0. ``spacing``: ``(z, y, x)`` in mm. ``tissue``: uint8
    ``(D, H, W)`` map of :class:`Tissue` classes (the unlabelled context included), for analysis.
    ``acquisition``: what was drawn for this case's scan, for analysis: ``phase`` (one of
    :data:`CONTRAST_PHASES`; None for MRI), ``dfov_mm``, ``scan_top_above_dome_mm``,
    ``rotation_deg``, ``table_offset_mm`` (x, y) and, for CT, the kernel and noise parameters.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    case_id: str
    source: str | None = None
    tissue: np.ndarray | None = None
    acquisition: dict | None = None


def _check_shape_spacing(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, ...] | None]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes (D, H, W) of at least 4 voxels, got {shape}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive sizes (z, y, x) in mm, got {spacing}")
    return shape, spacing


def generate_case(
    index: int,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] | None = None,
    modality: str = "ct",
    source: str | None = None,
) -> PhantomCase:
    """Generate case number ``index`` of the phantom.

    ``shape`` is ``(D, H, W)`` in voxels. ``spacing`` is ``(z, y, x)`` in mm; when None it is the
    case's field of view divided by ``shape``: 240 mm times a per-case factor in [0.85, 1.15]
    along z, the case's display field of view (300-460 mm, see the module docstring) in plane.
    When given it is used exactly (the patient, pose and scan start are the same either way).
    ``modality`` is ``"ct"`` (image in HU) or ``"mri"`` (non-negative arbitrary units).
    ``source`` (a key of :data:`SOURCE_CLASSES`) keeps only the classes that source annotates;
    other classes become 0. ``PhantomCase.acquisition`` records the drawn scan parameters.
    The same arguments always give byte-identical arrays (on one platform and library versions).
    """
    shape, spacing = _check_shape_spacing(shape, spacing)
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    if source is not None and source not in SOURCE_CLASSES:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(SOURCE_CLASSES)}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    anat_seq, geom_seq, look_seq = np.random.SeedSequence([seed, index]).spawn(3)
    anat = _Anatomy(np.random.default_rng(anat_seq))
    spacing, rot, shift, acquisition = _acquisition(
        anat, shape, spacing, np.random.default_rng(geom_seq)
    )
    renderer = _Renderer(anat, shape, spacing, rot, shift, acquisition["table_y_mm"])
    tissue, lesions = renderer.render()
    ct_seq, mri_seq = look_seq.spawn(2)
    if modality == "ct":
        image, look = _appearance_ct(renderer, lesions, np.random.default_rng(ct_seq))
    else:
        image = _appearance_mri(renderer, lesions, np.random.default_rng(mri_seq))
        look = {"phase": None}
    label = _TISSUE_LABEL[tissue]
    if source is not None:
        keep = np.zeros(len(LABELS), dtype=bool)
        keep[SOURCE_CLASSES[source]] = True
        label = np.where(keep[label], label, 0).astype(np.uint8)
    return PhantomCase(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=np.ascontiguousarray(label, dtype=np.uint8),
        spacing=spacing,  # type: ignore[arg-type]
        case_id=case_id(index),
        source=source,
        tissue=tissue,
        acquisition={**look, **acquisition},
    )


def case_id(index: int) -> str:
    """The id of case ``index``: ``case_000``, ``case_001``, ..."""
    return f"case_{index:03d}"
