"""Tests for alignment/ops/_normalizers.py: chunked WPO log normalisers."""

import math
import re

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment import losses, ops
from alignment.ops import _normalizers
from tests import testing


def _inputs(batch=3, length=7, width=16, vocab=50, seed=0, scale=0.7):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(batch, length, width)).astype(np.float32)
  unembedding = (scale * rng.normal(size=(width, vocab))).astype(np.float32)
  return hidden, unembedding


def _np_oracle(hidden, unembedding, alignment):
  """WPO's normalisers in float64, straight from the definition."""
  z = hidden.astype(np.float64) @ unembedding.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  if alignment == "sampled":
    return np.log(np.sum(p**2, -1))
  if alignment == "greedy":
    return np.log(p.max(-1))
  return np.zeros(z.shape[:-1])


def _fn(alignment, chunk, vocab_chunk):
  return jax.jit(
    lambda h, w: _normalizers.fused_token_log_normalizers(
      h,
      w,
      alignment=alignment,
      chunk_size=chunk,
      vocab_chunk_size=vocab_chunk,
    )
  )


# (chunk_size, vocab_chunk_size): rows that do / do not divide B·T = 21,
# vocabulary tiles that do / do not divide V = 50, one tile, one row.
_CONFIGS = ((4, None), (7, 10), (5, 16), (1, 50), (64, 3))


class FusedTokenLogNormalizersTest(parameterized.TestCase):
  @parameterized.product(
    alignment=("sampled", "greedy", "none"), config=_CONFIGS
  )
  def test_equals_numpy_oracle(self, alignment, config):
    hidden, unembedding = _inputs()
    got = _fn(alignment, *config)(hidden, unembedding)
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(
      got, _np_oracle(hidden, unembedding, alignment), rtol=1e-5, atol=1e-5
    )

  def test_same_as_the_loss_library_on_logits(self):
    hidden, unembedding = _inputs(seed=1, scale=2.0)
    for alignment in ("sampled", "greedy"):
      want = losses.wpo_token_log_normalizers(
        jnp.asarray(hidden) @ jnp.asarray(unembedding), alignment=alignment
      )
      got = _fn(alignment, 8, 16)(hidden, unembedding)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_closed_forms(self):
    hidden, _ = _inputs()
    vocab = 50
    # Uniform policy: Σ π² = max π = 1/V.
    zeros = np.zeros((16, vocab), np.float32)
    for alignment in ("sampled", "greedy"):
      np.testing.assert_allclose(
        _fn(alignment, 4, 16)(hidden, zeros), -math.log(vocab), rtol=1e-6
      )
    # A near-deterministic policy: both tend to log 1 = 0 from below.
    peaked = np.zeros((16, vocab), np.float32)
    peaked[:, 3] = 100.0
    ones = np.ones_like(hidden)
    for alignment in ("sampled", "greedy"):
      got = _fn(alignment, 4, 16)(ones, peaked)
      self.assertTrue(np.all(np.asarray(got) <= 0.0))
      np.testing.assert_allclose(got, 0.0, atol=1e-6)
    # Σ π² <= max π always (a mean of π under π).
    hidden, unembedding = _inputs(seed=2, scale=3.0)
    sampled = _fn("sampled", 8, 16)(hidden, unembedding)
    greedy = _fn("greedy", 8, 16)(hidden, unembedding)
    self.assertTrue(np.all(np.asarray(sampled) <= np.asarray(greedy) + 1e-6))

  def test_no_gradient_and_rows_independent(self):
    hidden, unembedding = _inputs()

    def total(h, w):
      return jnp.sum(
        _normalizers.fused_token_log_normalizers(
          h, w, chunk_size=4, vocab_chunk_size=16
        )
      )

    dh, dw = jax.jit(jax.grad(total, (0, 1)))(hidden, unembedding)
    np.testing.assert_array_equal(dh, 0.0)
    np.testing.assert_array_equal(dw, 0.0)
    # A NaN (padded) position spoils only its own row.
    bad = hidden.copy()
    bad[0, -1] = np.nan
    fn = _fn("sampled", 4, 16)
    got, want = (
      np.asarray(fn(bad, unembedding)),
      np.asarray(fn(hidden, unembedding)),
    )
    self.assertTrue(np.isnan(got[0, -1]))
    keep = np.ones_like(got, bool)
    keep[0, -1] = False
    np.testing.assert_array_equal(got[keep], want[keep])

  def test_bf16_inputs_float32_out(self):
    hidden, unembedding = _inputs()
    h16 = hidden.astype(jnp.bfloat16)
    w16 = unembedding.astype(jnp.bfloat16)
    got = _fn("sampled", 8, 16)(h16, w16)
    self.assertEqual(got.dtype, jnp.float32)
    want = _np_oracle(
      np.asarray(h16, np.float32), np.asarray(w16, np.float32), "sampled"
    )
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)

  def test_never_materialises_the_logits(self):
    batch, length, width, vocab = 2, 64, 16, 512
    hidden, unembedding = _inputs(batch, length, width, vocab)
    fn = jax.jit(
      lambda h, w: ops.fused_token_log_normalizers(
        h, w, chunk_size=32, vocab_chunk_size=128
      )
    )
    text = fn.lower(hidden, unembedding).compile().as_text()
    shapes = re.findall(r"\b(?:f32|bf16|f16|pred|s32)\[([\d,]+)\]", text)
    biggest = max(math.prod(int(d) for d in s.split(",")) for s in shapes)
    # The largest array is the [D, V] matrix itself, never [B·T, V].
    self.assertLessEqual(
      biggest, max(width * vocab, batch * length * vocab // 8)
    )

  def test_contracts(self):
    hidden, unembedding = _inputs()
    call = _normalizers.fused_token_log_normalizers
    with self.assertRaises(jaxtyping.TypeCheckError):
      call(hidden, unembedding[:-1])
    with self.assertRaises(jaxtyping.TypeCheckError):
      call(hidden[0], unembedding)
    for kwargs, name in (
      (dict(alignment="top1"), "alignment"),
      (dict(chunk_size=0), "chunk_size"),
      (dict(vocab_chunk_size=0), "vocab_chunk_size"),
    ):
      with self.assertRaisesRegex(ValueError, name):
        call(hidden, unembedding, **kwargs)

  def test_sharded_equals_unsharded_and_vmap(self):
    hidden, unembedding = _inputs(batch=8, length=4)

    def fn(h):
      return _normalizers.fused_token_log_normalizers(
        h, unembedding, chunk_size=8, vocab_chunk_size=16
      )

    testing.assert_sharded_equals_unsharded(fn, (hidden,), rtol=1e-5, atol=1e-5)
    vmapped = jax.jit(jax.vmap(fn))(hidden.reshape(2, 4, 4, 16))
    np.testing.assert_allclose(
      np.reshape(vmapped, (8, 4)), jax.jit(fn)(hidden), rtol=1e-5, atol=1e-5
    )


if __name__ == "__main__":
  absltest.main()
