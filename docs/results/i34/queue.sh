#!/usr/bin/env bash
# Issue 34 §4: the runs behind docs/results.md "vox2vec and hierarchical dense SSL on the FPN".
# Two jobs side by side at one thread each (2 cores); a job whose summary.json exists is skipped,
# a killed one resumes from its checkpoint, a fine-tuning job waits for its pre-training; the
# list runs in order (pre-training, probes, ablation pre-training and probes, fine-tuning at 1 and 2
# labelled cases × 8 seeds with the remaining probe seeds among the first, at 4 and all × 3 seeds),
# except the longer pre-training test (4x the budget, probes), which runs before fine-tuning seeds
# 6-7 at one case (moved there on 2026-12-07: it decides what the comparison's shortfall is).
# A job holds a lock on OUT.lock while it runs, so a second queue started beside the first skips
# it instead of running it twice.
# The *-mg runs in docs/results/i34 (hierarchical_dense-mg, vox2vec+aug-mg) were made before
# 52b89d8 changed the local augmentation to the public code's (see
# medssl_kit/methods/hierarchical_dense.py); they are records, not in this list.
# Run from the repository root:
#     bash docs/results/i34/queue.sh
set -u
export OMP_NUM_THREADS=1
M=data/phantom
MEDSSL=${MEDSSL:-.venv/bin/medssl}
[ -f $M/manifest.json ] || $MEDSSL phantom --out $M --profile cpu

job() {  # job OUT_DIR WAIT_FOR_RUN_OR_- medssl-arguments...
    local out=$1 dep=$2; shift 2
    [ -f "$out/summary.json" ] && return 0
    mkdir -p "$(dirname "$out")"
    exec 9> "$out.lock"
    flock -n 9 || return 0  # running in another queue
    if [ "$dep" != - ]; then while [ ! -f "$dep/summary.json" ]; do sleep 20; done; fi
    local rc
    # --resume: a run killed at a stop continues from its checkpoint (a new folder starts afresh)
    { echo "start $(date -u +%FT%TZ) $*"; "$MEDSSL" "$@" --out "$out" --resume; rc=$?; echo "end $(date -u +%FT%TZ) rc $rc"; } \
        > "$out.log" 2>&1
}
export -f job
export M MEDSSL

P=runs/i34/pretrain
pre="pretrain --method vox2vec --manifest $M --profile cpu --seed 0 --set aug=true"  # vox2vec + aug
probe() {  # probe NAME SEED: the linear probe of runs/i34/pretrain/NAME (random: a random FPN)
    if [ $1 = random ]; then src=scratch dep=-; else src=$P/$1 dep=$P/$1; fi
    echo "runs/i34/probe/$1/labeled-all_seed-$2 $dep finetune --init $src --backbone fpn --dims 3 --mode linear --labeled all --manifest $M --profile cpu --seed $2"
}
longer() {  # does the local augmentation pay after a longer pre-training? vox2vec, vox2vec + aug
    # and hierarchical_dense at 4x their 10-minute budgets (740, 740, 624 steps), probe seeds 0, 1
    local n s args
    for n in "vox2vec 740" "vox2vec+aug 740" "hierarchical_dense 624"; do
        set -- $n
        case $1 in vox2vec+aug) args="$pre";; *) args="pretrain --method $1 --manifest $M --profile cpu --seed 0";; esac
        echo "$P/$1-x4 - $args --steps $2"
    done
    for n in vox2vec vox2vec+aug hierarchical_dense; do for s in 0 1; do probe $n-x4 $s; done; done
}
list() {
    echo "$P/vox2vec - pretrain --method vox2vec --manifest $M --profile cpu --seed 0"
    echo "$P/hierarchical_dense - pretrain --method hierarchical_dense --manifest $M --profile cpu --seed 0"
    for s in 0 1; do for init in random vox2vec; do probe $init $s; done; done
    # the ablation (the paper's Table 1): one switch on top of vox2vec, vox2vec's 185 steps
    echo "$P/vox2vec+aug - $pre"
    for switch in arch recon; do
        echo "$P/vox2vec+$switch - pretrain --method vox2vec --manifest $M --profile cpu --seed 0 --set $switch=true"
    done
    for init in random vox2vec; do probe $init 2; done
    probe hierarchical_dense 0; probe vox2vec+aug 0
    # which part of the local augmentation costs what: the old curve (reversed half the time,
    # as Models Genesis) alone, and shuffling + in-painting without a curve (one probe seed each)
    echo "$P/vox2vec+aug-inverting-curve-only - $pre --set shuffle_rate=0 --set inpaint_boxes=0 --set invert_rate=0.5"
    echo "$P/vox2vec+aug-no-curve - $pre --set nonlinear_rate=0"
    probe vox2vec+aug-inverting-curve-only 0; probe vox2vec+aug-no-curve 0
    for n in 1 2 4 all; do
        seeds="0 1 2 3 4 5 6 7"; case $n in 4|all) seeds="0 1 2";; esac
        for s in $seeds; do
            if [ $n = 1 ] && [ $s = 6 ]; then longer; fi
            for init in scratch vox2vec hierarchical_dense; do
                # scratch: the same network and head, every layer training from the first step
                if [ $init = scratch ]; then src=scratch dep=- x="--set unfreeze_at=0 --set ramp_fraction=0"
                else src=$P/$init dep=$P/$init x=; fi
                # (no trailing blank: xargs -L 1 would join the next line to this one)
                echo "runs/i34/ft/$init/labeled-${n}_seed-$s $dep finetune --init $src --backbone fpn --dims 3 --mode nonlinear --labeled $n --manifest $M --profile cpu --seed $s${x:+ $x}"
            done
            # the remaining probe seeds, between the first seeds of the one-case comparison
            if [ $n = 1 ] && [ $s -lt 3 ]; then
                for p in "hierarchical_dense 1" "vox2vec+aug 1" "arch 2" "hierarchical_dense 2" "vox2vec+aug 2" "recon 1" "recon 2"; do
                    set -- $p; case $1 in arch|recon) probe vox2vec+$1 $2;; *) probe $1 $2;; esac
                done | sed -n "$((s * 3 + 1)),$((s * 3 + 3))p"
            fi
        done
    done
}
list | xargs -P 2 -L 1 bash -c 'job "$@"' _
