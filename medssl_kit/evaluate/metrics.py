"""Segmentation, classification and calibration metrics (DESIGN §6.1).

Dice, IoU, HD95 and AUROC are computed by MONAI (``compute_dice``, ``compute_iou``,
``compute_hausdorff_distance``, ``compute_roc_auc``); this module fixes the conventions around them
so that every table in the workbench means the same thing:

* Arrays are ``(D, H, W)`` = ``(z, y, x)``, axial slices first; ``spacing`` is ``(z, y, x)`` in mm,
  in the same axis order as the array (MONAI scales each array axis by the spacing entry at the
  same position, so the orders must agree). 2D ``(H, W)`` maps with ``(y, x)`` spacing work too.
* Voxels whose target is ``ignore_index`` (default 255) are excluded from every metric: they are
  neither ground truth nor prediction of any class.
* Empty masks (see :func:`segmentation_metrics`): both empty → Dice = IoU = 1, HD95 = 0 by default
  (``empty="nan"`` gives NaN, as nnU-Net does); exactly one empty → Dice = IoU = 0 and HD95 = NaN
  (there is no surface to measure a distance to). Summaries therefore use NaN-aware means, and
  an HD95 mean is over the cases where both surfaces exist; Dice records the failure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_roc_auc

ArrayLike = np.ndarray | torch.Tensor

METRICS = ("dice", "hd95", "iou")


def _to_numpy(x: ArrayLike | Sequence[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def segmentation_metrics(
    pred: ArrayLike,
    target: ArrayLike,
    classes: Mapping[int, str],
    spacing: Sequence[float],
    ignore_index: int = 255,
    labelled_classes: Iterable[int] | None = None,
    *,
    empty: Literal["one", "nan"] = "one",
    include_background: bool = False,
) -> list[dict[str, object]]:
    """Dice, HD95 (mm) and IoU of one case, one row per class.

    Args:
        pred: predicted class map ``(D, H, W)`` (integers; e.g. ``probs.argmax(0)``).
        target: ground-truth class map of the same shape; ``ignore_index`` marks unlabelled voxels.
        classes: ``{class_id: name}`` (a manifest's ``labels`` with integer keys). Class 0 is
            skipped unless ``include_background``.
        spacing: voxel size in mm in array axis order, ``(z, y, x)`` for a ``(D, H, W)`` volume.
        ignore_index: target value of voxels excluded from every metric (prediction there is
            discarded, so it is neither a true nor a false positive).
        labelled_classes: the classes annotated in this case (partially labelled data, e.g. the
            phantom's sources); rows for the other classes are not emitted at all, so they can
            never enter a mean. ``None``: every class is labelled.
        empty: score when a class is absent from both ground truth and prediction: ``"one"``
            (Dice = IoU = 1, HD95 = 0 mm: a correct "nothing here") or ``"nan"`` (all three NaN,
            the nnU-Net convention, which drops such rows from NaN-aware means).
        include_background: also report class 0.

    Returns:
        Rows ``{"class_id", "class", "dice", "hd95", "iou", "gt_voxels", "pred_voxels"}`` in the
        order of ``classes``. Voxel counts are after excluding ``ignore_index`` voxels.
        Empty-mask conventions: both empty → see ``empty``; ground truth empty but prediction not,
        or ground truth present but prediction empty → Dice = IoU = 0, HD95 = NaN.
        HD95 is MONAI's symmetric 95th-percentile Hausdorff distance between the two masks' edge
        voxels (the larger of the two directed 95th percentiles), Euclidean, in mm.
    """
    if empty not in ("one", "nan"):
        raise ValueError(f"empty must be 'one' or 'nan', got {empty!r}")
    pred_np, target_np = _to_numpy(pred), _to_numpy(target)
    if pred_np.shape != target_np.shape:
        raise ValueError(f"pred shape {pred_np.shape} differs from target shape {target_np.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != target_np.ndim:
        raise ValueError(
            f"spacing {spacing} has {len(spacing)} entries for a {target_np.ndim}-D map; give one "
            "per array axis, (z, y, x) for a (D, H, W) volume"
        )
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}")
    labelled = None if labelled_classes is None else {int(c) for c in labelled_classes}

    valid = target_np != ignore_index
    rows: list[dict[str, object]] = []
    for class_id, name in classes.items():
        class_id = int(class_id)
        if class_id == ignore_index:
            raise ValueError(f"class {class_id} ('{name}') equals ignore_index")
        if (class_id == 0 and not include_background) or (
            labelled is not None and class_id not in labelled
        ):
            continue
        gt = target_np == class_id
        pr = (pred_np == class_id) & valid
        n_gt, n_pr = int(gt.sum()), int(pr.sum())
        if n_gt == 0 and n_pr == 0:
            score = 1.0 if empty == "one" else math.nan
            dice, iou, hd95 = score, score, (0.0 if empty == "one" else math.nan)
        elif n_gt == 0 or n_pr == 0:
            dice, iou, hd95 = 0.0, 0.0, math.nan
        else:
            dice, iou, hd95 = _overlap_and_distance(pr, gt, spacing)
        rows.append(
            {
                "class_id": class_id,
                "class": str(name),
                "dice": dice,
                "hd95": hd95,
                "iou": iou,
                "gt_voxels": n_gt,
                "pred_voxels": n_pr,
            }
        )
    return rows


def _overlap_and_distance(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]
) -> tuple[float, float, float]:
    """MONAI Dice, IoU and HD95 (mm) of two non-empty boolean masks."""
    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(gt)[None, None].float()
    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
    iou = compute_iou(y_pred, y, include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated argument internally; nothing for users to fix.
        warnings.filterwarnings("ignore", ".*always_return_as_numpy", FutureWarning)
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=list(spacing)
        )
    return float(dice), float(iou), float(hd95)


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _selects(row: Mapping[str, object], wanted: Iterable[int | str]) -> bool:
    return any(
        (isinstance(w, str) and row["class"] == w)
        or (not isinstance(w, str) and row["class_id"] == int(w))
        for w in wanted
    )


def summarise(
    rows: Iterable[Mapping[str, object]],
    organ_classes: Iterable[int | str],
    lesion_classes: Iterable[int | str] = (),
) -> dict[str, float]:
    """NaN-aware mean Dice / HD95 (mm) / IoU over organ rows and, separately, lesion rows.

    ``rows`` are :func:`segmentation_metrics` rows of one or several cases; classes are chosen by
    ``class_id`` (int) or ``class`` name (str). Each mean is over all selected rows whose value is
    not NaN (NaN when there is none).

    Returns:
        ``{"organ_dice", "organ_hd95", "organ_iou", "lesion_dice", "lesion_hd95", "lesion_iou"}``.
    """
    rows = list(rows)
    organ, lesion = list(organ_classes), list(lesion_classes)
    out: dict[str, float] = {}
    for prefix, wanted in (("organ", organ), ("lesion", lesion)):
        chosen = [r for r in rows if _selects(r, wanted)]
        for metric in METRICS:
            out[f"{prefix}_{metric}"] = _nanmean(float(r[metric]) for r in chosen)
    return out


def auroc(scores: ArrayLike | Sequence[float], labels: ArrayLike | Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels`` (1 = positive).

    Computed by MONAI ``compute_roc_auc`` (tied scores count one half, as the Mann-Whitney U
    statistic does). When only one class is present the AUROC is undefined: a ``UserWarning`` is
    issued and NaN returned. Labels other than 0/1 and non-finite scores raise ``ValueError``.
    """
    s = _to_numpy(scores).astype(np.float64).ravel()
    y = _to_numpy(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:10].tolist()}")
    y = y.astype(np.int64)
    present = np.unique(y)
    if present.size < 2:
        warnings.warn(
            f"AUROC needs positive and negative labels, got only {present.tolist()}; returning NaN",
            UserWarning,
            stacklevel=2,
        )
        return math.nan
    return float(compute_roc_auc(torch.from_numpy(s), torch.from_numpy(y)))


def _class_axis_of(probs: np.ndarray, target: np.ndarray, class_axis: int | None) -> int:
    if class_axis is not None:
        axis = class_axis % probs.ndim
        if np.delete(probs.shape, axis).tolist() != list(target.shape):
            raise ValueError(
                f"probs {probs.shape} without class_axis {class_axis} != target {target.shape}"
            )
        return axis
    first = target.shape == probs.shape[1:]
    last = target.shape == probs.shape[:-1]
    if first and last:
        raise ValueError(
            f"probs {probs.shape} and target {target.shape} fit both the (K, *S) and the (N, K) "
            "layout; pass class_axis"
        )
    if not (first or last):
        raise ValueError(
            f"target shape {target.shape} fits neither probs (K, *S) nor (N, K) {probs.shape}"
        )
    return 0 if first else probs.ndim - 1


def expected_calibration_error(
    probs: ArrayLike,
    target: ArrayLike,
    n_bins: int = 15,
    *,
    ignore_index: int = 255,
    class_axis: int | None = None,
) -> float:
    """Top-label expected calibration error (Guo et al. 2017), equal-width bins.

    ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|, where the confidence of a sample is its top
    class probability, it is correct when that class is the target, and bin b holds confidences in
    ((b−1)/n_bins, b/n_bins]. In [0, 1]; 0 for a perfectly calibrated model.

    Args:
        probs: class probabilities, either ``(K, *S)`` (a volume, classes first) or ``(N, K)``
            (samples × classes). The layout is inferred from ``target``'s shape (``S`` or ``(N,)``);
            give ``class_axis`` when both fit.
        target: integer classes, shape ``S`` or ``(N,)``; ``ignore_index`` entries are excluded.
        n_bins: number of equal-width confidence bins.

    Counts and sums are accumulated in float64 (exact beyond 2**24 voxels).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _to_numpy(probs).astype(np.float64)
    t = _to_numpy(target)
    axis = _class_axis_of(p, t, class_axis)
    p = np.moveaxis(p, axis, -1).reshape(-1, p.shape[axis])
    t = t.reshape(-1)
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    if t.size == 0:
        return math.nan
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(
        bins, weights=conf, minlength=n_bins
    )
    return float(np.abs(gap).sum() / count.sum())


def uncertainty_error_auroc(
    uncertainty: ArrayLike, pred: ArrayLike, target: ArrayLike, ignore_index: int = 255
) -> float:
    """How well an uncertainty map finds the errors: AUROC of ``uncertainty`` as a detector of
    misclassified voxels (``pred != target``), over voxels whose target is not ``ignore_index``.

    1 when every error is more uncertain than every correct voxel, 0.5 for an uninformative map;
    NaN (with a warning, see :func:`auroc`) when there are no errors or no correct voxels.
    """
    u, p, t = _to_numpy(uncertainty), _to_numpy(pred), _to_numpy(target)
    if not (u.shape == p.shape == t.shape):
        raise ValueError(f"shapes differ: uncertainty {u.shape}, pred {p.shape}, target {t.shape}")
    keep = t != ignore_index
    return auroc(u[keep], (p[keep] != t[keep]).astype(np.int64))
