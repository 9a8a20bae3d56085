"""Procedural abdominal CT / MRI phantom: the workbench's embedded default dataset (DESIGN §2.1).

Every case is an abdominal scan from just above the diaphragm to the lower abdomen, drawn from its
own random anatomy: body outline with subcutaneous fat and an abdominal wall, paraspinal / psoas
muscles, ribs, lungs and heart above the diaphragm, liver (with vessels and 0-3 small lesions),
gallbladder, spleen, stomach, pancreas, kidneys (cortex, medulla, sinus fat, renal pelvis), aorta
and inferior vena cava with their renal branches, vertebrae with discs and posterior elements, small
bowel and colon, and the scanner couch under the patient.

Conventions (shared by the whole project):

* Arrays are shaped ``(D, H, W) = (z, y, x)``; spacings are ``(z, y, x)`` in millimetres.
* The array axes point to the patient's **left → right** (x index grows toward the patient's
  right), **posterior → anterior** (y) and **inferior → superior** (z: the last slices are the top
  of the scan, near the lungs). Written to NIfTI as ``(x, y, z)`` with the affine
  ``diag(sx, sy, sz, 1)`` this is RAS+, so MONAI's ``Orientation("RAS")`` leaves it unchanged.
  To display a slice in the radiological convention (anterior up, patient's right on the screen's
  left) show ``image[k, ::-1, ::-1]``.
* Anatomy is defined in millimetres in the patient frame; the acquisition geometry below places
  the patient in the scanner, so any shape / spacing samples the same patient.
* CT images are integer-valued Hounsfield units in ``float32`` arrays, clipped to [-1024, 3071] and
  written as ``int16`` NIfTI (exactly representable, so reading back gives the same values). MRI
  images are non-negative ``float32`` arbitrary units (T1-like contrast, smooth multiplicative bias
  field, Rician noise) written as ``float32``. Labels are ``uint8`` (:data:`LABELS`).
* Each case draws from its own generators seeded from ``(seed, case index)``: anatomy, acquisition
  geometry and appearance have separate streams, so the CT and the MRI of a case show the same
  anatomy in the same position, and results do not depend on the number of worker processes.
  What was drawn for a case's scan is returned in ``PhantomCase.acquisition``.

Variability between cases (version 2 makes it large enough that one labelled case does not cover
the distribution, while the unlabelled pool does; typical values from the radiology literature):

* **Patient.** Body and organ sizes (+-15 %), positions, elastic deformation (as in version 1).
  Habitus: subcutaneous fat from cachectic to obese, Beta(1.6, 2)-distributed, anterior 4-76 mm,
  lateral 4-56 mm, posterior 3-33 mm (pressed flat where the back rests on the couch), body
  width about 250-400 mm. Pose: in-plane rotation uniform in +-9 degrees plus ~3 degrees of tilt,
  table offset of the body centre from the isocentre uniform in +-20 mm in x and y.
* **Acquisition geometry.** Display field of view (reconstruction diameter) uniform in 300-460 mm,
  widened when it would cut the skin (about half of the cases, by 5-115 mm: large or off-centre
  patients), so the effective field of view is ~350-470 mm and, for a 128-pixel matrix, in-plane
  spacing is ~2.75-3.65 mm (default phantom, seed 0: 354-466 mm). z coverage: nominal
  240 mm times a factor in [0.85, 1.15] (the slice spacing jitter of version 1), with the top of
  the scan 10-70 mm above the right diaphragmatic dome (40 +- 30 mm), so organs appear at
  different slice indices. A given ``spacing`` is used exactly; then only the field of view
  follows from it and the z range still starts 10-70 mm above the dome.
* **Contrast phase** (CT), a categorical draw: non-contrast 0.25, late arterial (~35-40 s) 0.25,
  portal venous (~70 s) 0.35, delayed / nephrographic (~3 min) 0.15. Mean HU per phase
  (non-contrast / late arterial / portal venous / delayed):

  ==================  =====  =====  =====  =====
  tissue              NC     LA     PV     DL
  ==================  =====  =====  =====  =====
  liver               58     80     105    88
  spleen              48     95     115    85
  pancreas            42     110    95     80
  kidney cortex       32     190    165    135
  kidney medulla      32     85     150    135
  renal pelvis        8      8      10     350
  aorta, arteries     42     300    160    110
  IVC                 42     90     150    110
  portal/renal veins  42     140    165    110
  liver vessels       40     100    160    105
  heart blood         42     250    150    110
  myocardium          45     110    100    90
  lung vessels        40     200    150    110
  bowel/stomach wall  40     85     95     80
  muscle              50     55     60     58
  ==================  =====  =====  =====  =====

  The enhancement above non-contrast is scaled by a per-patient gain in [0.85, 1.15] (dose per
  kg, cardiac output), then each tissue gets its own jitter of +-5-10 HU (+-15-40 HU for the
  arterial aorta, heart and kidney cortex, whose peak depends on bolus timing; +-250 HU for the
  excreted contrast in the renal pelvis). The spleen is drawn relative to the liver (offset
  -10 / +15 / +10 / -3 HU, +-5 HU), so liver and spleen stay within ~20 HU of each other in every
  phase and shape and position must tell them apart; in the late arterial phase the spleen is
  heterogeneous (arciform pattern, +-15-30 HU). Liver lesions keep 15-40 HU from the liver of
  their case, darker (70 %) or brighter. Unenhanced tissues: vertebral cortex 850, cancellous bone
  420, posterior elements 620, ribs 550, subcutaneous fat -100, visceral fat -95, lung -850,
  gallbladder 10, air -1000, couch shells 150.
* **Oral contrast** (CT): in 40 % of cases positive oral contrast (150-350 HU) fills the stomach,
  a random share of small-bowel loops and, in half of those cases, the colon; otherwise the bowel
  holds water / chyme (10-20 HU) and gas.
* **Scanner.** Reconstruction kernel from smooth to sharp (sharpness s uniform in [0, 1]):
  in-plane PSF sigma 1.1-0.4 mm, edge enhancement (unsharp overshoot) 0-0.6, noise correlation
  length 2.0-0.9 mm (smooth kernels give blotchy, sharp kernels fine-grained noise). Noise sigma
  uniform in 8-25 HU, plus the slice profile (partial volume along z).

MRI (``modality="mri"``) shows the same patient, pose and field of view as a pre-contrast
T1-weighted series: the contrast phase and oral contrast are CT-only, and ``acquisition["phase"]``
is None.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from enum import IntEnum

import nibabel as nib
import numpy as np
from scipy import ndimage

from medssl_kit.atomic import atomic_path, atomic_write_text
from medssl_kit.config import get_profile
from medssl_kit.errors import ManifestError

LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "aorta",
    6: "vertebra",
    7: "liver_lesion",
}
SOURCE_CLASSES: dict[str, list[int]] = {"A": [1, 7], "B": [3, 4], "C": [2, 5]}

DEFAULT_SHAPE: tuple[int, int, int] = (48, 128, 128)
# Nominal field of view (z, y, x) in mm: the z coverage is jittered per case; in plane each case
# draws its own display field of view (DFOV_RANGE_MM), 360 mm being its typical value.
DEFAULT_FOV_MM: tuple[float, float, float] = (240.0, 360.0, 360.0)
SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "test")
GENERATOR_TOOL = "medssl_kit.data.phantom"
GENERATOR_VERSION = 2
CT_RANGE_HU = (-1024.0, 3071.0)


class Tissue(IntEnum):
    """Tissue classes of the phantom's internal tissue map (``PhantomCase.tissue``)."""

    AIR = 0
    SUBCUTANEOUS_FAT = 1
    MUSCLE = 2
    VISCERAL_FAT = 3
    BOWEL_WALL = 4
    BOWEL_CONTENT = 5
    BOWEL_GAS = 6
    COLON_CONTENT = 7
    LUNG = 8
    LUNG_VESSEL = 9
    HEART_WALL = 10
    HEART_BLOOD = 11
    RIB = 12
    STOMACH_WALL = 13
    STOMACH_CONTENT = 14
    PANCREAS = 15
    GALLBLADDER = 16
    LIVER = 17
    LIVER_VESSEL = 18
    LIVER_LESION = 19
    SPLEEN = 20
    KIDNEY_LEFT_CORTEX = 21
    KIDNEY_LEFT_MEDULLA = 22
    KIDNEY_RIGHT_CORTEX = 23
    KIDNEY_RIGHT_MEDULLA = 24
    AORTA = 25
    ARTERY = 26
    IVC = 27
    VEIN = 28
    VERTEBRA_CORTICAL = 29
    VERTEBRA_CANCELLOUS = 30
    VERTEBRA_POSTERIOR = 31
    DISC = 32
    SPINAL_CANAL = 33
    RENAL_PELVIS = 34
    TABLE = 35


TISSUES: dict[int, str] = {int(t): t.name.lower() for t in Tissue}

_T = Tissue
_TISSUE_LABEL = np.zeros(len(Tissue), dtype=np.uint8)
for _tissues, _label in (
    ((_T.LIVER, _T.LIVER_VESSEL), 1),
    ((_T.SPLEEN,), 2),
    ((_T.KIDNEY_LEFT_CORTEX, _T.KIDNEY_LEFT_MEDULLA), 3),
    ((_T.KIDNEY_RIGHT_CORTEX, _T.KIDNEY_RIGHT_MEDULLA), 4),
    ((_T.AORTA,), 5),
    ((_T.VERTEBRA_CORTICAL, _T.VERTEBRA_CANCELLOUS, _T.VERTEBRA_POSTERIOR), 6),
    ((_T.LIVER_LESION,), 7),
):
    _TISSUE_LABEL[list(_tissues)] = _label

# CT: (mean HU, per-case jitter half-range HU, texture amplitude HU). Phase-dependent tissues are
# overridden per case in _ct_lookup.
_CT_TABLE: dict[Tissue, tuple[float, float, float]] = {
    _T.AIR: (-1000, 0, 0),
    _T.SUBCUTANEOUS_FAT: (-100, 8, 8),
    _T.MUSCLE: (50, 5, 6),
    _T.VISCERAL_FAT: (-95, 8, 10),
    _T.BOWEL_WALL: (60, 10, 8),
    _T.BOWEL_CONTENT: (20, 10, 15),
    _T.BOWEL_GAS: (-950, 30, 40),
    _T.COLON_CONTENT: (10, 10, 45),
    _T.LUNG: (-850, 30, 30),
    _T.LUNG_VESSEL: (20, 20, 20),
    _T.HEART_WALL: (90, 10, 8),
    _T.HEART_BLOOD: (140, 20, 6),
    _T.RIB: (550, 60, 80),
    _T.STOMACH_WALL: (60, 8, 8),
    _T.STOMACH_CONTENT: (15, 8, 12),
    _T.PANCREAS: (45, 0, 12),
    _T.GALLBLADDER: (10, 6, 3),
    _T.LIVER: (60, 0, 4),
    _T.LIVER_VESSEL: (130, 0, 5),
    _T.LIVER_LESION: (60, 0, 5),
    _T.SPLEEN: (50, 0, 4),
    _T.KIDNEY_LEFT_CORTEX: (150, 0, 6),
    _T.KIDNEY_LEFT_MEDULLA: (110, 0, 6),
    _T.KIDNEY_RIGHT_CORTEX: (150, 0, 6),
    _T.KIDNEY_RIGHT_MEDULLA: (110, 0, 6),
    _T.AORTA: (180, 0, 5),
    _T.ARTERY: (180, 0, 5),
    _T.IVC: (120, 0, 6),
    _T.VEIN: (120, 0, 6),
    _T.VERTEBRA_CORTICAL: (850, 50, 40),
    _T.VERTEBRA_CANCELLOUS: (420, 40, 60),
    _T.VERTEBRA_POSTERIOR: (620, 50, 60),
    _T.DISC: (90, 10, 8),
    _T.SPINAL_CANAL: (20, 5, 4),
    _T.RENAL_PELVIS: (8, 4, 3),
    _T.TABLE: (150, 40, 10),
}

# Contrast phases of the CT cases and how often each is drawn.
CONTRAST_PHASES: tuple[str, ...] = ("non_contrast", "late_arterial", "portal_venous", "delayed")
PHASE_PROBABILITIES: tuple[float, ...] = (0.25, 0.25, 0.35, 0.15)

ORAL_CONTRAST_PROBABILITY = 0.4

# Enhancing tissues: HU in each phase (non-contrast, late arterial, portal venous, delayed) and the
# per-case jitter half-range (one value, or one per phase). The enhancement above non-contrast is
# scaled by a per-patient gain; the spleen follows the liver (_SPLEEN_MINUS_LIVER).
_PHASE_HU: dict[tuple[Tissue, ...], tuple[tuple[float, ...], float | tuple[float, ...]]] = {
    (_T.LIVER,): ((58, 80, 105, 88), 8),
    (_T.PANCREAS,): ((42, 110, 95, 80), 8),
    (_T.LIVER_VESSEL,): ((40, 100, 160, 105), 8),
    (_T.KIDNEY_LEFT_CORTEX, _T.KIDNEY_RIGHT_CORTEX): ((32, 190, 165, 135), (5, 15, 10, 10)),
    (_T.KIDNEY_LEFT_MEDULLA, _T.KIDNEY_RIGHT_MEDULLA): ((32, 85, 150, 135), (5, 10, 10, 10)),
    (_T.AORTA, _T.ARTERY): ((42, 300, 160, 110), (5, 40, 15, 10)),
    (_T.IVC,): ((42, 90, 150, 110), (5, 20, 10, 8)),
    (_T.VEIN,): ((42, 140, 165, 110), (5, 20, 10, 8)),
    (_T.HEART_BLOOD,): ((42, 250, 150, 110), (5, 40, 15, 10)),
    (_T.HEART_WALL,): ((45, 110, 100, 90), 8),
    (_T.LUNG_VESSEL,): ((40, 200, 150, 110), (5, 40, 15, 10)),
    (_T.BOWEL_WALL, _T.STOMACH_WALL): ((40, 85, 95, 80), 8),
    (_T.MUSCLE,): ((50, 55, 60, 58), 5),
    (_T.RENAL_PELVIS,): ((8, 8, 10, 350), (4, 4, 4, 250)),
}
_SPLEEN_MINUS_LIVER: tuple[float, ...] = (-10, 15, 10, -3)
_SPLEEN_JITTER = 5.0
_ENHANCEMENT_GAIN = (0.85, 1.15)

# Acquisition geometry: display field of view (reconstruction diameter, mm) drawn per case and
# widened where it would cut the skin; top of the scan above the right diaphragmatic dome (mm);
# in-plane patient rotation (degrees) and table offset (mm).
DFOV_RANGE_MM: tuple[float, float] = (300.0, 460.0)
SCAN_TOP_ABOVE_DOME_MM: tuple[float, float] = (10.0, 70.0)
ROTATION_RANGE_DEG = 9.0
TABLE_OFFSET_MM = 20.0

# MRI (T1-weighted-like, relative to fat = 1): (mean, per-case relative jitter, relative texture).
_MR_TABLE: dict[Tissue, tuple[float, float, float]] = {
    _T.AIR: (0.0, 0, 0),
    _T.SUBCUTANEOUS_FAT: (1.0, 0.05, 0.04),
    _T.MUSCLE: (0.30, 0.1, 0.06),
    _T.VISCERAL_FAT: (0.95, 0.05, 0.06),
    _T.BOWEL_WALL: (0.35, 0.1, 0.1),
    _T.BOWEL_CONTENT: (0.22, 0.2, 0.25),
    _T.BOWEL_GAS: (0.0, 0, 0),
    _T.COLON_CONTENT: (0.30, 0.2, 0.4),
    _T.LUNG: (0.03, 0.2, 0.3),
    _T.LUNG_VESSEL: (0.08, 0.2, 0.2),
    _T.HEART_WALL: (0.30, 0.1, 0.05),
    _T.HEART_BLOOD: (0.12, 0.3, 0.2),
    _T.RIB: (0.45, 0.15, 0.2),
    _T.STOMACH_WALL: (0.35, 0.1, 0.05),
    _T.STOMACH_CONTENT: (0.15, 0.3, 0.2),
    _T.PANCREAS: (0.62, 0.08, 0.08),
    _T.GALLBLADDER: (0.20, 0.3, 0.03),
    _T.LIVER: (0.55, 0.08, 0.04),
    _T.LIVER_VESSEL: (0.15, 0.2, 0.05),
    _T.LIVER_LESION: (0.55, 0.08, 0.05),
    _T.SPLEEN: (0.40, 0.08, 0.04),
    _T.KIDNEY_LEFT_CORTEX: (0.45, 0.08, 0.05),
    _T.KIDNEY_LEFT_MEDULLA: (0.30, 0.1, 0.05),
    _T.KIDNEY_RIGHT_CORTEX: (0.45, 0.08, 0.05),
    _T.KIDNEY_RIGHT_MEDULLA: (0.30, 0.1, 0.05),
    _T.AORTA: (0.08, 0.3, 0.1),
    _T.ARTERY: (0.08, 0.3, 0.1),
    _T.IVC: (0.12, 0.3, 0.1),
    _T.VEIN: (0.12, 0.3, 0.1),
    _T.VERTEBRA_CORTICAL: (0.05, 0.2, 0.2),
    _T.VERTEBRA_CANCELLOUS: (0.70, 0.1, 0.1),
    _T.VERTEBRA_POSTERIOR: (0.50, 0.1, 0.1),
    _T.DISC: (0.30, 0.15, 0.05),
    _T.SPINAL_CANAL: (0.12, 0.2, 0.05),
    _T.RENAL_PELVIS: (0.10, 0.2, 0.05),
    _T.TABLE: (0.0, 0, 0),
}


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


# --------------------------------------------------------------------------------------------
# Geometry helpers (all coordinates in mm; X toward the patient's right, Y anterior, Z superior)
# --------------------------------------------------------------------------------------------


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles in radians about the X, Y and Z axes."""
    c, s = np.cos([ax, ay, az]), np.sin([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def _local(P, centre, rot: np.ndarray | None = None):
    """Coordinates of points ``P = (X, Y, Z)`` in a frame at ``centre`` rotated by ``rot``."""
    d = [P[i] - float(centre[i]) for i in range(3)]
    if rot is None:
        return d
    r = [[float(v) for v in row] for row in rot]
    return [r[0][k] * d[0] + r[1][k] * d[1] + r[2][k] * d[2] for k in range(3)]


def _ellipsoid(P, centre, semi, rot: np.ndarray | None = None):
    """Normalised squared radius of points in an ellipsoid (< 1 inside); semi-axes in mm."""
    u = _local(P, centre, rot)
    return (u[0] / semi[0]) ** 2 + (u[1] / semi[1]) ** 2 + (u[2] / semi[2]) ** 2


def _capsule(P, a, b, radius: float):
    """Points within ``radius`` mm of the segment from ``a`` to ``b``."""
    ab = [float(b[i] - a[i]) for i in range(3)]
    d = [P[i] - float(a[i]) for i in range(3)]
    t = np.clip(
        (d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / max(sum(v * v for v in ab), 1e-6), 0, 1
    )
    return sum((d[i] - t * ab[i]) ** 2 for i in range(3)) < radius**2


def _soft_union(f1, f2, k: float):
    """Smooth minimum of two implicit functions (rounded union of two shapes)."""
    return np.minimum(f1, f2) - k * np.log1p(np.exp(-np.abs(f1 - f2) / k))


def _frac(a):
    """Fractional part (for periodic structures: ribs, vertebral levels)."""
    return a - np.floor(a)


class _Lattice:
    """A smooth random field in physical space: Gaussian bumps of width ``width`` mm on a cubic
    lattice of ``step`` mm with standard-normal weights, normalised to about unit variance.

    The lattice is fixed in millimetres (a box of +-``extent`` mm; the field fades to 0 outside),
    so it does not depend on how it is sampled; on a voxel grid it is evaluated separably.
    """

    def __init__(self, rng: np.random.Generator, step: float, width: float, extent: float = 300.0):
        n = int(2 * extent / step) + 1
        self.nodes = (-extent + step * np.arange(n)).astype(np.float32)
        self.coef = rng.standard_normal((n, n, n), dtype=np.float32)  # (z, y, x)
        self.width = width
        self.scale = float((np.sqrt(np.pi) * width / step) ** -1.5)

    def _basis(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        near = np.flatnonzero(
            (self.nodes > coords.min() - 4 * self.width)
            & (self.nodes < coords.max() + 4 * self.width)
        )
        b = np.exp(-((coords[:, None] - self.nodes[None, near]) ** 2) / (2 * self.width**2))
        return near, b.astype(np.float32)

    def on_grid(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The field on the grid of axis coordinates ``z``, ``y``, ``x`` (mm), as ``(D, H, W)``."""
        iz, bz = self._basis(z)
        iy, by = self._basis(y)
        ix, bx = self._basis(x)
        # Separable contraction; einsum without BLAS is fast here and does not depend on the
        # BLAS thread pool (threaded BLAS is slower than this on small products).
        a = np.einsum("klm,wm->klw", self.coef[np.ix_(iz, iy, ix)], bx, optimize=False)
        a = np.einsum("klw,hl->khw", a, by, optimize=False)
        out = np.einsum("khw,dk->dhw", a, bz, optimize=False)
        return out * np.float32(self.scale)


# --------------------------------------------------------------------------------------------
# Anatomy: every parameter of one patient, and the shapes as functions of mm coordinates
# --------------------------------------------------------------------------------------------


class _Anatomy:
    """Random anatomy of one case. All lengths in mm in the patient frame (origin: body centre)."""

    def __init__(self, rng: np.random.Generator):
        def u(a: float, b: float) -> float:
            return float(rng.uniform(a, b))

        # Body: the abdominal cavity is a superellipse (posterior and anterior half-axes differ);
        # muscle and subcutaneous fat are layers around it whose thickness depends on direction.
        self.cx, self.cya, self.cyp = u(104, 138), u(66, 96), u(74, 92)
        self.power, self.taper = u(2.1, 2.7), u(-0.03, 0.06)
        self.m_lat, self.m_ant, self.m_post = u(9, 15), u(6, 10), u(8, 12)
        self.m_rectus = u(3, 8)  # extra thickness of the rectus muscles beside the midline
        # Habitus: subcutaneous fat from cachectic (anterior ~4 mm) to obese (~75 mm); the
        # skewed draw makes lean-to-overweight patients the most common.
        self.obesity = float(rng.beta(1.6, 2.0))
        ob = self.obesity
        self.f_lat = min(4 + 52 * ob, 205 - 1.06 * self.cx - self.m_lat)
        self.f_ant = min(4 + 72 * ob, 185 - self.cya - self.m_ant)
        self.f_post = min(3 + 30 * ob, 160 - self.cyp - self.m_post)
        self.disp_sigma = u(2.5, 5.0)
        # Diaphragm domes (Z of the top of the right and left domes).
        self.hr = u(72, 92)
        self.hl = self.hr - u(10, 25)
        # Spine.
        self.vb_a = u(19, 24)
        self.vb_b = 0.78 * self.vb_a
        self.yv = -self.cyp + u(50, 58)
        self.level = u(30, 36)
        self.level0 = u(0, self.level)
        # Vessels.
        self.ao_r = u(9, 12.5)
        self.ao_x = -u(6, 14)
        self.ao_y = self.yv + self.vb_b + self.ao_r + u(1, 5)
        self.ivc_x, self.ivc_y = u(16, 26), self.yv + self.vb_b + u(7, 14)
        self.ivc_semi = (u(11, 15), u(7, 10))
        # Liver: right lobe and left lobe ellipsoids joined smoothly, sheared so that the tip of
        # the right lobe is lateral; the dome follows the diaphragm.
        s = u(0.85, 1.15)
        self.liver_r = dict(
            centre=(0.42 * self.cx + u(-6, 6), u(-10, 5), self.hr - 62 + u(-6, 6)),
            semi=(0.3 * (self.cx + 121) * s, 0.22 * (self.cya + self.cyp + 164) * s, 88 * s),
            shear=u(0.15, 0.35),
        )
        self.liver_l = dict(
            centre=(-0.05 * self.cx + u(-8, 8), 0.45 * self.cya, self.hl - 22 + u(-6, 6)),
            semi=(0.38 * self.cx * s * u(0.7, 1.2), 0.4 * self.cya * s, 36 * s),
        )
        # Gallbladder under the liver.
        self.gb = dict(
            centre=(0.22 * self.cx + u(-5, 5), 0.35 * self.cya, self.hr - 112 + u(-8, 8)),
            semi=(16 * u(0.6, 1.1), 16 * u(0.6, 1.1), 32 * u(0.6, 1.2)),
            rot=_rotation(u(-0.4, -0.1), u(0.1, 0.4), 0.0),
        )
        # Spleen: a crescent against the left posterolateral wall.
        ss = u(0.85, 1.15)
        sp_c = np.array([-(self.cx - 27 * ss), -0.3 * self.cyp + u(-6, 6), self.hl - 40 + u(-6, 6)])
        sp_rot = _rotation(0.0, u(-0.1, 0.1), u(-0.8, -0.5))
        self.spleen = dict(centre=sp_c, semi=(25 * ss, 55 * ss, 48 * ss), rot=sp_rot)
        self.spleen_cut = dict(
            centre=sp_c + sp_rot @ np.array([42 * ss, 0.0, 0.0]),
            semi=(24 * ss, 45 * ss, 60 * ss),
            rot=sp_rot,
        )
        # Stomach: upper left, anterior to the spleen, with an air-fluid level.
        st = u(0.7, 1.2)
        self.stomach = dict(
            centre=(-0.38 * self.cx, 0.2 * self.cya, self.hl - 42 + u(-6, 6)),
            semi=(40 * st, 34 * st, 50 * st),
            rot=_rotation(u(-0.2, 0.2), u(-0.3, 0.1), u(-0.3, 0.3)),
            gas_level=u(-0.2, 0.7),
        )
        # Kidneys (left slightly higher than right).
        self.kidneys = []
        zk_left = self.hl - 88 + u(-8, 8)
        size = u(0.85, 1.15)
        for side, zk in ((-1, zk_left), (1, zk_left - u(10, 22))):
            sk = size * u(0.95, 1.05)
            semi = (30 * sk, 21 * sk, 54 * sk)
            centre = np.array([side * (0.38 * self.cx + 18 + u(-5, 5)), self.yv - 2 + u(-5, 5), zk])
            # Frame in which medial is +u (mirrored for the right kidney): hilum turned
            # anteromedially, upper pole tilted medially and posteriorly.
            rot = _rotation(u(0.05, 0.2), -u(0.1, 0.3), u(0.4, 0.7))
            hilum = centre + np.diag([-side, 1, 1]) @ rot @ np.array([0.9 * semi[0], 0, 0])
            self.kidneys.append(dict(side=side, centre=centre, semi=semi, rot=rot, hilum=hilum))
        self.psoas_top, self.psoas_r = zk_left + 40, u(16, 24)
        # Pancreas: head right of the midline, body across the aorta, tail to the splenic hilum.
        zp = zk_left + 38 + u(-6, 6)
        self.pancreas = [
            ((0.2 * self.cx, self.yv + 48, zp - 12), (0.0, self.yv + 58, zp), 15 * u(0.8, 1.2)),
            ((0.0, self.yv + 58, zp), (-0.35 * self.cx, self.yv + 45, zp + 8), 11 * u(0.8, 1.2)),
            (
                (-0.35 * self.cx, self.yv + 45, zp + 8),
                (-0.6 * self.cx, self.yv + 25, zp + 18),
                9 * u(0.8, 1.2),
            ),
        ]
        # Colon: ascending, transverse, descending.
        zb = min(self.hr - 118, self.hl - 80)
        cr = u(15, 22)
        pts = [
            (0.68 * self.cx, -0.1 * self.cyp, -260),
            (0.7 * self.cx, -0.05 * self.cyp, zb),
            (0.4 * self.cx, 0.6 * self.cya, zb + 5),
            (-0.3 * self.cx, 0.6 * self.cya, zb + 10),
            (-0.7 * self.cx, -0.1 * self.cyp, self.hl - 75),
            (-0.72 * self.cx, -0.15 * self.cyp, -260),
        ]
        self.colon = [(pts[i], pts[i + 1], cr) for i in range(len(pts) - 1)]
        self.bowel_top = zb + 12
        # Portal and hepatic veins (inside the liver they are liver vessels).
        hilum = (0.22 * self.cx, self.yv + 45, self.hr - 95)
        ivc_top = (self.ivc_x, self.ivc_y, self.hr - 22)
        self.liver_veins = [
            ((0.05 * self.cx, self.yv + 48, zp), hilum, 6.5),
            (hilum, (0.62 * self.cx, 0.0, self.hr - 80), 5.5),
            (hilum, (-0.15 * self.cx, 0.45 * self.cya, self.hr - 70), 5.0),
            (ivc_top, (0.75 * self.cx, -0.1 * self.cyp, self.hr - 40), 4.5),
            (ivc_top, (0.3 * self.cx, 0.55 * self.cya, self.hr - 45), 4.5),
            (ivc_top, (-0.15 * self.cx, 0.5 * self.cya, self.hr - 35), 4.0),
        ]
        # Renal arteries and veins (the left renal vein passes in front of the aorta).
        self.renal = []
        for k in self.kidneys:
            h, z = k["hilum"], float(k["hilum"][2]) + 4
            self.renal.append((_T.ARTERY, (self.ao_x, self.ao_y, z + 4), tuple(h), 3.0))
            if k["side"] < 0:
                front = (self.ao_x, self.ao_y + self.ao_r + 5, z)
                self.renal.append((_T.VEIN, tuple(h), front, 4.5))
                self.renal.append((_T.VEIN, front, (self.ivc_x, self.ivc_y, z), 4.5))
            else:
                self.renal.append((_T.VEIN, tuple(h), (self.ivc_x, self.ivc_y, z), 4.5))
        # Heart above the left dome.
        self.heart = dict(
            centre=(-0.15 * self.cx, 0.35 * self.cya, self.hl + 48),
            semi=(70 * u(0.9, 1.1), 52, 58),
            rot=_rotation(0.0, 0.0, u(0.4, 0.7)),
        )
        # Ribs: slope down anteriorly; the costal margin is high in front, low behind.
        self.rib_pitch, self.rib_phase, self.rib_slope = u(26, 32), u(0, 30), u(110, 150)
        self.costal_post, self.costal_ant = self.hr - 130 + u(-10, 10), self.hr - 45 + u(-10, 10)
        # Random fields: elastic displacement (coarse) and two fine fields for texture, bowel
        # loops and small vessels.
        self.disp = [_Lattice(rng, 45.0, 40.0) for _ in range(3)]
        self.fine_a = _Lattice(rng, 10.0, 8.0)
        self.fine_b = _Lattice(rng, 10.0, 8.0)
        self.lesions = self._place_lesions(rng)

    def skin(self, z_levels: np.ndarray, n_angles: int = 180) -> np.ndarray:
        """Patient-frame points ``(N, 3)`` (mm) on the skin at the heights ``z_levels``."""
        theta = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)[None, :]
        c, s = np.cos(theta), np.sin(theta)
        z = np.asarray(z_levels, dtype=float)[:, None] + 0 * theta
        scale = 1 + self.taper * z / 120
        ay = np.where(s > 0, self.cya, self.cyp) * scale
        p = self.power
        wall = (np.abs(c) / (self.cx * scale)) ** p + (np.abs(s) / ay) ** p
        radius = wall ** (-1 / p)
        muscle, fat = self.wall_thickness((radius * c, radius * s, z))
        radius = radius + muscle + fat
        return np.stack([(radius * c).ravel(), (radius * s).ravel(), z.ravel()], axis=1)

    # ---- shapes: each takes P = (X, Y, Z) arrays of any shape in the patient frame ------------

    def cavity_depth(self, P):
        """Signed radial distance (mm) to the abdominal cavity wall: < 0 inside, > 0 outside."""
        px, py, pz = P
        scale = 1 + self.taper * pz / 120
        ay = np.where(py > 0, self.cya, self.cyp) * scale
        rho = (np.abs(px / (self.cx * scale)) ** self.power + np.abs(py / ay) ** self.power) ** (
            1 / self.power
        )
        r = np.sqrt(px**2 + py**2)
        return r * (1 - 1 / np.maximum(rho, 1e-3))

    def wall_thickness(self, P):
        """Muscle and subcutaneous fat thickness (mm) in the direction of each point."""
        px, py, _ = P
        r2 = px**2 + py**2 + 1e-3
        c2, s2 = px**2 / r2, py**2 / r2
        front = py > 0
        rectus = self.m_rectus * np.exp(-(((np.abs(px) - 0.17 * self.cx) / (0.1 * self.cx)) ** 2))
        muscle = self.m_lat * c2 + np.where(front, self.m_ant + rectus, self.m_post) * s2
        fat = self.f_lat * c2 + np.where(front, self.f_ant, self.f_post) * s2
        return muscle, fat

    def diaphragm(self, P):
        """Height Z (mm) of the diaphragm above each (X, Y)."""
        px, py, _ = P
        right = self.hr - ((px - 0.4 * self.cx) ** 2 + (py - 5) ** 2) / 260
        left = self.hl - ((px + 0.4 * self.cx) ** 2 + py**2) / 260
        return np.maximum(right, left)

    def liver(self, P):
        px, py, pz = P
        c, a = self.liver_r["centre"], self.liver_r["semi"]
        xs = px - self.liver_r["shear"] * (c[2] - pz)
        f1 = ((xs - c[0]) / a[0]) ** 2 + ((py - c[1]) / a[1]) ** 2 + ((pz - c[2]) / a[2]) ** 2
        f2 = _ellipsoid(P, self.liver_l["centre"], self.liver_l["semi"])
        return (_soft_union(f1, f2, 0.25) < 1) & (pz < self.diaphragm(P) - 4)

    def gallbladder(self, P):
        return _ellipsoid(P, **self.gb) < 1

    def spleen_shape(self, P):
        return (_ellipsoid(P, **self.spleen) < 1) & (_ellipsoid(P, **self.spleen_cut) > 1)

    def kidney_local(self, P, k):
        px, py, pz = P
        m = -k["side"]  # mirror so that +u points medially for both kidneys
        d = [
            (px - float(k["centre"][0])) * m,
            py - float(k["centre"][1]),
            pz - float(k["centre"][2]),
        ]
        return _local(d, (0, 0, 0), k["rot"])

    def kidney_outer(self, P, k):
        u = self.kidney_local(P, k)
        a = k["semi"]
        return (u[0] / a[0]) ** 2 + (u[1] / a[1]) ** 2 + (u[2] / a[2]) ** 2

    def ivc(self, P):
        px, py, pz = P
        a, b = self.ivc_semi
        return (((px - self.ivc_x) / a) ** 2 + ((py - self.ivc_y) / b) ** 2 < 1) & (
            pz < self.hr - 12
        )

    def aorta(self, P):
        px, py, pz = P
        top = np.clip((pz - 40) / 80, 0, 1)
        xc = self.ao_x - 6 * top
        yc = self.ao_y - 12 * top
        r = self.ao_r * (1 + 0.08 * pz / 120)
        return (px - xc) ** 2 + (py - yc) ** 2 < r**2

    def vertebral_body(self, P):
        px, py, _ = P
        return (px / self.vb_a) ** 2 + ((py - self.yv) / self.vb_b) ** 2

    # ---- lesions ----------------------------------------------------------------------------

    def _liver_interior(self, P):
        """Points of the liver that stay liver after the organs painted over it."""
        ok = self.liver(P) & ~self.gallbladder(P) & ~self.spleen_shape(P) & ~self.ivc(P)
        ok &= ~self.aorta(P) & (self.cavity_depth(P) < -3)
        for p0, p1, r in self.pancreas:
            ok &= ~_capsule(P, p0, p1, r)
        # Spine, paraspinal muscles and psoas.
        ok &= (np.abs(P[0]) > 65) | (P[1] > self.yv + self.vb_b + 3)
        for k in self.kidneys:
            ok &= self.kidney_outer(P, k) > 1.2
        return ok

    def _place_lesions(self, rng: np.random.Generator) -> list[dict]:
        n = int(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15]))
        c, a = np.array(self.liver_r["centre"]), np.array(self.liver_r["semi"])
        dirs = np.array(
            [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float
        )
        dirs[13] = 0.0
        norms = np.linalg.norm(dirs, axis=1)
        dirs[norms > 0] /= norms[norms > 0, None]
        lesions: list[dict] = []
        for _ in range(n):
            diameter = float(rng.uniform(3.5, 11.0))
            semi = diameter / 2 * rng.uniform(0.88, 1.12, size=3)
            delta = float(rng.uniform(15, 40)) * (-1.0 if rng.uniform() < 0.7 else 1.0)
            centres = c + rng.uniform(-0.8, 0.8, size=(200, 3)) * a
            pts = centres[:, None, :] + (semi.max() + 5.0) * dirs[None, :, :]
            inside = self._liver_interior((pts[..., 0], pts[..., 1], pts[..., 2])).all(axis=1)
            for i in np.flatnonzero(inside):
                far = all(
                    np.linalg.norm(centres[i] - les["centre"]) > les["semi"].max() + semi.max() + 5
                    for les in lesions
                )
                if far:
                    lesions.append(dict(centre=centres[i], semi=semi, delta=delta))
                    break
        return lesions


# --------------------------------------------------------------------------------------------
# Rendering the anatomy on a voxel grid
# --------------------------------------------------------------------------------------------


class _Renderer:
    """Paints the tissue map of an anatomy on a scanner grid (scanner mm coordinates per axis).

    ``rot`` and ``shift`` place the patient in the scanner: the patient-frame position of a voxel
    at scanner coordinates ``s`` (mm, origin at the centre of the reconstructed volume) is
    ``rot @ s + shift`` (plus the anatomy's elastic displacement).
    """

    def __init__(
        self,
        anat: _Anatomy,
        shape: tuple[int, int, int],
        spacing: tuple[float, ...],
        rot: np.ndarray,
        shift: np.ndarray,
        table_y: float | None = None,
    ):
        self.anat, self.shape, self.spacing = anat, shape, spacing
        self.rot, self.shift, self.table_y = rot, shift, table_y
        # Scanner coordinates of voxel centres, mm, (z, y, x); origin at the centre of the FOV.
        self.axes = [
            ((np.arange(n) + 0.5 - n / 2) * s).astype(np.float32)
            for n, s in zip(shape, spacing, strict=True)
        ]
        z, y, x = self.axes
        d = [f.on_grid(z, y, x) * np.float32(anat.disp_sigma) for f in anat.disp]
        self.dmax = float(max(np.abs(v).max() for v in d)) + 2.0
        r = [[float(v) for v in row] for row in rot]
        zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
        # Patient-frame coordinates of every voxel: rotation + shift + elastic displacement.
        self.P = tuple(
            r[i][0] * xx + r[i][1] * yy + r[i][2] * zz + np.float32(shift[i]) + d[i]
            for i in range(3)
        )
        self.fa = anat.fine_a.on_grid(z, y, x)
        self.fb = anat.fine_b.on_grid(z, y, x)
        self.tissue = np.zeros(shape, dtype=np.uint8)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel slices (z, y, x) covering the patient-frame box [lo, hi] (mm), or None if empty."""
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        )
        scan = (corners - self.shift) @ self.rot  # inverse rotation, row vectors
        slices = []
        for axis, k in zip(range(3), (2, 1, 0), strict=True):  # array axis 0 is z (patient index 2)
            n, s = self.shape[axis], self.spacing[axis]
            first = float(self.axes[axis][0])
            i0 = int(np.floor((scan[:, k].min() - self.dmax - first) / s))
            i1 = int(np.ceil((scan[:, k].max() + self.dmax - first) / s)) + 1
            i0, i1 = max(i0, 0), min(i1, n)
            if i0 >= i1:
                return None
            slices.append(slice(i0, i1))
        return tuple(slices)

    def sub(self, sl):
        return tuple(p[sl] for p in self.P)

    def paint(self, sl, mask, code: Tissue) -> None:
        self.tissue[sl][mask] = code

    def render(self) -> tuple[np.ndarray, list[tuple]]:
        a, t, P = self.anat, self.tissue, self.P
        depth = a.cavity_depth(P)
        muscle, fat = a.wall_thickness(P)
        cavity = depth < 0
        t[depth < muscle + fat] = _T.SUBCUTANEOUS_FAT
        wall = (depth >= 0) & (depth < muscle) & ~((P[1] > 0) & (np.abs(P[0]) < 3))
        t[wall] = _T.MUSCLE
        t[cavity] = _T.VISCERAL_FAT
        self._ribs(depth, muscle)
        self._thorax(cavity)
        self._bowel(cavity)
        self._organs(cavity)
        self._spine(depth, muscle)
        self._table()
        return t, self._lesions()

    def _table(self) -> None:
        """The scanner couch (fixed to the scanner, not the patient): two curved carbon-fibre
        shells 45 mm apart around a foam core (air), top surface at ``table_y`` (scanner mm)."""
        if self.table_y is None:
            return
        _, y, x = self.axes
        xx, yy = x[None, :], y[:, None]
        curve = xx**2 / 2000.0
        top = yy - (self.table_y + curve)
        bottom = yy - (self.table_y - 45 + 0.5 * curve)
        shell = ((top > -4) & (top <= 0)) | ((bottom > -4) & (bottom <= 0))
        side = (np.abs(np.abs(xx) - 215) < 2) & (top <= 0) & (bottom > 0)
        couch = (shell & (np.abs(xx) < 215)) | side
        t = self.tissue
        t[(t == _T.SUBCUTANEOUS_FAT) & (top <= 0)[None]] = _T.AIR  # fat pressed on the couch
        t[(t == _T.AIR) & couch[None]] = _T.TABLE

    def _ribs(self, depth, muscle) -> None:
        a = self.anat
        px, py, pz = self.P
        phi = np.abs(np.arctan2(px, -py)) / np.pi  # 0 behind, 1 in front
        band = (depth > 1) & (depth < np.minimum(muscle, 10.0) + 1)
        costal = pz > a.costal_post + (a.costal_ant - a.costal_post) * phi**1.5
        level = _frac((pz + a.rib_slope * phi - a.rib_phase) / a.rib_pitch) < 10 / a.rib_pitch
        ribs = band & costal & level & (phi > 0.12) & (np.abs(px) > 15)
        self.tissue[ribs] = _T.RIB

    def _thorax(self, cavity) -> None:
        a = self.anat
        sl = self.box((-200, -200, min(a.hr, a.hl) - 75), (200, 200, 400))
        if sl is None:
            return
        P = self.sub(sl)
        px, py, pz = P
        cav = cavity[sl]
        zd = a.diaphragm(P)
        above = cav & (pz > zd)
        # Diaphragm: a 4 mm muscle dome.
        self.paint(sl, cav & (pz > zd - 4) & ~above, _T.MUSCLE)
        heart_f = _ellipsoid(P, **a.heart)
        heart = above & (heart_f < 1) & (pz > zd + 6)
        mediastinum = (np.abs(px - 0.5 * a.ao_x) < 28) & (py > a.yv - 28)
        lung = above & (heart_f > 1.3) & ~mediastinum & (a.vertebral_body(P) > 2.5)
        self.paint(sl, lung, _T.LUNG)
        vessel = (np.abs(self.fa[sl]) < 0.15) & (np.abs(self.fb[sl]) < 0.15)
        self.paint(sl, lung & vessel, _T.LUNG_VESSEL)
        self.paint(sl, heart, _T.HEART_WALL)
        self.paint(sl, heart & (heart_f < 0.65), _T.HEART_BLOOD)

    def _bowel(self, cavity) -> None:
        a = self.anat
        sl = self.box((-200, a.yv, -400), (200, 200, a.bowel_top + 10))
        if sl is not None:
            P = self.sub(sl)
            fa, fb = self.fa[sl], self.fb[sl]
            terr = cavity[sl] & (P[2] < a.bowel_top + 8 * fa) & (P[1] > a.yv + 10 + 8 * fb)
            wall = terr & (fa > -0.25)
            self.paint(sl, wall, _T.BOWEL_WALL)
            self.paint(sl, terr & (fa > 0.05), _T.BOWEL_CONTENT)
            self.paint(sl, terr & (fa > 0.3) & (fb > 1.2), _T.BOWEL_GAS)
        for p0, p1, r in a.colon:
            sl = self._capsule_box(p0, p1, r)
            if sl is None:
                continue
            P = self.sub(sl)
            inner = _capsule(P, p0, p1, r - 3) & cavity[sl]
            self.paint(sl, _capsule(P, p0, p1, r) & cavity[sl], _T.BOWEL_WALL)
            self.paint(sl, inner, _T.COLON_CONTENT)
            self.paint(sl, inner & (self.fb[sl] > 0.3), _T.BOWEL_GAS)

    def _capsule_box(self, p0, p1, r):
        lo = np.minimum(p0, p1) - r
        hi = np.maximum(p0, p1) + r
        return self.box(lo, hi)

    def _ellipsoid_box(self, centre, semi):
        m = max(semi)
        return self.box(np.asarray(centre) - m, np.asarray(centre) + m)

    def _organs(self, cavity) -> None:
        a = self.anat
        # Stomach with wall, content and an air-fluid level (gas anterior: the patient is supine).
        st = a.stomach
        sl = self._ellipsoid_box(st["centre"], st["semi"])
        if sl is not None:
            P = self.sub(sl)
            below = cavity[sl] & (P[2] < a.diaphragm(P) - 4)
            f = _ellipsoid(P, st["centre"], st["semi"], st["rot"])
            inner = f < (1 - 5 / min(st["semi"])) ** 2
            self.paint(sl, below & (f < 1), _T.STOMACH_WALL)
            self.paint(sl, below & inner, _T.STOMACH_CONTENT)
            gas = P[1] > st["centre"][1] + st["gas_level"] * st["semi"][1]
            self.paint(sl, below & inner & gas, _T.BOWEL_GAS)
        # Muscles of the posterior abdominal wall.
        sl = self.box((-120, a.yv - 90, -400), (120, a.yv + 40, a.psoas_top))
        if sl is not None:
            px, py, pz = self.sub(sl)
            r = a.psoas_r * np.clip((a.psoas_top - pz) / 110, 0, 1) ** 0.6
            xc = a.vb_a + 4 + 0.5 * r
            psoas = (np.abs(px) - xc) ** 2 + (py - a.yv - 2) ** 2 < r**2
            ql = ((np.abs(px) - 55) / 15) ** 2 + ((py - a.yv + 22) / 10) ** 2 < 1
            self.paint(sl, (psoas | ql) & cavity[sl], _T.MUSCLE)
        for kind, p0, p1, r in a.renal:
            sl = self._capsule_box(p0, p1, r)
            if sl is not None:
                self.paint(sl, _capsule(self.sub(sl), p0, p1, r) & cavity[sl], kind)
        self._liver(cavity)
        for p0, p1, r in a.pancreas:
            sl = self._capsule_box(p0, p1, r)
            if sl is not None:
                self.paint(sl, _capsule(self.sub(sl), p0, p1, r) & cavity[sl], _T.PANCREAS)
        sl = self._ellipsoid_box(a.gb["centre"], a.gb["semi"])
        if sl is not None:
            self.paint(sl, a.gallbladder(self.sub(sl)) & cavity[sl], _T.GALLBLADDER)
        sl = self._ellipsoid_box(a.spleen["centre"], a.spleen["semi"])
        if sl is not None:
            P = self.sub(sl)
            spleen = a.spleen_shape(P) & cavity[sl] & (P[2] < a.diaphragm(P) - 4)
            self.paint(sl, spleen, _T.SPLEEN)
        for k in a.kidneys:
            self._kidney(k, cavity)
        sl = self.box((a.ivc_x - 20, a.ivc_y - 20, -400), (a.ivc_x + 20, a.ivc_y + 20, a.hr))
        if sl is not None:
            self.paint(sl, a.ivc(self.sub(sl)), _T.IVC)
        sl = self.box((a.ao_x - 40, a.ao_y - 40, -400), (a.ao_x + 40, a.ao_y + 40, 400))
        if sl is not None:
            self.paint(sl, a.aorta(self.sub(sl)), _T.AORTA)

    def _liver(self, cavity) -> None:
        a = self.anat
        c, s = a.liver_r["centre"], a.liver_r["semi"]
        sl = self.box(
            (-0.5 * a.cx - 80, -a.cyp - 10, c[2] - s[2] - 10), (a.cx + 10, a.cya + 10, a.hr + 10)
        )
        if sl is None:
            return
        P = self.sub(sl)
        liver = a.liver(P) & cavity[sl]
        self.paint(sl, liver, _T.LIVER)
        vessels = (np.abs(self.fa[sl]) < 0.16) & (np.abs(self.fb[sl]) < 0.16)
        for p0, p1, r in a.liver_veins:
            vessels |= _capsule(P, p0, p1, r)
        self.paint(sl, liver & vessels, _T.LIVER_VESSEL)
        # The extrahepatic portal vein.
        p0, p1, r = a.liver_veins[0]
        self.paint(sl, ~liver & cavity[sl] & _capsule(P, p0, p1, r), _T.VEIN)

    def _kidney(self, k: dict, cavity) -> None:
        sl = self._ellipsoid_box(k["centre"], k["semi"])
        if sl is None:
            return
        P = self.sub(sl)
        u = self.anat.kidney_local(P, k)
        a, b, c = k["semi"]
        f = (u[0] / a) ** 2 + (u[1] / b) ** 2 + (u[2] / c) ** 2
        sinus = ((u[0] - 0.45 * a) / (0.6 * a)) ** 2 + (u[1] / (0.5 * b)) ** 2 + (
            u[2] / (0.6 * c)
        ) ** 2 < 1
        parenchyma = (f < 1) & ~sinus & cavity[sl]
        left = k["side"] < 0
        cortex = _T.KIDNEY_LEFT_CORTEX if left else _T.KIDNEY_RIGHT_CORTEX
        medulla = _T.KIDNEY_LEFT_MEDULLA if left else _T.KIDNEY_RIGHT_MEDULLA
        self.paint(sl, parenchyma, cortex)
        pyramids = np.cos(7 * np.arctan2(u[2] / c, u[1] / b)) > -0.3
        self.paint(sl, parenchyma & (f < 0.6) & pyramids, medulla)
        self.paint(sl, sinus & (f < 1) & cavity[sl], _T.VISCERAL_FAT)
        # Renal pelvis (urine; bright when contrast is excreted) in the sinus, open to the hilum.
        pelvis = ((u[0] - 0.62 * a) / (0.4 * a)) ** 2 + (u[1] / (0.28 * b)) ** 2 + (
            u[2] / (0.3 * c)
        ) ** 2 < 1
        self.paint(sl, pelvis & (f < 1.15) & cavity[sl], _T.RENAL_PELVIS)

    def _spine(self, depth, muscle) -> None:
        a = self.anat
        sl = self.box((-90, a.yv - 110, -400), (90, a.yv + 30, 400))
        if sl is None:
            return
        P = self.sub(sl)
        px, py, pz = P
        inside = depth[sl] < muscle[sl]
        # Paraspinal muscles.
        para = ((np.abs(px) - 24) / 22) ** 2 + ((py - a.yv + 45) / 24) ** 2 < 1
        self.paint(sl, para & inside, _T.MUSCLE)
        phase = _frac((pz - a.level0) / a.level)
        body = a.vertebral_body(P)
        shell = (1 - 2.5 / a.vb_b) ** 2
        cy = a.yv - a.vb_b - 9  # spinal canal centre
        canal = (px / 10) ** 2 + ((py - cy) / 8.5) ** 2 < 1
        arch = ((px / 16) ** 2 + ((py - cy) / 14) ** 2 < 1) & (py < a.yv - a.vb_b + 3)
        spinous = (np.abs(px) < 3.5 + 0.03 * (cy - py)) & (py < cy) & (py > cy - 52)
        spinous &= (phase > 0.2) & (phase < 0.85)
        transverse = (np.abs(px) > 12) & (np.abs(px) < 36) & (np.abs(py - cy - 3) < 4)
        transverse &= (phase > 0.4) & (phase < 0.6)
        self.paint(sl, (arch | spinous | transverse) & inside & ~canal, _T.VERTEBRA_POSTERIOR)
        self.paint(sl, canal, _T.SPINAL_CANAL)
        endplate = (phase < 9 / a.level) | (phase > 1 - 2 / a.level)
        self.paint(sl, body < 1, _T.VERTEBRA_CORTICAL)
        self.paint(sl, (body < shell) & ~endplate, _T.VERTEBRA_CANCELLOUS)
        self.paint(sl, (body < 1) & (phase < 7 / a.level), _T.DISC)

    def _lesions(self) -> list[tuple]:
        masks = []
        for les in self.anat.lesions:
            sl = self._ellipsoid_box(les["centre"], les["semi"])
            if sl is None:
                continue
            mask = _ellipsoid(self.sub(sl), les["centre"], les["semi"]) < 1
            mask &= np.isin(self.tissue[sl], (_T.LIVER, _T.LIVER_VESSEL))
            if mask.any():
                self.paint(sl, mask, _T.LIVER_LESION)
                masks.append((sl, mask, les["delta"]))
        return masks


# --------------------------------------------------------------------------------------------
# Appearance: CT and MRI
# --------------------------------------------------------------------------------------------


def _ct_lookup(rng: np.random.Generator, phase: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-case HU of every tissue and its texture amplitude in contrast phase ``phase``.

    Unenhanced tissues take :data:`_CT_TABLE` +- its jitter. Enhancing tissues take the
    non-contrast value plus the phase's enhancement times a per-patient gain (contrast dose per kg,
    cardiac output), plus their own jitter; the spleen follows the liver at the phase's offset.
    """
    mean = np.zeros(len(Tissue), np.float32)
    tex = np.zeros(len(Tissue), np.float32)
    for tissue, (m, jitter, amp) in _CT_TABLE.items():
        mean[tissue] = m + rng.uniform(-jitter, jitter)
        tex[tissue] = amp
    gain = rng.uniform(*_ENHANCEMENT_GAIN)
    for tissues, (values, jitters) in _PHASE_HU.items():
        jitter = jitters if np.isscalar(jitters) else jitters[phase]
        value = values[0] + gain * (values[phase] - values[0]) + rng.uniform(-jitter, jitter)
        mean[list(tissues)] = value
    liver = mean[_T.LIVER]
    mean[_T.LIVER_LESION] = liver
    offset, jitter = _SPLEEN_MINUS_LIVER[phase], _SPLEEN_JITTER
    mean[_T.SPLEEN] = liver + gain * offset + rng.uniform(-jitter, jitter)
    return mean, tex


def _mr_lookup(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-case relative T1 signal of every tissue and its relative texture amplitude."""
    mean = np.zeros(len(Tissue), np.float32)
    tex = np.zeros(len(Tissue), np.float32)
    for tissue, (m, jitter, amp) in _MR_TABLE.items():
        mean[tissue] = m * (1 + rng.uniform(-jitter, jitter))
        tex[tissue] = amp * m
    mean[_T.LIVER_LESION] = mean[_T.LIVER]
    for left, right in (
        (_T.KIDNEY_LEFT_CORTEX, _T.KIDNEY_RIGHT_CORTEX),
        (_T.KIDNEY_LEFT_MEDULLA, _T.KIDNEY_RIGHT_MEDULLA),
    ):
        mean[right] = mean[left]
    return mean, tex


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


def _appearance_ct(r: _Renderer, lesions, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """CT image in HU (contrast phase, tissue values + texture, lesion contrast, kernel blur and
    edge enhancement, correlated noise) and the acquisition parameters drawn for it."""
    phase = int(rng.choice(len(CONTRAST_PHASES), p=PHASE_PROBABILITIES))
    mean, tex = _ct_lookup(rng, phase)
    tissue = r.tissue
    image = mean[tissue] + tex[tissue] * r.fb
    if CONTRAST_PHASES[phase] == "late_arterial":
        # Arciform (moire) enhancement of the spleen: red and white pulp enhance unevenly.
        spleen = tissue == _T.SPLEEN
        image[spleen] += np.float32(rng.uniform(15, 30)) * np.sin(3.0 * r.fa[spleen])
    oral = rng.uniform() < ORAL_CONTRAST_PROBABILITY
    if oral:
        # Positive oral contrast: opacified small-bowel loops (patchy: not every loop is reached),
        # stomach, and the colon in about half of the cases.
        hu = rng.uniform(150, 350)
        reach = rng.uniform(-0.8, 0.4)
        lumen = (tissue == _T.BOWEL_CONTENT) & (r.fb > reach)
        lumen |= tissue == _T.STOMACH_CONTENT
        if rng.uniform() < 0.5:
            lumen |= tissue == _T.COLON_CONTENT
        image[lumen] = np.float32(hu) + np.float32(20) * r.fb[lumen]
    for sl, mask, delta in lesions:
        image[sl][mask] += np.float32(delta)
    sharpness = rng.uniform(0, 1)  # reconstruction kernel: 0 smooth ... 1 sharp
    psf = 1.1 - 0.7 * sharpness
    image = _blur(image, r.spacing, psf, edge=0.6 * sharpness**2)
    sigma = rng.uniform(8, 25)
    corr = 2.0 - 1.1 * sharpness
    image += np.float32(sigma) * _correlated_noise(tissue.shape, r.spacing, rng, corr)
    info = {
        "phase": CONTRAST_PHASES[phase],
        "oral_contrast": bool(oral),
        "kernel_sharpness": float(sharpness),
        "psf_mm": float(psf),
        "noise_hu": float(sigma),
        "noise_corr_mm": float(corr),
    }
    return np.clip(np.rint(image), *CT_RANGE_HU).astype(np.float32), info


def _appearance_mri(r: _Renderer, lesions, rng: np.random.Generator) -> np.ndarray:
    """T1-like MRI (arbitrary units >= 0): tissue signal, blur, bias field, Rician noise."""
    mean, tex = _mr_lookup(rng)
    tissue = r.tissue
    image = mean[tissue] + tex[tissue] * r.fb
    liver = mean[_T.LIVER]
    for sl, mask, delta in lesions:
        # CT contrast of 15-40 HU maps to a relative MRI contrast of 20-50 %.
        rel = np.sign(delta) * (0.2 + 0.3 * (abs(delta) - 15) / 25)
        image[sl][mask] += np.float32(rel * liver)
    image = _blur(np.maximum(image, 0), r.spacing, rng.uniform(0.4, 1.0))
    # Smooth multiplicative bias field: a random low-frequency field and a linear ramp.
    z, y, x = r.axes
    bias = _Lattice(rng, 80.0, 90.0).on_grid(z, y, x) * np.float32(rng.uniform(0.1, 0.2))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.float32(rng.uniform(0.25, 0.5) / 300)  # log-intensity change per mm
    bias += ramp * (np.cos(angle) * x[None, None, :] + np.sin(angle) * y[None, :, None])
    gain = rng.uniform(600, 1400)
    image *= np.exp(bias) * np.float32(gain)
    sigma = np.float32(rng.uniform(0.015, 0.035) * gain)
    n1 = _correlated_noise(tissue.shape, r.spacing, rng)
    n2 = _correlated_noise(tissue.shape, r.spacing, rng)
    return np.sqrt((image + sigma * n1) ** 2 + (sigma * n2) ** 2).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_shape_spacing(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, ...] | None]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes (D, H, W) of at least 4 voxels, got {shape}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive sizes (z, y, x) in mm, got {spacing}")
    return shape, spacing


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


def default_split(n_cases: int) -> dict[str, int]:
    """Case counts per split: test 20 %, val 10 %, train 20 % (each at least 1), pretrain the rest.

    Gives the ``smoke`` (8) and ``cpu`` (40) profiles' splits. Raises ValueError below 4 cases.
    """
    if n_cases < 4:
        raise ValueError(
            f"the phantom needs at least 4 cases for a pretrain/train/val/test split, got"
            f" {n_cases}; pass more cases or an explicit split"
        )
    test = max(1, round(0.2 * n_cases))
    val = max(1, round(0.1 * n_cases))
    train = max(1, round(0.2 * n_cases))
    return {"pretrain": n_cases - test - val - train, "train": train, "val": val, "test": test}


def _check_split(split: dict[str, int], n_cases: int) -> dict[str, int]:
    unknown = set(split) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {list(SPLITS)}")
    counts = {name: int(split.get(name, 0)) for name in SPLITS}
    if min(counts.values()) < 0 or sum(counts.values()) != n_cases:
        raise ValueError(
            f"split counts {counts} must be non-negative and add up to {n_cases} cases"
        )
    return counts


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


def _assign_splits(n_cases: int, counts: dict[str, int], seed: int) -> list[str]:
    """Split name of every case: the counts of ``counts`` in a seeded random order."""
    order = np.random.default_rng([seed, n_cases, 0x5EED]).permutation(n_cases)
    names = [name for name in SPLITS for _ in range(counts[name])]
    split_of = [""] * n_cases
    for position, index in enumerate(order):
        split_of[int(index)] = names[position]
    return split_of


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
