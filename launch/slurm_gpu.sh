#!/usr/bin/env bash
# Multi-node GPU run through SLURM: one process per node, all GPUs of a node
# local to it. Submit with sbatch, e.g.
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm_gpu.sh \
#       configs/preference.py runs/dpo --config.batch_size=512
#SBATCH --job-name=alignment
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config="$1"; workdir="$2"; shift 2
REPO="${REPO:-$SLURM_SUBMIT_DIR}"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export ALIGNMENT_DISTRIBUTED=1
export ALIGNMENT_COORDINATOR="${head_node}:${COORDINATOR_PORT:-29500}"
export ALIGNMENT_NUM_PROCESSES="$SLURM_NTASKS"
# Each task reads its own rank from SLURM_PROCID inside srun.
srun --kill-on-bad-exit=1 bash -c "cd $REPO && ALIGNMENT_PROCESS_ID=\$SLURM_PROCID \
  .venv/bin/python -m alignment.main --config=$config --workdir=$workdir $*"
