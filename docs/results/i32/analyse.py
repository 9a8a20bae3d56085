"""The tables of docs/results.md for issue 32 §3, from the run folders (issue 33's: ../i33/).

    python docs/results/i32/analyse.py [--copy]

Each start against its scratch at one labelled case: organ Dice (mean over organs 1-6 of each test
case, then over the cases of a seed) per seed, the paired Wilcoxon tests of
``medssl_kit.evaluate.results.paired_wilcoxon`` over (case, seed) pairs and over seeds, and the
seeds ahead; then the kNN readings against a random network's and the cluster NMIs. ``--copy``
puts every run's results.csv / summary.json (and the cluster readings) under docs/results/.
"""

import sys
from pathlib import Path

import pandas as pd

from medssl_kit.evaluate.results import paired_wilcoxon

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paired_tables import (  # noqa: E402
    ORGANS,
    cluster_lines,
    comparison_table,
    copy_records,
    frame,
    p_text,
    per_seed,
)

SCRATCH = "runs/i32/ft/scratch"
ROWS = [  # label, folder, its baseline (None: the baseline itself)
    ("scratch", SCRATCH, None),
    ("GP (global + pixel, corrected EMA)", "runs/i32/ft/GP", SCRATCH),
    ("GP without skips in pre-training", "runs/i32/ft/GP-noskip", SCRATCH),
    ("ssmtl (no input normalisation)", "runs/i32/ft/ssmtl", SCRATCH),
    ("pixel_global (Ours: every term)", "runs/i32/ft/Ours", SCRATCH),
]


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


if __name__ == "__main__":
    clusters = cluster_lines("runs/i32/clusters")
    print("\n".join([*comparison_table(ROWS), "", *knn_table(), "", *clusters]))
    if "--copy" in sys.argv:
        copy_records(["runs/i32"], extra=("clusters/*.json",))
