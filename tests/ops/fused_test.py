"""Tests for alignment/ops/_fused.py: chunked LM head + log-softmax."""

import math
import re

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment import ops
from alignment.ops import _fused, _logprobs
from tests import testing


def _inputs(batch=3, length=7, width=16, vocab=50, seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(batch, length, width)).astype(np.float32)
  unembedding = (scale * rng.normal(size=(width, vocab))).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, length))
  return hidden, unembedding, targets


def _naive(hidden, unembedding, targets, temperature=1.0):
  logits = hidden @ unembedding / temperature
  return (
    _logprobs.token_logps(logits, targets),
    _logprobs.entropy_from_logits(logits),
  )


def _np_oracle(hidden, unembedding, targets, temperature=1.0):
  z = hidden.astype(np.float64) @ unembedding.astype(np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return picked, -np.sum(np.exp(logp) * logp, -1)


def _value_and_grads(fn, hidden, unembedding, c1, c2):
  """Values of both outputs and d(Σ c1·logp + Σ c2·H)/d(hidden, W)."""

  def scalar(h, w):
    logp, ent = fn(h, w)
    return jnp.sum(c1 * logp) + jnp.sum(c2 * ent), (logp, ent)

  (_, out), grads = jax.value_and_grad(scalar, (0, 1), has_aux=True)(
    hidden, unembedding
  )
  return out, grads


# (chunk_size, vocab_chunk_size, temperature, dense_rows): rows that do /
# do not divide B·T = 21, vocabulary tiles that do / do not divide V = 50,
# one tile, one row per chunk (dense_rows 0: always tiles; 9 < 21: tiles);
# the dense head: exactly B·T rows and the default (wider at this size).
_CONFIGS = (
  (4, None, 1.0, 0),
  (7, 10, 0.7, 0),
  (5, 16, 0.7, 0),
  (64, 50, 1.0, 0),
  (1, 3, 1.0, 0),
  (5, 16, 0.7, 9),
  (4, None, 1.0, 21),
  (7, 10, 0.7, None),
)


class FusedTokenLogpsTest(parameterized.TestCase):
  def test_values_and_gradients_equal_naive_path(self):
    hidden, unembedding, targets = _inputs()
    rng = np.random.default_rng(1)
    c1 = rng.normal(size=targets.shape).astype(np.float32)
    c2 = rng.normal(size=targets.shape).astype(np.float32)

    @jax.jit
    def run(hidden, unembedding):
      got, want = {}, {}
      for chunk, vocab_chunk, temp, dense in _CONFIGS:
        fused = lambda h, w, c=chunk, v=vocab_chunk, t=temp, d=dense: (
          _fused.fused_token_logps(
            h,
            w,
            targets,
            chunk_size=c,
            vocab_chunk_size=v,
            temperature=t,
            return_entropy=True,
            dense_rows=d,
          )
        )
        # (dense -1: the default; dict keys must compare)
        key = (chunk, vocab_chunk, temp, -1 if dense is None else dense)
        got[key] = _value_and_grads(fused, hidden, unembedding, c1, c2)
        if temp not in want:
          naive = lambda h, w, t=temp: _naive(h, w, targets, t)
          want[temp] = _value_and_grads(naive, hidden, unembedding, c1, c2)
      return got, want

    # Scale 120 gives logits of about ±1000: the online log-sum-exp must not
    # overflow. Rows are zero-padded (21 -> 24, 25, 64): finite gradients.
    for scale, tol in ((1.0, 1e-5), (120.0, 1e-4)):
      w = unembedding * scale
      got, want = run(hidden, w)
      for config, out in got.items():
        msg = str((scale, config))
        for g, ref in zip(
          jax.tree.leaves(out), jax.tree.leaves(want[config[2]]), strict=True
        ):
          self.assertEqual(g.dtype, jnp.float32)
          self.assertTrue(np.all(np.isfinite(g)), msg)
          atol = tol * max(1.0, float(np.abs(ref).max()))  # f32 rounding
          np.testing.assert_allclose(g, ref, rtol=tol, atol=atol, err_msg=msg)
        oracle = _np_oracle(hidden, w, targets, config[2])
        for g, ref in zip(out[0], oracle, strict=True):
          atol = tol * max(1.0, float(np.abs(ref).max()))  # f32 rounding
          np.testing.assert_allclose(g, ref, rtol=tol, atol=atol, err_msg=msg)

  def test_masking_the_result_afterwards(self):
    # The documented usage: fused log-probs, then a masked sequence sum.
    hidden, unembedding, targets = _inputs()
    mask = np.arange(7)[None] < np.array([7, 3, 0])[:, None]

    def seq(fn):
      return lambda h, w: jnp.sum(ops.sequence_logps(fn(h, w), mask))

    fused = seq(lambda h, w: ops.fused_token_logps(h, w, targets, chunk_size=8))
    naive = seq(lambda h, w: _naive(h, w, targets)[0])
    run = jax.jit(
      lambda h, w: (
        jax.value_and_grad(fused, (0, 1))(h, w),
        jax.value_and_grad(naive, (0, 1))(h, w),
      )
    )
    got, want = run(hidden, unembedding)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1][0][~mask], 0.0)

  def test_never_materialises_the_logits(self):
    batch, length, width, vocab = 2, 64, 16, 512
    hidden, unembedding, targets = _inputs(batch, length, width, vocab)
    full = batch * length * vocab

    def loss(fn):
      return jax.jit(
        jax.value_and_grad(
          lambda h, w: jnp.sum(fn(h, w)[0]) + jnp.sum(fn(h, w)[1]), (0, 1)
        )
      )

    fused = loss(
      lambda h, w: _fused.fused_token_logps(
        h,
        w,
        targets,
        chunk_size=32,
        vocab_chunk_size=128,
        return_entropy=True,
        dense_rows=0,
      )
    )
    naive = loss(lambda h, w: _naive(h, w, targets))
    fused_c = fused.lower(hidden, unembedding).compile()
    naive_c = naive.lower(hidden, unembedding).compile()
    shapes = re.findall(
      r"\b(?:f32|bf16|f16|pred|s32)\[([\d,]+)\]", fused_c.as_text()
    )
    biggest = max(math.prod(int(d) for d in s.split(",")) for s in shapes)
    self.assertLessEqual(biggest, max(width * vocab, full // 8))
    naive_shapes = re.findall(r"\bf32\[([\d,]+)\]", naive_c.as_text())
    self.assertIn(
      full, [math.prod(int(d) for d in s.split(",")) for s in naive_shapes]
    )  # the check can fail
    fused_mem = fused_c.memory_analysis()
    naive_mem = naive_c.memory_analysis()
    self.assertLess(
      fused_mem.temp_size_in_bytes, naive_mem.temp_size_in_bytes / 4
    )

  def test_dense_head_keeps_its_logits_for_the_backward_pass(self):
    # Three [B·T, V] products (forward, dh, dW): the backward pass reads
    # the kept logits instead of recomputing them. One row more than the
    # head holds: the tiles, which recompute (a fourth product).
    batch, length, width, vocab = 2, 64, 16, 512
    hidden, unembedding, targets = _inputs(batch, length, width, vocab)

    def dots(dense):
      fn = lambda h, w: jnp.sum(
        _fused.fused_token_logps(h, w, targets, dense_rows=dense, chunk_size=32)
      )
      text = str(jax.make_jaxpr(jax.grad(fn, (0, 1)))(hidden, unembedding))
      return text.count("dot_general"), text

    count, text = dots(batch * length)
    self.assertEqual(count, 3)
    self.assertIn(f"f32[{batch * length},{vocab}]", text)
    count, text = dots(batch * length - 1)
    self.assertGreaterEqual(count, 4)
    self.assertNotIn(f"f32[{batch * length},{vocab}]", text)

  def test_fused_dense_rows(self):
    budget_rows = _fused.FUSED_DENSE_LOGITS_BYTES // (4 * 32000)
    self.assertEqual(_fused.fused_dense_rows(32000), budget_rows)
    self.assertEqual(budget_rows, 262)
    self.assertEqual(_fused.fused_dense_rows(32000, 256), 256)
    self.assertEqual(_fused.fused_dense_rows(32000, 10_000), 262)
    self.assertEqual(_fused.fused_dense_rows(260, 0), 0)
    with self.assertRaisesRegex(ValueError, "vocab_size"):
      _fused.fused_dense_rows(0)
    with self.assertRaisesRegex(ValueError, "max_rows"):
      _fused.fused_dense_rows(100, -1)

  def test_bf16_inputs(self):
    hidden, unembedding, targets = _inputs()
    h16 = hidden.astype(jnp.bfloat16)
    w16 = unembedding.astype(jnp.bfloat16)
    fn = jax.jit(
      jax.value_and_grad(
        lambda h, w: _fused.fused_token_logps(
          h, w, targets, chunk_size=8, vocab_chunk_size=16
        ).sum(),
        (0, 1),
      )
    )
    value, (dh, dw) = fn(h16, w16)
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(dh.dtype, jnp.bfloat16)
    self.assertEqual(dw.dtype, jnp.bfloat16)
    # Same as the f32 computation on the bf16-rounded inputs.
    want = _np_oracle(
      np.asarray(h16, np.float32), np.asarray(w16, np.float32), targets
    )[0]
    np.testing.assert_allclose(value, want.sum(), rtol=1e-4)

  def test_contracts(self):
    hidden, unembedding, targets = _inputs()
    shape = lambda *a, **k: jax.eval_shape(
      lambda *a: _fused.fused_token_logps(*a, **k), *a
    )
    out = shape(hidden, unembedding, targets)
    self.assertEqual(out.shape, targets.shape)  # no entropy unless asked
    self.assertLen(shape(hidden, unembedding, targets, return_entropy=True), 2)
    with self.assertRaises(jaxtyping.TypeCheckError):
      shape(hidden, unembedding[:-1], targets)
    with self.assertRaises(jaxtyping.TypeCheckError):
      shape(hidden, unembedding, targets[:, :-1])
    with self.assertRaises(jaxtyping.TypeCheckError):
      shape(hidden[0], unembedding, targets)
    for kwargs, name in (
      (dict(chunk_size=0), "chunk_size"),
      (dict(vocab_chunk_size=0), "vocab_chunk_size"),
      (dict(temperature=0.0), "temperature"),
      (dict(dense_rows=-1), "dense_rows"),
    ):
      with self.assertRaisesRegex(ValueError, name):
        shape(hidden, unembedding, targets, **kwargs)

  def test_sharded_equals_unsharded_and_vmap(self):
    hidden, unembedding, targets = _inputs(batch=8, length=4)

    def fn(h, t):
      return _fused.fused_token_logps(
        h,
        unembedding,
        t,
        chunk_size=8,
        vocab_chunk_size=16,
        return_entropy=True,
      )

    testing.assert_sharded_equals_unsharded(
      fn, (hidden, targets), rtol=1e-5, atol=1e-5
    )
    grouped = (hidden.reshape(2, 4, 4, 16), targets.reshape(2, 4, 4))
    vmapped = jax.jit(jax.vmap(fn))(*grouped)
    direct = jax.jit(fn)(hidden, targets)
    for a, b in zip(vmapped, direct, strict=True):
      np.testing.assert_allclose(
        np.reshape(a, b.shape), b, rtol=1e-5, atol=1e-5
      )


if __name__ == "__main__":
  absltest.main()
