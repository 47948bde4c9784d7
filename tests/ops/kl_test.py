"""Tests for alignment/ops/_kl.py: per-token KL estimators."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment.ops import _kl
from tests import testing

_DIRECT = {
  "k1": _kl.kl_k1,
  "k2": _kl.kl_k2,
  "k3": _kl.kl_k3,
  "k3_straight_through": _kl.kl_k3_straight_through,
}


def _np_kl(estimator, logp, ref):
  """Schulman's estimators with x = log π_ref - log π, in float64."""
  x = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
  return {
    "k1": -x,
    "k2": 0.5 * x**2,
    "mse": 0.5 * x**2,
    "k3": np.expm1(x) - x,
    "k3_straight_through": np.expm1(x) - x,
    "abs": np.abs(x),
  }[estimator]


def _logps(shape=(4, 6), seed=0):
  rng = np.random.default_rng(seed)
  logp = -np.abs(rng.normal(size=shape)).astype(np.float32) * 2
  ref = -np.abs(rng.normal(size=shape)).astype(np.float32) * 2
  return logp, ref


class KlEstimatorsTest(parameterized.TestCase):
  def test_matches_numpy_oracle(self):
    logp, ref = _logps()
    run = jax.jit(
      lambda a, b: {
        e: _kl.kl_estimate(a, b, estimator=e) for e in _kl.KL_ESTIMATORS
      }
    )
    for e, got in run(logp, ref).items():
      np.testing.assert_allclose(
        got, _np_kl(e, logp, ref), rtol=1e-5, atol=1e-6, err_msg=e
      )

  def test_dispatch_equals_direct_functions(self):
    logp, ref = _logps()
    for name, fn in _DIRECT.items():
      np.testing.assert_array_equal(
        _kl.kl_estimate(logp, ref, estimator=name), fn(logp, ref)
      )

  def test_k3_is_non_negative_and_zero_on_policy(self):
    x = np.linspace(-30.0, 30.0, 2001, dtype=np.float32)
    out = jax.jit(_kl.kl_k3)(np.zeros_like(x), x)
    self.assertTrue(np.all(np.asarray(out) >= 0.0))
    self.assertTrue(np.all(np.isfinite(out)))
    zero = jax.jit(
      lambda a: {
        e: _kl.kl_estimate(a, a, estimator=e) for e in _kl.KL_ESTIMATORS
      }
    )(x)
    for e, v in zero.items():
      np.testing.assert_array_equal(v, 0.0, err_msg=e)

  def test_k1_and_k3_are_unbiased_and_k2_gradient_is_unbiased(self):
    """Exact expectations over a categorical π (no sampling noise)."""
    rng = np.random.default_rng(2)
    theta = rng.normal(size=7).astype(np.float32)
    ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=7), jnp.float32))

    def kl(theta):
      logp = jax.nn.log_softmax(theta)
      return jnp.sum(jnp.exp(logp) * (logp - ref))

    def expected(theta, estimator):
      logp = jax.nn.log_softmax(theta)
      p = jax.lax.stop_gradient(jnp.exp(logp))  # E_{y~π} of the estimate
      return jnp.sum(p * _kl.kl_estimate(logp, ref, estimator=estimator))

    run = jax.jit(
      lambda t: (
        kl(t),
        jax.grad(kl)(t),
        {
          e: jax.value_and_grad(expected)(t, e)
          for e in ("k1", "k2", "k3", "k3_straight_through")
        },
      )
    )
    true_kl, true_grad, est = run(theta)
    np.testing.assert_allclose(est["k1"][0], true_kl, rtol=1e-5)
    np.testing.assert_allclose(est["k3"][0], true_kl, rtol=1e-5)
    np.testing.assert_allclose(
      est["k3_straight_through"][0], true_kl, rtol=1e-5
    )
    # ∇ E_π[k2] with the sampling distribution held fixed is ∇ KL(π||π_ref).
    np.testing.assert_allclose(est["k2"][1], true_grad, atol=1e-6)
    np.testing.assert_allclose(
      est["k3_straight_through"][1], true_grad, atol=1e-6
    )

  def test_straight_through_value_of_k3_gradient_of_k2(self):
    logp, ref = _logps()
    fn = lambda est: jax.value_and_grad(
      lambda a: jnp.sum(_kl.kl_estimate(a, ref, estimator=est))
    )
    run = jax.jit(
      lambda a: {e: fn(e)(a) for e in ("k2", "k3", "k3_straight_through")}
    )
    out = run(logp)
    np.testing.assert_allclose(
      out["k3_straight_through"][0], out["k3"][0], rtol=1e-6
    )
    np.testing.assert_allclose(
      out["k3_straight_through"][1], out["k2"][1], rtol=1e-6
    )
    # k2's gradient w.r.t. log π is (log π - log π_ref).
    np.testing.assert_allclose(out["k2"][1], logp - ref, rtol=1e-6)

  def test_reference_gets_no_gradient(self):
    logp, ref = _logps()
    run = jax.jit(
      lambda a, b: {
        e: jax.grad(lambda b, e=e: jnp.sum(_kl.kl_estimate(a, b, estimator=e)))(
          b
        )
        for e in _kl.KL_ESTIMATORS
      }
    )
    for e, g in run(logp, ref).items():
      np.testing.assert_array_equal(g, np.zeros_like(ref), err_msg=e)

  def test_bf16_in_f32_out(self):
    logp, ref = _logps()
    run = jax.jit(
      lambda a, b: [
        _kl.kl_estimate(a, b, estimator=e) for e in _kl.KL_ESTIMATORS
      ]
    )
    for out in run(logp.astype(jnp.bfloat16), ref.astype(jnp.bfloat16)):
      self.assertEqual(out.dtype, jnp.float32)

  def test_contracts(self):
    logp, ref = _logps()
    with self.assertRaises(jaxtyping.TypeCheckError):
      _kl.kl_k3(logp, ref[:, :-1])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _kl.kl_estimate(logp, ref[0])
    with self.assertRaisesRegex(ValueError, "estimator"):
      _kl.kl_estimate(logp, ref, estimator="k4")

  def test_sharded_equals_unsharded_and_vmap(self):
    logp, ref = _logps(shape=(8, 5))
    fn = lambda a, b: [
      _kl.kl_estimate(a, b, estimator=e) for e in _kl.KL_ESTIMATORS
    ]
    testing.assert_sharded_equals_unsharded(fn, (logp, ref))
    for a, b in zip(
      jax.jit(jax.vmap(fn))(logp, ref), jax.jit(fn)(logp, ref), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
