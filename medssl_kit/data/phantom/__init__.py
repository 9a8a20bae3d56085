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

The package, one module a concern: :mod:`.tissues` (tissue classes and labels), :mod:`.geometry`
(implicit shapes, smooth random fields), :mod:`.anatomy` (one patient), :mod:`.renderer` (the
tissue map on a voxel grid), :mod:`.acquisition` (field of view, pose, kernel, noise), :mod:`.ct`
and :mod:`.mri` (appearance), :mod:`.case` (:func:`generate_case`), :mod:`.splits` and
:mod:`.write` (:func:`make_phantom`, :func:`ensure_phantom`).
"""

from __future__ import annotations

from medssl_kit.data.phantom.acquisition import (
    DEFAULT_FOV_MM,
    DFOV_RANGE_MM,
    ROTATION_RANGE_DEG,
    SCAN_TOP_ABOVE_DOME_MM,
    TABLE_OFFSET_MM,
)
from medssl_kit.data.phantom.case import DEFAULT_SHAPE, PhantomCase, case_id, generate_case
from medssl_kit.data.phantom.ct import (
    CONTRAST_PHASES,
    CT_RANGE_HU,
    ORAL_CONTRAST_PROBABILITY,
    PHASE_PROBABILITIES,
    _ct_lookup,
)
from medssl_kit.data.phantom.splits import SPLITS, default_split
from medssl_kit.data.phantom.tissues import LABELS, SOURCE_CLASSES, TISSUES, Tissue
from medssl_kit.data.phantom.write import (
    GENERATOR_TOOL,
    GENERATOR_VERSION,
    ensure_phantom,
    make_phantom,
)

__all__ = [
    "CONTRAST_PHASES",
    "CT_RANGE_HU",
    "DEFAULT_FOV_MM",
    "DEFAULT_SHAPE",
    "DFOV_RANGE_MM",
    "GENERATOR_TOOL",
    "GENERATOR_VERSION",
    "LABELS",
    "ORAL_CONTRAST_PROBABILITY",
    "PHASE_PROBABILITIES",
    "ROTATION_RANGE_DEG",
    "SCAN_TOP_ABOVE_DOME_MM",
    "SOURCE_CLASSES",
    "SPLITS",
    "TABLE_OFFSET_MM",
    "TISSUES",
    "PhantomCase",
    "Tissue",
    "_ct_lookup",
    "case_id",
    "default_split",
    "ensure_phantom",
    "generate_case",
    "make_phantom",
]
