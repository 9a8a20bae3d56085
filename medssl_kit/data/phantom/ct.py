"""CT appearance: tissue HU per contrast phase, oral contrast, kernel and noise."""

from __future__ import annotations

import numpy as np

from medssl_kit.data.phantom.acquisition import _blur, _correlated_noise
from medssl_kit.data.phantom.renderer import _Renderer
from medssl_kit.data.phantom.tissues import Tissue

_T = Tissue


CT_RANGE_HU = (-1024.0, 3071.0)


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
