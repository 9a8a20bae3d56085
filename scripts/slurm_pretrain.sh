#!/usr/bin/env bash
# Pre-training on several GPU nodes with SLURM (DESIGN §5.4): srun starts one torchrun per node,
# each torchrun one worker per GPU, and the nodes meet at the first node's c10d rendezvous
# endpoint. The batch size stays the global batch (it must divide by nodes x GPUs).
#
#   sbatch scripts/slurm_pretrain.sh METHOD MANIFEST RUN_DIR [more medssl pretrain options]
#   sbatch --nodes=4 scripts/slurm_pretrain.sh pixel_global data_manifests/my-ct.json \
#       runs/pg-gpu --set batch_size=64
#
# RUN_DIR must be on a file system every node sees (rank 0 writes it, every rank reads the
# checkpoint on --resume). Submitted again (or requeued) with the same RUN_DIR, the job continues
# from the last checkpoint. PYTHON chooses the interpreter (default: python on the PATH, e.g. the
# project's activated .venv); MEDSSL_RDZV_PORT the rendezvous port (default 29500).
#
#SBATCH --job-name=medssl-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

METHOD=${1:?usage: slurm_pretrain.sh METHOD MANIFEST RUN_DIR [options]}
MANIFEST=${2:?usage: slurm_pretrain.sh METHOD MANIFEST RUN_DIR [options]}
RUN_DIR=${3:?usage: slurm_pretrain.sh METHOD MANIFEST RUN_DIR [options]}
shift 3

GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MEDSSL_RDZV_PORT:-29500}
PY=${PYTHON:-python}
# the node's cores shared between its workers (each also builds batches in DataLoader workers)
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / GPUS / 2 > 0 ? ${SLURM_CPUS_PER_TASK:-$(nproc)} / GPUS / 2 : 1 ))

RESUME=()
[[ -f "$RUN_DIR/checkpoint.pt" ]] && RESUME=(--resume)

srun --kill-on-bad-exit=1 "$PY" -m torch.distributed.run \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" \
  -m medssl_kit pretrain --method "$METHOD" --manifest "$MANIFEST" --profile gpu \
  --out "$RUN_DIR" --device cuda ${RESUME[@]+"${RESUME[@]}"} "$@"
