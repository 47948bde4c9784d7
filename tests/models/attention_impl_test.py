"""Tests of ``ModelConfig.attention_impl``: dense vs blockwise attention."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from alignment import config_lib
from alignment.models import config as config_mod
from alignment.models import hf
from alignment.models import transformer as tr
from alignment.trainers import _setup
from tests.models import tiny


def _batch(length, vocab, seed=0):
  """Row 0 left-padded, row 1 two packed segments then right padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (2, length)).astype(np.int32)
  mask = np.ones((2, length), bool)
  mask[0, :7] = False
  mask[1, -4:] = False
  segments = np.ones((2, length), np.int32)
  segments[1, length // 2 :] = 2
  return tokens, mask, segments


def _loss_and_grads(config, tokens, mask, segments):
  """Logits and d sum(logits * c) / d params, one compile per config."""
  graphdef, params = nnx.split(tiny.build(config))
  c = np.random.default_rng(1).normal(size=(*tokens.shape, config.vocab_size))
  c = (c / 16).astype(np.float32)  # gradients of order 1

  def loss(params):
    logits = nnx.merge(graphdef, params)(
      tokens, attention_mask=mask, segment_ids=segments
    )
    return jnp.sum(logits * c), logits

  fn = jax.value_and_grad(loss, has_aux=True)
  (_, logits), grads = tiny.compile_fast(fn, params)(params)
  return logits, grads


class AttentionImplTest(absltest.TestCase):
  def test_blockwise_model_equals_dense_logits_and_gradients(self):
    """Tiny preset, L = 45 with 16 x 8 tiles (neither divides L)."""
    base = config_mod.get_preset("tiny")
    tokens, mask, segments = _batch(45, base.vocab_size)
    dense = _loss_and_grads(base, tokens, mask, segments)
    blockwise = _loss_and_grads(
      base.replace(
        attention_impl="blockwise", attention_q_block=16, attention_kv_block=8
      ),
      tokens,
      mask,
      segments,
    )
    # All positions, padding included (attention output 0 in both).
    np.testing.assert_allclose(blockwise[0], dense[0], atol=1e-5, rtol=1e-5)
    flat_b = nnx.to_flat_state(blockwise[1])
    flat_d = dict(nnx.to_flat_state(dense[1]))
    self.assertLen(flat_b, len(flat_d))
    for path, g in flat_b:
      np.testing.assert_allclose(
        g[...], flat_d[path][...], atol=1e-5, rtol=1e-5, err_msg=str(path)
      )

  def test_cached_prefill_and_decode_match_blockwise_forward(self):
    """With a cache the dense path runs; it agrees with blockwise."""
    config = tiny.ROPE.replace(
      attention_impl="blockwise", attention_q_block=4, attention_kv_block=3
    )
    graphdef, state = nnx.split(tiny.build(config))
    rng = np.random.default_rng(0)
    full = rng.integers(3, config.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), bool)
    mask[0, :2] = False

    def run(state):
      m = nnx.merge(graphdef, state)
      want = m(full, attention_mask=mask)
      cache = m.init_cache(2, 9)
      first, cache = m(full[:, :6], attention_mask=mask[:, :6], cache=cache)
      steps = []
      for t in range(6, 9):
        logits, cache = m(full[:, t : t + 1], cache=cache, decode=True)
        steps.append(logits[:, 0])
      return want, first, jnp.stack(steps, 1)

    want, first, steps = tiny.compile_fast(run, state)(state)
    real = mask[:, :6]
    np.testing.assert_allclose(
      first[real], want[:, :6][real], atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(steps, want[:, 6:], atol=1e-5, rtol=1e-5)

  def test_auto_picks_blockwise_from_threshold_and_never_with_cache(self):
    threshold = tr.AUTO_BLOCKWISE_MIN_LENGTH
    config = tiny.LEARNED.replace(
      n_layers=1, max_len=threshold, attention_impl="auto"
    )
    model = tiny.abstract(config)
    graphdef, state = nnx.split(model)

    def uses_blockwise(length, cache=False):
      tokens = jnp.zeros((1, length), jnp.int32)

      def fwd(state):
        m = nnx.merge(graphdef, state)
        if cache:
          return m(tokens, cache=m.init_cache(1, length))[0]
        return m(tokens)

      # Both paths are custom_vjp calls; the blockwise one is `_attention`.
      return "name=_attention" in str(jax.make_jaxpr(fwd)(state))

    self.assertFalse(uses_blockwise(threshold - 1))
    self.assertTrue(uses_blockwise(threshold))
    self.assertFalse(uses_blockwise(threshold, cache=True))
    self.assertTrue(
      tr.use_blockwise(config.replace(attention_impl="blockwise"), 1)
    )
    self.assertFalse(
      tr.use_blockwise(config.replace(attention_impl="dense"), 10**6)
    )

  def test_grad_step_temp_memory(self):
    """Compiled temp bytes of a tiny-preset grad step at B = 2, L = 1024.

    Measured under conftest's XLA flags (compiled, never run): dense
    213.2 MiB, blockwise 26.2 MiB (8.1x).
    """
    length = 1024
    tokens = jnp.zeros((2, length), jnp.int32)
    temps = []
    for impl in ("dense", "blockwise"):
      config = config_mod.get_preset("tiny", attention_impl=impl)
      graphdef, params = nnx.split(tiny.abstract(config))

      def loss(params, graphdef=graphdef):
        hidden = nnx.merge(graphdef, params).hidden(tokens)
        return jnp.sum(jnp.tanh(hidden))

      compiled = jax.jit(jax.grad(loss)).lower(params).compile()
      temps.append(compiled.memory_analysis().temp_size_in_bytes)
    dense, blockwise = temps
    self.assertGreater(dense, 5 * blockwise, temps)

  def test_config_validation_and_flow(self):
    with self.assertRaisesRegex(ValueError, r"attention_impl must be one of"):
      config_mod.get_preset("tiny", attention_impl="flash")
    with self.assertRaisesRegex(ValueError, "attention_kv_block"):
      config_mod.get_preset("tiny", attention_kv_block=0)
    # Presets and HF imports keep the default; HF export ignores the field.
    self.assertEqual(config_mod.get_preset("small").attention_impl, "auto")
    config = config_mod.get_preset("tiny", attention_impl="blockwise")
    exported = hf.config_to_hf(config)
    self.assertNotIn("attention_impl", str(exported))
    self.assertEqual(hf.config_from_hf(exported).attention_impl, "auto")
    self.assertEqual(
      config_mod.ModelConfig(**config.to_dict()).attention_impl, "blockwise"
    )
    # config.model.attention_impl reaches the ModelConfig like remat does.
    block = config_lib.model("tiny")
    self.assertEqual(_setup.model_config(block).attention_impl, "auto")
    block.attention_impl = "blockwise"
    self.assertEqual(_setup.model_config(block).attention_impl, "blockwise")
    block.overrides.attention_q_block = 64
    self.assertEqual(_setup.model_config(block).attention_q_block, 64)


if __name__ == "__main__":
  absltest.main()
