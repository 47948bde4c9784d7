"""Derived advantage inputs of the online RL trainer (``_rl_inputs``).

NumPy recomputations of the pairwise preferences (arena_rank), the greedy
baseline path (remax) and the reward components (gdpo) through
``rl.compute_advantages``, the start-time checks, and (slow) a 2-step
``runlocal`` of each newly supported estimator.
"""

import pathlib
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from alignment import trainers
from alignment.trainers import _rl_inputs, rl
from tests.trainers import _util

B, G = 3, 4
N = B * G
LEN = 6


_config = _util.rl_config
_np_sigmoid = _util.np_sigmoid


def _np_group_norm(x, mask, eps):
  """GRPO normalisation (Bessel std) of x [B, G] within each group."""
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    v = x[b][mask[b]]
    out[b][mask[b]] = (v - v.mean()) / (v.std(ddof=1) + eps)
  return out


class _Scorer:
  """Stands in for rl.RewardScorer: gold = number of 'a' characters."""

  def gold(self, prompts, completions):
    return np.array([c.count("a") for c in completions], np.float64)


class DerivedInputsTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.r = rng.normal(size=(B, G)).astype(np.float32)
    self.r[0, 1] = self.r[0, 2]  # a tie
    self.lengths = rng.integers(1, LEN, N).astype(np.int32)
    self.mask = np.ones((N, LEN), bool)

  @parameterized.parameters(("sigmoid", 1.0), ("sigmoid", 0.5), ("hard", 1.0))
  def test_preferences_match_numpy(self, mode, tau):
    got = jax.jit(
      lambda r: _rl_inputs.pairwise_preferences(r, mode=mode, temperature=tau)
    )(self.r)
    diff = self.r[:, :, None].astype(np.float64) - self.r[:, None, :]
    want = (
      _np_sigmoid(diff / tau)
      if mode == "sigmoid"
      else (np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5)))
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    self.assertEqual(got.dtype, np.float32)
    np.testing.assert_allclose(got + got.transpose(0, 2, 1), 1.0, atol=1e-6)

  @parameterized.parameters(
    ("gold", "hard"), ("model", "sigmoid"), ("ensemble", "sigmoid")
  )
  def test_auto_preference_mode_follows_the_source(self, source, want):
    config = _config("arena_rank", source=source)
    self.assertEqual(_rl_inputs.preference_mode(config), want)
    config.reward.preferences = "sigmoid"
    self.assertEqual(_rl_inputs.preference_mode(config), "sigmoid")

  def test_arena_rank_advantages_match_numpy(self):
    config = _config("arena_rank", preferences="hard")
    _, _, ahyper = rl._check(config)
    adv, _ = rl.compute_advantages(
      config, ahyper, self.r.reshape(N), self.lengths, self.mask, None, G
    )
    diff = self.r[:, :, None].astype(np.float64) - self.r[:, None, :]
    p = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    win = (p.sum(-1) - 0.5) / (G - 1)  # drop the diagonal's 0.5
    eps = ahyper.get("epsilon") or 1e-6
    want = _np_group_norm(win, np.ones((B, G), bool), eps)
    np.testing.assert_allclose(np.asarray(adv).reshape(B, G), want, atol=1e-5)

  def test_remax_subtracts_the_greedy_baseline(self):
    config = _config("remax")
    _, _, ahyper = rl._check(config)
    base = np.array([0.5, -1.0, 2.0], np.float32)
    adv, _ = rl.compute_advantages(
      config,
      ahyper,
      self.r.reshape(N),
      self.lengths,
      self.mask,
      None,
      G,
      {"baseline_rewards": base},
    )
    want = self.r.astype(np.float64) - base[:, None]
    np.testing.assert_allclose(np.asarray(adv).reshape(B, G), want, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "needs 'baseline_rewards'"):
      rl.compute_advantages(
        config, ahyper, self.r.reshape(N), self.lengths, self.mask, None, G
      )

  def test_shape_with_baseline_shapes_one_joint_batch(self):
    def centre(name, r, ln):
      del name, ln
      return r - r.mean()

    r = self.r.reshape(N)
    base = np.array([1.0, 2.0, 3.0], np.float32)
    shaped, sb = _rl_inputs.shape_with_baseline(
      centre, ["c"], r, self.lengths, base, np.ones(B, np.int32)
    )
    joint = np.concatenate([r, base]).astype(np.float64)
    joint -= joint.mean()
    np.testing.assert_allclose(shaped, joint[:N], atol=1e-6)
    np.testing.assert_allclose(sb, joint[N:], atol=1e-6)
    alone, none = _rl_inputs.shape_with_baseline(centre, ["c"], r, self.lengths)
    self.assertIsNone(none)
    np.testing.assert_allclose(alone, r - r.mean(), atol=1e-6)

  def test_gdpo_components_and_advantages_match_numpy(self):
    config = _config("gdpo", components=["reward", "gold", "length"])
    config.advantage.reward_weights = (1.0, 2.0, 0.5)
    _, _, ahyper = rl._check(config)
    completions = ["a" * (i % 3) + "b" * (i % 2) for i in range(N)]
    comps, scalar = _rl_inputs.reward_components(
      config,
      _Scorer(),
      self.r.reshape(N),
      self.lengths,
      [""] * N,
      completions,
      [{}] * N,
    )
    gold = np.array([c.count("a") for c in completions], np.float64)
    length = -self.lengths / config.rl.max_new_tokens
    want = np.stack([self.r.reshape(N), gold, length], 1)
    np.testing.assert_allclose(comps, want, atol=1e-6)
    np.testing.assert_allclose(scalar, want @ [1.0, 2.0, 0.5], atol=1e-5)
    adv, _ = rl.compute_advantages(
      config,
      ahyper,
      scalar,
      self.lengths,
      self.mask,
      None,
      G,
      {"reward_components": comps},
    )
    eps = ahyper.get("epsilon") or 1e-6
    k = want.reshape(B, G, 3)
    centred = k - k.mean(1, keepdims=True)
    summed = np.sum(
      centred / (k.std(1, ddof=1, keepdims=True) + eps) * [1.0, 2.0, 0.5], -1
    )
    want_adv = (summed - summed.mean()) / (summed.std(ddof=1) + eps)
    np.testing.assert_allclose(
      np.asarray(adv).reshape(B, G), want_adv, rtol=1e-4, atol=1e-4
    )

  @parameterized.named_parameters(
    ("no_components", "gdpo", dict(components=[]), "set config.reward.comp"),
    ("bad_component", "gdpo", dict(components=["x"]), "has \\['x'\\]"),
    ("bad_mode", "arena_rank", dict(preferences="soft"), "preferences='soft'"),
    ("bad_tau", "arena_rank", dict(preference_temperature=0.0), "temperature"),
  )
  def test_bad_configs_fail_at_start(self, advantage, reward, regex):
    with self.assertRaisesRegex(ValueError, regex):
      rl._check(_config(advantage, **reward))

  def test_gdpo_rejects_kl_in_reward_and_mismatched_weights(self):
    config = _config("gdpo")
    config.kl.mode = "reward"
    with self.assertRaisesRegex(ValueError, "kl.mode='loss'"):
      rl._check(config)
    config = _config("gdpo")
    config.advantage.reward_weights = (1.0,)
    with self.assertRaisesRegex(ValueError, "reward_weights has 1 entries"):
      rl._check(config)


@pytest.mark.slow
class RunlocalTest(_util.WorkdirCase, parameterized.TestCase):
  prefix = "alignment-rl-inputs-"

  @parameterized.parameters("remax", "arena_rank", "gdpo")
  def test_two_step_runlocal(self, advantage):
    config = _util.load_config("rl", f"advantage={advantage},runlocal")
    config.progress = False
    config.batch_size = jax.device_count()
    workdir = pathlib.Path(self._tmp.name) / advantage
    real = _rl_inputs.greedy_baseline
    with mock.patch.object(
      _rl_inputs, "greedy_baseline", side_effect=real
    ) as greedy:
      _, _, history = trainers.get_trainer(config.trainer).run(
        config, str(workdir)
      )
    self.assertLen(history, 2)
    for row in history:
      self.assertTrue(np.isfinite(row["loss"]), row)
    # The greedy decode runs once per iteration for remax only.
    self.assertEqual(greedy.call_count, 2 if advantage == "remax" else 0)
    self.assertEqual(
      all("baseline_reward" in row for row in history), advantage == "remax"
    )


if __name__ == "__main__":
  absltest.main()
