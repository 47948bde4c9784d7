"""PRIME in the RL trainer: 2-step ``runlocal`` and a bitwise resume (slow).

The implicit PRM has its own train state (parameters, AdamW state, step,
RNG), updated online every iteration and saved in the checkpoint next to the
policy's. As ``resume_online_test.py`` does for GRPO, a run stopped after
iteration 1 through the trainer's preemption path and restarted must end
with bitwise identical policy and implicit-PRM parameters and write the same
metrics (including ``prm_loss``) as an uninterrupted run.
"""

import pathlib
import tempfile
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl.testing import absltest

from alignment import trainers
from alignment.trainers import common
from tests.trainers import _util
from tests.trainers.resume_online_test import _StopAfter


def _config():
  config = _util.load_config("rl", "advantage=prime,runlocal")
  config.progress = False
  config.checkpoint.async_save = False
  return config


def _implicit_prm(workdir, step):
  """The saved implicit-PRM parameters, as NumPy arrays."""
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  tree = ocp.PyTreeCheckpointer().restore(path)
  return jax.tree.map(np.asarray, tree["implicit_prm"]["params"])


@pytest.mark.slow
class PrimeResumeTest(absltest.TestCase):
  def test_preempted_then_resumed_run_is_bitwise_identical(self):
    with tempfile.TemporaryDirectory() as tmp, _util.compilation_cache():
      trainer = trainers.get_trainer("rl")
      reference = pathlib.Path(tmp) / "reference"
      ref_state, _, ref_history = trainer.run(_config(), str(reference))
      for row in ref_history:
        self.assertTrue(np.isfinite(row["prm_loss"]), row)
      # At iteration 1 the implicit PRM is the reference: loss log 2.
      self.assertAlmostEqual(ref_history[0]["prm_loss"], np.log(2), places=4)
      self.assertNotEqual(
        ref_history[1]["prm_loss"], ref_history[0]["prm_loss"]
      )

      resumed = pathlib.Path(tmp) / "resumed"
      stop = _StopAfter(resumed / "metrics_rl.jsonl", 1)
      with mock.patch.object(common, "_Preemption", stop):
        with self.assertRaises(common.Preempted):
          trainer.run(_config(), str(resumed))
      state, _, history = trainer.run(_config(), str(resumed))
      self.assertEqual(
        (resumed / "metrics_rl.jsonl").read_text(),
        (reference / "metrics_rl.jsonl").read_text(),
      )
      self.assertEqual(history, ref_history)
      for a, b in zip(
        jax.tree.leaves(jax.device_get(state["params"])),
        jax.tree.leaves(jax.device_get(ref_state["params"])),
        strict=True,
      ):
        np.testing.assert_array_equal(a, b)
      got, want = _implicit_prm(resumed, 2), _implicit_prm(reference, 2)
      self.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  absltest.main()
