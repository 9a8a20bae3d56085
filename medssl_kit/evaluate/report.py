"""The comparison table: every method × label budget against the from-scratch baseline.

Built from the results store (:func:`~medssl_kit.evaluate.results.load_results`): organ and lesion
Dice and organ HD95 as mean ± sd over seeds of the per-seed case means
(:func:`~medssl_kit.evaluate.results.aggregate`), and a paired two-sided Wilcoxon signed-rank test
of each method's organ Dice against the baseline over (test case, seed) pairs
(:func:`~medssl_kit.evaluate.results.paired_wilcoxon`), as the pixel-global paper reports
p-values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pandas as pd

from medssl_kit.evaluate.results import aggregate, paired_wilcoxon

LESION_WORDS = ("lesion", "tumor", "tumour")


def split_classes(labels: Mapping[int, str]) -> tuple[list[int], list[int]]:
    """Foreground class ids of a manifest's ``labels``: (organs, lesions), by name."""
    fg = [c for c in labels if c != 0]
    lesions = [c for c in fg if any(w in labels[c].lower() for w in LESION_WORDS)]
    return [c for c in fg if c not in lesions], lesions


def comparison_table(
    df: pd.DataFrame,
    organs: Iterable[int],
    lesions: Iterable[int] = (),
    baseline: str = "scratch",
) -> pd.DataFrame:
    """One row per method × budget: Dice / HD95 mean and sd over seeds, p vs ``baseline``."""
    organs, lesions = list(organs), list(lesions)
    table = aggregate(df, by=("method", "labeled"), classes=organs, metrics=("dice", "hd95"))
    table = table.rename(
        columns={
            "dice_mean": "organ_dice",
            "dice_sd": "organ_dice_sd",
            "hd95_mean": "organ_hd95",
            "hd95_sd": "organ_hd95_sd",
        }
    )
    if lesions:
        lesion = aggregate(df, by=("method", "labeled"), classes=lesions, metrics=("dice",))
        table = table.merge(
            lesion[["method", "labeled", "dice_mean", "dice_sd"]].rename(
                columns={"dice_mean": "lesion_dice", "dice_sd": "lesion_dice_sd"}
            ),
            on=["method", "labeled"],
            how="left",
        )
    methods = set(df["method"])
    p_values, pairs = [], []
    for row in table.itertuples():
        if row.method == baseline or baseline not in methods:
            p_values.append(math.nan)
            pairs.append(0)
            continue
        test = paired_wilcoxon(df, row.method, baseline, "dice", row.labeled, classes=organs)
        p_values.append(test["p_value"])
        pairs.append(test["n_pairs"])
    table[f"p_vs_{baseline}"] = p_values
    table["n_pairs"] = pairs
    return table.sort_values(["labeled", "method"]).reset_index(drop=True)


def to_markdown(table: pd.DataFrame, baseline: str = "scratch") -> str:
    """The comparison table as a Markdown table (mean ± sd; budgets as case counts)."""

    def pm(mean: float, sd: float, digits: int) -> str:
        if mean != mean:  # NaN
            return "–"
        return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd == sd else f"{mean:.{digits}f}"

    has_lesion = "lesion_dice" in table
    header = ["method", "labelled cases", "organ Dice", "organ HD95 (mm)"]
    header += ["lesion Dice"] if has_lesion else []
    header += [f"p vs {baseline}", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        p = getattr(r, f"p_vs_{baseline}")
        cells = [
            r.method,
            f"{r.labeled:g}",
            pm(r.organ_dice, r.organ_dice_sd, 3),
            pm(r.organ_hd95, r.organ_hd95_sd, 1),
        ]
        cells += [pm(r.lesion_dice, r.lesion_dice_sd, 3)] if has_lesion else []
        cells += ["–" if p != p else f"{p:.3g}", str(r.n_seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
