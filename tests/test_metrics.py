import math

import numpy as np
import pytest
import torch

from medssl_kit.evaluate.metrics import (
    auroc,
    expected_calibration_error,
    segmentation_metrics,
    summarise,
    uncertainty_error_auroc,
)

SPACING = (5.0, 0.8, 0.7)  # (z, y, x) mm: thick axial slices, fine in-plane
CLASSES = {1: "liver"}


def _one(pred, target, spacing=SPACING, **kw):
    rows = segmentation_metrics(pred, target, CLASSES, spacing, **kw)
    assert len(rows) == 1
    return rows[0]


def _two_cubes():
    target = np.zeros((10, 10, 10), dtype=np.int64)
    pred = np.zeros_like(target)
    target[0:4, 0:4, 0:4] = 1  # 64 voxels
    pred[2:6, 2:6, 2:6] = 1  # 64 voxels, overlap 2x2x2 = 8
    return pred, target


def test_dice_iou_two_cubes_known_overlap():
    pred, target = _two_cubes()
    row = _one(pred, target, spacing=(1.0, 1.0, 1.0))
    assert row["dice"] == pytest.approx(2 * 8 / (64 + 64))
    assert row["iou"] == pytest.approx(8 / (64 + 64 - 8))
    assert (row["gt_voxels"], row["pred_voxels"]) == (64, 64)
    assert row["class"] == "liver" and row["class_id"] == 1


def test_dice_iou_match_counting_formula_on_random_maps():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (6, 9, 11))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 4, target.shape))
    classes = {1: "a", 2: "b", 3: "c"}
    rows = segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(target), classes, SPACING)
    assert [r["class_id"] for r in rows] == [1, 2, 3]
    for r in rows:
        a, b = pred == r["class_id"], target == r["class_id"]
        inter = (a & b).sum()
        assert r["dice"] == pytest.approx(2 * inter / (a.sum() + b.sum()), rel=1e-6)
        assert r["iou"] == pytest.approx(inter / (a | b).sum(), rel=1e-6)


@pytest.mark.parametrize(
    ("shift", "expected_mm"),
    [
        ((3, 0, 0), 3 * 5.0),  # along z: 5 mm slices
        ((0, 2, 0), 2 * 0.8),  # along y
        ((0, 0, 4), 4 * 0.7),  # along x: 0.7 mm pixels
        ((1, 0, 2), math.hypot(5.0, 2 * 0.7)),
    ],
)
def test_hd95_single_voxels_anisotropic_spacing(shift, expected_mm):
    target = np.zeros((10, 12, 14), dtype=np.int64)
    pred = np.zeros_like(target)
    target[2, 3, 4] = 1
    pred[2 + shift[0], 3 + shift[1], 4 + shift[2]] = 1
    assert _one(pred, target)["hd95"] == pytest.approx(expected_mm, rel=1e-5)


def test_hd95_slabs_displaced_along_z_and_x():
    shape = (10, 12, 14)
    target, pred = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    target[2], pred[4] = 1, 1  # axial planes two slices apart
    assert _one(pred, target)["hd95"] == pytest.approx(2 * 5.0, rel=1e-5)
    target, pred = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    target[:, :, 3], pred[:, :, 6] = 1, 1  # sagittal planes three columns apart
    assert _one(pred, target)["hd95"] == pytest.approx(3 * 0.7, rel=1e-5)


def test_hd95_2d_map_with_yx_spacing():
    target, pred = np.zeros((8, 9), dtype=np.int64), np.zeros((8, 9), dtype=np.int64)
    target[1, 1], pred[4, 1] = 1, 1
    assert _one(pred, target, spacing=(0.8, 0.7))["hd95"] == pytest.approx(3 * 0.8, rel=1e-5)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    target = np.zeros((10, 20, 20), dtype=np.int64)
    target[0:2] = 1  # 800 surface voxels
    pred = target.copy()
    pred[9, 0, 0] = 1  # one stray voxel 8 slices (40 mm) away
    row = _one(pred, target)
    assert row["hd95"] == pytest.approx(0.0, abs=1e-6)
    assert row["dice"] < 1.0


@pytest.mark.filterwarnings("error")
def test_empty_mask_conventions():
    empty = np.zeros((4, 5, 6), dtype=np.int64)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = 1
    both = _one(empty, empty)
    assert (both["dice"], both["iou"], both["hd95"]) == (1.0, 1.0, 0.0)
    both_nan = _one(empty, empty, empty="nan")
    assert all(math.isnan(both_nan[k]) for k in ("dice", "iou", "hd95"))
    for e in ("one", "nan"):
        fp = _one(some, empty, empty=e)  # nothing there, something predicted
        assert (fp["dice"], fp["iou"]) == (0.0, 0.0) and math.isnan(fp["hd95"])
        assert (fp["gt_voxels"], fp["pred_voxels"]) == (0, 8)
        fn = _one(empty, some, empty=e)  # organ missed entirely
        assert (fn["dice"], fn["iou"]) == (0.0, 0.0) and math.isnan(fn["hd95"])
        assert (fn["gt_voxels"], fn["pred_voxels"]) == (8, 0)
    with pytest.raises(ValueError, match="empty"):
        _one(empty, empty, empty="zero")


def test_ignore_index_voxels_do_not_count():
    pred, target = _two_cubes()
    reference = _one(pred, target)
    # predictions inside an unlabelled region far from the organ are discarded ...
    target[8:10] = 255
    pred[8:10, 7:10, 7:10] = 1
    assert _one(pred, target) == reference
    # ... and so is ground truth turned into ignore (organ voxels there no longer exist)
    target[0:4, 0:4, 0:2] = 255
    row = _one(pred, target, spacing=(1.0, 1.0, 1.0))
    assert row["gt_voxels"] == 32 and row["pred_voxels"] == 64
    assert row["dice"] == pytest.approx(2 * 8 / (32 + 64))


def test_labelled_classes_and_background_rows():
    target = np.zeros((3, 4, 4), dtype=np.int64)
    target[1, 1:3, 1:3] = 2
    classes = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
    rows = segmentation_metrics(target, target, classes, SPACING, labelled_classes=[2, 3])
    assert [r["class_id"] for r in rows] == [2, 3]
    rows = segmentation_metrics(target, target, classes, SPACING, include_background=True)
    assert [r["class_id"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["dice"] == 1.0


def test_invalid_arguments():
    m = np.zeros((3, 4, 5), dtype=np.int64)
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(m, m, CLASSES, (1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(m, m[:2], CLASSES, SPACING)
    with pytest.raises(ValueError, match="ignore_index"):
        segmentation_metrics(m, m, {255: "x"}, SPACING)


def test_summarise_organs_and_lesions_nan_aware():
    rows = [
        {"class_id": 1, "class": "liver", "dice": 0.9, "hd95": 4.0, "iou": 0.8},
        {"class_id": 2, "class": "spleen", "dice": 0.7, "hd95": math.nan, "iou": 0.6},
        {"class_id": 7, "class": "lesion", "dice": 0.2, "hd95": 20.0, "iou": 0.1},
        {"class_id": 7, "class": "lesion", "dice": math.nan, "hd95": math.nan, "iou": math.nan},
    ]
    s = summarise(rows, organ_classes=[1, "spleen"], lesion_classes=[7])
    assert s["organ_dice"] == pytest.approx(0.8)
    assert s["organ_hd95"] == pytest.approx(4.0)
    assert s["organ_iou"] == pytest.approx(0.7)
    assert (s["lesion_dice"], s["lesion_hd95"], s["lesion_iou"]) == pytest.approx((0.2, 20, 0.1))
    assert math.isnan(summarise(rows, [1], [])["lesion_dice"])


def test_auroc_against_hand_count():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    labels = [0, 0, 1, 1, 1]
    # positive-negative pairs (6): 0.35>0.1 ✓, 0.35<0.4 ✗, 0.8 ✓✓, 0.4>0.1 ✓, 0.4=0.4 ½
    assert auroc(scores, labels) == pytest.approx(4.5 / 6)
    assert auroc(np.array(scores), np.array(labels, dtype=bool)) == pytest.approx(4.5 / 6)


def test_auroc_single_class_is_nan_with_warning():
    with pytest.warns(UserWarning, match="positive and negative"):
        assert math.isnan(auroc([0.1, 0.9], [1, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0.1, 0.9], [0, 2])


def test_ece_perfectly_calibrated_is_zero():
    # confidence 0.75 and 3 of 4 right
    probs = np.array([[0.75, 0.25], [0.75, 0.25], [0.75, 0.25], [0.75, 0.25]])
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    one_hot = np.eye(3)[[0, 2, 1, 1]]
    assert expected_calibration_error(one_hot, np.array([0, 2, 1, 1])) == pytest.approx(0.0)


def test_ece_overconfident_hand_computed():
    probs = np.array([[0.85, 0.15], [0.15, 0.85], [0.85, 0.15], [0.35, 0.65]])
    target = np.array([0, 1, 1, 1])  # the 0.85 bin: 2 of 3 right; the 0.65 bin: 1 of 1
    expected = 0.75 * abs(2 / 3 - 0.85) + 0.25 * abs(1.0 - 0.65)
    assert expected_calibration_error(probs, target, n_bins=10) == pytest.approx(expected)
    # one bin: |mean accuracy - mean confidence|
    assert expected_calibration_error(probs, target, n_bins=1) == pytest.approx(abs(0.75 - 0.8))


def test_ece_bins_are_right_closed():
    # n_bins=2: (0, .5] and (.5, 1]. Confidence .5 (a tie, argmax 0) falls in the lower bin.
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    target = np.array([0, 0, 0])  # right at .5, right at 1, wrong at 1
    expected = (1 / 3) * abs(1 - 0.5) + (2 / 3) * abs(0.5 - 1.0)
    assert expected_calibration_error(probs, target, n_bins=2) == pytest.approx(expected)


def test_ece_volume_layout_and_ignore_index():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 5, 6))
    probs = np.exp(logits) / np.exp(logits).sum(0)
    target = rng.integers(0, 3, (4, 5, 6))
    flat = expected_calibration_error(probs.reshape(3, -1).T, target.reshape(-1))
    assert expected_calibration_error(probs, target) == pytest.approx(flat)
    assert expected_calibration_error(torch.from_numpy(probs), target) == pytest.approx(flat)
    ignored = target.copy()
    ignored[0] = 255
    kept = expected_calibration_error(probs[:, 1:], target[1:])
    assert expected_calibration_error(probs, ignored) == pytest.approx(kept)
    assert kept != pytest.approx(flat)


def test_ece_ambiguous_layout_needs_class_axis():
    probs = np.array([[0.6, 0.9], [0.4, 0.1]])
    target = np.array([0, 0])
    with pytest.raises(ValueError, match="class_axis"):
        expected_calibration_error(probs, target)
    # columns are samples: (.6, .4) right, (.9, .1) right -> gaps .4 and .1
    assert expected_calibration_error(probs, target, class_axis=0) == pytest.approx(0.25)
    # rows are samples: (.6, .9) wrong at .9, (.4, .1) right at .4 -> gaps .9 and .6
    assert expected_calibration_error(probs, target, class_axis=-1) == pytest.approx(0.75)


def test_uncertainty_error_auroc():
    rng = np.random.default_rng(2)
    target = rng.integers(0, 3, (4, 8, 8))
    pred = np.where(rng.random(target.shape) < 0.8, target, (target + 1) % 3)
    errors = (pred != target).astype(float)
    assert 0 < errors.mean() < 1
    assert uncertainty_error_auroc(errors + 0.5 * rng.random(target.shape), pred, target) == 1.0
    assert uncertainty_error_auroc(1 - errors, pred, target) == 0.0
    # errors hidden under ignore_index with zero uncertainty are not counted
    target_ign, unc = target.copy(), errors.copy()
    target_ign[0], pred_ign = 255, pred.copy()
    pred_ign[0] = 1
    unc[0] = 0.0
    assert uncertainty_error_auroc(unc, pred_ign, target_ign) == 1.0
