"""The results store and its statistics (DESIGN §6.3).

Every fine-tuning run writes ``runs/<run_id>/results.csv``: one row per test case × class with the
columns :data:`RESULT_COLUMNS` (any further columns, e.g. ``mode``, ``init``, ``run_id``,
``gt_voxels``, are kept and loaded as strings). Column meaning and units:

========  =======  ==========================================================================
method    str      pre-training method, or ``scratch``
backbone  str      backbone name (``unet``, ``resunet``, ...)
dims      int      2 or 3 (spatial dimensionality of the model)
labeled   float    label budget: number of labelled fine-tuning cases (written as an integer,
                   ``1``), or a fraction of them (``0.25``); loaded as a float
seed      int      seed of the fine-tuning run (same seed = same labelled subset across methods)
case      str      test case id
class_id  int      label value
class     str      class name
dice      float    Dice in [0, 1] (NaN allowed)
hd95      float    95th-percentile Hausdorff distance in mm (NaN when a mask is empty)
iou       float    IoU in [0, 1] (NaN allowed)
========  =======  ==========================================================================

Missing values are written as empty fields. Files are written atomically and validated on the way
in and on the way out; a malformed file raises :class:`~medssl_kit.errors.MedsslError` naming it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from medssl_kit.atomic import atomic_write_text
from medssl_kit.errors import MedsslError

RESULT_COLUMNS = [
    "method",
    "backbone",
    "dims",
    "labeled",
    "seed",
    "case",
    "class_id",
    "class",
    "dice",
    "hd95",
    "iou",
]
RESULTS_FILENAME = "results.csv"

_STR_COLUMNS = ("method", "backbone", "case", "class")
_INT_COLUMNS = ("dims", "seed", "class_id")
_FLOAT_COLUMNS = ("labeled", "dice", "hd95", "iou")
METRIC_COLUMNS = ("dice", "hd95", "iou")


def _as_float(value: object, column: str, row: int) -> float:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"column '{column}', data row {row}: {value!r} is not a number") from None


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Check columns and values, fix dtypes; ``ValueError`` naming column and data row."""
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; required: {RESULT_COLUMNS}")
    extras = [c for c in df.columns if c not in RESULT_COLUMNS]
    out = pd.DataFrame(index=range(len(df)))
    for col in RESULT_COLUMNS + extras:
        values = df[col].tolist()
        if col in _STR_COLUMNS:
            for i, v in enumerate(values, 1):
                if _is_missing(v) or str(v) == "":
                    raise ValueError(f"column '{col}', data row {i}: empty value")
            out[col] = pd.Series([str(v) for v in values], dtype=str)
        elif col in _INT_COLUMNS:
            ints = []
            for i, v in enumerate(values, 1):
                f = _as_float(v, col, i)
                if not (math.isfinite(f) and f == int(f)):
                    raise ValueError(f"column '{col}', data row {i}: {v!r} is not an integer")
                ints.append(int(f))
            out[col] = pd.Series(ints, dtype=np.int64)
        elif col in _FLOAT_COLUMNS:
            out[col] = pd.Series(
                [_as_float(v, col, i) for i, v in enumerate(values, 1)], dtype=np.float64
            )
        else:
            out[col] = pd.Series(["" if _is_missing(v) else str(v) for v in values], dtype=str)
    checks = {
        "dims": out["dims"].isin((2, 3)),
        "labeled": np.isfinite(out["labeled"]) & (out["labeled"] >= 0),
        "dice": out["dice"].isna() | out["dice"].between(0, 1),
        "iou": out["iou"].isna() | out["iou"].between(0, 1),
        "hd95": out["hd95"].isna() | (out["hd95"] >= 0),
    }
    rules = {
        "dims": "2 or 3",
        "labeled": "a finite number >= 0",
        "dice": "in [0, 1] or empty",
        "iou": "in [0, 1] or empty",
        "hd95": ">= 0 mm or empty",
    }
    for col, ok in checks.items():
        if not ok.all():
            i = int(np.flatnonzero(~ok.to_numpy())[0])
            raise ValueError(
                f"column '{col}', data row {i + 1}: {out[col].iloc[i]!r} is not {rules[col]}"
            )
    return out


def write_results(rows: Iterable[Mapping[str, object]], path: str | Path) -> Path:
    """Validate ``rows`` and write them atomically as a results CSV; returns the path.

    Each row needs every column of :data:`RESULT_COLUMNS`; other keys become extra columns (in
    order of first appearance; a row without one gets an empty field). Invalid rows raise
    ``ValueError`` before anything is written, and an existing file is replaced only by a complete
    new one (temporary file + fsync + ``os.replace``).
    """
    rows = [dict(r) for r in rows]
    extras: list[str] = []
    for r in rows:
        extras += [k for k in r if k not in RESULT_COLUMNS and k not in extras]
    for i, r in enumerate(rows, 1):
        missing = [c for c in RESULT_COLUMNS if c not in r]
        if missing:
            raise ValueError(f"result row {i} lacks column(s) {missing}")
    df = _normalise(pd.DataFrame(rows, columns=RESULT_COLUMNS + extras))
    # a case count is written as one ("1", not "1.0"); a fractional budget stays a number
    df["labeled"] = pd.Series(
        [int(v) if float(v).is_integer() else float(v) for v in df["labeled"]], dtype=object
    )
    path = Path(path)
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))
    return path


def _read_one(path: Path) -> pd.DataFrame:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsslError(f"results file '{path}' cannot be read: {exc}") from exc
    try:
        records = list(csv.reader(io.StringIO(text)))
        if not records:
            raise ValueError("the file is empty (no header line)")
        header, data = records[0], [r for r in records[1:] if r]
        if len(set(header)) != len(header):
            raise ValueError(f"duplicate column names in header {header}")
        for i, r in enumerate(data, 1):
            if len(r) != len(header):
                raise ValueError(f"data row {i} has {len(r)} fields, the header has {len(header)}")
        return _normalise(pd.DataFrame(data, columns=header, dtype=str))
    except (ValueError, csv.Error) as exc:
        raise MedsslError(f"results file '{path}' is malformed: {exc}") from exc


def _discover(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            hits = sorted(p.rglob(RESULTS_FILENAME))
            if not hits:
                raise MedsslError(f"no {RESULTS_FILENAME} found under folder '{p}'")
            found += hits
        elif p.is_file():
            found.append(p)
        else:
            raise MedsslError(f"results path '{p}' does not exist")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def load_results(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Load results CSVs into one DataFrame with fixed dtypes.

    ``paths`` is a file, a folder (searched recursively for ``results.csv``, e.g. ``runs/``), or
    an iterable of both; a file reached twice is read once. Columns: :data:`RESULT_COLUMNS` with
    the dtypes of the module table, then extra columns (strings; empty where a file lacks them).

    Raises:
        MedsslError: a path does not exist, a folder holds no ``results.csv``, or a file is
            malformed (the message names the file and the offending column / row).
    """
    frames = [_read_one(p) for p in _discover(paths)]
    df = pd.concat(frames, ignore_index=True)
    extras = [c for c in df.columns if c not in RESULT_COLUMNS]
    for col in extras:
        df[col] = df[col].fillna("").astype(str)
    return df[RESULT_COLUMNS + extras]


def _select_classes(df: pd.DataFrame, classes: Iterable[int | str] | None) -> pd.DataFrame:
    if classes is None:
        return df
    wanted = list(classes)
    ids = [int(c) for c in wanted if not isinstance(c, str)]
    names = [c for c in wanted if isinstance(c, str)]
    return df[df["class_id"].isin(ids) | df["class"].isin(names)]


def _check_unique(df: pd.DataFrame, key: Sequence[str]) -> None:
    dup = df.duplicated(list(key), keep=False)
    if dup.any():
        first = df.loc[dup, list(key)].iloc[0].to_dict()
        raise ValueError(
            f"{int(dup.sum())} rows share the key {list(key)} (e.g. {first}); filter the frame "
            "(e.g. by backbone, dims or mode) or add the distinguishing column to `by`"
        )


def aggregate(
    df: pd.DataFrame,
    by: Sequence[str] = ("method", "labeled"),
    classes: Iterable[int | str] | None = None,
    metrics: Sequence[str] = METRIC_COLUMNS,
) -> pd.DataFrame:
    """Mean ± sd over seeds of per-seed case means, per group of ``by``.

    For each group and seed: each case's score is the NaN-aware mean over the selected classes
    (``class_id`` ints or ``class`` names; all when ``None``), the seed's score is the NaN-aware
    mean over cases; the group reports the mean and the sample sd (ddof = 1; NaN for a single
    seed) of the seeds' scores. Put ``"class"`` in ``by`` for per-class tables.

    Returns:
        One row per group: the ``by`` columns, ``<metric>_mean``, ``<metric>_sd`` for each metric,
        ``n_seeds`` and ``n_cases`` (distinct cases).

    Raises:
        ValueError: ``by`` contains ``seed`` or ``case``, or rows are not unique per
            ``by`` + seed + case + class_id (e.g. two backbones mixed under one method).
    """
    by = list(by)
    metrics = list(metrics)
    if {"seed", "case"} & set(by):
        raise ValueError("`by` cannot contain 'seed' or 'case': they are averaged over")
    sel = _select_classes(df, classes)
    _check_unique(sel, [*by, "seed", "case", "class_id"])
    per_case = sel.groupby([*by, "seed", "case"])[metrics].mean()
    per_seed = per_case.groupby(level=[*by, "seed"]).mean()
    grouped = per_seed.groupby(level=by)
    out = pd.DataFrame(index=grouped.size().index)
    for m in metrics:
        out[f"{m}_mean"] = grouped[m].mean()
        out[f"{m}_sd"] = grouped[m].std(ddof=1)
    out["n_seeds"] = grouped.size()
    out["n_cases"] = sel.groupby(by)["case"].nunique()
    return out.reset_index()


def paired_wilcoxon(
    df: pd.DataFrame,
    method: str,
    baseline: str = "scratch",
    metric: str = "dice",
    labeled: float | None = None,
    *,
    classes: Iterable[int | str] | None = None,
    per_class: bool = False,
    unit: str = "case",
    min_pairs: int = 6,
) -> dict[str, object]:
    """Two-sided Wilcoxon signed-rank test of ``method`` against ``baseline`` on paired results.

    Pairing: a pair is the same test case and the same fine-tuning seed (hence the same labelled
    subset) under both methods, within one label budget (``labeled``; ``None`` pools every budget,
    still pairing within a budget). By default each side's value is the NaN-aware mean of
    ``metric`` over the selected classes of that case; with ``per_class`` every (case, seed,
    class) is its own pair. Keys present for only one method, or with a NaN on either side, are
    dropped. With ``unit="seed"`` a pair is instead one fine-tuning seed of a budget (per class
    with ``per_class``), each side the mean over that seed's paired cases: the replicated unit,
    where the per-case pairs count the test cases of one fine-tuned model as independent (at
    one labelled case a run's mean moves by a tenth from run to run, which they do not see).
    Six seeds are the fewest for which it can give p < 0.05. The test is
    ``scipy.stats.wilcoxon(method_values, baseline_values)`` (zero differences discarded,
    scipy's default).

    Returns:
        ``{"statistic", "p_value", "n_pairs", "n_ahead", "median_difference", "reason"}``:
        ``n_ahead`` counts the pairs where ``method`` is strictly higher (with ``unit="seed"``, the
        seeds it is ahead on; for HD95, where lower is better, those where it is worse), the
        median is of method − baseline (for HD95 negative is better), ``reason`` is ``None``
        when the test ran;
        otherwise statistic and p-value are NaN and ``reason`` says why: fewer than ``min_pairs``
        pairs (default 6, the fewest for which a two-sided exact p can be < 0.05) or all
        differences zero.

    Raises:
        ValueError: a method has several rows per (labeled, case, seed, class_id), or ``unit``
            is neither ``"case"`` nor ``"seed"``.
    """
    if unit not in ("case", "seed"):
        raise ValueError(f"unit must be 'case' or 'seed', got {unit!r}")
    pairs = _pairs(df, method, baseline, metric, labeled, classes, per_class, unit == "seed")
    diff = (pairs["m"] - pairs["b"]).to_numpy()
    result: dict[str, object] = {
        "statistic": math.nan,
        "p_value": math.nan,
        "n_pairs": len(pairs),
        "n_ahead": int((diff > 0).sum()),
        "median_difference": float(np.median(diff)) if len(diff) else math.nan,
        "reason": None,
    }
    if len(pairs) < min_pairs:
        result["reason"] = (
            f"{len(pairs)} pair(s) of '{method}' and '{baseline}' on {metric}, "
            f"fewer than min_pairs={min_pairs}"
        )
    elif not np.any(diff != 0):
        result["reason"] = f"all {len(pairs)} differences are zero"
    else:
        test = wilcoxon(pairs["m"].to_numpy(), pairs["b"].to_numpy())
        result["statistic"] = float(test.statistic)
        result["p_value"] = float(test.pvalue)
    return result


def _pairs(
    df: pd.DataFrame,
    method: str,
    baseline: str,
    metric: str,
    labeled: float | None,
    classes: Iterable[int | str] | None,
    per_class: bool,
    per_seed: bool,
) -> pd.DataFrame:
    """``method`` (column ``m``) beside ``baseline`` (``b``), one row per paired key.

    The key is (labeled, case, seed[, class_id]); ``per_seed`` then averages each seed's
    paired cases into one row per (labeled, seed[, class_id]).
    """
    sel = _select_classes(df, classes)
    if labeled is not None:
        sel = sel[sel["labeled"] == float(labeled)]
    key = ["labeled", "case", "seed"] + (["class_id"] if per_class else [])

    def values(name: str) -> pd.Series:
        part = sel[sel["method"] == name]
        _check_unique(part, ["labeled", "case", "seed", "class_id"])
        return part.groupby(key)[metric].mean()

    pairs = pd.concat({"m": values(method), "b": values(baseline)}, axis=1, join="inner").dropna()
    if per_seed:
        return pairs.groupby(level=[k for k in key if k != "case"]).mean()
    return pairs
