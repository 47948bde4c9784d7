"""Learning-rate schedules of `trainers.common.make_schedule`."""

import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from alignment.trainers import common


def _schedule(name, warmup, total, lr=2.0, final=0.1):
  config = ml_collections.ConfigDict(
    dict(
      learning_rate=lr,
      warmup_steps=warmup,
      schedule=name,
      final_lr_fraction=final,
    )
  )
  fn = common.make_schedule(config, total)
  # optax counts updates from 0: count k-1 is the update of step k.
  return np.array([float(fn(k)) for k in range(total)])


class ScheduleTest(parameterized.TestCase):
  @parameterized.parameters("warmup_constant", "warmup_cosine", "warmup_linear")
  def test_warmup_ramps_linearly_from_the_first_step(self, name):
    lrs = _schedule(name, warmup=4, total=10)
    np.testing.assert_allclose(lrs[:4], [0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    self.assertGreater(lrs[0], 0.0)

  def test_cosine_ends_at_the_final_fraction(self):
    lrs = _schedule("warmup_cosine", warmup=2, total=12, final=0.1)
    np.testing.assert_allclose(lrs[2], 2.0, rtol=1e-6)
    np.testing.assert_allclose(lrs[-1], 0.2, rtol=1e-5)
    self.assertTrue(np.all(np.diff(lrs[2:]) <= 1e-7))

  def test_linear_decays_to_one_step_before_zero(self):
    lrs = _schedule("warmup_linear", warmup=2, total=10)
    np.testing.assert_allclose(lrs[2], 2.0, rtol=1e-6)
    np.testing.assert_allclose(lrs[-1], 2.0 / 8, rtol=1e-5)
    self.assertTrue(np.all(np.diff(lrs[2:]) < 0))

  def test_no_warmup_starts_at_the_peak(self):
    lrs = _schedule("warmup_cosine", warmup=0, total=5)
    np.testing.assert_allclose(lrs[0], 2.0, rtol=1e-6)

  def test_unknown_schedule_names_the_choices(self):
    with self.assertRaisesRegex(ValueError, "warmup_cosine"):
      _schedule("cosine", warmup=1, total=3)


if __name__ == "__main__":
  absltest.main()
