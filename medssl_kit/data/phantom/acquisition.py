"""The scan of one case: field of view and patient pose, reconstruction kernel and noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medssl_kit.data.phantom.anatomy import _Anatomy
from medssl_kit.data.phantom.geometry import _rotation

# Nominal field of view (z, y, x) in mm: the z coverage is jittered per case; in plane each case
# draws its own display field of view (DFOV_RANGE_MM), 360 mm being its typical value.
DEFAULT_FOV_MM: tuple[float, float, float] = (240.0, 360.0, 360.0)


# Acquisition geometry: display field of view (reconstruction diameter, mm) drawn per case and
# widened where it would cut the skin; top of the scan above the right diaphragmatic dome (mm);
# in-plane patient rotation (degrees) and table offset (mm).
DFOV_RANGE_MM: tuple[float, float] = (300.0, 460.0)
SCAN_TOP_ABOVE_DOME_MM: tuple[float, float] = (10.0, 70.0)
ROTATION_RANGE_DEG = 9.0
TABLE_OFFSET_MM = 20.0


def _acquisition(
    anat: _Anatomy, shape, spacing, rng: np.random.Generator
) -> tuple[tuple[float, float, float], np.ndarray, np.ndarray, dict]:
    """Scan geometry of one case: voxel spacing, patient rotation and shift (see _Renderer).

    Every draw is made whatever ``spacing`` is, so a given spacing changes nothing else.
    """
    z_factor = rng.uniform(0.85, 1.15)
    dfov = rng.uniform(*DFOV_RANGE_MM)
    top_above_dome = rng.uniform(*SCAN_TOP_ABOVE_DOME_MM)
    angle = rng.uniform(-ROTATION_RANGE_DEG, ROTATION_RANGE_DEG)
    tilt = rng.uniform(-0.05, 0.05, size=2)  # about 3 degrees about the x and y axes
    offset = rng.uniform(-TABLE_OFFSET_MM, TABLE_OFFSET_MM, size=2)
    rot = _rotation(tilt[0], tilt[1], np.deg2rad(angle))
    extent = DEFAULT_FOV_MM[0] * z_factor if spacing is None else shape[0] * spacing[0]
    top = anat.hr + top_above_dome  # patient-frame height of the top of the scan
    shift = -rot @ np.array([offset[0], offset[1], 0.0])
    shift[2] = top - rot[2, 2] * extent / 2
    # The technologist never cuts the skin: widen the field of view where it would.
    skin = (anat.skin(np.linspace(top - extent, top, 9)) - shift) @ rot  # scanner mm
    needed = 2 * (np.abs(skin[:, :2]).max() + 3 * anat.disp_sigma + 5)
    # The couch under the patient (posterior is -y): the back rests on it, its fat flattened.
    table_y = float(np.median(skin[:, 1].reshape(9, -1).min(axis=1)) + rng.uniform(0, 6))
    dfov = max(dfov, float(needed))
    if spacing is None:
        spacing = (extent / shape[0], dfov / shape[1], dfov / shape[2])
    else:
        dfov = float(min(shape[1] * spacing[1], shape[2] * spacing[2]))
    info = {
        "dfov_mm": float(dfov),
        "scan_top_above_dome_mm": float(top_above_dome),
        "rotation_deg": float(angle),
        "table_offset_mm": (float(offset[0]), float(offset[1])),
        "table_y_mm": table_y,
    }
    return tuple(float(v) for v in spacing), rot, shift, info  # type: ignore[return-value]


def _blur(image: np.ndarray, spacing, psf_mm: float, edge: float = 0.0) -> np.ndarray:
    """Partial-volume blur: slice profile along z plus an in-plane PSF of ``psf_mm`` sigma; with
    ``edge`` > 0 the in-plane edge enhancement (overshoot) of a sharp reconstruction kernel."""
    sigma_mm = (
        0.45 * spacing[0],
        np.hypot(0.35 * spacing[1], psf_mm),
        np.hypot(0.35 * spacing[2], psf_mm),
    )
    out = ndimage.gaussian_filter(
        image, [s / sp for s, sp in zip(sigma_mm, spacing, strict=True)], mode="nearest"
    )
    if edge > 0:
        halo = [0.0, max(1.5 / spacing[1], 0.7), max(1.5 / spacing[2], 0.7)]
        out += np.float32(edge) * (out - ndimage.gaussian_filter(out, halo, mode="nearest"))
    return out


def _correlated_noise(shape, spacing, rng: np.random.Generator, corr_mm: float = 1.5) -> np.ndarray:
    """Unit-variance Gaussian noise correlated over ``corr_mm`` in-plane and ~1 mm along z."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma = [1.0 / spacing[0], corr_mm / spacing[1], corr_mm / spacing[2]]
    noise = ndimage.gaussian_filter(white, sigma, mode="wrap")
    return noise / np.float32(noise.std())
