"""Tests for alignment/losses/_off_policy.py (KL control, IS corrections)."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment.losses import _off_policy as op
from tests import testing

B, T = 4, 6
LENGTHS = np.array([6, 3, 1, 0])


def _data(seed=0):
  rng = np.random.RandomState(seed)
  mask = np.arange(T)[None, :] < LENGTHS[:, None]
  policy = -np.abs(rng.randn(B, T)).astype(np.float32)
  ref = (policy + 0.4 * rng.randn(B, T)).astype(np.float32)
  old = (policy + 0.3 * rng.randn(B, T)).astype(np.float32)
  sampler = (old + 0.8 * rng.randn(B, T)).astype(np.float32)
  advantages = np.array([-1.0, 0.5, -0.3, 1.0], np.float32)
  return policy, ref, old, sampler, advantages, mask


# ---------------------------------------------------------------- oracles --


def _kl_np(logp, ref, estimator):
  x = ref.astype(np.float64) - logp.astype(np.float64)
  if estimator == "k1":
    return -x
  if estimator in ("k2", "mse"):
    return 0.5 * x * x
  if estimator in ("k3", "k3_straight_through"):
    return np.exp(x) - 1.0 - x
  if estimator == "abs":
    return np.abs(x)
  raise ValueError(estimator)


def _kl_rewards_np(rewards, logp, ref, mask, beta, estimator):
  kl = np.where(mask, _kl_np(logp, ref, estimator), 0.0)
  out = -beta * kl
  for b in range(mask.shape[0]):
    if rewards.ndim == 1:
      idx = np.nonzero(mask[b])[0]
      if idx.size:
        out[b, idx[-1]] += rewards[b]
    else:
      out[b] += np.where(mask[b], rewards[b], 0.0)
  return np.where(mask, out, 0.0)


def _log_ratio_np(old, sampler, mask, level):
  lr = np.where(mask, old.astype(np.float64) - sampler, 0.0)
  out = np.zeros_like(lr)
  for b in range(mask.shape[0]):
    n = mask[b].sum()
    if level == "token":
      out[b] = lr[b]
    elif level == "sequence":
      out[b] = lr[b].sum()
    else:
      out[b] = lr[b].sum() / n if n else 0.0
  return np.where(mask, out, 0.0)


def _tis_np(old, sampler, mask, level, cap):
  rho = np.exp(_log_ratio_np(old, sampler, mask, level))
  return np.where(mask, np.minimum(rho, cap), 0.0)


def _mis_np(old, sampler, mask, level, low, high):
  rho = np.exp(_log_ratio_np(old, sampler, mask, level))
  keep = mask & (rho >= low) & (rho <= high)
  return np.where(keep, rho, 0.0)


def _opsm_np(policy, sampler, adv, mask, delta):
  keep = []
  for b in range(mask.shape[0]):
    n = mask[b].sum()
    kl = (
      (sampler[b][mask[b]].astype(np.float64) - policy[b][mask[b]]).sum() / n
      if n
      else 0.0
    )
    keep.append(not (adv[b] < 0 and kl > delta))
  return np.array(keep)


class _ReferenceSafe:
  """Transcription of SAFE's PIDController and KL trackers (mainD.py)."""

  def __init__(self, kp=0.3, ki=0.01, kd=0.05, base=0.3, phase=1.0):
    self.kp, self.ki, self.kd = kp, ki, kd
    self.integral, self.prev_error, self.reward_ema = 0.0, 0.0, None
    self.kl_short = self.kl_long = 0.0
    self.base, self.phase = base, phase

  def _pid(self, reward):
    if self.reward_ema is None:
      self.reward_ema = reward
      return 0.0
    old = self.reward_ema
    self.reward_ema = 0.95 * self.reward_ema + 0.05 * reward
    error = (self.reward_ema - old) - 0.001
    p = self.kp * error
    self.integral = max(-1.0, min(1.0, self.integral + error))
    d = self.kd * (error - self.prev_error)
    self.prev_error = error
    return p + self.ki * self.integral + d

  def step(self, kl, reward):
    self.kl_short = 0.9 * self.kl_short + 0.1 * kl
    self.kl_long = 0.99 * self.kl_long + 0.01 * kl
    threshold = (self.base + self._pid(reward)) * self.phase
    return max(0.1, min(0.6, threshold))


# ------------------------------------------------------------------ tests --


class KLPenaltyLossTest(parameterized.TestCase):
  @parameterized.parameters("k1", "k2", "k3", "abs")
  def test_matches_numpy_oracle(self, estimator):
    policy, ref, _, _, _, mask = _data()
    fn = jax.jit(
      lambda *a: op.kl_penalty_loss(*a, beta=0.3, estimator=estimator)
    )
    loss, aux = fn(policy, ref, mask)
    kl = np.where(mask, _kl_np(policy, ref, estimator), 0.0)
    np.testing.assert_allclose(loss, 0.3 * kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.kl, kl, rtol=1e-5, atol=1e-6)
    self.assertEqual(loss.dtype, jnp.float32)

  def test_k3_gradient_closed_form_and_padding_inert(self):
    policy, ref, _, _, _, mask = _data()
    fn = lambda p, r, m: op.kl_penalty_loss(p, r, m, beta=0.5)
    gp, gr = testing.grads(fn, (policy, ref, mask), (0, 1))
    want = np.where(mask, 0.5 * (1.0 - np.exp(ref - policy)), 0.0)
    np.testing.assert_allclose(gp, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gr, 0.0)
    # NaN in padded positions changes neither value nor gradient.
    gp_nan, _ = testing.grads(
      fn,
      (
        testing.with_nan_padding(policy, mask),
        testing.with_nan_padding(ref, mask),
        mask,
      ),
      (0, 1),
    )
    np.testing.assert_array_equal(gp_nan, gp)
    loss_nan, _ = jax.jit(fn)(
      testing.with_nan_padding(policy, mask),
      testing.with_nan_padding(ref, mask),
      mask,
    )
    np.testing.assert_array_equal(loss_nan, jax.jit(fn)(policy, ref, mask)[0])

  def test_bad_hyperparameters(self):
    policy, ref, _, _, _, mask = _data()
    with self.assertRaisesRegex(ValueError, "beta"):
      op.kl_penalty_loss(policy, ref, mask, beta=-1.0)
    with self.assertRaisesRegex(ValueError, "estimator"):
      op.kl_penalty_loss(policy, ref, mask, estimator="k4")

  def test_shape_contract(self):
    policy, ref, _, _, _, mask = _data()
    with self.assertRaises(jaxtyping.TypeCheckError):
      op.kl_penalty_loss(policy[0], ref[0], mask[0])
    with self.assertRaises(jaxtyping.TypeCheckError):
      op.kl_penalty_loss(policy[:3], ref, mask)


class KLPenalizedRewardsTest(parameterized.TestCase):
  @parameterized.product(token_level=(False, True), estimator=("k1", "k3"))
  def test_matches_numpy_oracle(self, token_level, estimator):
    policy, ref, _, _, _, mask = _data()
    rng = np.random.RandomState(1)
    shape = (B, T) if token_level else (B,)
    rewards = rng.randn(*shape).astype(np.float32)
    fn = jax.jit(
      lambda *a: op.kl_penalized_rewards(*a, beta=0.1, estimator=estimator)
    )
    got, aux = fn(rewards, policy, ref, mask)
    want = _kl_rewards_np(rewards, policy, ref, mask, 0.1, estimator)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.score - 0.1 * aux.kl, got, atol=1e-6)

  def test_k1_total_is_sequence_log_ratio_and_no_gradient(self):
    policy, ref, _, _, _, mask = _data()
    rewards = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    fn = lambda r, p, q, m: op.kl_penalized_rewards(r, p, q, m, beta=0.2)
    got, _ = jax.jit(fn)(rewards, policy, ref, mask)
    seq_log_ratio = np.where(mask, policy - ref.astype(np.float64), 0).sum(-1)
    has_tokens = mask.any(-1)
    np.testing.assert_allclose(
      got.sum(-1),
      np.where(has_tokens, rewards - 0.2 * seq_log_ratio, 0.0),
      rtol=1e-5,
    )
    for g in testing.grads(fn, (rewards, policy, ref, mask), (0, 1, 2)):
      np.testing.assert_array_equal(g, 0.0)


class AdaptiveKLTest(parameterized.TestCase):
  def test_closed_form_step_and_clipping(self):
    update = jax.jit(
      lambda s, kl, n: op.adaptive_kl_update(
        s, kl, n, target=6.0, horizon=10000.0
      )
    )
    state = op.adaptive_kl_init(beta=0.2)
    for kl, n in ((7.0, 256), (6.0, 64), (3.0, 512), (100.0, 100), (0.0, 10)):
      got = update(state, jnp.float32(kl), jnp.int32(n))
      error = np.clip(kl / 6.0 - 1.0, -0.2, 0.2)
      np.testing.assert_allclose(
        got.beta, 0.2 * (1 + error * n / 10000.0), rtol=1e-6
      )
    self.assertEqual(got.beta.dtype, jnp.float32)

  def test_scan_moves_beta_towards_target(self):
    def body(state, kl):
      new = op.adaptive_kl_update(state, kl, 1000, target=1.0, horizon=1000.0)
      return new, new.beta

    _, betas = jax.jit(lambda s, k: jax.lax.scan(body, s, k))(
      op.adaptive_kl_init(beta=1.0), jnp.full((5,), 2.0)
    )
    np.testing.assert_allclose(betas, 1.2 ** np.arange(1, 6), rtol=1e-5)

  def test_bad_hyperparameters(self):
    state = op.adaptive_kl_init()
    for name in ("target", "horizon", "clip"):
      with self.assertRaisesRegex(ValueError, name):
        op.adaptive_kl_update(state, 1.0, 1, **{name: 0.0})
    with self.assertRaisesRegex(ValueError, "beta"):
      op.adaptive_kl_init(beta=0.0)


class ImportanceWeightsTest(parameterized.TestCase):
  @parameterized.parameters("token", "sequence", "geometric")
  def test_tis_and_mis_match_numpy_oracle(self, level):
    _, _, old, sampler, _, mask = _data()

    @jax.jit
    def fn(o, s, m):
      tis = op.truncated_importance_weights(o, s, m, level=level, cap=1.5)
      mis = op.masked_importance_weights(
        o, s, m, level=level, low=0.5, high=2.0
      )
      return tis, mis

    (tis, tis_aux), (mis, mis_aux) = fn(old, sampler, mask)
    np.testing.assert_allclose(
      tis, _tis_np(old, sampler, mask, level, 1.5), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
      mis,
      _mis_np(old, sampler, mask, level, 0.5, 2.0),
      rtol=1e-5,
      atol=1e-6,
    )
    log_ratio = _log_ratio_np(old, sampler, mask, level)
    np.testing.assert_allclose(tis_aux.log_ratio, log_ratio, atol=1e-5)
    np.testing.assert_array_equal(
      tis_aux.corrected, mask & (np.exp(log_ratio) > 1.5)
    )
    rho = np.exp(log_ratio)
    np.testing.assert_array_equal(
      mis_aux.corrected, mask & ((rho < 0.5) | (rho > 2.0))
    )
    self.assertTrue(np.all(np.asarray(tis) <= 1.5))

  def test_icepop_is_token_level_band_mask(self):
    _, _, old, sampler, _, mask = _data()
    got, _ = jax.jit(op.icepop_weights)(old, sampler, mask)
    np.testing.assert_allclose(
      got, _mis_np(old, sampler, mask, "token", 0.5, 5.0), rtol=1e-5
    )

  def test_on_policy_weights_are_one(self):
    _, _, old, _, _, mask = _data()
    for name, fn in op.REGISTRY.items():
      if name == "kl_penalty":
        continue
      weights, aux = fn(old, old, mask)
      np.testing.assert_allclose(weights, mask.astype(np.float32), err_msg=name)
      self.assertFalse(np.any(aux.corrected), msg=name)

  def test_long_sequence_does_not_overflow(self):
    mask = np.ones((1, 200), bool)
    old = np.zeros((1, 200), np.float32)
    sampler = np.full((1, 200), -1.0, np.float32)  # log rho = 200 per seq
    tis, _ = op.truncated_importance_weights(
      old, sampler, mask, level="sequence", cap=2.0
    )
    mis, _ = op.masked_importance_weights(old, sampler, mask)
    np.testing.assert_allclose(tis, 2.0)
    np.testing.assert_array_equal(mis, 0.0)

  def test_padding_inert_and_no_gradient(self):
    _, _, old, sampler, _, mask = _data()
    nan_old = testing.with_nan_padding(old, mask)
    nan_sampler = testing.with_nan_padding(sampler, mask)
    for name in ("tis", "mis", "icepop"):
      fn = op.REGISTRY[name]
      clean = jax.jit(fn)(old, sampler, mask)
      dirty = jax.jit(fn)(nan_old, nan_sampler, mask)
      jax.tree.map(np.testing.assert_array_equal, clean, dirty)
      for g in testing.grads(fn, (nan_old, nan_sampler, mask), (0, 1)):
        np.testing.assert_array_equal(g, 0.0)

  def test_bad_hyperparameters(self):
    _, _, old, sampler, _, mask = _data()
    with self.assertRaisesRegex(ValueError, "cap"):
      op.truncated_importance_weights(old, sampler, mask, cap=0.0)
    with self.assertRaisesRegex(ValueError, "level"):
      op.truncated_importance_weights(old, sampler, mask, level="batch")
    with self.assertRaisesRegex(ValueError, "low"):
      op.masked_importance_weights(old, sampler, mask, low=-1.0)
    with self.assertRaisesRegex(ValueError, "high"):
      op.icepop_weights(old, sampler, mask, low=2.0, high=1.0)

  def test_shape_contract_and_vmap(self):
    _, _, old, sampler, _, mask = _data()
    with self.assertRaises(jaxtyping.TypeCheckError):
      op.truncated_importance_weights(old, sampler[:, :3], mask)
    stacked = np.stack([old, sampler])
    got = jax.jit(
      jax.vmap(lambda o: op.truncated_importance_weights(o, sampler, mask)[0])
    )(stacked)
    np.testing.assert_allclose(
      got[0], _tis_np(old, sampler, mask, "token", 2.0), rtol=1e-5
    )
    np.testing.assert_allclose(got[1], mask.astype(np.float32))


class OffPolicySequenceMaskTest(parameterized.TestCase):
  @parameterized.parameters(0.0, 0.3, 1.0)
  def test_matches_numpy_oracle(self, delta):
    policy, _, _, sampler, adv, mask = _data()
    fn = jax.jit(lambda *a: op.off_policy_sequence_mask(*a, threshold=delta))
    keep, aux = fn(policy, sampler, adv, mask)
    np.testing.assert_array_equal(
      keep, _opsm_np(policy, sampler, adv, mask, delta)
    )
    self.assertEqual(keep.dtype, jnp.bool_)
    self.assertEqual(aux.sequence_kl[3], 0.0)  # empty row

  def test_drops_only_negative_advantage_off_policy_rows(self):
    mask = np.ones((4, 3), bool)
    policy = np.zeros((4, 3), np.float32)
    sampler = np.array([[1.0] * 3, [1.0] * 3, [0.1] * 3, [0.1] * 3], np.float32)
    adv = np.array([-1.0, 1.0, -1.0, 1.0], np.float32)
    keep, _ = op.off_policy_sequence_mask(
      policy, sampler, adv, mask, threshold=0.5
    )
    np.testing.assert_array_equal(keep, [False, True, True, True])

  def test_padding_inert_and_bad_threshold(self):
    policy, _, _, sampler, adv, mask = _data()
    clean = op.off_policy_sequence_mask(policy, sampler, adv, mask)
    dirty = op.off_policy_sequence_mask(
      testing.with_nan_padding(policy, mask),
      testing.with_nan_padding(sampler, mask),
      adv,
      mask,
    )
    jax.tree.map(np.testing.assert_array_equal, clean, dirty)
    with self.assertRaisesRegex(ValueError, "threshold"):
      op.off_policy_sequence_mask(policy, sampler, adv, mask, threshold=-1.0)
    with self.assertRaises(jaxtyping.TypeCheckError):
      op.off_policy_sequence_mask(policy, sampler, adv[:2], mask)


class SafeTest(parameterized.TestCase):
  def test_controller_matches_reference_transcription(self):
    rng = np.random.RandomState(3)
    kls = rng.uniform(0, 0.8, size=12)
    rewards = np.cumsum(rng.uniform(-0.02, 0.05, size=12))
    reference = _ReferenceSafe(phase=1.2)
    step = jax.jit(
      lambda s, k, r: op.safe_controller_update(s, k, r, phase_multiplier=1.2)
    )
    state = op.safe_controller_init()
    for kl, reward in zip(kls, rewards, strict=True):
      want = reference.step(float(kl), float(reward))
      state, threshold = step(state, jnp.float32(kl), jnp.float32(reward))
      np.testing.assert_allclose(threshold, want, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(state.kl_short, reference.kl_short, rtol=1e-5)
      np.testing.assert_allclose(state.kl_long, reference.kl_long, rtol=1e-5)
      np.testing.assert_allclose(
        state.reward_ema, reference.reward_ema, rtol=1e-5
      )

  def test_zero_gains_give_constant_threshold(self):
    state = op.safe_controller_init()
    for reward in (0.0, 1.0, -3.0, 5.0):
      state, threshold = op.safe_controller_update(
        state, 0.1, reward, kp=0.0, ki=0.0, kd=0.0, base_threshold=0.25
      )
      np.testing.assert_allclose(threshold, 0.25, rtol=1e-6)

  def test_penalty_oracle_gradient_and_gate(self):
    kl = np.array([0.1, 0.5, 0.9, 2.0], np.float32)
    entropy = np.array([3.0, 0.5, 10.0, 0.0], np.float32)
    fn = jax.jit(lambda k, h, t: op.safe_kl_penalty(k, h, t))
    penalty, aux = fn(kl, entropy, jnp.float32(0.3))
    gate = np.maximum(0.5, 2.0 / (entropy + 0.1))
    want = 0.1 * gate * np.maximum(kl - 0.3, 0.0) ** 2
    np.testing.assert_allclose(penalty, want, rtol=1e-6)
    np.testing.assert_allclose(aux.gate, gate, rtol=1e-6)
    np.testing.assert_array_equal(aux.active, kl > 0.3)
    # Low entropy amplifies: same excess, lower entropy -> larger penalty.
    self.assertGreater(
      float(fn(kl[1:2], entropy[1:2], 0.3)[0][0]),
      float(fn(kl[1:2], entropy[2:3], 0.3)[0][0]),
    )
    gk, gh, gt = testing.grads(
      lambda k, h, t: op.safe_kl_penalty(k, h, t),
      (kl, entropy, jnp.float32(0.3)),
      (0, 1, 2),
    )
    np.testing.assert_allclose(
      gk, 0.2 * gate * np.maximum(kl - 0.3, 0.0), rtol=1e-6
    )
    np.testing.assert_array_equal(gh, 0.0)
    np.testing.assert_array_equal(gt, 0.0)

  def test_bad_hyperparameters(self):
    for name, value in (
      ("coefficient", -1.0),
      ("entropy_floor", 0.0),
      ("min_gate", -0.1),
      ("entropy_offset", 0.0),
    ):
      with self.assertRaisesRegex(ValueError, name):
        op.safe_kl_penalty(jnp.ones(2), jnp.ones(2), 0.3, **{name: value})
    state = op.safe_controller_init()
    for name, value in (
      ("reward_decay", 1.0),
      ("short_decay", -0.1),
      ("integral_limit", 0.0),
      ("phase_multiplier", 0.0),
      ("max_threshold", 0.01),
    ):
      with self.assertRaisesRegex(ValueError, name):
        op.safe_controller_update(state, 0.1, 0.1, **{name: value})


class CommonTest(parameterized.TestCase):
  @parameterized.parameters(sorted(op.REGISTRY))
  def test_bf16_in_float32_out(self, name):
    policy, ref, _, _, _, mask = _data()
    out, _ = op.REGISTRY[name](
      policy.astype(jnp.bfloat16), ref.astype(jnp.bfloat16), mask
    )
    self.assertEqual(out.dtype, jnp.float32)

  def test_bf16_other_functions(self):
    policy, ref, _, sampler, adv, mask = _data()
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    rewards, _ = op.kl_penalized_rewards(bf(adv), bf(policy), bf(ref), mask)
    self.assertEqual(rewards.dtype, jnp.float32)
    _, aux = op.off_policy_sequence_mask(bf(policy), bf(sampler), bf(adv), mask)
    self.assertEqual(aux.sequence_kl.dtype, jnp.float32)
    penalty, _ = op.safe_kl_penalty(bf(adv), bf(adv), bf(0.1))
    self.assertEqual(penalty.dtype, jnp.float32)

  def test_sharded_equals_unsharded(self):
    rng = np.random.RandomState(7)
    n = 8
    mask = np.arange(T)[None] < rng.randint(0, T + 1, size=n)[:, None]
    policy = -np.abs(rng.randn(n, T)).astype(np.float32)
    ref = (policy + 0.3 * rng.randn(n, T)).astype(np.float32)
    sampler = (policy + 0.5 * rng.randn(n, T)).astype(np.float32)
    adv = rng.randn(n).astype(np.float32)

    def fn(p, r, s, a, m):
      return (
        op.kl_penalty_loss(p, r, m),
        op.kl_penalized_rewards(a, p, r, m),
        op.truncated_importance_weights(r, s, m, level="geometric"),
        op.masked_importance_weights(r, s, m),
        op.off_policy_sequence_mask(p, s, a, m),
      )

    testing.assert_sharded_equals_unsharded(
      fn, (policy, ref, sampler, adv, mask)
    )


if __name__ == "__main__":
  absltest.main()
