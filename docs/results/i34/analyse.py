"""The tables of docs/results.md for issue 34 §4 (vox2vec and hierarchical dense SSL on the FPN).

    python docs/results/i34/analyse.py [--copy] [--records]

The runs are docs/results/i34/queue.sh's, at the cpu profile on data/phantom, 3D on the fpn:
the linear probe (backbone frozen, one 1x1 convolution per pyramid level, all 8 labelled cases)
of a random-init FPN, vox2vec and hierarchical_dense, each pre-trained within the cpu profile's
10-minute budget; the paper's ablation (one of its switches on top of vox2vec) at the linear
probe; and the non-linear fine-tuning (the paper's: head first, then the backbone on an
exponential ramp) at 1, 2, 4 and all labelled cases (those that have runs) against the same
network from scratch (every layer training from the first step). ``--copy`` first puts every
run's results.csv / summary.json under docs/results/; ``--records`` reads the tables from those
records instead of runs/ (run folders do not outlive a session).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paired_tables import ORGANS, comparison_table, copy_records, frame  # noqa: E402

ROOT = "docs/results" if "--records" in sys.argv else "runs"
PROBE, FT = f"{ROOT}/i34/probe", f"{ROOT}/i34/ft"
ALL = 8  # the phantom's train split: "all" labelled cases
HD_MG = "hierarchical_dense-mg"  # made with Models Genesis' transforms, before 52b89d8


def ablation() -> list[tuple[str, str, str | None]]:
    """The paper's Table 1 at the linear probe: one switch on top of vox2vec (same 185 steps),
    and all three (hierarchical_dense, at its own 156-step budget); then the parts of the local
    augmentation, and the runs made with Models Genesis' transforms before 52b89d8 (*-mg)."""
    v = f"{PROBE}/vox2vec"
    parts = [
        ("vox2vec + aug, the curve only, reversed half the time (MG)", "aug-inverting-curve-only"),
        ("vox2vec + aug, shuffling + in-painting, no curve", "aug-no-curve"),
        ("vox2vec + aug with Models Genesis' transforms (MG)", "aug-mg"),
    ]
    return [
        ("vox2vec", v, None),
        *[(f"vox2vec + {k} against vox2vec", f"{v}+{k}", v) for k in ("aug", "arch", "recon")],
        ("all three (hierarchical_dense) against vox2vec", f"{PROBE}/hierarchical_dense", v),
        *[(f"{label} against vox2vec", f"{v}+{k}", v) for label, k in parts],
        ("hierarchical_dense, MG's transforms, against vox2vec", f"{PROBE}/{HD_MG}", v),
    ]


def pretraining() -> list[str]:
    """Each pre-training run's loss terms: the mean of its first and last 10 steps."""
    out = ["| run | steps | InfoNCE, first → last 10 | MSE, first → last 10 |", "|---|---|---|---|"]
    for f in sorted(Path(f"{ROOT}/i34/pretrain").glob("*/metrics.jsonl")):
        rows = [r for r in map(json.loads, f.read_text().splitlines()) if "infonce" in r]

        def mean(key: str, part: list[dict]) -> str:
            return f"{sum(r[key] for r in part) / len(part):.3f}" if key in part[0] else "–"

        terms = [f"{mean(k, rows[:10])} → {mean(k, rows[-10:])}" for k in ("infonce", "mse")]
        out.append(f"| {f.parent.name} | {len(rows)} | {terms[0]} | {terms[1]} |")
    return out


def against(root: str, base: str) -> list[tuple[str, str, str | None]]:
    hd, mg = f"{root}/hierarchical_dense", f"{root}/hierarchical_dense-mg"
    return [
        (base, f"{root}/{base}", None),
        (f"vox2vec against {base}", f"{root}/vox2vec", f"{root}/{base}"),
        (f"hierarchical_dense against {base}", hd, f"{root}/{base}"),
        ("hierarchical_dense against vox2vec", hd, f"{root}/vox2vec"),
        (f"hierarchical_dense with MG's transforms against {base}", mg, f"{root}/{base}"),
        ("hierarchical_dense with MG's transforms against vox2vec", mg, f"{root}/vox2vec"),
    ]


def organs(root: str, names: list[str], labeled: int) -> list[str]:
    """Each start's organ Dice (mean over its seeds; liver / spleen / kidneys L, R / aorta /
    vertebra) and organ HD95 (mm), at ``labeled`` cases."""
    out = []
    for name in names:
        df = frame(f"{root}/{name}", name, labeled)
        if df is None:
            continue
        df = df[df.class_id.isin(ORGANS)]
        dice = df.groupby("class_id").dice.mean()
        seeds = sorted(df.seed.unique())
        out.append(
            f"{name} (seeds {'/'.join(map(str, seeds))}): "
            f"{' / '.join(f'{v:.2f}' for v in dice)}, HD95 {df.hd95.mean():.1f} mm"
        )
    return out


if __name__ == "__main__":
    if "--copy" in sys.argv:
        copy_records(["runs/i34"], extra=("pretrain/*/metrics.jsonl",))
    print("\npre-training (loss terms):")
    print("\n".join(pretraining()))
    print("\nlinear probe, all 8 labelled cases:")
    print("\n".join(comparison_table(against(PROBE, "random"), ALL)))
    starts = ["vox2vec", "hierarchical_dense", HD_MG]
    print("\n".join(organs(PROBE, ["random", *starts], ALL)))
    print("\nablation (linear probe, all 8 labelled cases):")
    print("\n".join(comparison_table(ablation(), ALL)))
    longer = comparison_table(
        [
            ("vox2vec, 4x steps", f"{PROBE}/vox2vec-x4", None),
            (
                "vox2vec + aug, 4x steps, against vox2vec 4x",
                f"{PROBE}/vox2vec+aug-x4",
                f"{PROBE}/vox2vec-x4",
            ),
            (
                "hierarchical_dense, 4x steps, against vox2vec 4x",
                f"{PROBE}/hierarchical_dense-x4",
                f"{PROBE}/vox2vec-x4",
            ),
            # what 4x the steps gave each: against its own run at the budget (the x4 run's
            # first 185 / 156 steps are that run, step for step: same seed, constant rate)
            ("vox2vec, 4x steps, against vox2vec", f"{PROBE}/vox2vec-x4", f"{PROBE}/vox2vec"),
            (
                "vox2vec + aug, 4x steps, against vox2vec + aug",
                f"{PROBE}/vox2vec+aug-x4",
                f"{PROBE}/vox2vec+aug",
            ),
            (
                "hierarchical_dense, 4x steps, against hierarchical_dense",
                f"{PROBE}/hierarchical_dense-x4",
                f"{PROBE}/hierarchical_dense",
            ),
        ],
        ALL,
    )
    if len(longer) > 2:
        print("\nlonger pre-training (4x the budget), linear probe:")
        print("\n".join(longer))
        x4 = ["vox2vec-x4", "vox2vec+aug-x4", "hierarchical_dense-x4"]
        print("\n".join(organs(PROBE, x4, ALL)))
    for labeled in (1, 2, 4, ALL):
        table = comparison_table(against(FT, "scratch"), labeled)
        if len(table) > 2:
            print(f"\nnon-linear fine-tuning, {labeled} labelled case(s):")
            print("\n".join(table))
            print("\n".join(organs(FT, ["scratch", *starts], labeled)))
