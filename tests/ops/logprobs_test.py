"""Tests for alignment/ops/_logprobs.py."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest

from alignment.ops import _logprobs
from tests import testing


def _np_log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_token_logps(logits, targets):
  return np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[
    ..., 0
  ]


def _np_entropy(logits):
  logp = _np_log_softmax(logits)
  p = np.exp(logp)
  return -np.sum(np.where(p > 0, p * logp, 0.0), -1)


def _inputs(batch=4, length=5, vocab=11, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(batch, length, vocab))).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, length))
  return logits, targets


class TokenLogpsTest(absltest.TestCase):
  def test_matches_float64_log_softmax(self):
    logits, targets = _inputs()
    # A large offset checks the log-sum-exp is shifted (no overflow).
    big = logits + 1e4
    fn = jax.jit(_logprobs.token_logps)
    np.testing.assert_allclose(
      fn(logits, targets),
      _np_token_logps(logits, targets),
      rtol=1e-5,
      atol=1e-5,
    )
    np.testing.assert_allclose(
      fn(big, targets), _np_token_logps(big, targets), atol=2e-3
    )
    # -inf logits (masked vocabulary entries) drop out of the normaliser.
    banned = np.where(
      np.arange(logits.shape[-1]) == targets[..., None], logits, -np.inf
    )
    banned[..., :3] = logits[..., :3]
    np.testing.assert_allclose(
      fn(banned, targets),
      _np_token_logps(banned, targets),
      rtol=1e-5,
      atol=1e-5,
    )
    # Leading batch dimensions are optional (*B).
    np.testing.assert_allclose(
      fn(logits[0], targets[0]),
      _np_token_logps(logits[0], targets[0]),
      rtol=1e-5,
      atol=1e-5,
    )

  def test_gradient_is_onehot_minus_softmax(self):
    logits, targets = _inputs()
    g = testing.grads(_logprobs.token_logps, (logits, targets), 0)
    want = np.eye(logits.shape[-1])[targets] - np.exp(_np_log_softmax(logits))
    np.testing.assert_allclose(g, want, atol=1e-6)

  def test_bf16_logits_give_f32(self):
    logits, targets = _inputs(vocab=4096, scale=8.0)
    bf16 = logits.astype(jnp.bfloat16)
    out = jax.jit(_logprobs.token_logps)(bf16, targets)
    self.assertEqual(out.dtype, jnp.float32)
    # Exact log-softmax of the bf16-rounded logits: the reduction is f32.
    want = _np_token_logps(np.asarray(bf16, np.float32), targets)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)

  def test_shape_contract(self):
    logits, targets = _inputs()
    with self.assertRaises(jaxtyping.TypeCheckError):
      _logprobs.token_logps(logits, targets[:, :-1])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _logprobs.token_logps(logits, targets.astype(np.float32))


class SequenceLogpsTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(1)
    self.x = rng.normal(size=(4, 6)).astype(np.float32)
    self.mask = np.arange(6)[None] < np.array([6, 3, 0, 1])[:, None]

  def test_matches_oracle(self):
    fn = jax.jit(
      lambda x, m: (
        _logprobs.sequence_logps(x, m),
        _logprobs.sequence_logps(x, m, average=True),
      )
    )
    total, mean = fn(self.x, self.mask)
    v = np.where(self.mask, self.x.astype(np.float64), 0.0)
    n = self.mask.sum(-1)
    np.testing.assert_allclose(total, v.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(
      mean, np.where(n > 0, v.sum(-1) / np.maximum(n, 1), 0.0), rtol=1e-6
    )

  def test_nan_padding_and_empty_rows_are_inert(self):
    x_nan = testing.with_nan_padding(self.x, self.mask)
    for average in (False, True):
      fn = jax.jit(
        jax.value_and_grad(
          lambda x, m, a=average: jnp.sum(
            _logprobs.sequence_logps(x, m, average=a)
          )
        )
      )
      clean, dirty = fn(self.x, self.mask), fn(x_nan, self.mask)
      np.testing.assert_array_equal(dirty[0], clean[0])
      np.testing.assert_array_equal(dirty[1], clean[1])
      self.assertTrue(np.all(np.asarray(dirty[1])[~self.mask] == 0))
    n = self.mask.sum(-1, keepdims=True)
    np.testing.assert_allclose(dirty[1], self.mask / np.maximum(n, 1))

  def test_bf16_in_f32_out(self):
    out = jax.jit(_logprobs.sequence_logps)(
      self.x.astype(jnp.bfloat16), self.mask
    )
    self.assertEqual(out.dtype, jnp.float32)


class EntropyTest(absltest.TestCase):
  def test_matches_oracle_and_limits(self):
    logits, _ = _inputs()
    fn = jax.jit(_logprobs.entropy_from_logits)
    np.testing.assert_allclose(
      fn(logits), _np_entropy(logits), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
      fn(np.zeros((3, 7), np.float32)), np.full(3, np.log(7)), rtol=1e-6
    )
    # Logits of size ~1e3 (an untempered large-vocabulary head): the O(1)
    # entropy must not drown in the rounding of the O(1e3) terms.
    wide, _ = _inputs(scale=400.0)
    np.testing.assert_allclose(fn(wide), _np_entropy(wide), atol=5e-5)
    peaked = np.array([[0.0, 200.0, 0.0]], np.float32)
    np.testing.assert_allclose(fn(peaked), [0.0], atol=1e-6)

  def test_minus_inf_logits_are_excluded(self):
    logits, _ = _inputs(vocab=6)
    masked = logits.copy()
    masked[..., 4:] = -np.inf
    fn = jax.jit(
      jax.value_and_grad(
        lambda z: jnp.sum(_logprobs.entropy_from_logits(z)), has_aux=False
      )
    )
    value, grad = fn(masked)
    # The entropy of the remaining 4 entries.
    np.testing.assert_allclose(
      value, _np_entropy(logits[..., :4]).sum(), rtol=1e-5
    )
    want_grad = testing.grads(
      _logprobs.entropy_from_logits, (logits[..., :4],), 0
    )
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_allclose(grad[..., :4], want_grad, atol=1e-5)
    np.testing.assert_array_equal(grad[..., 4:], 0.0)

  def test_gradient_identity(self):
    # dH/dz = -p (log p + H).
    logits, _ = _inputs()
    g = testing.grads(_logprobs.entropy_from_logits, (logits,), 0)
    logp = _np_log_softmax(logits)
    want = -np.exp(logp) * (logp + _np_entropy(logits)[..., None])
    np.testing.assert_allclose(g, want, atol=1e-5)

  def test_bf16_in_f32_out(self):
    logits, _ = _inputs()
    out = jax.jit(_logprobs.entropy_from_logits)(logits.astype(jnp.bfloat16))
    self.assertEqual(out.dtype, jnp.float32)


class ShardingTest(absltest.TestCase):
  def test_sharded_equals_unsharded_and_vmap(self):
    logits, targets = _inputs(batch=8)
    mask = np.arange(5)[None] < (np.arange(8) % 5 + 1)[:, None]

    def fn(logits, targets, mask):
      lp = _logprobs.token_logps(logits, targets)
      return (
        lp,
        _logprobs.sequence_logps(lp, mask),
        _logprobs.entropy_from_logits(logits),
      )

    testing.assert_sharded_equals_unsharded(
      fn, (logits, targets, mask), rtol=1e-5, atol=1e-5
    )
    vmapped = jax.jit(jax.vmap(fn))(logits, targets, mask)
    direct = jax.jit(fn)(logits, targets, mask)
    for a, b in zip(vmapped, direct, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
