"""Global test settings. Runs before any test imports jax or alignment."""

import os

# 8 fake CPU devices for sharding tests. The test programs are tiny, so
# XLA's expensive backend passes cost far more compile time than they save
# (measured: a 2-step SFT run goes from 20 s to 11 s of CPU). The 8 devices'
# collectives rendezvous in-process, and XLA:CPU aborts the whole process
# when one device thread is 40 s late (seen in the quick-pipeline test under
# the full suite's load on 2 cores: "Termination timeout for `all gather`
# ... only 7 of them arrived on time"): wait 10 minutes instead.
os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=8"
  " --xla_backend_optimization_level=0"
  " --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_collective_call_terminate_timeout_seconds=600",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)


def pytest_collection_modifyitems(config, items):
  del config
  if jax.default_backend() != "cpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU or TPU")
  for item in items:
    if "accelerator" in item.keywords:
      item.add_marker(skip)
