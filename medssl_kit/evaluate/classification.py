"""Slice-classifier runs (``finetune --mode classify``): AUROC per method and budget, paired.

Each classify run folder holds ``summary.json`` (``mode: "classify"``) and ``predictions.csv``
(one row per test slice: ``case``, ``slice``, ``score``, ``target``). The comparison against a
baseline is paired: both methods score the same test slices for a seed, so the statistic is the
AUROC difference averaged over the seeds both have, and its uncertainty comes from a bootstrap
that resamples *test cases* (slices of one case are correlated, so resampling slices would
overstate the evidence), the same resampled cases for both methods and every seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.metrics import auroc
from medssl_kit.evaluate.report import SUMMARY_FILENAME, load_run_summaries

PREDICTIONS_FILENAME = "predictions.csv"
PREDICTION_COLUMNS = ("case", "slice", "score", "target")


def load_classifier_predictions(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every classify run's test predictions under ``paths`` (folders searched recursively).

    Returns one row per (run, test slice) with ``method``, ``labeled``, ``seed``, ``case``,
    ``slice``, ``score``, ``target`` and ``run_dir``; empty when no classify run is found.

    Raises:
        MedsslError: a path does not exist, a summary cannot be read, or a classify run lacks a
            readable ``predictions.csv`` with the expected columns (the file is named).
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    runs = load_run_summaries(
        [p for p in items if Path(p).is_dir() or Path(p).name == SUMMARY_FILENAME]
    )
    frames = [
        _read_predictions(Path(run.run_dir) / PREDICTIONS_FILENAME, run)
        for run in runs[runs["mode"] == "classify"].itertuples()
    ]
    columns = ["method", "labeled", "seed", *PREDICTION_COLUMNS, "run_dir"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def _read_predictions(path: Path, run) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"case": str})
    except (OSError, ValueError) as exc:
        raise MedsslError(f"classifier predictions '{path}' cannot be read: {exc}") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise MedsslError(f"classifier predictions '{path}' lack the column(s) {missing}")
    df = df[list(PREDICTION_COLUMNS)].copy()
    df["method"] = run.method
    df["labeled"] = float(run.labeled)
    df["seed"] = int(run.seed)
    df["run_dir"] = str(path.parent)
    return df


def _by_seed_and_case(preds: pd.DataFrame) -> dict[int, dict[str, np.ndarray]]:
    """``{seed: {case: [n, 2] array of (score, target)}}`` for fast resampling."""
    return {
        int(seed): {
            case: g[["score", "target"]].to_numpy(dtype=float) for case, g in rows.groupby("case")
        }
        for seed, rows in preds.groupby("seed")
    }


def _mean_auroc(table: dict[int, dict[str, np.ndarray]], seeds: list[int], cases) -> float:
    """AUROC of each seed's slices of ``cases`` (a case drawn twice counts twice), averaged."""
    values = []
    for seed in seeds:
        chosen = np.concatenate([table[seed][c] for c in cases])
        values.append(auroc(chosen[:, 0], chosen[:, 1].astype(int)))
    return float(np.mean(values))


def paired_auroc_difference(
    preds: pd.DataFrame,
    method: str,
    baseline: str,
    labeled: float,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """``AUROC(method) − AUROC(baseline)`` at one budget, averaged over their common seeds.

    The 95 % interval and the two-sided p come from a paired case bootstrap: ``n_boot`` times,
    draw the test cases with replacement (the same draw for both methods and all seeds; draws
    whose slices hold one class only are redrawn) and recompute the mean difference. ``p`` is
    ``2 · min(P*(Δ ≤ 0), P*(Δ ≥ 0))``, at least ``1 / n_boot``-resolved, capped at 1.
    Returns ``diff``, ``ci_low``, ``ci_high``, ``p_value``, ``n_seeds``, ``n_cases``.
    """
    at = preds[preds["labeled"] == labeled]
    a, b = at[at["method"] == method], at[at["method"] == baseline]
    seeds = sorted(set(a["seed"]) & set(b["seed"]))
    nan = {"diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    if not seeds:
        return {**nan, "n_seeds": 0, "n_cases": 0}
    cases = np.array(sorted(set(a["case"]) & set(b["case"])))
    reference = b[b["seed"] == seeds[0]]
    positive = set(reference.loc[reference["target"] == 1, "case"])
    negative = set(reference.loc[reference["target"] == 0, "case"])
    if not positive or not negative:  # AUROC undefined: no draw could hold both classes
        return {**nan, "n_seeds": len(seeds), "n_cases": len(cases)}

    table_a, table_b = _by_seed_and_case(a), _by_seed_and_case(b)

    def diff(chosen: np.ndarray) -> float:
        return _mean_auroc(table_a, seeds, chosen) - _mean_auroc(table_b, seeds, chosen)

    observed = diff(cases)
    rng = np.random.default_rng(seed)
    draws = []
    while len(draws) < n_boot:
        chosen = rng.choice(cases, size=len(cases), replace=True)
        if positive.isdisjoint(chosen) or negative.isdisjoint(chosen):
            continue
        draws.append(diff(chosen))
    draws = np.asarray(draws)
    tail = min(np.mean(draws <= 0.0), np.mean(draws >= 0.0))
    return {
        "diff": observed,
        "ci_low": float(np.percentile(draws, 2.5)),
        "ci_high": float(np.percentile(draws, 97.5)),
        "p_value": float(min(1.0, 2.0 * max(tail, 1.0 / n_boot))),
        "n_seeds": len(seeds),
        "n_cases": len(cases),
    }


def auroc_table(preds: pd.DataFrame, baseline: str = "scratch", n_boot: int = 2000) -> pd.DataFrame:
    """One row per method × budget: AUROC mean and sd over seeds, and the paired difference
    against ``baseline`` (:func:`paired_auroc_difference`) with its interval and p."""
    rows = []
    methods = set(preds["method"])
    for (method, labeled), group in preds.groupby(["method", "labeled"]):
        per_seed = [
            auroc(g["score"].to_numpy(), g["target"].to_numpy()) for _, g in group.groupby("seed")
        ]
        row = {
            "method": method,
            "labeled": labeled,
            "auroc": float(np.mean(per_seed)),
            "auroc_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
            "n_seeds": len(per_seed),
        }
        if method != baseline and baseline in methods:
            test = paired_auroc_difference(preds, method, baseline, labeled, n_boot=n_boot)
            row.update({k: test[k] for k in ("diff", "ci_low", "ci_high", "p_value")})
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("diff", "ci_low", "ci_high", "p_value"):
        if column not in table:
            table[column] = math.nan
    return table.sort_values(["labeled", "method"]).reset_index(drop=True)


def auroc_markdown(table: pd.DataFrame, baseline: str = "scratch") -> str:
    """The :func:`auroc_table` as Markdown."""
    header = ["method", "labelled cases", "AUROC", f"Δ vs {baseline} (95 % CI)", "p", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        sd = f" ± {r.auroc_sd:.3f}" if r.auroc_sd == r.auroc_sd else ""
        if r.diff == r.diff:
            delta = f"{r.diff:+.3f} ({r.ci_low:+.3f}, {r.ci_high:+.3f})"
            p = f"{r.p_value:.3g}"
        else:
            delta, p = "–", "–"
        cells = [r.method, f"{r.labeled:g}", f"{r.auroc:.3f}{sd}", delta, p, str(r.n_seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
