#!/usr/bin/env bash
# The GPU path's check (issue 37), for a machine with a CUDA GPU; about 5-8 minutes:
#
#   1. the test suite's GPU-marked tests (pytest -m gpu: every method pre-trains on cuda in mixed
#      precision and resumes on the CPU, a fine-tune on cuda, SyncBatchNorm, and with two GPUs
#      a 2-process DDP run with nccl);
#   2. the smoke pre-training and fine-tuning commands with --device cuda (the pipeline,
#      `medssl run`, takes no --device: its notebooks train on the default device `auto`,
#      which is the GPU wherever PyTorch sees one);
#   3. with two GPUs or more, a 2-process DDP smoke run of each command (--nproc 2);
#   4. 20 pre-training steps of every method at the gpu profile, on a small phantom of the gpu
#      profile's volume size: seconds per step and peak GPU memory, a Markdown table in OUT.
#
# Each stage has a time limit, and a failed stage does not stop the later ones: the script lists
# the failed stages at the end and exits 1 if there are any.
#
# Usage: scripts/gpu_check.sh [OUT.md]      (default OUT: gpu_check.md in the current folder)
# PYTHON=/path/to/python chooses the interpreter (default: .venv/bin/python, else python).
# CI never runs this: it has no GPU, and nothing in the package or the test suite needs one.
set -euo pipefail

OUT=$(realpath -m "${1:-gpu_check.md}")
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
FAILED=()
stage() { echo "== [$(( SECONDS - START )) s] $*" >&2; }
check() {  # check NAME SECONDS COMMAND...: run it with a time limit, note a failure
  local name=$1 limit=$2
  shift 2
  if ! timeout "$limit" "$@"; then FAILED+=("$name"); echo "-- $name FAILED" >&2; fi
}

NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if (( NGPU == 0 )); then
  echo "gpu_check: PyTorch sees no CUDA GPU on this machine; nothing to check" >&2
  exit 1
fi
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'

stage "1/4 GPU-marked tests"
check "gpu tests" 150 env MEDSSL_PROFILE=smoke \
  "$PY" -m pytest tests/test_distributed.py -m gpu -q -p no:cacheprovider

stage "2/4 smoke pre-training and fine-tuning with --device cuda"
"$PY" -m medssl_kit phantom --out "$WORK/smoke" --profile smoke --workers 4 >/dev/null
check "smoke pretrain" 60 "$PY" -m medssl_kit pretrain --method pcrlv2 --manifest "$WORK/smoke" \
  --profile smoke --out "$WORK/pretrain" --device cuda
check "smoke finetune" 60 "$PY" -m medssl_kit finetune --init "$WORK/pretrain" \
  --manifest "$WORK/smoke" --profile smoke --labeled 1 --out "$WORK/finetune" --device cuda

stage "3/4 2-process DDP smoke"
if (( NGPU >= 2 )); then
  check "ddp pretrain" 90 "$PY" -m medssl_kit pretrain --method simsiam --manifest "$WORK/smoke" \
    --profile smoke --out "$WORK/ddp-pretrain" --device cuda --nproc 2 --set batch_size=4
  check "ddp finetune" 90 "$PY" -m medssl_kit finetune --manifest "$WORK/smoke" \
    --profile smoke --labeled 1 --out "$WORK/ddp-finetune" --device cuda --nproc 2
else
  echo "one GPU: the DDP smoke needs two, skipped"
fi

stage "4/4 20 pre-training steps of every method at the gpu profile"
"$PY" -m medssl_kit phantom --out "$WORK/gpu" --profile gpu --cases 8 --workers 8 >/dev/null
# methods start while the script is under 7 minutes; each takes well under a minute
BUDGET=$(( 420 - (SECONDS - START) ))
(( BUDGET < 60 )) && BUDGET=60
check "timing" $(( BUDGET + 90 )) "$PY" - "$WORK/gpu" "$OUT" "$BUDGET" <<'PY'
"""Seconds per step and peak GPU memory of 20 steps of every method at the gpu profile."""
import sys
import tempfile
import time

import torch

from medssl_kit.train.distributed import precision
from medssl_kit.train.pretrain import PretrainConfig, run_pretraining

manifest, out, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
METHODS = [("pixel_global", 2), ("pcrlv2", 2), ("pcrlv2", 3), ("mixcl", 3), ("mixcl", 2),
           ("ssmtl", 2), ("ssmtl_plus", 2), ("simsiam", 2), ("byol", 2), ("mocov2", 2),
           ("models_genesis", 2), ("models_genesis", 3)]
STEPS, UNTIMED = 20, 3
device = torch.device("cuda", 0)
dtype = precision(device, True).dtype
started = time.perf_counter()
rows = []
for name, dims in METHODS:
    cfg = PretrainConfig(method=name, profile="gpu", dims=dims, steps=STEPS, device="cuda",
                         checkpoint_every=STEPS)
    sizes = cfg.resolved()
    view = "x".join(map(str, sizes.patch_size if dims == 3 else sizes.crop_size))
    what = f"| `{name}` | {dims}D | {sizes.backbone} | {sizes.batch_size} | {view} |"
    if time.perf_counter() - started > budget:
        rows.append(f"{what} not run (time budget) | | | |")
        continue
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_pretraining(cfg, manifest, f"{tmp}/run", progress=False)
        times = sorted(r["seconds"] for r in result.history[UNTIMED:])
        wall = result.summary["wall_time_s"] / STEPS
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(f"{what} {times[len(times) // 2]:.3f} | {wall:.3f} | {peak:.1f} | "
                    f"{result.history[-1]['loss']:.4g} |")
    except Exception as err:  # noqa: BLE001 - one method's failure is a row, not the end
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        rows.append(f"{what} failed: {type(err).__name__}: {first[:120]} | | | |")
    print(rows[-1], flush=True)
header = [
    f"# Pre-training at the gpu profile: {torch.cuda.get_device_name(device)}",
    "",
    f"torch {torch.__version__}, CUDA {torch.version.cuda}; autocast {dtype}; {STEPS} steps per "
    f"method (median of steps {UNTIMED + 1}-{STEPS}: forward, backward, optimiser step; wall: "
    "the loop's time per step, batches built in DataLoader workers); peak = "
    "torch.cuda.max_memory_allocated; phantom of 8 cases at the gpu profile's 96x256x256 "
    "(scripts/gpu_check.sh).",
    "",
    "| method | dims | backbone | batch | view / patch | s/step | wall s/step | peak GiB "
    "| last loss |",
    "|---|---|---|---|---|---|---|---|---|",
]
with open(out, "w") as f:
    f.write("\n".join(header + rows) + "\n")
print(f"wrote {out}")
PY
if (( ${#FAILED[@]} )); then
  stage "failed: ${FAILED[*]}"
  exit 1
fi
stage "all passed; the timing table is in $OUT"
