"""Tests for alignment/evaluation/metrics.py against float64 hand computations."""

import itertools
import math
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from alignment import evaluation
from alignment.evaluation import metrics


class AccuracyTest(parameterized.TestCase):
  @parameterized.parameters(("random", 0.5), ("lose", 0.0), ("win", 1.0))
  def test_pairwise_accuracy_and_ties(self, ties, credit):
    chosen = [2.0, 1.0, 0.5, 3.0, -1.0]
    rejected = [1.0, 1.0, 0.7, 3.0, -2.0]
    # wins: pairs 0 and 4; ties: pairs 1 and 3; loss: pair 2.
    want = (2 + 2 * credit) / 5
    self.assertAlmostEqual(
      metrics.pairwise_accuracy(chosen, rejected, ties=ties), want, places=12
    )
    # JAX arrays are accepted.
    got = metrics.pairwise_accuracy(
      jnp.asarray(chosen), jnp.asarray(rejected), ties=ties
    )
    self.assertAlmostEqual(got, want, places=6)
    self.assertAlmostEqual(
      metrics.win_rate(chosen, rejected, ties=ties), want, places=12
    )

  def test_pairwise_limits(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=100)
    self.assertEqual(metrics.pairwise_accuracy(x + 1.0, x), 1.0)
    self.assertEqual(metrics.pairwise_accuracy(x, x), 0.5)
    self.assertEqual(metrics.pairwise_accuracy(x - 1.0, x), 0.0)
    self.assertTrue(math.isnan(metrics.pairwise_accuracy([], [])))

  def test_by_subset(self):
    chosen = np.array([1.0, 2.0, 0.0, 5.0, 1.0, 1.0])
    rejected = np.array([0.0, 3.0, 0.0, 4.0, 2.0, 0.0])
    subsets = np.array(["math", "chat", "chat", "math", "safety", "chat"])
    out = metrics.pairwise_accuracy_by_subset(chosen, rejected, subsets)
    np.testing.assert_array_equal(out.labels, ["chat", "math", "safety"])
    # chat: loss, tie (0.5), win -> 1.5 / 3; math: 2 / 2; safety: 0 / 1.
    np.testing.assert_allclose(out.accuracy, [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(out.counts, [3, 2, 1])
    self.assertAlmostEqual(out.overall, 3.5 / 6)
    self.assertAlmostEqual(out.macro, 0.5)
    self.assertEqual(out.as_dict(), {"chat": 0.5, "math": 1.0, "safety": 0.0})
    ints = metrics.pairwise_accuracy_by_subset(
      chosen, rejected, [2, 1, 1, 2, 7, 1], ties="lose"
    )
    self.assertEqual(ints.as_dict(), {1: 1 / 3, 2: 1.0, 7: 0.0})

  def test_best_of_n_accuracy(self):
    chosen = np.array([3.0, 1.0, 2.0, 2.0, 0.0])
    rejected = np.array(
      [
        [1.0, 2.0, 0.0],  # win
        [1.0, 0.0, 0.5],  # tie with one -> 1/2 under "random"
        [2.0, 2.0, 1.0],  # tie with two -> 1/3
        [1.0, 5.0, 0.0],  # loss
        [-1.0, np.nan, -2.0],  # win; the NaN is padding
      ]
    )
    mask = ~np.isnan(rejected)
    want = {
      "random": (1 + 1 / 2 + 1 / 3 + 0 + 1) / 5,
      "lose": 2 / 5,
      "win": 4 / 5,
    }
    for ties, value in want.items():
      self.assertAlmostEqual(
        metrics.best_of_n_accuracy(chosen, rejected, mask, ties=ties),
        value,
        places=12,
      )
    with self.assertRaisesRegex(ValueError, "NaN"):
      metrics.best_of_n_accuracy(chosen, rejected)

  def test_best_of_4_random_baseline(self):
    rng = np.random.default_rng(1)
    acc = metrics.best_of_n_accuracy(
      rng.normal(size=20000), rng.normal(size=(20000, 3))
    )
    self.assertAlmostEqual(acc, 0.25, delta=0.01)
    # Pairwise (R = 1) agrees with pairwise_accuracy, ties included.
    c, r = np.array([1.0, 1.0, 0.0]), np.array([[0.0], [1.0], [2.0]])
    self.assertEqual(
      metrics.best_of_n_accuracy(c, r), metrics.pairwise_accuracy(c, r[:, 0])
    )

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "ties"):
      metrics.pairwise_accuracy([1.0], [0.0], ties="half")
    with self.assertRaisesRegex(ValueError, "NaN"):
      metrics.pairwise_accuracy([np.nan], [0.0])
    with self.assertRaisesRegex(ValueError, "equal length"):
      metrics.pairwise_accuracy([1.0, 2.0], [0.0])
    with self.assertRaisesRegex(ValueError, "subsets"):
      metrics.pairwise_accuracy_by_subset([1.0], [0.0], ["a", "b"])
    with self.assertRaisesRegex(ValueError, "at least one"):
      metrics.best_of_n_accuracy([1.0], [[0.0]], [[False]])


class CalibrationTest(absltest.TestCase):
  def test_brier_and_probabilities(self):
    self.assertAlmostEqual(metrics.brier_score([0.5] * 4, [1, 0, 1, 0]), 0.25)
    p = np.array([0.9, 0.2, 0.6])
    y = np.array([True, False, False])
    self.assertAlmostEqual(
      metrics.brier_score(p, y), (0.01 + 0.04 + 0.36) / 3, places=12
    )
    probs = metrics.preference_probabilities(
      [1.0, 0.0], [0.0, 0.0], temperature=2.0
    )
    np.testing.assert_allclose(probs, [1 / (1 + math.exp(-0.5)), 0.5])
    both, labels = metrics.preference_calibration_data([2.0], [0.0])
    np.testing.assert_allclose(
      both, [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))]
    )
    np.testing.assert_array_equal(labels, [True, False])

  def test_ece_and_reliability_hand_computation(self):
    p = np.array([0.05, 0.15, 0.12, 0.55, 0.58, 0.95, 1.0, 0.5])
    y = np.array([0, 1, 0, 1, 0, 1, 1, 1])
    data = metrics.reliability_diagram_data(p, y, num_bins=4)
    np.testing.assert_allclose(data.bin_edges, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(data.bin_centers, [0.125, 0.375, 0.625, 0.875])
    # bins: [0.05, 0.15, 0.12] | [] | [0.55, 0.58, 0.5] | [0.95, 1.0]
    np.testing.assert_array_equal(data.counts, [3, 0, 3, 2])
    np.testing.assert_allclose(data.accuracy, [1 / 3, np.nan, 2 / 3, 1.0])
    np.testing.assert_allclose(
      data.confidence, [0.32 / 3, np.nan, 1.63 / 3, 0.975]
    )
    want = (
      3 * abs(1 / 3 - 0.32 / 3)
      + 3 * abs(2 / 3 - 1.63 / 3)
      + 2 * abs(1.0 - 0.975)
    ) / 8
    self.assertAlmostEqual(
      metrics.expected_calibration_error(p, y, num_bins=4), want, places=12
    )

  def test_calibrated_forecasts_have_small_ece(self):
    rng = np.random.default_rng(0)
    p = rng.uniform(size=50000)
    y = rng.uniform(size=p.shape) < p
    self.assertLess(metrics.expected_calibration_error(p, y), 0.01)
    overconfident = np.where(p > 0.5, 1.0, 0.0)
    self.assertGreater(
      metrics.expected_calibration_error(overconfident, y), 0.2
    )

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"\[0, 1\]"):
      metrics.brier_score([1.5], [1])
    with self.assertRaisesRegex(ValueError, "labels"):
      metrics.brier_score([0.5], [2])
    with self.assertRaisesRegex(ValueError, "num_bins"):
      metrics.expected_calibration_error([0.5], [1], num_bins=0)
    with self.assertRaisesRegex(ValueError, "temperature"):
      metrics.preference_probabilities([1.0], [0.0], temperature=0.0)

  def test_plot_reliability_diagram_writes_png(self):
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200)
    data = metrics.reliability_diagram_data(p, rng.uniform(size=200) < p)
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / "reliability.png"
      metrics.plot_reliability_diagram(data, path)
      self.assertEqual(path.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
      self.assertGreater(path.stat().st_size, 1000)


def _brute_force_best_of_n(proxy, gold, n):
  """Average over every n-subset, ties broken uniformly at random."""
  values = []
  for row_p, row_g in zip(proxy, gold, strict=True):
    subsets = list(itertools.combinations(range(len(row_p)), n))
    total = 0.0
    for subset in subsets:
      best = max(row_p[i] for i in subset)
      winners = [i for i in subset if row_p[i] == best]
      total += np.mean([row_g[i] for i in winners])
    values.append(total / len(subsets))
  return float(np.mean(values))


class BestOfNTest(absltest.TestCase):
  def test_matches_brute_force_enumeration(self):
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(3, 6))
    proxy[1, [0, 3, 4]] = 0.25  # proxy ties
    gold = proxy + rng.normal(size=(3, 6))
    curve = metrics.best_of_n_curve(proxy, gold, [1, 2, 3, 4, 5, 6])
    for n, value in zip(curve.ns, curve.gold, strict=True):
      self.assertAlmostEqual(
        value, _brute_force_best_of_n(proxy, gold, n), places=12
      )
      self.assertAlmostEqual(
        curve.proxy[n - 1], _brute_force_best_of_n(proxy, proxy, n), places=12
      )
    # n = 1 is the mean gold score; n = M keeps the proxy's argmax.
    self.assertAlmostEqual(curve.gold[0], gold.mean(), places=12)
    np.testing.assert_allclose(
      curve.kl, np.log(curve.ns) - (curve.ns - 1) / curve.ns
    )
    # With a perfect proxy the curve is non-decreasing.
    perfect = metrics.best_of_n_curve(gold, gold, np.arange(1, 7))
    self.assertTrue(np.all(np.diff(perfect.gold) >= -1e-12))

  def test_sample_order_does_not_matter(self):
    rng = np.random.default_rng(1)
    proxy = rng.integers(0, 3, size=(4, 7)).astype(float)  # many ties
    gold = rng.normal(size=(4, 7))
    perm = rng.permutation(7)
    a = metrics.best_of_n_curve(proxy, gold, [2, 5])
    b = metrics.best_of_n_curve(proxy[:, perm], gold[:, perm], [2, 5])
    np.testing.assert_allclose(a.gold, b.gold, rtol=1e-12)

  def test_kl_and_errors(self):
    self.assertEqual(float(metrics.best_of_n_kl(1)), 0.0)
    self.assertAlmostEqual(
      float(metrics.best_of_n_kl(4)), math.log(4) - 0.75, places=12
    )
    with self.assertRaisesRegex(ValueError, "n must"):
      metrics.best_of_n_kl(0)
    with self.assertRaisesRegex(ValueError, r"\[1, 3\]"):
      metrics.best_of_n_curve(np.zeros((2, 3)), np.zeros((2, 3)), [4])
    with self.assertRaisesRegex(ValueError, "integers"):
      metrics.best_of_n_curve(np.zeros((2, 3)), np.zeros((2, 3)), [1.5])
    with self.assertRaisesRegex(ValueError, r"\[P, M\]"):
      metrics.best_of_n_curve(np.zeros(3), np.zeros(3), [1])

  def test_package_exports(self):
    for name in metrics.__all__:
      self.assertIs(getattr(evaluation, name), getattr(metrics, name))


if __name__ == "__main__":
  absltest.main()
