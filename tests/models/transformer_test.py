"""Tests of the decoder: cache, padding, packing, remat, dtypes, sharding.

Numerical parity with ``transformers`` is in ``hf_test.py``; here the model
is checked against itself (cache vs full recompute, packed vs separate) and
its pieces against float64 NumPy transcriptions.
"""

import functools
import math

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment.models import partitioning
from alignment.models import transformer as tr
from tests.models import tiny


def _model(config, seed=0):
  return tiny.build(config, seed=seed)


class CacheTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("rope", tiny.ROPE), ("learned", tiny.LEARNED.replace(n_layers=1))
  )
  def test_prefill_and_decode_equal_full_recompute(self, config):
    """Row 0 left-padded, row 1 right-padded (its pads sit mid-sequence)."""
    model = _model(config)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, (2, 5)).astype(np.int32)
    prompt_mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    new = rng.integers(3, config.vocab_size, (2, 4)).astype(np.int32)
    full = np.concatenate([prompt, new], 1)
    full_mask = np.concatenate([prompt_mask, np.ones((2, 4), bool)], 1)

    def run(state):
      m = nnx.merge(graphdef, state)
      want = m(full, attention_mask=full_mask)
      cache = m.init_cache(2, 9)
      first, cache = m(prompt, attention_mask=prompt_mask, cache=cache)

      def step(cache, token):
        logits, cache = m(token[:, None], cache=cache, decode=True)
        return cache, logits[:, 0]

      cache, steps = jax.lax.scan(step, cache, new.T)
      return want, first, jnp.swapaxes(steps, 0, 1), cache

    want, first, steps, cache = tiny.compile_fast(run, state)(state)
    np.testing.assert_allclose(
      first[prompt_mask], want[:, :5][prompt_mask], atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(steps, want[:, 5:], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.index, 9)
    np.testing.assert_array_equal(
      cache.key_positions,
      [[-1, -1, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, -1, -1, 3, 4, 5, 6]],
    )
    self.assertLen(cache.k, config.n_layers)
    self.assertEqual(cache.k[0].shape, (2, config.n_kv_heads, 9, 8))

  def test_init_cache(self):
    cache = tr.init_cache(tiny.ROPE, 3, 7, jnp.bfloat16)
    self.assertEqual([k.shape for k in cache.k], [(3, 2, 7, 8)] * 2)
    self.assertEqual({v.dtype for v in cache.v}, {jnp.dtype(jnp.bfloat16)})
    np.testing.assert_array_equal(cache.key_positions, -np.ones((3, 7)))
    np.testing.assert_array_equal(cache.index, 0)
    with self.assertRaisesRegex(ValueError, "max_len"):
      tr.init_cache(tiny.ROPE, 3, 0)

  def test_decode_needs_cache_and_no_segments(self):
    model = tiny.abstract(tiny.ROPE)
    tokens = np.ones((1, 3), np.int32)
    with self.assertRaisesRegex(ValueError, "cache"):
      model(tokens, decode=True)
    with self.assertRaisesRegex(ValueError, "segment_ids"):
      model(
        tokens,
        segment_ids=np.ones((1, 3), np.int32),
        cache=model.init_cache(1, 4),
      )


class PaddingAndPackingTest(absltest.TestCase):
  def test_packing_and_left_padding_match_separate_sequences(self):
    """[a | b] packed with segment ids, and a left-padded, equal a and b."""
    config = tiny.NEOX.replace(n_layers=1)
    model = _model(config)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    a = rng.integers(3, 64, (1, 4)).astype(np.int32)
    b = rng.integers(3, 64, (1, 6)).astype(np.int32)
    packed = np.concatenate([a, b], 1)
    segments = np.array([[1] * 4 + [2] * 6], np.int32)
    left = np.concatenate([np.zeros((1, 6), np.int32), a], 1)
    left_mask = np.array([[False] * 6 + [True] * 4])

    def run(state):
      m = nnx.merge(graphdef, state).transformer
      return (
        m(a),
        m(b),
        m(packed, segment_ids=segments),
        m(left, attention_mask=left_mask),
      )

    ha, hb, hp, hl = tiny.compile_fast(run, state)(state)
    np.testing.assert_allclose(hp[:, :4], ha, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(hp[:, 4:], hb, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(hl[:, 6:], ha, atol=1e-5, rtol=1e-5)

  def test_default_positions_oracle(self):
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]], bool)
    segments = np.array([[0, 0, 1, 1, 2, 2], [1, 1, 1, 1, 2, 2]], np.int32)
    want = []
    for m_row, s_row in zip(mask, segments, strict=True):
      row, count, prev = [], 0, None
      for m, s in zip(m_row, s_row, strict=True):
        if s != prev:
          count = 0
        count += int(m)
        row.append(max(count - 1, 0))
        prev = s
      want.append(row)
    got = tr.default_positions(jnp.asarray(mask), jnp.asarray(segments))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
      tr.default_positions(jnp.asarray(mask)),
      [[0, 0, 0, 1, 2, 3], [0, 1, 1, 2, 3, 4]],
    )


class RopeTest(absltest.TestCase):
  def test_llama3_inverse_frequencies_oracle(self):
    """float64 transcription of the Llama 3.1 frequency rule."""
    scaling = dict(tiny.ROPE.rope_scaling)
    dim, theta = tiny.ROPE.rotary_dim, tiny.ROPE.rope_theta
    factor, low, high = (
      scaling["factor"],
      scaling["low_freq_factor"],
      scaling["high_freq_factor"],
    )
    old = scaling["original_max_position_embeddings"]
    want = []
    for i in range(0, dim, 2):
      freq = 1.0 / theta ** (i / dim)
      wavelen = 2 * math.pi / freq
      if wavelen < old / high:
        want.append(freq)
      elif wavelen > old / low:
        want.append(freq / factor)
      else:
        smooth = (old / wavelen - low) / (high - low)
        want.append((1 - smooth) * freq / factor + smooth * freq)
    got = tr.rope_inverse_frequencies(tiny.ROPE)
    self.assertEqual(got.dtype, np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    linear = tiny.ROPE.replace(
      rope_scaling={"rope_type": "linear", "factor": 2.0}
    )
    plain = tiny.ROPE.replace(rope_scaling=None)
    np.testing.assert_allclose(
      tr.rope_inverse_frequencies(linear),
      tr.rope_inverse_frequencies(plain) / 2,
    )

  def test_rotation_preserves_norm_and_passes_unrotated_dims(self):
    x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)

    def rotate(x):
      cos, sin = tr._rope_tables(tiny.NEOX, jnp.arange(3)[None])  # noqa: SLF001
      return tr._apply_rope(x, cos, sin)  # noqa: SLF001

    y = np.asarray(tiny.compile_fast(rotate, x)(x))
    np.testing.assert_allclose(y[..., 4:], x[..., 4:])
    np.testing.assert_allclose(
      np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # position 0
    # Position p rotates pair (i, i + 2) by angle p * inv_freq[i].
    inv = tr.rope_inverse_frequencies(tiny.NEOX)
    angle = 2 * inv[0]
    want = x[0, 2, 0, 0] * np.cos(angle) - x[0, 2, 0, 2] * np.sin(angle)
    np.testing.assert_allclose(y[0, 2, 0, 0], want, rtol=1e-5)


class OutputIndexTest(parameterized.TestCase):
  """``Transformer(output_index=...)``: the last block only at R positions."""

  @parameterized.named_parameters(
    ("rope", tiny.ROPE),
    ("learned", tiny.LEARNED),
    ("neox_parallel_residual", tiny.NEOX),
    ("remat", tiny.ROPE.replace(remat=True)),
  )
  def test_equals_gathered_full_hidden_states_and_gradients(self, config):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, size=(3, 9)).astype(np.int32)
    mask = np.ones((3, 9), bool)
    mask[1, :3] = False  # left padding
    mask[2, -2:] = False  # right padding
    # Two positions per row, in any order, one repeated.
    index = np.array([[8, 2], [3, 8], [6, 6]], np.int32)
    weights = rng.normal(size=(3, 2, config.d_model)).astype(np.float32)
    graphdef, params = nnx.split(_model(config))

    def run(params, gathered):
      tr_ = nnx.merge(graphdef, params).transformer
      if gathered:
        h = tr_(tokens, attention_mask=mask)
        h = jnp.take_along_axis(h, jnp.asarray(index)[..., None], 1)
      else:
        h = tr_(tokens, attention_mask=mask, output_index=index)
      return jnp.sum(jnp.tanh(h) * weights), h

    def compiled(gathered):
      fn = functools.partial(run, gathered=gathered)
      return tiny.compile_fast(jax.value_and_grad(fn, has_aux=True), params)

    (v_want, h_want), g_want = compiled(True)(params)
    (v_got, h_got), g_got = compiled(False)(params)
    self.assertEqual(h_got.shape, (3, 2, config.d_model))
    np.testing.assert_allclose(h_got, h_want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v_got, v_want, atol=1e-5, rtol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
      g_got,
      g_want,
    )

  def test_packed_shared_prefix_rows(self):
    """``[prompt | chosen | rejected]`` rows read at each completion's end."""
    config = tiny.ROPE
    tokens = (np.arange(24, dtype=np.int32).reshape(2, 12) % 50) + 3
    segments = np.array([[1] * 4 + [2] * 4 + [3] * 4] * 2, np.int32)
    prefix = np.array([[0] * 4 + [1] * 8] * 2, np.int32)
    index = np.array([[7, 11], [7, 11]], np.int32)
    tr_ = _model(config).transformer
    kw = dict(segment_ids=segments, prefix_ids=prefix)
    want = np.take_along_axis(
      np.asarray(tr_(tokens, **kw)), index[..., None], 1
    )
    got = tr_(tokens, output_index=index, **kw)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  def test_last_block_flops_shrink_and_cache_refused(self):
    config = tiny.ROPE.replace(n_layers=1)
    graphdef, params = nnx.split(_model(config))
    tokens = np.zeros((2, 64), np.int32) + 3

    def flops(index):
      fn = lambda p: nnx.merge(graphdef, p).transformer(  # noqa: E731
        tokens, output_index=index
      )
      cost = jax.jit(fn).lower(params).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      return cost["flops"]

    full = flops(None)
    one = flops(np.full((2, 1), 63, np.int32))
    # One block: only its K/V projections still run at all 64 positions.
    self.assertLess(one, 0.5 * full)
    model = _model(config)
    with self.assertRaisesRegex(ValueError, "output_index"):
      model.transformer(
        tokens[:, :4],
        cache=model.init_cache(2, 8),
        decode=True,
        output_index=np.zeros((2, 1), np.int32),
      )


class LmTest(absltest.TestCase):
  def test_logits_are_hidden_times_unembedding(self):
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) + 3
    for config in (tiny.ROPE, tiny.LEARNED):
      model = _model(config)
      graphdef, state = nnx.split(model)

      def run(state, graphdef=graphdef):
        m = nnx.merge(graphdef, state)
        return m(tokens), m.hidden(tokens), m.unembedding()

      logits, hidden, w = tiny.compile_fast(run, state)(state)
      self.assertEqual(w.shape, (config.d_model, config.vocab_size))
      if config.tie_embeddings:
        np.testing.assert_array_equal(w, model.transformer.embedding[...].T)
        self.assertFalse(hasattr(model, "lm_head"))
      else:
        np.testing.assert_array_equal(w, model.lm_head[...])
      np.testing.assert_allclose(
        logits, np.asarray(hidden) @ np.asarray(w), atol=1e-5, rtol=1e-5
      )

  def test_remat_gives_same_value_and_gradient(self):
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5) + 3
    out, jaxprs = [], []
    for remat in (False, True):
      config = tiny.LEARNED.replace(remat=remat, n_layers=1)
      graphdef, params = nnx.split(_model(config))

      def loss(params, graphdef=graphdef):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, params).hidden(tokens)))

      grad = jax.value_and_grad(loss)
      jaxprs.append(str(jax.make_jaxpr(grad)(params)))
      out.append(tiny.compile_fast(grad, params)(params))
    self.assertEqual(["remat" in j for j in jaxprs], [False, True])
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), *out
    )

  def test_bfloat16_compute_and_params(self):
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5) + 3
    config = tiny.ROPE.replace(n_layers=1)
    f32 = _model(config)
    b16 = _model(config.replace(dtype="bfloat16", param_dtype="bfloat16"))
    self.assertEqual(b16.transformer.embedding[...].dtype, jnp.bfloat16)
    graphdef, state = nnx.split(b16)
    f32_graphdef, f32_state = nnx.split(f32)

    def run(state, f32_state):
      m = nnx.merge(graphdef, state)
      want = nnx.merge(f32_graphdef, f32_state).hidden(tokens)
      return m.hidden(tokens), m(tokens), want

    hidden, logits, want = tiny.compile_fast(run, state, f32_state)(
      state, f32_state
    )
    self.assertEqual(hidden.dtype, jnp.bfloat16)
    self.assertEqual(logits.dtype, jnp.float32)
    np.testing.assert_allclose(
      hidden.astype(np.float32), want, atol=0.1, rtol=0.05
    )

  def test_wrong_rank_raises_type_error(self):
    model = tiny.abstract(tiny.ROPE)
    with self.assertRaises(jaxtyping.TypeCheckError):
      model.transformer(np.ones((5,), np.int32))
    with self.assertRaises(jaxtyping.TypeCheckError):
      model.transformer(
        np.ones((2, 5), np.int32), attention_mask=np.ones((3, 5), bool)
      )


class ShardingTest(absltest.TestCase):
  def test_every_param_has_logical_axes(self):
    known = {"vocab", "embed", "heads", "kv_heads", "kv", "mlp", None}
    for config in (tiny.ROPE, tiny.LEARNED, tiny.NEOX):
      model = tiny.abstract(config)
      axes = partitioning.param_logical_axes(model)
      flat = nnx.to_flat_state(nnx.state(model))
      for (path, var), (_, names) in zip(
        flat, nnx.to_flat_state(axes), strict=True
      ):
        self.assertLen(names, var.ndim, path)
        self.assertContainsSubset(set(names), known, path)
      tr_axes = partitioning.param_logical_axes(model)
      self.assertEqual(tr_axes["transformer"]["embedding"], ("vocab", "embed"))

  def test_sharded_forward_equals_unsharded(self):
    config = tiny.ROPE
    model = _model(config)
    graphdef, state = nnx.split(model)
    mesh = jax.make_mesh(
      (2, 2, 2),
      ("data", "fsdp", "tensor"),
      axis_types=(jax.sharding.AxisType.Auto,) * 3,
    )
    rules = (
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("kv", None),
      ("length", None),
    )
    tokens = np.arange(40, dtype=np.int32).reshape(4, 10) % 60 + 3
    mask = np.ones((4, 10), bool)
    mask[0, :3] = False

    def run(state, tokens, mask):
      return nnx.merge(graphdef, state)(tokens, attention_mask=mask)

    want = tiny.compile_fast(run, state, tokens, mask)(state, tokens, mask)
    shardings = partitioning.param_shardings(state, mesh, rules)
    self.assertEqual(
      shardings["transformer"]["layers"][0]["attn"]["q_kernel"].spec,
      jax.P("fsdp", "tensor"),
    )
    sharded = jax.device_put(state, shardings)
    batch = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
    args = (sharded, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
      jaxpr = jax.make_jaxpr(run)(*args)
      self.assertIn("sharding_constraint", str(jaxpr))
      got = tiny.compile_fast(run, *args)(*args)
    self.assertNotIn("sharding_constraint", str(jax.make_jaxpr(run)(*args)))
    self.assertEqual(got.sharding.spec[0], ("data", "fsdp"))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
