#!/usr/bin/env bash
# Runs one experiment on this machine.
#   launch/local.sh configs/preference.py:runlocal runs/dpo [--config.k=v ...]
# Set FAKE_DEVICES=8 to emulate an 8-device mesh on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; workdir="$2"; shift 2
PY="${PYTHON:-.venv/bin/python}"
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  # Fake devices are threads of this process: on a loaded machine one can
  # be more than XLA's default 40 s late to a collective, which aborts.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES} --xla_cpu_collective_call_terminate_timeout_seconds=600"
  export JAX_PLATFORMS=cpu
fi
exec "$PY" -m alignment.main --config="$config" --workdir="$workdir" "$@"
