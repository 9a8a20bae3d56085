"""MRI appearance: T1-like tissue signal, blur, bias field and Rician noise."""

from __future__ import annotations

import numpy as np

from medssl_kit.data.phantom.acquisition import _blur, _correlated_noise
from medssl_kit.data.phantom.geometry import _Lattice
from medssl_kit.data.phantom.renderer import _Renderer
from medssl_kit.data.phantom.tissues import Tissue

_T = Tissue


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
