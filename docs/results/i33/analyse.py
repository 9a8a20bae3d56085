"""The tables of docs/results.md for issue 33 §4 (MixCL on the shared UNet), from the run folders.

    python docs/results/i33/analyse.py [--copy] [--records]

At 1 and at 2 labelled cases: scratch, MixCL pre-trained on the partially labelled pool (it uses
the pool's labels) and the supervised start on the same pool's labels, each against scratch, and
MixCL against the supervised start (../paired_tables.py); MixCL with the label term weighted
alpha = 10 instead of the paper's 0.01 (gradient_share.py: at 0.01 it barely reaches the
encoder). At 2 cases, seeds 0-3 and 4-7 are also shown apart: seeds 4-7 ran in a later session
on another machine, with the MixCL and supervised starts pre-trained again there (same commands;
a rerun on other CPU kernels is a new draw of training noise). The paper's own backbone: MixCL
3D on ``unetr`` against ``unetr`` from scratch at 1 and 4 cases; the ablation of the paper's
Table 2 (Id / Id+Label / Id+Label+Recon) at 1 case. Scratch at 1 case is issue 32's run
(data/phantom-pool's train/val/test are data/phantom's, byte for byte). ``--copy`` first puts
every run's results.csv / summary.json under docs/results/, with the cluster readings;
``--records`` reads the tables from those records instead of runs/ (run folders do not outlive
a session; the records hold every run).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paired_tables import cluster_lines, comparison_table, copy_records  # noqa: E402

ROOT = "docs/results" if "--records" in sys.argv else "runs"
FT = f"{ROOT}/i33/ft"
SCRATCH = {1: f"{ROOT}/i32/ft/scratch", 2: f"{FT}/scratch"}
MIXCL, SUP = f"{FT}/mixcl-unet", f"{FT}/sup-pool"
MIXCL_A10 = f"{FT}/mixcl-unet-a10"
UNETR_SCRATCH, MIXCL_UNETR = f"{FT}/unetr-scratch", f"{FT}/mixcl-unetr"
ID, ID_LABEL = f"{FT}/mixcl-unet-id", f"{FT}/mixcl-unet-idlabel"


def rows(labeled: int) -> list[tuple[str, str, str | None]]:
    scratch = SCRATCH[labeled]
    return [
        ("scratch", scratch, None),
        ("mixcl (unet; uses the pool's labels)", MIXCL, scratch),
        ("supervised start on the pool's labels", SUP, scratch),
        ("mixcl against the supervised start", MIXCL, SUP),
        ("mixcl, alpha = 10", MIXCL_A10, scratch),
        ("mixcl, alpha = 10, against the supervised start", MIXCL_A10, SUP),
        ("mixcl, alpha = 10, against alpha = 0.01", MIXCL_A10, MIXCL),
    ]


def unetr_rows() -> list[tuple[str, str, str | None]]:
    return [
        ("unetr from scratch", UNETR_SCRATCH, None),
        ("mixcl 3D on unetr (uses the pool's labels)", MIXCL_UNETR, UNETR_SCRATCH),
    ]


def ablation_rows() -> list[tuple[str, str, str | None]]:
    scratch = SCRATCH[1]
    return [
        ("scratch", scratch, None),
        ("Id", ID, scratch),
        ("Id + Label", ID_LABEL, scratch),
        ("Id + Label + Recon (mixcl)", MIXCL, scratch),
        ("Id + Label against Id", ID_LABEL, ID),
        ("Id + Label + Recon against Id + Label", MIXCL, ID_LABEL),
    ]


if __name__ == "__main__":
    if "--copy" in sys.argv:
        copy_records(["runs/i33"], extra=("clusters/*.json",))
    for labeled in (1, 2):
        print(f"\n{labeled} labelled case(s):")
        print("\n".join(comparison_table(rows(labeled), labeled)))
    print("\n2 labelled cases, seeds 0-3 (first pre-training) and 4-7 (re-run starts) apart:")
    for seeds in ({0, 1, 2, 3}, {4, 5, 6, 7}):
        print("\n".join(comparison_table(rows(2), 2, only_seeds=seeds)))
    for labeled in (1, 4):
        print(f"\nunetr, {labeled} labelled case(s):")
        print("\n".join(comparison_table(unetr_rows(), labeled)))
    print("\nablation (unet, 1 labelled case, the seeds every arm has):")
    print("\n".join(comparison_table(ablation_rows(), 1, only_seeds={0, 1, 2})))
    print("\n" + "\n".join(cluster_lines(f"{ROOT}/i33/clusters")))
