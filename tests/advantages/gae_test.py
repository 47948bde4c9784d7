"""Tests for alignment/advantages/_gae.py (masked GAE and returns)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment.advantages import _gae
from tests import testing

GOLDENS = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "goldens"
  / "rlax_multistep.json"
)


def _np_gae(rewards, values, mask, boot, gamma, lam):
  """float64 transcription of GAE that skips masked positions (verl/Tunix)."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    next_value, next_adv = boot[i], 0.0
    for j in reversed(range(t)):
      if not mask[i, j]:
        continue
      delta = rewards[i, j] + gamma * next_value - values[i, j]
      adv[i, j] = delta + gamma * lam * next_adv
      next_value, next_adv = values[i, j], adv[i, j]
  return adv


def _np_discounted(rewards, mask, boot, gamma):
  b, t = rewards.shape
  out = np.zeros((b, t))
  for i in range(b):
    g = boot[i]
    for j in reversed(range(t)):
      if mask[i, j]:
        g = rewards[i, j] + gamma * g
        out[i, j] = g
  return out


def _batch(seed=0, b=8, t=7, holes=False):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, t + 1, size=b)
  lengths[:2] = (t, 0)
  mask = np.arange(t)[None, :] < lengths[:, None]
  if holes:  # masked observation tokens inside completions
    mask = mask & (rng.uniform(size=(b, t)) > 0.3)
  rewards = rng.normal(size=(b, t)).astype(np.float32)
  values = rng.normal(size=(b, t)).astype(np.float32)
  boot = np.where(lengths > 0, rng.normal(size=b), 0.0).astype(np.float32)
  return rewards, values, mask, boot


class RlaxGoldenTest(absltest.TestCase):
  """Parity with rlax 0.1.9 (tests/oracles/rlax_goldens.py) to 1e-6."""

  def test_matches_rlax_goldens(self):
    payload = json.loads(GOLDENS.read_text())
    self.assertEqual(payload["rlax_version"], "0.1.9")
    self.assertLen(payload["cases"], 8)
    for case in payload["cases"]:
      args = [np.asarray(case[k], np.float32) for k in ("rewards", "values")]
      mask = np.asarray(case["completion_mask"], bool)
      boot = np.asarray(case["bootstrap_values"], np.float32)
      gamma, lam = case["gamma"], case["lam"]
      gae = jax.jit(
        lambda r, v, m, bt, g=gamma, la=lam: (
          _gae.generalized_advantage_estimation(r, v, m, bt, gamma=g, lam=la)
        )
      )(*args, mask, boot)
      lam_ret = _gae.lambda_returns(*args, mask, boot, gamma=gamma, lam=lam)
      disc = _gae.discounted_returns(args[0], mask, boot, gamma=gamma)
      for got, key in (
        (gae.advantages, "gae_advantages"),
        (gae.returns, "lambda_returns"),
        (lam_ret, "lambda_returns"),
        (disc, "discounted_returns"),
      ):
        np.testing.assert_allclose(
          got,
          np.asarray(case[key]),
          rtol=1e-6,
          atol=1e-6,
          err_msg=f"{key} {gamma} {lam}",
        )


class GAETest(parameterized.TestCase):
  @parameterized.parameters(
    (1.0, 0.95, False), (0.9, 0.7, True), (0.99, 1.0, True)
  )
  def test_matches_numpy_oracle(self, gamma, lam, holes):
    r, v, m, boot = _batch(1, holes=holes)
    out = jax.jit(
      lambda *a: _gae.generalized_advantage_estimation(*a, gamma=gamma, lam=lam)
    )(r, v, m, boot)
    want = _np_gae(
      r.astype(np.float64),
      v.astype(np.float64),
      m,
      boot.astype(np.float64),
      gamma,
      lam,
    )
    np.testing.assert_allclose(out.advantages, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
      out.returns, np.where(m, want + v, 0.0), rtol=1e-5, atol=1e-5
    )
    disc = _gae.discounted_returns(r, m, boot, gamma=gamma)
    np.testing.assert_allclose(
      disc, _np_discounted(r, m, boot, gamma), rtol=1e-5, atol=1e-5
    )

  def test_limits(self):
    r, v, m, boot = _batch(2)
    mc = _gae.discounted_returns(r, m, boot, gamma=0.9)
    lam1 = _gae.generalized_advantage_estimation(
      r, v, m, boot, gamma=0.9, lam=1.0
    )
    np.testing.assert_allclose(
      lam1.advantages, np.where(m, mc - v, 0.0), atol=1e-5
    )
    # lambda = 0: the one-step TD error r_t + gamma V_{t+1} - V_t.
    lam0 = _gae.generalized_advantage_estimation(
      r, v, m, boot, gamma=0.9, lam=0.0
    )
    lengths = m.sum(1)
    next_v = np.concatenate([v[:, 1:], np.zeros_like(v[:, :1])], 1)
    next_v[np.arange(len(v)), np.maximum(lengths - 1, 0)] = boot
    np.testing.assert_allclose(
      lam0.advantages, np.where(m, r + 0.9 * next_v - v, 0.0), atol=1e-5
    )
    # TD(lambda) returns equal GAE + V for every lambda.
    for lam in (0.0, 0.5):
      got = _gae.lambda_returns(r, v, m, boot, gamma=0.9, lam=lam)
      gae = _gae.generalized_advantage_estimation(
        r, v, m, boot, gamma=0.9, lam=lam
      )
      np.testing.assert_allclose(got, gae.returns, atol=1e-5)
    # Without bootstrap (terminated), gamma = 1: reverse cumulative sum.
    cum = _gae.discounted_returns(r, m)
    np.testing.assert_allclose(
      cum,
      np.where(m, np.cumsum(np.where(m, r, 0)[:, ::-1], 1)[:, ::-1], 0),
      atol=1e-5,
    )

  def test_nan_padding_changes_nothing_and_no_gradient(self):
    r, v, m, boot = _batch(3, holes=True)
    fn = lambda r, v, bt: _gae.generalized_advantage_estimation(
      r, v, m, bt, gamma=0.95, lam=0.9
    )
    want = jax.jit(fn)(r, v, boot)
    rn = testing.with_nan_padding(r, m)
    vn = testing.with_nan_padding(v, m)
    got = jax.jit(fn)(rn, vn, boot)
    np.testing.assert_array_equal(got.advantages, want.advantages)
    np.testing.assert_array_equal(got.returns, want.returns)
    for grad_fn in (
      fn,
      lambda r, v, bt: _gae.lambda_returns(r, v, m, bt),
      lambda r, v, bt: _gae.discounted_returns(r, m, bt),
    ):
      grads = testing.grads(
        lambda *a, f=grad_fn: jax.tree.leaves(f(*a))[0],
        (rn, vn, boot),
        (0, 1, 2),
      )
      for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))

  def test_dtypes_shapes_and_errors(self):
    r, v, m, boot = _batch(4)
    bf16 = [x.astype(jnp.bfloat16) for x in (r, v)]
    out = jax.eval_shape(_gae.generalized_advantage_estimation, *bf16, m)
    self.assertEqual(out.advantages.dtype, jnp.float32)
    self.assertEqual(out.returns.dtype, jnp.float32)
    out = jax.eval_shape(_gae.discounted_returns, bf16[0], m)
    self.assertEqual(out.dtype, jnp.float32)
    with self.assertRaises(jaxtyping.TypeCheckError):
      _gae.generalized_advantage_estimation(r[0], v[0], m[0])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _gae.lambda_returns(r, v[:-1], m)
    with self.assertRaises(jaxtyping.TypeCheckError):
      _gae.discounted_returns(r, m, boot[:-1])
    for kwargs, name in (({"gamma": 1.5}, "gamma"), ({"lam": -0.1}, "lam")):
      with self.assertRaisesRegex(ValueError, name):
        _gae.generalized_advantage_estimation(r, v, m, **kwargs)
      with self.assertRaisesRegex(ValueError, name):
        _gae.lambda_returns(r, v, m, **kwargs)

  def test_vmap_and_sharded(self):
    r, v, m, boot = _batch(5, b=8)
    fn = lambda r, v, m, bt: _gae.generalized_advantage_estimation(
      r, v, m, bt, gamma=0.99, lam=0.95
    )
    stacked = jax.vmap(fn)(*(np.stack([x, x]) for x in (r, v, m, boot)))
    np.testing.assert_allclose(
      stacked.advantages[1], fn(r, v, m, boot).advantages
    )
    testing.assert_sharded_equals_unsharded(fn, (r, v, m, boot))


if __name__ == "__main__":
  absltest.main()
