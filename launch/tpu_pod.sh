#!/usr/bin/env bash
# Runs one experiment on every worker of a Cloud TPU VM pod slice.
#   TPU=my-v5e-256 ZONE=us-west4-a launch/tpu_pod.sh configs/rl.py gs://bucket/runs/grpo [--config.k=v ...]
# Every worker runs the same command; jax.distributed.initialize() reads the
# coordinator and process ids from the TPU environment (ALIGNMENT_DISTRIBUTED=1).
# The repo is expected at ~/alignment on every worker (REPO to override), with
# its .venv built by `make .venv/.installed-stamp` plus `pip install -e '.[tpu]'`.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE}"
config="$1"; workdir="$2"; shift 2
REPO="${REPO:-~/alignment}"
overrides=""
for a in "$@"; do overrides+=" $(printf '%q' "$a")"; done
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd $REPO && ALIGNMENT_DISTRIBUTED=1 .venv/bin/python -m alignment.main --config=$config --workdir=$workdir$overrides"
