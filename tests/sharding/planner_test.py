"""The memory planner: analytic figures, compiled agreement, CLI.

The compiled comparisons run the CLI (``python -m
alignment.sharding.planner --compile --json``) in two subprocesses with 8
fake CPU devices and LLVM optimisation off (buffer assignment, hence the
memory analysis, is the same; codegen is most of the compile time).
"""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from absl.testing import absltest

from alignment import models
from alignment.sharding import planner

ROOT = pathlib.Path(__file__).resolve().parents[2]
GiB = 2**30


def _cli_json(*args) -> subprocess.Popen:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0"
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "alignment.sharding.planner",
      "--json",
      "--compile",
      "--dtype=float32",
      *args,
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _records(proc) -> list[dict]:
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.slow
class CompiledAgreementTest(absltest.TestCase):
  """Analytic (XLA:CPU assumptions) vs compiled, within 10%."""

  def test_tiny_and_small_presets(self):
    tiny = _cli_json(
      "--presets=tiny",
      "--meshes=cpu-8",
      "--trainers=sft,dpo,reward_model,grpo",
      "--batch=8",
      "--seq_len=64",
      "--num_samples=2",
      "--no_remat",
    )
    small = _cli_json(
      "--presets=small",
      "--meshes=data:1,fsdp:1,tensor:1",
      "--trainers=sft,dpo,reward_model",
      "--batch=2",
      "--seq_len=128",
      "--no_remat",
    )
    records = _records(tiny) + _records(small)
    self.assertLen(records, 7)
    for r in records:
      name = f"{r['preset']}/{r['workload']['trainer']}/{r['mesh']}"
      self.assertIsNotNone(r["compiled_total"], name)
      ratio = r["xla_cpu_estimate"] / r["compiled_total"]
      self.assertBetween(ratio, 0.9, 1.1, f"{name}: {ratio:.3f}")
      # Parameters, optimiser state and (when donated) the new state are
      # the compiled program's arguments and outputs.
      state = r["params"] + r["opt_state"] + r["reference"]
      self.assertBetween(
        r["compiled_arguments"] / (state + r["batch"]), 0.99, 1.01, name
      )
      if r["workload"]["trainer"] == "grpo":
        # The sampler's prefill returns exactly the KV cache.
        self.assertBetween(
          r["compiled_kv_cache"] / r["kv_cache"], 0.99, 1.01, name
        )


class AnalyticTest(absltest.TestCase):
  def test_state_bytes_of_a_7b_preset_on_8xh100(self):
    p = planner.plan(
      "llama-3-8b", "8xH100", planner.default_workload("dpo", "8xH100")
    )
    cfg = models.get_preset("llama-3-8b")
    self.assertEqual(p.num_params, cfg.num_params())
    self.assertEqual(p.params, cfg.num_params() * 4 // 8)
    # AdamW: two float32 moments (plus a few counters), like the params.
    self.assertBetween(p.opt_state - 2 * p.params, 0, 64)
    self.assertEqual(p.grads, p.params)
    self.assertEqual(p.reference, p.params)
    self.assertEqual(p.workload.batch, 8)  # one pair per batch shard
    self.assertEqual(p.kv_cache, 0)

  def test_kv_cache_and_remat(self):
    mesh = "8xH100"
    workload = planner.default_workload(
      "grpo", mesh, batch=8, seq_len=1024, num_samples=4
    )
    p = planner.plan(
      "llama-3-8b", mesh, workload, model_overrides={"dtype": "bfloat16"}
    )
    cfg = models.get_preset("llama-3-8b")
    rows = 8 * 4 // 8  # per device
    want = 2 * cfg.n_layers * rows * 1024 * cfg.n_kv_heads * cfg.head_dim * 2
    want += rows * 1024 * 4  # key positions
    self.assertEqual(p.kv_cache, want)
    self.assertLess(p.activations_remat.peak, p.activations_no_remat.peak / 4)
    self.assertLess(p.total(True), p.total(False))
    self.assertGreaterEqual(p.total(True), p.sampling_peak())

  def test_tensor_parallel_splits_activations(self):
    fsdp = planner.plan(
      "llama-3-8b", "8xH100", planner.default_workload("sft", "8xH100", batch=8)
    )
    tp = planner.plan(
      "llama-3-8b",
      "8xH100/fsdp=2,tensor=4",
      planner.default_workload("sft", "8xH100", batch=8),
    )
    self.assertEqual(tp.mesh_axes, {"data": 1, "fsdp": 2, "tensor": 4})
    self.assertAlmostEqual(tp.params / fsdp.params, 1.0, delta=0.01)
    # 4x the rows per device, heads and MLP split 4 ways.
    self.assertLess(
      tp.activations_no_remat.saved, 4 * fsdp.activations_no_remat.saved
    )
    self.assertGreater(
      tp.activations_no_remat.saved, fsdp.activations_no_remat.saved
    )

  def test_bad_mesh_arguments(self):
    with self.assertRaisesRegex(ValueError, r"has 512 devices but 256"):
      planner.resolve_mesh("v5e-256/fsdp=512")
    with self.assertRaisesRegex(ValueError, r"NAME/axis=size"):
      planner.resolve_mesh("v5e-256/fsdp")
    with self.assertRaisesRegex(ValueError, r"neither a named mesh"):
      planner.resolve_mesh("tpu-42")

  def test_cli_table(self):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      rc = planner.main(
        [
          "--presets=llama-3.2-1b",
          "--meshes=v5e-256,8xH100",
          "--trainers=sft,grpo",
        ]
      )
    self.assertEqual(rc, 0)
    lines = [x for x in buf.getvalue().splitlines() if x.startswith("| ll")]
    self.assertLen(lines, 4)
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    self.assertEqual(cells[:3], ["llama-3.2-1b", "v5e-256", "sft"])
    self.assertEqual(float(cells[13]), 16.0)  # v5e HBM, GiB
    self.assertIn(cells[14], ("yes", "remat only", "no"))
    self.assertTrue(np.isfinite(float(cells[11])))


if __name__ == "__main__":
  absltest.main()
