"""Two JAX processes x 4 CPU devices == one process x 8 devices == 1 device.

Launches ``tests/sharding/_train_steps.py`` as two subprocesses that form
one 8-device mesh through the real multi-controller path
(``jax.distributed.initialize`` with an explicit coordinator on localhost,
gloo CPU collectives), each loading only its own half of the batch, plus one
reference subprocess (one process, the same mesh on 8 devices, and 1
device). Three steps of the DPO, reward-model (Bradley–Terry) and GRPO steps
must give the same losses and parameters to 1e-5. The workers then save
the DPO state with the trainers' orbax ``Checkpointer`` and restore it
straight into another sharded layout (each process holding only its own
shards). No network beyond 127.0.0.1.
"""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl.testing import absltest

from tests.sharding import _train_steps

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, devices: int, log):
  env = dict(os.environ)
  # opt level 0: LLVM codegen is the bulk of this test's time; the same
  # flags in every process, so the programs compare like for like.
  env["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={devices} "
    "--xla_backend_optimization_level=0"
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return subprocess.Popen(
    [sys.executable, "-m", "tests.sharding._train_steps", *args],
    cwd=ROOT,
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
  )


def _wait(procs, logs, timeout):
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    tails = []
    for i in failed:
      logs[i].seek(0)
      text = logs[i].read().decode(errors="replace")
      tails.append(
        f"--- process {i} (rc={procs[i].returncode}) ---\n" + text[-3000:]
      )
    raise AssertionError("subprocess failed:\n" + "\n".join(tails))


@pytest.mark.multiprocess
class MultiProcessTest(absltest.TestCase):
  def test_two_processes_match_one_process_and_one_device(self):
    with tempfile.TemporaryDirectory() as tmp:
      dist_out = os.path.join(tmp, "dist.npz")
      ref_out = os.path.join(tmp, "ref.npz")
      port = _free_port()
      logs = [open(os.path.join(tmp, f"log{i}.txt"), "w+b") for i in range(3)]
      try:
        procs = [
          _launch(
            [
              "--mode=worker",
              f"--process_id={i}",
              "--num_processes=2",
              f"--port={port}",
              f"--out={dist_out}",
              f"--ckpt_dir={os.path.join(tmp, 'ckpt')}",
            ],
            4,
            logs[i],
          )
          for i in range(2)
        ]
        procs.append(
          _launch(["--mode=reference", f"--out={ref_out}"], 8, logs[2])
        )
        _wait(procs, logs, timeout=900)
      finally:
        for log in logs:
          log.close()
      dist = dict(np.load(dist_out))
      ref = dict(np.load(ref_out))

    self.assertEqual(int(dist["process_count"]), 2)
    self.assertEqual(int(dist["device_count"]), 8)
    self.assertEqual(int(dist["local_device_count"]), 4)
    # Checkpoint restored into an fsdp=8 layout: exact values, the target
    # shardings, and 4 shards (this process's devices) per parameter.
    self.assertTrue(bool(dist["checkpoint/layout_ok"]))
    self.assertEqual(float(dist["checkpoint/max_abs_diff"]), 0.0)
    self.assertEqual(dist["checkpoint/local_shards"].tolist(), [4])
    for trainer in _train_steps.TRAINERS:
      keys = [k for k in dist if k.startswith(f"{trainer}/")]
      self.assertGreater(len(keys), 5, trainer)
      losses = dist[f"{trainer}/losses"]
      self.assertLen(losses, _train_steps.STEPS)
      self.assertTrue(np.all(np.isfinite(losses)), trainer)
      # The steps really train: the loss moves far more than the tolerance.
      self.assertGreater(abs(losses[0] - losses[-1]), 100 * TOL, trainer)
      for key in keys:
        for prefix in ("8dev/", "1dev/"):
          np.testing.assert_allclose(
            dist[key],
            ref[prefix + key],
            rtol=0,
            atol=TOL,
            err_msg=f"2 processes vs {prefix[:-1]}: {key}",
          )


if __name__ == "__main__":
  absltest.main()
