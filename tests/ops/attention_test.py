"""Tests for alignment/ops/_attention.py: blockwise vs dense attention."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment import ops
from alignment.ops import _attention
from tests import testing

# B rows: causal + left padding, causal + right padding, two packed
# segments, causal + sliding window of 4 (row 0 also has empty query rows).
_B, _KV, _G, _N = 4, 2, 2, 8


def _allowed(length, keys=None):
  keys = length if keys is None else keys
  offset = keys - length  # queries are the last `length` of `keys` slots
  qi = np.arange(length)[:, None] + offset
  kj = np.arange(keys)[None, :]
  causal = kj <= qi
  real = np.ones((_B, keys), bool)
  real[0, :5] = False
  real[1, -3:] = False
  seg = np.where(np.arange(keys) < keys // 2, 1, 2)
  allowed = np.broadcast_to(causal, (_B, length, keys)) & real[:, None, :]
  allowed = allowed.copy()
  allowed[2] &= seg[offset:, None] == seg[None, :]
  allowed[3] &= qi - kj < 4
  return allowed


def _inputs(length, keys=None, seed=0, dtype=np.float32):
  keys = length if keys is None else keys
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(_B, _KV, _G, length, _N))
  k = rng.normal(size=(_B, _KV, keys, _N))
  v = rng.normal(size=(_B, _KV, keys, _N))
  do = rng.normal(size=q.shape)
  cast = lambda x: jnp.asarray(x.astype(np.float32), dtype)  # noqa: E731
  return cast(q), cast(k), cast(v), _allowed(length, keys), cast(do)


def _np_oracle(q, k, v, allowed, do):
  """Attention and its gradients in float64, from the definitions.

  ``P = softmax(Q K^T / sqrt(N))`` over allowed keys (rows with none: P = 0),
  ``O = P V``; ``dV = P^T dO``, ``dP = dO V^T``,
  ``dS = P * (dP - rowsum(dP * P))``, ``dQ = dS K / sqrt(N)``,
  ``dK = dS^T Q / sqrt(N)``.
  """
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  scale = q.shape[-1] ** -0.5
  s = np.einsum("bkgln,bksn->bkgls", q, k) * scale
  mask = np.broadcast_to(allowed[:, None, None], s.shape)
  s = np.where(mask, s, -np.inf)
  peak = np.max(s, -1, keepdims=True)
  e = np.where(mask, np.exp(s - np.where(np.isinf(peak), 0, peak)), 0.0)
  total = e.sum(-1, keepdims=True)
  p = e / np.where(total > 0, total, 1.0)
  out = np.einsum("bkgls,bksn->bkgln", p, v)
  dv = np.einsum("bkgls,bkgln->bksn", p, do)
  dp = np.einsum("bkgln,bksn->bkgls", do, v)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  dq = np.einsum("bkgls,bksn->bkgln", ds, k) * scale
  dk = np.einsum("bkgls,bkgln->bksn", ds, q) * scale
  return out, (dq, dk, dv)


def _value_and_vjp(fn):
  def run(q, k, v, allowed, do):
    out, vjp = jax.vjp(lambda *a: fn(*a, allowed), q, k, v)
    return out, vjp(do)

  return jax.jit(run)


def _blockwise(q_block, kv_block):
  return _value_and_vjp(
    lambda q, k, v, a: ops.blockwise_attention(
      q, k, v, a, q_block=q_block, kv_block=kv_block
    )
  )


# (L, S, q_block, kv_block): blocks that divide / do not divide L and S,
# one block, blocks larger than the sequence, fewer queries than keys (a
# chunk attending to earlier slots too).
_CONFIGS = (
  (16, 16, 4, 8),
  (37, 37, 8, 16),
  (37, 37, 5, 7),
  (13, 13, 64, 64),
  (6, 19, 4, 5),
)


class BlockwiseAttentionTest(parameterized.TestCase):
  @parameterized.parameters(*_CONFIGS)
  def test_values_and_gradients_equal_oracle_and_dense(
    self, length, keys, q_block, kv_block
  ):
    args = _inputs(length, keys)
    want, want_grads = _np_oracle(*args)
    got, got_grads = _blockwise(q_block, kv_block)(*args)
    dense, dense_grads = _value_and_vjp(ops.dense_attention)(*args)
    self.assertEqual(got.dtype, jnp.float32)
    for a, b in ((got, want), (dense, want), (got, dense)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for name, g, w, d in zip(
      "qkv", got_grads, want_grads, dense_grads, strict=True
    ):
      self.assertEqual(g.shape, w.shape, name)
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
      np.testing.assert_allclose(g, d, atol=1e-5, rtol=1e-5, err_msg=name)

  def test_empty_rows_give_zero_output_and_gradient_without_nan(self):
    q, k, v, allowed, do = _inputs(12)
    allowed[1, 3:7] = False  # empty rows in the middle of a sequence
    allowed[2] = False  # a whole batch row masked
    for fn in (_blockwise(4, 5), _value_and_vjp(ops.dense_attention)):
      out, (dq, dk, dv) = fn(q, k, v, allowed, do)
      for x in (out, dq, dk, dv):
        self.assertFalse(np.isnan(np.asarray(x)).any())
      np.testing.assert_array_equal(out[0, :, :, :5], 0.0)  # left padding
      np.testing.assert_array_equal(out[1, :, :, 3:7], 0.0)
      np.testing.assert_array_equal(out[2], 0.0)
      np.testing.assert_array_equal(dq[1, :, :, 3:7], 0.0)
      np.testing.assert_array_equal(dq[2], 0.0)
      np.testing.assert_array_equal(dk[2], 0.0)
      np.testing.assert_array_equal(dv[2], 0.0)
      # Keys nobody may see (row 0's padding) get no gradient either.
      np.testing.assert_array_equal(dk[0, :, :5], 0.0)
      np.testing.assert_array_equal(dv[0, :, :5], 0.0)

  def test_bfloat16_inputs(self):
    args32 = _inputs(20)
    args16 = _inputs(20, dtype=jnp.bfloat16)
    want, want_grads = _blockwise(8, 8)(*args32)
    got, got_grads = _blockwise(8, 8)(*args16)
    dense, _ = _value_and_vjp(ops.dense_attention)(*args16)
    self.assertEqual(got.dtype, jnp.bfloat16)
    self.assertEqual({g.dtype for g in got_grads}, {jnp.dtype(jnp.bfloat16)})
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(got), want, atol=5e-2, rtol=5e-2)
    np.testing.assert_allclose(f32(got), f32(dense), atol=3e-2, rtol=3e-2)
    for g, w in zip(got_grads, want_grads, strict=True):
      np.testing.assert_allclose(f32(g), w, atol=1e-1, rtol=1e-1)

  def test_vmap_equals_loop(self):
    q, k, v, allowed, _ = _inputs(9)
    stack = lambda x: jnp.stack([x, 2.0 * x])  # noqa: E731
    fn = lambda q, k, v: ops.blockwise_attention(  # noqa: E731
      q, k, v, allowed, q_block=4, kv_block=4
    )
    got = jax.jit(jax.vmap(fn))(stack(q), stack(k), stack(v))
    want = jax.jit(jax.vmap(ops.dense_attention, (0, 0, 0, None)))(
      stack(q), stack(k), stack(v), allowed
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  def test_sharded_equals_unsharded(self):
    q, k, v, allowed, do = _inputs(8, seed=1)
    rep = lambda x: jnp.concatenate([x, x[::-1]])  # noqa: E731 -> B = 8

    def fn(q, k, v, allowed, do):
      return _blockwise(4, 4)(q, k, v, allowed, do)

    testing.assert_sharded_equals_unsharded(
      fn,
      (rep(q), rep(k), rep(v), np.concatenate([allowed, allowed]), rep(do)),
      rtol=1e-5,
      atol=1e-5,
    )

  def test_grad_step_temp_memory_is_several_times_smaller(self):
    """Compiled temp bytes of ``grad(sum(attention * c))`` at L = 1024.

    Dense keeps ``[B, KV, G, L, L]`` float32 scores / probabilities and
    their cotangents; blockwise a few ``128 x 128`` tiles and
    ``[B, KV, G, L, N]`` accumulators. Measured under conftest's XLA flags
    (compiled, never run): dense 192.6 MiB, blockwise 5.9 MiB (32x; at
    L = 512: 48.3 vs 5.6 MiB).
    """
    length = 1024
    q, k, v, allowed, c = _inputs(length)

    def temp(fn):
      loss = lambda q, k, v, a, c: jnp.sum(fn(q, k, v, a) * c)  # noqa: E731
      grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      compiled = grad.lower(q, k, v, allowed, c).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    dense = temp(ops.dense_attention)
    blockwise = temp(ops.blockwise_attention)
    scores = _B * _KV * _G * length * length * 4
    self.assertGreaterEqual(dense, 2 * scores)
    self.assertLess(blockwise, scores / 4)
    self.assertGreater(dense, 16 * blockwise, (dense, blockwise))

  def test_bad_arguments_raise(self):
    q, k, v, allowed, _ = _inputs(6)
    for name in ("q_block", "kv_block"):
      with self.assertRaisesRegex(ValueError, name):
        ops.blockwise_attention(q, k, v, allowed, **{name: 0})
    with self.assertRaises(jaxtyping.TypeCheckError):
      ops.blockwise_attention(q[0], k, v, allowed)
    with self.assertRaises(jaxtyping.TypeCheckError):  # S differs from v's
      ops.blockwise_attention(q, k[:, :, :5], v, allowed)
    with self.assertRaises(jaxtyping.TypeCheckError):  # mask not bool
      ops.blockwise_attention(q, k, v, allowed.astype(np.float32))

  def test_exported(self):
    self.assertIs(ops.blockwise_attention, _attention.blockwise_attention)
    self.assertIs(ops.dense_attention, _attention.dense_attention)


if __name__ == "__main__":
  absltest.main()
