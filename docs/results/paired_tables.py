"""The eight-seed protocol's tables (docs/results.md) from run folders; used by each issue's
``analyse.py`` beside it.

Organ Dice is the mean over organs 1-6 of each test case, then over the cases of a seed; each
start is compared with its baseline by the paired Wilcoxon tests of
``medssl_kit.evaluate.results.paired_wilcoxon`` over (case, seed) pairs and over seeds, and by
the seeds ahead.
"""

import json
import shutil
from pathlib import Path

import pandas as pd

from medssl_kit.evaluate.results import load_results, paired_wilcoxon

ORGANS = [1, 2, 3, 4, 5, 6]


def frame(folder: str, label: str, labeled: int | None = None) -> pd.DataFrame | None:
    """Every results.csv under ``folder`` (``labeled-<n|all>_seed-<s>`` runs; only runs on
    ``labeled`` cases where given: results.csv records "all" as its case count), tagged
    ``method=label``; ``None`` when there is none."""
    parts = [load_results(f) for f in sorted(Path(folder).glob("labeled-*/results.csv"))]
    df = pd.concat(parts) if parts else None
    if df is not None and labeled:
        df = df[df.labeled == labeled].copy()
    if df is None or df.empty:
        return None
    df["method"] = label
    return df


def per_seed(df: pd.DataFrame, labeled: int = 1) -> pd.Series:
    d = df[(df.labeled == labeled) & df.class_id.isin(ORGANS)]
    return d.groupby(["seed", "case"]).dice.mean().groupby("seed").mean()


def p_text(test: dict) -> str:
    p = test["p_value"]
    return "–" if p is None or p != p else f"{p:.3g}"


def comparison_table(
    rows: list[tuple[str, str, str | None]], labeled: int = 1, only_seeds: set[int] | None = None
) -> list[str]:
    """Markdown rows for ``(label, folder, baseline folder or None)`` at ``labeled`` cases (the
    fine-tuning seeds in ``only_seeds`` only, where given); a start is compared over the seeds
    both it and its baseline have."""
    out = [
        "| start | organ Dice | per seed | p over pairs | p over seeds | seeds ahead | against |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, folder, base in rows:
        df = frame(folder, "x", labeled)
        if df is not None and only_seeds is not None:
            df = df[df.seed.isin(only_seeds)]
        if df is None or df.empty:
            continue
        s = per_seed(df, labeled)
        seeds = "/".join(str(int(k)) for k in s.index)
        cells = (
            f"| {label} | {s.mean():.3f} ± {s.std():.3f} (seeds {seeds}) | "
            f"{' / '.join(f'{v:.3f}' for v in s)}"
        )
        other = frame(base, "base", labeled) if base else None
        if other is None:
            out.append(f"{cells} | – | – | – | – |")
            continue
        shared = set(df.seed) & set(other.seed)
        both = pd.concat([df[df.seed.isin(shared)], other[other.seed.isin(shared)]])
        pairs = paired_wilcoxon(both, "x", "base", "dice", labeled, classes=ORGANS)
        by_seed = paired_wilcoxon(both, "x", "base", "dice", labeled, classes=ORGANS, unit="seed")
        worse = " worse" if (pairs["median_difference"] or 0) < 0 else ""
        out.append(
            f"{cells} | {p_text(pairs)}{worse} ({pairs['n_pairs']}) | {p_text(by_seed)} | "
            f"{by_seed['n_ahead']}/{by_seed['n_pairs']} | {Path(base).name} |"
        )
    return out


def copy_records(roots: list[str], extra: tuple[str, ...] = ()) -> None:
    """Every run's results.csv and summary.json under ``roots`` (and files matching the
    ``extra`` glob patterns) into docs/results/, at the same path below ``runs/``."""
    for root in roots:
        files = [*Path(root).rglob("results.csv"), *Path(root).rglob("summary.json")]
        for pattern in extra:
            files += list(Path(root).rglob(pattern))
        for f in files:
            dest = Path("docs/results") / f.relative_to("runs")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)


def cluster_lines(folder: str) -> list[str]:
    """``medssl clusters`` NMIs (organ / position / intensity) of every reading in ``folder``."""
    lines = []
    for f in sorted(Path(folder).glob("*.json")):
        nmi = json.loads(f.read_text()).get("nmi", {})
        lines.append(f"{f.stem}: " + ", ".join(f"{k} {v:.3f}" for k, v in nmi.items()))
    return lines
