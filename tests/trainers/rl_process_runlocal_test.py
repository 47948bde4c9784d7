"""2-step ``runlocal`` runs of the process-credit estimators (slow).

``pure_min`` reads a process reward model made here by a 2-step
reward-model run (``configs/reward_model.py:loss=prm_hard,runlocal``);
``igpo`` scores turns with the policy's answer probabilities (the synthetic
task's stand-in answer, see ``_rl_process.answer_texts``). ``prime``'s run,
with its online implicit-PRM update, is in ``rl_prime_resume_test.py``.
"""

import pathlib

import jax
import numpy as np
import pytest
from absl.testing import absltest

from alignment import trainers
from tests.trainers import _util


def _rl_config(advantage):
  config = _util.load_config("rl", f"advantage={advantage},runlocal")
  config.progress = False
  config.batch_size = jax.device_count()
  return config


@pytest.mark.slow
class ProcessRunlocalTest(_util.WorkdirCase):
  prefix = "alignment-rl-process-"

  def _run(self, config, name):
    workdir = pathlib.Path(self._tmp.name) / name
    _, _, history = trainers.get_trainer(config.trainer).run(
      config, str(workdir)
    )
    self.assertLen(history, 2)
    for row in history:
      self.assertTrue(np.isfinite(row["loss"]), row)
    return history

  def test_pure_min_with_a_trained_prm(self):
    rm = _util.load_config("reward_model", "loss=prm_hard,runlocal")
    rm.progress = False
    rm.batch_size = jax.device_count()
    prm_dir = pathlib.Path(self._tmp.name) / "prm"
    trainers.get_trainer(rm.trainer).run(rm, str(prm_dir))
    config = _rl_config("pure_min")
    config.reward.process_model = str(prm_dir)
    config.reward.verifiable_rewards = True
    history = self._run(config, "pure_min")
    for row in history:
      self.assertBetween(row["step_reward"], -1.0, 1.0)
      # Synthetic data: one step per letter (EOS joins the last one).
      self.assertGreater(row["step_count"], 1.0)
      self.assertEqual(row["step_overflow"], 0.0)

  def test_igpo(self):
    config = _rl_config("igpo")
    config.reward.max_steps = 3  # 4 answer passes; later letters merge
    history = self._run(config, "igpo")
    for row in history:
      self.assertBetween(row["answer_prob"], 0.0, 1.0)
      self.assertIn("information_gain", row)
      self.assertBetween(row["step_count"], 1.0, 3.0)
      self.assertGreater(row["step_overflow"], 0.0)


if __name__ == "__main__":
  absltest.main()
