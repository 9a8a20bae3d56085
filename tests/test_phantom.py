"""Tests of the procedural abdominal phantom (DESIGN §2.1) and the files make_phantom writes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medssl_kit.cli import main
from medssl_kit.config import PROFILES
from medssl_kit.data.manifest import load_manifest
from medssl_kit.data.phantom import (
    CONTRAST_PHASES,
    DEFAULT_FOV_MM,
    DEFAULT_SHAPE,
    DFOV_RANGE_MM,
    LABELS,
    SCAN_TOP_ABOVE_DOME_MM,
    SOURCE_CLASSES,
    Tissue,
    _ct_lookup,
    default_split,
    generate_case,
    make_phantom,
)
from medssl_kit.data.validate import validate_manifest
from medssl_kit.errors import ManifestError

SMALL = (16, 64, 64)
IN_PLANE = np.ones((1, 3, 3), dtype=bool)


def _erode(mask: np.ndarray) -> np.ndarray:
    """In-plane erosion: drops the voxels blurred by partial volume with neighbours."""
    return ndimage.binary_erosion(mask, structure=IN_PLANE)


def _read(path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj).transpose(2, 1, 0), img.affine, img


@pytest.fixture(scope="module")
def ct_cases():
    return [generate_case(i) for i in range(8)]


@pytest.fixture(scope="module")
def phase_cases():
    """Cases 8-23 at a coarser grid: every contrast phase is drawn among them."""
    return [generate_case(i, shape=(24, 96, 96)) for i in range(8, 24)]


@pytest.fixture(scope="module")
def mri_cases():
    return [generate_case(i, modality="mri") for i in range(6)]


# --- determinism, shape, spacing ---------------------------------------------------------------


def test_same_arguments_give_identical_bytes_and_seeds_differ():
    a = generate_case(3, seed=7, shape=SMALL)
    b = generate_case(3, seed=7, shape=SMALL)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.spacing == b.spacing
    other_seed = generate_case(3, seed=8, shape=SMALL)
    other_case = generate_case(4, seed=7, shape=SMALL)
    for other in (other_seed, other_case):
        assert not np.array_equal(a.image, other.image)
        assert not np.array_equal(a.label, other.label)


def test_dtypes_shapes_and_ids():
    case = generate_case(12, shape=SMALL)
    assert case.image.dtype == np.float32 and case.image.shape == SMALL
    assert case.label.dtype == np.uint8 and case.label.shape == SMALL
    assert case.case_id == "case_012" and case.source is None
    assert set(np.unique(case.label)) <= set(LABELS)
    # CT is integer HU within the scanner range.
    assert np.array_equal(case.image, np.rint(case.image))
    assert case.image.min() >= -1024 and case.image.max() <= 3071


def test_spacing_follows_the_field_of_view_and_explicit_spacing_is_exact(ct_cases):
    d, h, w = DEFAULT_SHAPE
    z_spacings, fovs = [], []
    for case in ct_cases:
        sz, sy, sx = case.spacing
        fov = case.acquisition["dfov_mm"]
        # In-plane spacing: the case's display field of view over the matrix (square pixels).
        assert sy == pytest.approx(fov / h) and sx == pytest.approx(fov / w)
        assert DFOV_RANGE_MM[0] <= fov <= DFOV_RANGE_MM[1] + 40  # widened only to fit the body
        assert 0.85 * DEFAULT_FOV_MM[0] / d <= sz <= 1.15 * DEFAULT_FOV_MM[0] / d
        # The skin is never cut: the outer rows and columns hold no patient (air or couch only).
        body = ~np.isin(case.tissue, (Tissue.AIR, Tissue.TABLE))
        assert not body[:, [0, -1], :].any() and not body[:, :, [0, -1]].any(), case.case_id
        z_spacings.append(sz)
        fovs.append(fov)
    assert max(z_spacings) - min(z_spacings) > 0.2  # slice spacing varies between cases
    assert max(fovs) / min(fovs) > 1.15  # in-plane spacing varies between cases
    explicit = generate_case(0, shape=SMALL, spacing=(12.5, 5.0, 4.5))
    assert explicit.spacing == (12.5, 5.0, 4.5)
    for i in (0, 1):  # a given spacing is honoured exactly for every case
        assert generate_case(i, shape=SMALL, spacing=(15.0, 5.6, 5.6)).spacing == (15.0, 5.6, 5.6)


def test_given_spacing_changes_only_the_sampling():
    """The patient, pose and scan range are drawn whatever the spacing; the default grid and the
    same spacing passed explicitly give the same case."""
    default = generate_case(6, shape=SMALL)
    explicit = generate_case(6, shape=SMALL, spacing=default.spacing)
    assert np.array_equal(default.label, explicit.label)
    assert np.abs(default.image - explicit.image).max() <= 1.0


def test_scan_range_moves_organs_between_cases():
    """The top of the scan lies 10-70 mm above the diaphragm (per case), so on one fixed grid the
    organs sit at different slices from case to case."""
    spacing = (5.0, 3.0, 3.0)
    tops, liver_z, kidney_z = [], [], []
    for i in range(8):
        case = generate_case(i, shape=(48, 32, 32), spacing=spacing)
        top = case.acquisition["scan_top_above_dome_mm"]
        assert SCAN_TOP_ABOVE_DOME_MM[0] <= top <= SCAN_TOP_ABOVE_DOME_MM[1]
        tops.append(top)
        liver_z.append(np.argwhere(case.label == 1)[:, 0].mean() * spacing[0])
        kidney_z.append(np.argwhere(np.isin(case.label, (3, 4)))[:, 0].mean() * spacing[0])
    assert np.ptp(tops) > 30
    assert np.ptp(liver_z) > 20 and np.ptp(kidney_z) > 20  # mm
    # The organs move with the scan range: a higher scan top puts them lower in the volume.
    assert np.corrcoef(tops, liver_z)[0, 1] < -0.3


def test_anatomy_is_defined_in_millimetres():
    """The same case sampled on a coarse and a fine grid puts the organs at the same place."""
    coarse = generate_case(5, shape=(24, 64, 64))
    fine = generate_case(5, shape=(48, 128, 128))
    assert coarse.spacing[0] == pytest.approx(2 * fine.spacing[0])
    for label in (1, 2, 3, 4, 6):
        centres = []
        for case in (coarse, fine):
            idx = np.argwhere(case.label == label).mean(axis=0)
            shape = np.array(case.label.shape)
            centres.append((idx + 0.5 - shape / 2) * np.array(case.spacing))
        assert np.abs(centres[0] - centres[1]).max() < 6.0, LABELS[label]
    volume = [(c.label == 1).sum() * np.prod(c.spacing) for c in (coarse, fine)]
    assert volume[0] == pytest.approx(volume[1], rel=0.1)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="modality"):
        generate_case(0, shape=SMALL, modality="pet")
    with pytest.raises(ValueError, match="source"):
        generate_case(0, shape=SMALL, source="D")
    with pytest.raises(ValueError, match="shape"):
        generate_case(0, shape=(2, 64, 64))
    with pytest.raises(ValueError, match="spacing"):
        generate_case(0, shape=SMALL, spacing=(1.0, -1.0, 1.0))


# --- anatomy -----------------------------------------------------------------------------------


def test_all_organs_present_and_plausible(ct_cases):
    for case in ct_cases:
        voxel_ml = np.prod(case.spacing) / 1000
        present = set(np.unique(case.label))
        assert {0, 1, 2, 3, 4, 5, 6} <= present, case.case_id
        volumes = {k: (case.label == k).sum() * voxel_ml for k in range(1, 7)}
        assert 700 < volumes[1] < 2800, volumes  # liver, ml
        assert 60 < volumes[2] < 350, volumes  # spleen
        assert 40 < volumes[3] < 250 and 40 < volumes[4] < 250, volumes  # kidneys
    # Aorta and vertebra run the full length of the scan.
    for case in ct_cases:
        for label in (5, 6):
            assert (case.label == label).any(axis=(1, 2)).all(), (case.case_id, LABELS[label])


def test_lesions_small_few_inside_liver(ct_cases):
    counts = []
    for case in ct_cases:
        lesions, n = ndimage.label(case.label == 7, structure=np.ones((3, 3, 3)))
        counts.append(n)
        assert n <= 3
        voxel = np.prod(case.spacing)
        for j in range(1, n + 1):
            mask = lesions == j
            diameter = (6 * mask.sum() * voxel / np.pi) ** (1 / 3)
            assert 2.5 <= diameter <= 13.0, (case.case_id, diameter)
            for axis, spacing in enumerate(case.spacing):
                extent = np.ptp(np.nonzero(mask)[axis]) * spacing
                assert extent <= 12.0 * 1.15 + spacing, (case.case_id, axis, extent)
            # Surrounded by liver: the in-plane ring around the lesion is liver.
            ring = ndimage.binary_dilation(mask, structure=IN_PLANE) & ~mask
            assert np.isin(case.label[ring], (1, 7)).mean() > 0.95, case.case_id
    assert sum(c > 0 for c in counts) >= 3  # lesions appear in a handful of cases
    assert 0 in counts or len(set(counts)) > 1  # and their number varies


def test_lesion_contrast_is_low(ct_cases):
    contrasts = []
    for case in ct_cases:
        lesions, n = ndimage.label(case.label == 7)
        liver = np.median(case.image[_erode(case.tissue == Tissue.LIVER)])
        for j in range(1, n + 1):
            mask = lesions == j
            if mask.sum() >= 6:  # large enough to escape partial volume
                contrasts.append(abs(np.median(case.image[mask]) - liver))
    # 15-40 HU by design; a median over a few noisy voxels (sigma up to 25 HU) spreads it.
    assert contrasts and max(contrasts) < 75 and 5 < np.median(contrasts) < 45


# Expected mean HU of the eroded labels per phase (non-contrast, late arterial, portal venous,
# delayed) and the tolerance: per-case jitter, enhancement gain, partial volume and noise.
EXPECTED_HU = {
    1: ((58, 80, 105, 88), 25),  # liver
    2: ((48, 95, 115, 85), 30),  # spleen (heterogeneous in the late arterial phase)
    3: ((32, 150, 160, 135), 45),  # left kidney: cortex + medulla
    4: ((32, 150, 160, 135), 45),  # right kidney
    5: ((42, 300, 160, 110), 80),  # aorta
    6: ((625, 625, 625, 625), 275),  # vertebra: cortex, cancellous bone and discs
}


def _label_means(case) -> dict[int, float]:
    return {k: float(case.image[_erode(case.label == k)].mean()) for k in EXPECTED_HU}


def test_hounsfield_units_by_structure(ct_cases, phase_cases):
    tissue_ranges = {
        Tissue.SUBCUTANEOUS_FAT: (-125, -75),
        Tissue.MUSCLE: (35, 75),
        Tissue.LUNG: (-900, -780),
    }
    checked = 0
    for case in ct_cases + phase_cases:
        phase = CONTRAST_PHASES.index(case.acquisition["phase"])
        means = _label_means(case)
        for k, (values, tolerance) in EXPECTED_HU.items():
            assert abs(means[k] - values[phase]) <= tolerance, (case.case_id, LABELS[k], means[k])
        for t, (lo, hi) in tissue_ranges.items():
            inner = _erode(case.tissue == t)
            if inner.sum() >= 50:  # a lean patient's fat layer can be thinner than 3 voxels
                checked += 1
                mean = case.image[inner].mean()
                assert lo <= mean <= hi, (case.case_id, t.name, mean)
    assert checked >= 2 * len(tissue_ranges) * len(ct_cases + phase_cases) // 3


def test_contrast_phases_are_drawn_across_cases_with_their_hu_ordering(ct_cases, phase_cases):
    cases = ct_cases + phase_cases
    by_phase: dict[str, list] = {p: [] for p in CONTRAST_PHASES}
    for case in cases:
        by_phase[case.acquisition["phase"]].append(_label_means(case))
    assert all(by_phase.values()), {p: len(v) for p, v in by_phase.items()}  # every phase occurs

    def mean(phase, label):
        return np.mean([m[label] for m in by_phase[phase]])

    # Aorta: late arterial > portal venous > delayed > non-contrast.
    aorta = [mean(p, 5) for p in ("late_arterial", "portal_venous", "delayed", "non_contrast")]
    assert aorta == sorted(aorta, reverse=True) and aorta[0] - aorta[1] > 80
    # Unenhanced kidneys are darker than the liver; enhanced ones much brighter.
    assert mean("non_contrast", 3) < mean("non_contrast", 1)
    for phase in ("late_arterial", "portal_venous", "delayed"):
        assert mean(phase, 3) > mean(phase, 1) + 30, phase
    # The liver enhances most in the portal venous phase.
    liver = {p: mean(p, 1) for p in CONTRAST_PHASES}
    assert max(liver, key=liver.get) == "portal_venous"
    assert liver["non_contrast"] == min(liver.values())
    # Images of one phase vary: per-case jitter and the enhancement gain.
    for phase, means in by_phase.items():
        if len(means) >= 3:
            assert np.ptp([m[1] for m in means]) > 3, phase


def test_phase_table_liver_spleen_close_and_corticomedullary_pattern():
    """The drawn HU tables (before texture, blur and noise), many draws per phase."""
    T = Tissue
    for phase, name in enumerate(CONTRAST_PHASES):
        draws = [_ct_lookup(np.random.default_rng([phase, i]), phase)[0] for i in range(200)]
        table = np.array(draws)
        liver, spleen = table[:, T.LIVER], table[:, T.SPLEEN]
        assert np.abs(liver - spleen).max() <= 25, name  # shape and position must decide
        assert np.array_equal(table[:, T.LIVER_LESION], liver)
        cortex, medulla = table[:, T.KIDNEY_LEFT_CORTEX], table[:, T.KIDNEY_LEFT_MEDULLA]
        assert np.array_equal(cortex, table[:, T.KIDNEY_RIGHT_CORTEX])
        if name == "late_arterial":
            assert (cortex - medulla).min() > 50  # corticomedullary differentiation
            assert table[:, T.AORTA].min() > 200 and table[:, T.IVC].max() < 150
        else:
            assert np.abs(cortex - medulla).max() < 40
        if name == "non_contrast":
            assert table[:, T.AORTA].max() < 60 and cortex.max() < 45
        assert table[:, T.AORTA].min() > 30 and table[:, T.AORTA].max() < 400
        assert 0.0 < table[:, T.LIVER].std() < 12  # per-case jitter of a few HU


def test_liver_and_spleen_are_close_in_every_phase(ct_cases, phase_cases):
    for case in ct_cases + phase_cases:
        liver = case.image[_erode(case.tissue == Tissue.LIVER)].mean()
        spleen = case.image[_erode(case.tissue == Tissue.SPLEEN)].mean()
        assert abs(liver - spleen) < 25, (case.case_id, case.acquisition["phase"])


def test_left_right_and_anterior_posterior_layout(ct_cases):
    """x index grows to the patient's right, y index anteriorly (RAS)."""
    for case in ct_cases:
        w = case.label.shape[2]
        centre = {k: np.argwhere(case.label == k).mean(axis=0) for k in (1, 2, 3, 4, 5, 6)}
        assert centre[1][2] > w / 2 > centre[2][2]  # liver right, spleen left
        assert centre[4][2] > w / 2 > centre[3][2]  # right / left kidney
        assert centre[5][1] > centre[6][1]  # aorta anterior to the vertebra
        assert centre[5][2] < centre[6][2]  # ... and to its left
        assert centre[1][0] > centre[3][0]  # liver above the kidneys


def test_left_kidney_higher_than_right(ct_cases):
    offsets = []
    for case in ct_cases:
        z = {k: np.argwhere(case.label == k)[:, 0] for k in (3, 4)}
        offsets.append((z[3].max() - z[4].max()) * case.spacing[0])  # upper poles, mm
    assert np.mean(offsets) > 5 and np.mean(np.array(offsets) >= 0) >= 0.75


def test_lungs_only_in_upper_slices_and_kidneys_absent_at_the_top(ct_cases):
    for case in ct_cases:
        d = case.label.shape[0]
        lung_slices = np.flatnonzero((case.tissue == Tissue.LUNG).any(axis=(1, 2)))
        assert lung_slices.size and lung_slices.min() >= d // 2, case.case_id
        assert lung_slices.max() == d - 1  # the scan starts at the lung bases
        kidney_slices = np.flatnonzero(np.isin(case.label, (3, 4)).any(axis=(1, 2)))
        assert kidney_slices.max() < int(0.8 * d), case.case_id


def test_unlabelled_context_is_present(ct_cases):
    """Fat, muscle, bowel (gas and soft tissue), ribs and lungs exist but are background."""
    context = (
        Tissue.SUBCUTANEOUS_FAT,
        Tissue.MUSCLE,
        Tissue.BOWEL_CONTENT,
        Tissue.BOWEL_GAS,
        Tissue.RIB,
        Tissue.LUNG,
        Tissue.PANCREAS,
        Tissue.IVC,
        Tissue.RENAL_PELVIS,
        Tissue.TABLE,
    )
    for case in ct_cases:
        for t in context:
            mask = case.tissue == t
            assert mask.any(), (case.case_id, t.name)
            assert (case.label[mask] == 0).all()
        # Bowel gas lies in the lower abdomen.
        gas_z = np.argwhere(case.tissue == Tissue.BOWEL_GAS)[:, 0]
        assert np.median(gas_z) < case.label.shape[0] / 2


def test_oral_contrast_and_couch(ct_cases, phase_cases):
    """Positive oral contrast in some cases (bright bowel, stomach), the couch under every
    patient; both are unlabelled background."""
    oral = []
    for case in ct_cases + phase_cases:
        lumen = np.isin(case.tissue, (Tissue.BOWEL_CONTENT, Tissue.STOMACH_CONTENT))
        assert (case.label[lumen] == 0).all()
        brightest = np.percentile(case.image[lumen], 90)
        oral.append(case.acquisition["oral_contrast"])
        if oral[-1]:
            assert brightest > 150, case.case_id
        else:
            assert brightest < 110, case.case_id
        couch = case.tissue == Tissue.TABLE
        assert couch.any() and (case.label[couch] == 0).all()
        # Fixed to the scanner, under the patient's back (posterior = low y index).
        body_y = np.nonzero(~np.isin(case.tissue, (Tissue.AIR, Tissue.TABLE)))[1]
        assert np.nonzero(couch)[1].mean() < body_y.min() <= np.nonzero(couch)[1].max() + 2
    assert 0 < sum(oral) < len(oral)


def test_cases_vary(ct_cases):
    def variation(values):
        return np.std(values) / np.mean(values)

    def body(c):
        return ~np.isin(c.tissue, (Tissue.AIR, Tissue.TABLE))

    middle = [body(c)[c.tissue.shape[0] // 2].sum() * np.prod(c.spacing[1:]) for c in ct_cases]
    assert variation(middle) > 0.04  # body size and shape (cross-section area, mm2)
    livers = [(c.label == 1).sum() * np.prod(c.spacing) for c in ct_cases]
    assert variation(livers) > 0.08  # organ size
    # Habitus: subcutaneous fat from lean to obese (fat area / body area in the middle slice).
    fat = [
        (c.tissue[c.tissue.shape[0] // 2] == Tissue.SUBCUTANEOUS_FAT).sum()
        / body(c)[c.tissue.shape[0] // 2].sum()
        for c in ct_cases
    ]
    assert max(fat) > 3 * min(fat) and max(fat) > 0.2
    # Pose: in-plane rotation up to about 9 degrees and table offsets up to 20 mm.
    angles = [c.acquisition["rotation_deg"] for c in ct_cases]
    offsets = np.array([c.acquisition["table_offset_mm"] for c in ct_cases])
    assert max(np.abs(angles)) <= 9 and np.ptp(angles) > 6
    assert np.abs(offsets).max() <= 20 and np.ptp(offsets, axis=0).min() > 10


def test_noise_is_correlated_and_varies_between_cases(ct_cases):
    sigmas, correlations = [], []
    for case in ct_cases:
        residual = case.image - ndimage.gaussian_filter(case.image, (0.5, 2, 2))
        liver = _erode(case.tissue == Tissue.LIVER)
        values = residual[liver]
        sigmas.append(1.4826 * np.median(np.abs(values - np.median(values))))
        pair = liver[:, :, :-1] & liver[:, :, 1:]
        a, b = residual[:, :, :-1][pair], residual[:, :, 1:][pair]
        correlations.append(np.corrcoef(a, b)[0, 1])
    assert min(sigmas) > 4 and max(sigmas) < 35
    assert max(sigmas) / min(sigmas) > 1.2
    assert min(correlations) > 0.2  # white noise would give about -0.1 after the high-pass
    # Reconstruction kernel: a sharp kernel leaves finer (less correlated) noise than a smooth one.
    sharpness = [c.acquisition["kernel_sharpness"] for c in ct_cases]
    assert np.ptp(sharpness) > 0.4
    assert np.corrcoef(sharpness, correlations)[0, 1] < -0.3


# --- MRI ---------------------------------------------------------------------------------------


def _fat_gradient(case, transform) -> float:
    """Gradient (per 100 mm) of a plane fitted to transform(intensity) in subcutaneous fat."""
    fat = _erode(case.tissue == Tissue.SUBCUTANEOUS_FAT)
    coords = np.argwhere(fat) * np.array(case.spacing)
    design = np.c_[coords, np.ones(len(coords))]
    coef = np.linalg.lstsq(design, transform(case.image[fat]), rcond=None)[0]
    return float(np.linalg.norm(coef[:3]) * 100)


def test_mri_same_anatomy_other_contrast_with_bias_field(ct_cases, mri_cases):
    compared = (Tissue.SUBCUTANEOUS_FAT, Tissue.LIVER, Tissue.SPLEEN, Tissue.AORTA, Tissue.MUSCLE)
    liver_over_spleen, mri_gradients, ct_gradients = [], [], []
    for ct, mr in zip(ct_cases, mri_cases, strict=False):
        assert np.array_equal(ct.label, mr.label) and ct.spacing == mr.spacing
        assert mr.image.dtype == np.float32 and np.isfinite(mr.image).all()
        assert mr.image.min() >= 0
        mean = {t: mr.image[_erode(mr.tissue == t)].mean() for t in compared}
        ct_mean = {t: ct.image[_erode(ct.tissue == t)].mean() for t in compared}
        # T1-like: fat brightest, flowing blood dark; in CT fat is darkest and the aorta bright.
        assert mean[Tissue.SUBCUTANEOUS_FAT] > mean[Tissue.LIVER] > mean[Tissue.AORTA]
        assert mean[Tissue.AORTA] < mean[Tissue.MUSCLE]
        assert ct_mean[Tissue.SUBCUTANEOUS_FAT] < ct_mean[Tissue.LIVER]
        if ct.acquisition["phase"] != "non_contrast":
            assert ct_mean[Tissue.LIVER] < ct_mean[Tissue.AORTA]
        assert mr.acquisition["phase"] is None  # MRI: pre-contrast T1 whatever the CT phase
        liver_over_spleen.append(mean[Tissue.LIVER] / mean[Tissue.SPLEEN])
        # Bias field: a smooth multiplicative trend across the body in MRI, none in CT.
        mri_gradients.append(_fat_gradient(mr, np.log))
        ct_gradients.append(_fat_gradient(ct, lambda hu: hu / -100.0))
    assert np.median(liver_over_spleen) > 1.05  # liver brighter than spleen on T1 (bias aside)
    assert np.median(mri_gradients) > 0.08 and max(ct_gradients) < 0.05


# --- sources -----------------------------------------------------------------------------------


def test_source_cases_keep_only_their_classes():
    full = generate_case(2, shape=SMALL)
    for source, classes in SOURCE_CLASSES.items():
        partial = generate_case(2, shape=SMALL, source=source)
        assert partial.source == source
        assert np.array_equal(partial.image, full.image)
        keep = np.isin(full.label, classes)
        assert np.array_equal(partial.label[keep], full.label[keep])
        assert (partial.label[~keep] == 0).all()
        assert set(np.unique(partial.label)) <= {0, *classes}


def test_make_phantom_with_sources(tmp_path):
    manifest_path = make_phantom(tmp_path, cases=6, shape=SMALL, sources=["A", "B", "C"])
    manifest = json.loads(manifest_path.read_text())
    assert manifest["sources"] == {"A": [1, 7], "B": [3, 4], "C": [2, 5]}
    assert [c["source"] for c in manifest["cases"]] == ["A", "B", "C", "A", "B", "C"]
    for entry in manifest["cases"]:
        label, _, _ = _read(tmp_path / entry["label"])
        assert set(np.unique(label)) <= {0, *SOURCE_CLASSES[entry["source"]]}
    b_label, _, _ = _read(tmp_path / "labelsTr" / "case_001.nii.gz")
    assert {3, 4} <= set(np.unique(b_label))


def _source_split_phantom(out, **kwargs):
    split = {"pretrain": 5, "train": 2, "val": 1, "test": 1}
    path = make_phantom(
        out, cases=9, seed=5, shape=SMALL, sources=["A", "B", "C"], split=split, workers=1, **kwargs
    )
    return path, json.loads(path.read_text())


def test_source_splits_keep_the_other_splits_fully_labelled(tmp_path):
    path, manifest = _source_split_phantom(tmp_path / "a", source_splits=["pretrain"])
    cases = manifest["cases"]
    assert manifest["sources"] == {"A": [1, 7], "B": [3, 4], "C": [2, 5]}
    assert manifest["generator"]["source_splits"] == ["pretrain"]
    pool = [c for c in cases if c["split"] == "pretrain"]
    others = [c for c in cases if c["split"] != "pretrain"]
    assert len(pool) == 5 and len(others) == 4
    # round-robin over the pool's cases, in case order; the other splits get no source
    assert [c["source"] for c in pool] == ["A", "B", "C", "A", "B"]
    assert all("source" not in c for c in others)
    for entry in cases:
        index = int(entry["id"].split("_")[1])
        label, _, _ = _read(path.parent / entry["label"])
        expected = generate_case(index, seed=5, shape=SMALL, source=entry.get("source"))
        assert np.array_equal(label, expected.label), entry["id"]
        if "source" not in entry:  # all labels: more classes than any one source annotates
            assert len(set(np.unique(label)) - {0}) > 2, entry["id"]
    m = load_manifest(path)
    assert validate_manifest(m).ok
    assert all(
        m.labelled_classes(c) == m.foreground_classes for c in m.cases if c.split != "pretrain"
    )

    # deterministic: the same arguments give the same manifest and identical arrays
    again_path, again = _source_split_phantom(tmp_path / "b", source_splits=["pretrain"])
    assert again["cases"] == cases
    for entry in cases:
        for key in ("image", "label"):
            first, _, _ = _read(path.parent / entry[key])
            second, _, _ = _read(again_path.parent / entry[key])
            assert first.tobytes() == second.tobytes()

    # every split named (or none) is today's behaviour: every case round-robin, nothing recorded
    _, default = _source_split_phantom(tmp_path / "c")
    _, every = _source_split_phantom(
        tmp_path / "d", source_splits=["test", "val", "train", "pretrain"]
    )
    assert default == every and "source_splits" not in default["generator"]
    assert [c["source"] for c in default["cases"]] == ["A", "B", "C"] * 3


def test_source_splits_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="source_splits needs sources"):
        make_phantom(tmp_path / "a", cases=4, shape=SMALL, source_splits=["pretrain"])
    for bad in (["training"], [], ["train", "train"]):
        with pytest.raises(ValueError, match="source_splits must be distinct split names"):
            make_phantom(tmp_path / "b", cases=4, shape=SMALL, sources=["A"], source_splits=bad)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_source_splits(tmp_path, capsys):
    out = tmp_path / "ph"
    argv = ["phantom", "--out", str(out), "--cases", "6", "--shape", "8", "32", "32"]
    argv += ["--sources", "B,A", "--workers", "1"]
    assert main([*argv, "--source-splits", "pretrain, test"]) == 0
    cases = json.loads((out / "manifest.json").read_text())["cases"]
    assert default_split(6) == {"pretrain": 3, "train": 1, "val": 1, "test": 1}
    with_source = [c for c in cases if "source" in c]
    assert [c["split"] in ("pretrain", "test") for c in cases] == ["source" in c for c in cases]
    assert [c["source"] for c in with_source] == ["B", "A", "B", "A"]  # 3 pretrain + 1 test
    capsys.readouterr()
    assert main(["phantom", "--out", str(tmp_path / "x"), "--source-splits", "pretrain"]) == 2
    assert main([*argv, "--source-splits", "pretraining"]) == 2
    err = capsys.readouterr().err
    assert "source_splits needs sources" in err and "'pretraining'" in err
    assert "Traceback" not in err


# --- make_phantom ------------------------------------------------------------------------------


def test_make_phantom_round_trip_and_manifest(tmp_path):
    manifest_path = make_phantom(tmp_path / "ph", cases=5, seed=3, shape=SMALL, workers=2)
    assert manifest_path == tmp_path / "ph" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["name"] == "phantom-abdomen" and manifest["modality"] == "CT"
    assert manifest["base_dir"] == "."
    assert manifest["labels"] == {str(k): v for k, v in LABELS.items()}
    assert manifest["ignore_index"] == 255
    assert manifest["intensity"] == {"window": [-200, 300]}
    assert manifest["generator"]["seed"] == 3 and manifest["generator"]["cases"] == 5
    assert "sources" not in manifest
    assert [c["id"] for c in manifest["cases"]] == [f"case_{i:03d}" for i in range(5)]
    splits = [c["split"] for c in manifest["cases"]]
    assert {s: splits.count(s) for s in set(splits)} == {
        k: v for k, v in default_split(5).items() if v
    }
    for i, entry in enumerate(manifest["cases"]):
        assert "source" not in entry
        expected = generate_case(i, seed=3, shape=SMALL)
        image, affine, img = _read(manifest_path.parent / entry["image"])
        label, label_affine, label_img = _read(manifest_path.parent / entry["label"])
        assert img.get_data_dtype() == np.int16 and label_img.get_data_dtype() == np.uint8
        assert np.array_equal(image.astype(np.float32), expected.image)
        assert np.array_equal(label, expected.label)
        sz, sy, sx = expected.spacing
        assert np.allclose(affine, np.diag([sx, sy, sz, 1.0]))
        assert np.allclose(label_affine, affine)
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert not list(manifest_path.parent.rglob(".tmp-*"))


def test_make_phantom_mri_and_explicit_split(tmp_path):
    split = {"pretrain": 1, "train": 2, "val": 0, "test": 1}
    path = make_phantom(tmp_path, cases=4, shape=SMALL, modality="mri", split=split, workers=1)
    manifest = json.loads(path.read_text())
    assert manifest["name"] == "phantom-abdomen-mri" and manifest["modality"] == "MR"
    assert manifest["intensity"] == {"percentiles": [0.5, 99.5]}
    splits = [c["split"] for c in manifest["cases"]]
    assert {k: splits.count(k) for k in split} == split
    image, _, img = _read(tmp_path / "imagesTr" / "case_002.nii.gz")
    assert img.get_data_dtype() == np.float32
    assert np.array_equal(image, generate_case(2, shape=SMALL, modality="mri").image)
    with pytest.raises(ValueError, match="add up"):
        make_phantom(tmp_path / "other", cases=4, shape=SMALL, split={"train": 5})


def test_split_is_seeded(tmp_path):
    def splits(folder, seed):
        path = make_phantom(tmp_path / folder, cases=10, seed=seed, shape=(4, 16, 16), workers=1)
        return [c["split"] for c in json.loads(path.read_text())["cases"]]

    first = splits("a", 0)
    assert splits("b", 0) == first
    assert any(splits(f"s{seed}", seed) != first for seed in (1, 2, 3))


def test_default_split_counts():
    assert default_split(40) == PROFILES["cpu"].phantom.split
    assert default_split(8) == PROFILES["smoke"].phantom.split
    assert default_split(4) == {"pretrain": 1, "train": 1, "val": 1, "test": 1}
    for n in range(4, 60):
        counts = default_split(n)
        assert sum(counts.values()) == n and min(counts.values()) >= 1
    with pytest.raises(ValueError, match="at least 4"):
        default_split(3)


def test_refuses_foreign_manifest_and_user_files(tmp_path):
    foreign = tmp_path / "manifest.json"
    foreign.write_text('{"name": "my-precious-dataset", "cases": []}')
    with pytest.raises(ManifestError, match="did not write"):
        make_phantom(tmp_path, cases=4, shape=SMALL)
    assert foreign.read_text() == '{"name": "my-precious-dataset", "cases": []}'
    assert not (tmp_path / "imagesTr").exists()

    user = tmp_path / "user"
    (user / "imagesTr").mkdir(parents=True)
    (user / "imagesTr" / "case_000.nii.gz").write_bytes(b"user data")
    with pytest.raises(ManifestError, match="refusing"):
        make_phantom(user, cases=4, shape=SMALL)
    assert (user / "imagesTr" / "case_000.nii.gz").read_bytes() == b"user data"


def test_overwrites_its_own_previous_phantom(tmp_path):
    make_phantom(tmp_path, cases=6, seed=0, shape=SMALL, workers=1)
    path = make_phantom(tmp_path, cases=4, seed=1, shape=SMALL, workers=1)
    manifest = json.loads(path.read_text())
    assert len(manifest["cases"]) == 4 and manifest["generator"]["seed"] == 1
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir()) == [
        f"case_{i:03d}.nii.gz" for i in range(4)
    ]
    image, _, _ = _read(tmp_path / "imagesTr" / "case_000.nii.gz")
    assert np.array_equal(image.astype(np.float32), generate_case(0, seed=1, shape=SMALL).image)


def test_interrupted_run_leaves_a_placeholder_and_can_be_rerun(tmp_path, monkeypatch):
    import medssl_kit.data.phantom.write as phantom

    calls = []

    def failing_write(job):
        calls.append(job)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(job)

    original = phantom._write_case
    monkeypatch.setattr(phantom, "_write_case", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        make_phantom(tmp_path, cases=4, shape=SMALL, workers=1)
    placeholder = json.loads((tmp_path / "manifest.json").read_text())
    assert placeholder["cases"] == [] and placeholder["generator"]["status"] == "incomplete"
    monkeypatch.setattr(phantom, "_write_case", original)
    manifest = json.loads(make_phantom(tmp_path, cases=4, shape=SMALL, workers=1).read_text())
    assert len(manifest["cases"]) == 4 and "status" not in manifest["generator"]


def test_monai_reads_the_files_in_ras_unchanged(tmp_path):
    monai_transforms = pytest.importorskip("monai.transforms")
    path = make_phantom(tmp_path, cases=4, shape=SMALL, workers=1)
    load = monai_transforms.Compose(
        [
            monai_transforms.LoadImage(image_only=True),
            monai_transforms.EnsureChannelFirst(),
            monai_transforms.Orientation(axcodes="RAS"),
        ]
    )
    expected = generate_case(1, shape=SMALL)
    for key, array in (("image", expected.image), ("label", expected.label)):
        tensor = load(str(path.parent / f"{key}sTr" / "case_001.nii.gz"))
        assert np.array_equal(np.asarray(tensor[0]).transpose(2, 1, 0), array)
    sz, sy, sx = expected.spacing
    assert np.allclose(np.asarray(tensor.affine), np.diag([sx, sy, sz, 1.0]))


def test_ensure_phantom_reuses_an_identical_phantom_only(tmp_path):
    from medssl_kit.data.phantom import ensure_phantom

    first = ensure_phantom(tmp_path / "p", profile="smoke", workers=1)
    image = tmp_path / "p" / json.loads(first.read_text())["cases"][0]["image"]
    stamp = image.stat().st_mtime_ns
    assert ensure_phantom(tmp_path / "p", profile="smoke", workers=1) == first
    assert image.stat().st_mtime_ns == stamp  # reused, not rewritten
    ensure_phantom(tmp_path / "p", profile="smoke", seed=1, workers=1)
    assert image.stat().st_mtime_ns != stamp  # other arguments: regenerated
    assert json.loads(first.read_text())["generator"]["seed"] == 1
    image.unlink()
    ensure_phantom(tmp_path / "p", profile="smoke", seed=1, workers=1)
    assert image.is_file()  # an incomplete phantom is regenerated


def test_ensure_phantom_with_sources_on_the_pool_only(tmp_path):
    from medssl_kit.data.phantom import ensure_phantom

    kw = {"profile": "smoke", "sources": ["A", "B"], "source_splits": ["pretrain"], "workers": 1}
    path = ensure_phantom(tmp_path / "pool", **kw)
    cases = json.loads(path.read_text())["cases"]
    assert {c.get("source") is not None for c in cases if c["split"] == "pretrain"} == {True}
    assert all("source" not in c for c in cases if c["split"] != "pretrain")
    stamp = path.stat().st_mtime_ns
    assert ensure_phantom(tmp_path / "pool", **kw) == path and path.stat().st_mtime_ns == stamp
    ensure_phantom(tmp_path / "pool", **{**kw, "source_splits": None})  # sources everywhere now
    assert all("source" in c for c in json.loads(path.read_text())["cases"])
