"""Tests for alignment/rewards/_ensemble.py (reward-model ensembles)."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment.rewards import _ensemble as en
from tests import testing

M, B = 5, 7
NAMES = sorted(en.REGISTRY)


def _rewards(seed=0, m=M, b=B):
  return np.random.RandomState(seed).randn(m, b).astype(np.float32)


def _oracle(name, r, **kw):
  r = r.astype(np.float64)
  if name == "mean":
    return r.mean(0)
  if name == "median":
    return np.median(r, 0)
  if name in ("min", "wco"):
    return r.min(0)
  if name == "uwo":
    return r.mean(0) - kw.get("lam", 0.1) * r.var(0)
  if name == "mean_minus_std":
    return r.mean(0) - kw.get("lam", 1.0) * r.std(0)
  if name == "softmin":
    tau = kw.get("temperature", 1.0)
    return -tau * np.log(np.mean(np.exp(-r / tau), 0))
  if name in ("robust", "brme"):
    lam = kw.get("lam", 0.5)
    stds = kw.get("stds")
    if stds is None:
      nominal = r.mean(0)
    else:
      nominal = r[np.argmin(stds, 0), np.arange(r.shape[1])]
    return lam * nominal + (1 - lam) * r.min(0)
  raise ValueError(name)


class EnsembleTest(parameterized.TestCase):
  @parameterized.parameters(NAMES)
  def test_matches_numpy_oracle(self, name):
    r = _rewards()
    got = jax.jit(en.REGISTRY[name])(r)
    np.testing.assert_allclose(got, _oracle(name, r), rtol=1e-5, atol=1e-6)
    self.assertEqual(got.dtype, jnp.float32)
    self.assertEqual(got.shape, (B,))

  @parameterized.parameters(
    ("uwo", {"lam": 0.7}),
    ("mean_minus_std", {"lam": 0.3}),
    ("softmin", {"temperature": 0.25}),
    ("robust", {"lam": 0.8}),
  )
  def test_hyperparameters_match_oracle(self, name, kw):
    r = _rewards(1)
    got = jax.jit(lambda x: en.REGISTRY[name](x, **kw))(r)
    np.testing.assert_allclose(got, _oracle(name, r, **kw), rtol=1e-5)

  def test_invariances(self):
    r = _rewards(2)
    perm = np.random.RandomState(0).permutation(M)

    @jax.jit
    def all_aggregates(x):
      return {name: fn(x) for name, fn in en.REGISTRY.items()}

    base = all_aggregates(r)
    permuted = all_aggregates(r[perm])
    shifted = all_aggregates(r + 3.0)
    single = all_aggregates(r[:1])
    for name in NAMES:
      # Member permutation invariance.
      np.testing.assert_allclose(
        permuted[name], base[name], rtol=1e-6, atol=1e-6, err_msg=name
      )
      # Adding c to every member adds c.
      np.testing.assert_allclose(
        shifted[name], base[name] + 3.0, rtol=1e-5, atol=1e-5, err_msg=name
      )
      # M = 1 is the identity.
      np.testing.assert_allclose(
        single[name], r[0], rtol=1e-6, atol=1e-6, err_msg=name
      )
      if name in ("uwo", "mean_minus_std"):
        continue  # penalised aggregates may fall below the worst member.
      # The others lie between the worst and the best member.
      self.assertTrue(np.all(base[name] >= r.min(0) - 1e-5), msg=name)
      self.assertTrue(np.all(base[name] <= r.max(0) + 1e-5), msg=name)

  def test_softmin_limits(self):
    r = _rewards(3)
    fn = jax.jit(
      lambda x, tau: en.ensemble_softmin(x, temperature=tau),
      static_argnums=1,
    )
    # tau -> 0: the min (error <= tau * log M).
    np.testing.assert_allclose(fn(r, 1e-3), r.min(0), atol=2e-3)
    # tau -> infinity: the mean, approached as mean - Var / (2 tau).
    np.testing.assert_allclose(fn(r, 1e4), r.mean(0), atol=1e-3)
    np.testing.assert_allclose(
      fn(r, 50.0), r.mean(0) - r.var(0) / 100.0, atol=2e-3
    )
    mid = np.asarray(fn(r, 1.0))
    self.assertTrue(np.all(mid >= r.min(0) - 1e-6))
    self.assertTrue(np.all(mid <= r.mean(0) + 1e-6))
    # Large scores do not overflow.
    big = np.array([[1e4, -1e4], [-1e4, 1e4]], np.float32)
    np.testing.assert_allclose(fn(big, 1e-2), [-1e4, -1e4], rtol=1e-6)

  def test_robust_limits_and_nominal_head(self):
    r = _rewards(4)
    stds = np.abs(_rewards(5))
    fn = jax.jit(
      lambda x, s, lam: en.ensemble_robust(x, s, lam=lam), static_argnums=2
    )
    np.testing.assert_allclose(fn(r, stds, 0.0), r.min(0), rtol=1e-6)
    nominal = r[np.argmin(stds, 0), np.arange(B)]
    np.testing.assert_allclose(fn(r, stds, 1.0), nominal, rtol=1e-6)
    np.testing.assert_allclose(
      fn(r, stds, 0.3), _oracle("robust", r, lam=0.3, stds=stds), rtol=1e-5
    )
    _, g_stds = testing.grads(
      lambda x, s: en.ensemble_robust(x, s), (r, stds), (0, 1)
    )
    np.testing.assert_array_equal(g_stds, 0.0)

  def test_gradients(self):
    r = _rewards(6)
    g_mean = testing.grads(en.ensemble_mean, (r,), 0)
    np.testing.assert_allclose(g_mean, np.full((M, B), 1.0 / M), rtol=1e-6)
    g_min = testing.grads(en.ensemble_min, (r,), 0)
    np.testing.assert_array_equal(g_min, r == r.min(0, keepdims=True))
    # mean - std at full agreement: finite gradient equal to the mean's.
    same = np.ones((M, B), np.float32)
    g_std = testing.grads(en.ensemble_mean_minus_std, (same,), 0)
    np.testing.assert_allclose(g_std, np.full((M, B), 1.0 / M), rtol=1e-6)
    # Soft-min gradient is a softmax over members of -r / tau (sums to 1).
    g_soft = testing.grads(en.ensemble_softmin, (r,), 0)
    np.testing.assert_allclose(np.sum(g_soft, 0), 1.0, rtol=1e-5)

  @parameterized.parameters(NAMES)
  def test_bf16_in_float32_out(self, name):
    got = en.REGISTRY[name](_rewards().astype(jnp.bfloat16))
    self.assertEqual(got.dtype, jnp.float32)

  def test_shape_contract_and_bad_hyperparameters(self):
    r = _rewards()
    for name in NAMES:
      with self.assertRaises(jaxtyping.TypeCheckError):
        en.REGISTRY[name](r[0])
    with self.assertRaises(jaxtyping.TypeCheckError):
      en.ensemble_robust(r, r[:, :3])
    for fn, name, value in (
      (en.ensemble_uwo, "lam", -1.0),
      (en.ensemble_mean_minus_std, "lam", -0.5),
      (en.ensemble_softmin, "temperature", 0.0),
      (en.ensemble_robust, "lam", 1.5),
    ):
      with self.assertRaisesRegex(ValueError, name):
        fn(r, **{name: value})

  def test_vmap_and_sharded_equals_unsharded(self):
    r8 = _rewards(7, m=8, b=6)

    def fn(x):
      return {name: agg(x) for name, agg in en.REGISTRY.items()}

    testing.assert_sharded_equals_unsharded(fn, (r8,))
    stacked = np.stack([r8, r8 + 1.0])
    got = jax.jit(jax.vmap(en.ensemble_softmin))(stacked)
    np.testing.assert_allclose(got[1], got[0] + 1.0, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
