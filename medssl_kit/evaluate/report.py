"""The comparison table: every method × label budget against the from-scratch baseline.

Built from the results store (:func:`~medssl_kit.evaluate.results.load_results`): organ and lesion
Dice and organ HD95 as mean ± sd over seeds of the per-seed case means
(:func:`~medssl_kit.evaluate.results.aggregate`), and a paired two-sided Wilcoxon signed-rank test
of each method's organ Dice against the baseline over (test case, seed) pairs
(:func:`~medssl_kit.evaluate.results.paired_wilcoxon`), as the pixel-global paper reports
p-values, the same test over per-seed means (``unit="seed"``: the fine-tuning run is the
replicated unit; needs six seeds), and the number of fine-tuning seeds on which the method's mean
is ahead (that test's ``n_ahead``). Also: a ranking of methods at each
budget, wall times read from the runs' ``summary.json`` files, and notes on what the numbers can
mean (:func:`profile_notes`: smoke-profile runs only prove that the pipeline runs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.results import aggregate, paired_wilcoxon

SUMMARY_FILENAME = "summary.json"
CONFIG_FILENAME = "config.json"

SMOKE_NOTE = (
    "The smoke profile trains on tiny images for a handful of steps: it shows that the pipeline "
    "runs, not which start is better. After so few steps the models predict much the same "
    "(often one class everywhere), so every method tends to get the same numbers; compare "
    "methods on runs at the cpu or gpu profile."
)

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
    p_values, pairs, p_seeds, ahead, paired_seeds = [], [], [], [], []
    for row in table.itertuples():
        if row.method == baseline or baseline not in methods:
            p_values.append(math.nan)
            pairs.append(0)
            p_seeds.append(math.nan)
            ahead.append(0)
            paired_seeds.append(0)
            continue
        args = (df, row.method, baseline, "dice", row.labeled)
        test = paired_wilcoxon(*args, classes=organs)
        p_values.append(test["p_value"])
        pairs.append(test["n_pairs"])
        by_seed = paired_wilcoxon(*args, classes=organs, unit="seed")
        p_seeds.append(by_seed["p_value"])
        ahead.append(by_seed["n_ahead"])
        paired_seeds.append(by_seed["n_pairs"])
    table[f"p_vs_{baseline}"] = p_values
    table["n_pairs"] = pairs
    table[f"p_seeds_vs_{baseline}"] = p_seeds
    table["seeds_ahead"] = ahead
    table["n_paired_seeds"] = paired_seeds
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
    header += [f"p vs {baseline}", "p over seeds", "seeds ahead", "seeds"]
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
        p_seeds = getattr(r, f"p_seeds_vs_{baseline}", math.nan)  # absent in older saved tables
        cells += ["–" if p != p else f"{p:.3g}", "–" if p_seeds != p_seeds else f"{p_seeds:.3g}"]
        paired = getattr(r, "n_paired_seeds", 0)  # 0 also in tables saved before the count
        cells += [f"{r.seeds_ahead}/{paired}" if paired else "–"]
        cells += [str(r.n_seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranking(table: pd.DataFrame, metric: str = "organ_dice") -> pd.DataFrame:
    """Methods ranked at each budget by ``metric`` of a :func:`comparison_table` (1 = best).

    Higher is better for Dice, lower for HD95 (by the metric's name). Ties share the best rank.
    """
    ascending = "hd95" in metric
    out = table[["labeled", "method", metric]].copy()
    out["rank"] = (
        out.groupby("labeled")[metric].rank(ascending=ascending, method="min").astype("Int64")
    )
    return out.sort_values(["labeled", "rank", "method"]).reset_index(drop=True)


def load_run_summaries(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every run's ``summary.json`` under ``paths`` (folders, searched recursively), one row each.

    Columns: ``run_dir``, ``kind`` (``finetune`` when the summary has a label budget, else
    ``pretrain``), ``method``, ``labeled``, ``seed``, ``wall_time_s`` (NaN where absent),
    ``steps`` (fine-tuning: ``steps_run``) and ``mode`` (fine-tuning: ``full``, ``probe`` or
    ``classify``; empty for pre-training).
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    rows = []
    for item in items:
        root = Path(item)
        if not root.exists():
            raise MedsslError(f"run folder '{root}' does not exist")
        files = [root] if root.is_file() else sorted(root.rglob(SUMMARY_FILENAME))
        for path in files:
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise MedsslError(f"run summary '{path}' cannot be read: {exc}") from exc
            finetune = "labeled" in summary
            rows.append(
                {
                    "run_dir": str(path.parent),
                    "kind": "finetune" if finetune else "pretrain",
                    "method": summary.get("method", ""),
                    "labeled": float(summary["labeled"]) if finetune else math.nan,
                    "seed": summary.get("seed", -1),
                    "wall_time_s": float(summary.get("wall_time_s", math.nan)),
                    "steps": summary.get("steps_run" if finetune else "steps", math.nan),
                    "mode": summary.get("mode", "full") if finetune else "",
                }
            )
    columns = ["run_dir", "kind", "method", "labeled", "seed", "wall_time_s", "steps", "mode"]
    return pd.DataFrame(rows, columns=columns)


def wall_time_table(summaries: pd.DataFrame) -> pd.DataFrame:
    """Per method: pre-training seconds, fine-tuning runs, their mean and total seconds, total."""
    ft = summaries[summaries["kind"] == "finetune"].groupby("method")["wall_time_s"]
    pre = summaries[summaries["kind"] == "pretrain"].groupby("method")["wall_time_s"].sum()
    out = pd.DataFrame(
        {
            "finetune_runs": ft.size(),
            "finetune_mean_s": ft.mean(),
            "finetune_total_s": ft.sum(),
        }
    )
    out.insert(0, "pretrain_s", pre.reindex(out.index))
    out["total_s"] = out["pretrain_s"].fillna(0.0) + out["finetune_total_s"]
    return out.reset_index().rename(columns={"index": "method"})


def run_profiles(paths: str | Path | Iterable[str | Path]) -> dict[str, str]:
    """The profile of every fine-tuning run under ``paths``: run folder → profile name.

    ``paths`` are what :func:`~medssl_kit.evaluate.results.load_results` takes: folders (searched
    recursively for the runs' ``config.json``) or a run's ``results.csv`` (its folder's
    ``config.json``). Runs whose config does not record a profile, and files that are not a
    run's config, are left out.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    files: dict[Path, Path] = {}
    for item in items:
        root = Path(item)
        found = [root.parent / CONFIG_FILENAME] if root.is_file() else root.rglob(CONFIG_FILENAME)
        files.update({f.resolve(): f for f in found if f.is_file()})
    profiles = {}
    for path in files.values():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not a run's config; the results themselves are checked where they load
        settings = config.get("config") if isinstance(config, dict) else None
        profile = settings.get("profile") if isinstance(settings, dict) else None
        if isinstance(profile, str) and config.get("kind") == "finetune":
            profiles[str(path.parent)] = profile
    return profiles


def profile_notes(paths: str | Path | Iterable[str | Path]) -> list[str]:
    """What the runs' profile says about their numbers, one note each (empty when nothing).

    When fine-tuning runs under ``paths`` were made at the ``smoke`` profile, a note says so and
    that their numbers only prove the pipeline runs (:data:`SMOKE_NOTE`), with how many of the
    runs it concerns when other profiles are mixed in.
    """
    profiles = run_profiles(paths)
    smoke = sum(p == "smoke" for p in profiles.values())
    if not smoke:
        return []
    which = (
        "These are smoke-profile runs"
        if smoke == len(profiles)
        else f"{smoke} of these {len(profiles)} fine-tuning runs are smoke-profile runs"
    )
    return [f"{which}. {SMOKE_NOTE}"]
