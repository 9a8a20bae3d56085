"""The tables of docs/results.md for issue 32 §3 (and issue 33's first runs), from the run folders.

    python docs/results/i32/analyse.py [--copy]

Each start against its scratch at one labelled case: organ Dice (mean over organs 1-6 of each test
case, then over the cases of a seed) per seed, the paired Wilcoxon tests of
``medssl_kit.evaluate.results.paired_wilcoxon`` over (case, seed) pairs and over seeds, and the
seeds ahead; then the kNN readings against a random network's and the cluster NMIs. ``--copy``
puts every run's results.csv / summary.json (and the cluster readings) under docs/results/.
"""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd

from medssl_kit.evaluate.results import load_results, paired_wilcoxon

ORGANS = [1, 2, 3, 4, 5, 6]
SCRATCH = "runs/i32/ft/scratch"
ROWS = [  # label, folder, its baseline (None: the baseline itself)
    ("scratch", SCRATCH, None),
    ("GP (global + pixel, corrected EMA)", "runs/i32/ft/GP", SCRATCH),
    ("GP without skips in pre-training", "runs/i32/ft/GP-noskip", SCRATCH),
    ("ssmtl (no input normalisation)", "runs/i32/ft/ssmtl", SCRATCH),
    ("pixel_global (Ours: every term)", "runs/i32/ft/Ours", SCRATCH),
    ("mixcl (unet, pool labels used)", "runs/i33/ft/mixcl-unet", SCRATCH),
    ("supervised pool start", "runs/i33/ft/sup-pool", SCRATCH),
    ("mixcl vs supervised pool start", "runs/i33/ft/mixcl-unet", "runs/i33/ft/sup-pool"),
]


def frame(folder: str, label: str) -> pd.DataFrame | None:
    parts = [load_results(f) for f in sorted(Path(folder).glob("labeled-*/results.csv"))]
    if not parts:
        return None
    df = pd.concat(parts)
    df["method"] = label
    return df


def per_seed(df: pd.DataFrame) -> pd.Series:
    d = df[(df.labeled == 1) & df.class_id.isin(ORGANS)]
    return d.groupby(["seed", "case"]).dice.mean().groupby("seed").mean()


def p_text(test: dict) -> str:
    p = test["p_value"]
    return "–" if p is None or p != p else f"{p:.3g}"


def comparison_table() -> list[str]:
    out = [
        "| start | organ Dice | per seed (0–7) | p over pairs | p over seeds | seeds ahead "
        "| against |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, folder, base in ROWS:
        df = frame(folder, "x")
        if df is None:
            continue
        s = per_seed(df)
        cells = f"| {label} | {s.mean():.3f} ± {s.std():.3f} | {' / '.join(f'{v:.3f}' for v in s)}"
        if base is None:
            out.append(f"{cells} | – | – | – | – |")
            continue
        both = pd.concat([df, frame(base, "base")])
        pairs = paired_wilcoxon(both, "x", "base", "dice", 1, classes=ORGANS)
        seeds = paired_wilcoxon(both, "x", "base", "dice", 1, classes=ORGANS, unit="seed")
        worse = " worse" if (pairs["median_difference"] or 0) < 0 else ""
        out.append(
            f"{cells} | {p_text(pairs)}{worse} ({pairs['n_pairs']}) | {p_text(seeds)} | "
            f"{seeds['n_ahead']}/{seeds['n_pairs']} | {Path(base).name} |"
        )
    return out


def knn_table() -> list[str]:
    frames = [frame(f"runs/i32/knn/{n}", n) for n in ("random", "GP", "GP-noskip", "ssmtl", "Ours")]
    knn = pd.concat([f for f in frames if f is not None])
    out = ["| kNN features | organ Dice per seed | mean | p over pairs vs random |"]
    out.append("|---|---|---|---|")
    for name in knn.method.unique():
        s = per_seed(knn[knn.method == name])
        test = paired_wilcoxon(knn, name, "random", "dice", 1, classes=ORGANS)
        p = "–" if name == "random" else p_text(test)
        out.append(f"| {name} | {' / '.join(f'{v:.3f}' for v in s)} | {s.mean():.3f} | {p} |")
    return out


def cluster_lines() -> list[str]:
    lines = []
    for f in sorted(Path("runs/i32/clusters").glob("*.json")):
        nmi = json.loads(f.read_text()).get("nmi", {})
        lines.append(f"{f.stem}: " + ", ".join(f"{k} {v:.3f}" for k, v in nmi.items()))
    return lines


def copy_records() -> None:
    for root in ("runs/i32", "runs/i33"):
        files = [*Path(root).rglob("results.csv"), *Path(root).rglob("summary.json")]
        files += list(Path(root).rglob("clusters/*.json"))
        for f in files:
            dest = Path("docs/results") / f.relative_to("runs")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)


if __name__ == "__main__":
    print("\n".join([*comparison_table(), "", *knn_table(), "", *cluster_lines()]))
    if "--copy" in sys.argv:
        copy_records()
