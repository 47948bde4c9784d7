"""Preemption and resume of the online trainers (GRPO and online DPO).

``tests/trainers/preemption_test.py`` proves that an offline run killed and
restarted ends bitwise identical to an uninterrupted one. The online
trainers carry more state across iterations (the prompt iterator, the
sampling keys, the adaptive-KL coefficient, online DPO's swapped
reference), so each is run here three times, in-process on this process's
8 CPU devices (runlocal's batch of 8 prompts splits over them), from
``configs/<name>.py:runlocal``:

1. uninterrupted, ``STEPS`` iterations;
2. stopped after iteration ``STOP`` through the trainer's own preemption
   path (the SIGTERM flag, raised here without a signal): it saves a
   checkpoint and exits with ``Preempted`` (143);
3. restarted on the same workdir: it restores and runs to ``STEPS``.

Run 3 must end with bitwise identical parameters and write the same
metrics file and history as run 1. Runs share a persistent compilation
cache, so each program compiles once.
"""

import json
import pathlib
import tempfile
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest, parameterized

from alignment import sharding, trainers
from alignment.trainers import _setup, common
from tests.trainers import _util

STEPS, STOP = 2, 1
# config name -> (metrics file stem, history file)
CASES = {
  "rl": ("rl", "rl_history.json"),
  "online_preference": ("online_preference", "online_history.json"),
}
_TMP = None
_CACHE = None


def setUpModule():
  global _TMP, _CACHE
  _TMP = tempfile.TemporaryDirectory(prefix="alignment-resume-online-")
  _CACHE = _util.compilation_cache()
  _CACHE.__enter__()


def tearDownModule():
  _CACHE.__exit__(None, None, None)
  _TMP.cleanup()


class _StopAfter:
  """Stands in for ``common._Preemption``: requests a stop once the metrics
  file holds iteration ``step`` (the loop polls ``requested`` right after
  logging each iteration, as it does for SIGTERM)."""

  def __init__(self, metrics: pathlib.Path, step: int):
    self._metrics, self._step = metrics, step

  def __call__(self):
    return self

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  @property
  def requested(self) -> bool:
    if not self._metrics.exists():
      return False
    rows = common.read_metrics(self._metrics)
    return bool(rows) and rows[-1]["step"] >= self._step


def _config(name):
  config = _util.load_config(name, "runlocal")
  config.total_steps = STEPS
  config.progress = False
  config.checkpoint.async_save = False
  if name == "rl":
    # The adaptive-KL controller's coefficient is logged every iteration
    # (and with kl.mode="reward" shapes the rewards): its state must
    # survive the restart.
    config.kl.adaptive = True
  return config


def _params(state):
  return jax.device_get(state["params"])


class ResumeOnlineTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(n, n) for n in CASES])
  def test_runlocal_batch_splits_over_eight_devices(self, name):
    # The runs below use runlocal's own batch on this process's 8 devices.
    self.assertEqual(jax.device_count(), 8)
    config = _util.load_config(name, "runlocal")
    mesh, rules = _setup.mesh_of(config), _setup.rules_of(config)
    self.assertEqual(sharding.batch_shard_count(mesh, rules), 8)
    sharding.check_batch_size(config.batch_size, mesh, rules)
    for devices in (1, 2, 4):  # smaller hosts
      self.assertEqual(config.batch_size % devices, 0)

  @parameterized.named_parameters(*[(n, n) for n in CASES])
  def test_preempted_then_resumed_run_is_bitwise_identical(self, name):
    stem, history_file = CASES[name]
    root = pathlib.Path(_TMP.name) / name
    trainer = trainers.get_trainer(name)
    reference = root / "reference"
    ref_state, *_ = trainer.run(_config(name), str(reference))

    resumed = root / "resumed"
    stop = _StopAfter(resumed / f"metrics_{stem}.jsonl", STOP)
    with mock.patch.object(common, "_Preemption", stop):
      with self.assertRaises(common.Preempted):
        trainer.run(_config(name), str(resumed))
    logged = common.read_metrics(resumed / f"metrics_{stem}.jsonl")
    self.assertEqual([r["step"] for r in logged], list(range(1, STOP + 1)))
    self.assertFalse((resumed / history_file).exists())
    state, *_ = trainer.run(_config(name), str(resumed))

    self.assertEqual(
      (resumed / f"metrics_{stem}.jsonl").read_text(),
      (reference / f"metrics_{stem}.jsonl").read_text(),
    )
    self.assertEqual(
      json.loads((resumed / history_file).read_text()),
      json.loads((reference / history_file).read_text()),
    )
    got, want = _params(state), _params(ref_state)
    self.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(a, b)  # bitwise on CPU


if __name__ == "__main__":
  absltest.main()
