"""Tests for ``fused_token_logps(..., where=mask)``: only masked rows run.

The rows outside ``where`` must get log-prob and entropy 0 and no gradient,
and the rows inside must match the unmasked computation (and a float64
oracle), whatever the chunking: rows are reordered so the computed ones come
first and chunks without any are skipped.
"""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment import ops
from alignment.ops import _logprobs
from tests import testing

B, T, D, V = 6, 60, 16, 50  # 360 rows: several 128-row chunks


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  unembedding = (0.5 * rng.normal(size=(D, V))).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T))
  # A completion mask: a suffix per row, one row empty, one full.
  start = np.array([20, 45, 60, 0, 59, 30])
  where = np.arange(T)[None] >= start[:, None]
  c1 = rng.normal(size=(B, T)).astype(np.float32)
  c2 = rng.normal(size=(B, T)).astype(np.float32)
  return hidden, unembedding, targets, where, c1, c2


def _oracle(hidden, unembedding, targets, temperature):
  z = hidden.astype(np.float64) @ unembedding.astype(np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return picked, -np.sum(np.exp(logp) * logp, -1)


def _loss(fn, c1, c2, where):
  """Value, outputs and d(Σ c1·logp + Σ c2·H over ``where``)/d(h, W)."""

  def scalar(h, w):
    logp, ent = fn(h, w)
    logp = jnp.where(where, logp, 0.0)
    ent = jnp.where(where, ent, 0.0)
    return jnp.sum(c1 * logp) + jnp.sum(c2 * ent), (logp, ent)

  return jax.value_and_grad(scalar, (0, 1), has_aux=True)


# (chunk_size, vocab_chunk_size, temperature, dense_rows); 146 of the 360
# rows are True. Tiles: always (0), a head too narrow for the True rows
# (100), one they fill less than half of (300; the default, 360 rows at
# this size). The dense head: exactly filled (146), wider (200, 292: half
# filled).
_CONFIGS = (
  (2048, None, 1.0, 0),
  (64, 16, 0.7, 0),
  (7, 10, 1.0, 0),
  (1000, 50, 0.7, 0),
  (64, 16, 0.7, 100),
  (7, 10, 1.0, 146),
  (64, 16, 1.0, 200),
  (7, 10, 0.7, 292),
  (64, 16, 1.0, 300),
  (2048, None, 0.7, None),
)


class FusedWhereTest(parameterized.TestCase):
  def test_equals_unmasked_path_and_oracle(self):
    hidden, unembedding, targets, where, c1, c2 = _inputs()

    @jax.jit
    def run(h, w):
      out = {}
      for chunk, vchunk, temp, dense in _CONFIGS:
        kw = dict(
          chunk_size=chunk,
          vocab_chunk_size=vchunk,
          temperature=temp,
          return_entropy=True,
          dense_rows=dense,
        )
        masked = lambda h, w, kw=kw: ops.fused_token_logps(
          h, w, targets, where=where, **kw
        )
        full = lambda h, w, kw=kw: ops.fused_token_logps(h, w, targets, **kw)
        out[chunk, vchunk, temp, dense] = (
          _loss(masked, c1, c2, where)(h, w),
          _loss(full, c1, c2, where)(h, w),
          masked(h, w),
        )
      return out

    for key, (got, want, raw) in run(hidden, unembedding).items():
      msg = str(key)
      for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        self.assertEqual(g.dtype, jnp.float32)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=msg)
      # Outside ``where`` the raw outputs are exactly 0.
      for x in raw:
        np.testing.assert_array_equal(np.asarray(x)[~where], 0.0, msg)
      oracle = _oracle(hidden, unembedding, targets, key[2])
      for g, r in zip(raw, oracle, strict=True):
        np.testing.assert_allclose(
          np.asarray(g)[where], r[where], rtol=1e-5, atol=1e-5, err_msg=msg
        )
      # Zero gradient into the rows outside ``where``.
      dh = np.asarray(got[1][0])
      np.testing.assert_array_equal(dh[~where], 0.0, msg)
      self.assertGreater(np.abs(dh[where]).max(), 0.0)

  @parameterized.parameters(0, 100, None)
  def test_nan_outside_where_is_inert(self, dense):
    hidden, unembedding, targets, where, c1, c2 = _inputs(1)
    poisoned = testing.with_nan_padding(hidden, where[..., None])
    fn = lambda h, w: ops.fused_token_logps(
      h,
      w,
      targets,
      chunk_size=64,
      return_entropy=True,
      where=where,
      dense_rows=dense,
    )
    grad = jax.jit(_loss(fn, c1, c2, where))
    (v0, _), g0 = grad(hidden, unembedding)
    (v1, _), g1 = grad(poisoned, unembedding)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
      self.assertTrue(np.all(np.isfinite(a)))
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  @parameterized.product(value=(True, False), dense=(0, 100, None))
  def test_all_or_no_rows(self, value, dense):
    hidden, unembedding, targets, _, _, _ = _inputs(2)
    where = np.full((B, T), value)
    got = jax.jit(
      lambda h, w: ops.fused_token_logps(
        h, w, targets, where=where, dense_rows=dense
      )
    )(hidden, unembedding)
    if value:
      want = _oracle(hidden, unembedding, targets, 1.0)[0]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_array_equal(got, 0.0)

  def test_bf16_in_float32_out_and_contracts(self):
    hidden, unembedding, targets, where, _, _ = _inputs(3)
    out = jax.jit(
      lambda h, w: ops.fused_token_logps(h, w, targets, where=where)
    )(hidden.astype(jnp.bfloat16), unembedding.astype(jnp.bfloat16))
    self.assertEqual(out.dtype, jnp.float32)
    want = _logprobs.token_logps(
      jnp.asarray(hidden, jnp.bfloat16).astype(jnp.float32)
      @ jnp.asarray(unembedding, jnp.bfloat16).astype(jnp.float32),
      targets,
    )
    np.testing.assert_allclose(
      np.asarray(out)[where], np.asarray(want)[where], rtol=2e-2, atol=2e-2
    )
    with self.assertRaises(jaxtyping.TypeCheckError):
      ops.fused_token_logps(hidden, unembedding, targets, where=where[:, :-1])
    with self.assertRaises(jaxtyping.TypeCheckError):
      ops.fused_token_logps(
        hidden, unembedding, targets, where=where.astype(np.int32)
      )

  def test_sharded_equals_unsharded_and_vmap(self):
    hidden, unembedding, targets, where, _, _ = _inputs(4)
    hidden, targets, where = hidden[:, :16], targets[:, :16], where[:, :16]
    hidden = np.concatenate([hidden, hidden[:2]])  # 8 rows for 8 devices
    targets = np.concatenate([targets, targets[:2]])
    where = np.concatenate([where, where[:2]])

    def fn(h, t, m):
      return ops.fused_token_logps(
        h,
        unembedding,
        t,
        chunk_size=8,
        return_entropy=True,
        where=m,
        dense_rows=40,  # a dense head and tiles
      )

    testing.assert_sharded_equals_unsharded(
      fn, (hidden, targets, where), rtol=1e-5, atol=1e-5
    )
    vmapped = jax.jit(jax.vmap(fn))(
      hidden.reshape(2, 4, 16, D),
      targets.reshape(2, 4, 16),
      where.reshape(2, 4, 16),
    )
    direct = jax.jit(fn)(hidden, targets, where)
    for a, b in zip(vmapped, direct, strict=True):
      np.testing.assert_allclose(
        np.reshape(a, b.shape), b, rtol=1e-5, atol=1e-5
      )


if __name__ == "__main__":
  absltest.main()
