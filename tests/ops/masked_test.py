"""Tests for alignment/ops/_masked.py: reductions, aggregation, axis_name."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import PartitionSpec as P

from alignment.ops import _masked
from tests import testing

_MODES = _masked.AGGREGATION_MODES


def _data(batch=8, length=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length)).astype(np.float32)
  lengths = rng.integers(0, length + 1, size=batch)
  lengths[0] = length  # at least one full row
  lengths[1] = 0  # and one empty row
  mask = np.arange(length)[None, :] < lengths[:, None]
  return x, mask


# ---- float64 NumPy oracles --------------------------------------------------


def _np_sum(x, m, axis):
  return np.sum(np.where(m, x.astype(np.float64), 0.0), axis=axis)


def _np_mean(x, m, axis):
  n = np.sum(m, axis=axis)
  return np.where(n > 0, _np_sum(x, m, axis) / np.maximum(n, 1), 0.0)


def _np_var(x, m, axis, ddof):
  mean = _np_mean(x, m, axis)
  if axis is not None:
    mean = np.expand_dims(mean, axis)
  sq = np.sum(np.where(m, (x - mean) ** 2, 0.0), axis=axis)
  n = np.sum(m, axis=axis) - ddof
  return np.where(n > 0, sq / np.maximum(n, 1), 0.0)


def _np_whiten(x, m, shift_mean, eps):
  x = x.astype(np.float64)
  mean, var = _np_mean(x, m, None), _np_var(x, m, None, 1)
  out = (x - mean) / np.sqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return np.where(m, out, 0.0)


def _np_aggregate(x, m, mode, max_tokens=None):
  """(total, weight) of each mode, transcribed from the docstring."""
  v = np.where(m, x.astype(np.float64), 0.0)
  batch, length = x.shape
  if mode == "token_mean":
    return v.sum(), m.sum()
  if mode == "sequence_mean":
    n = m.sum(-1)
    per_seq = [v[b].sum() / n[b] for b in range(batch) if n[b] > 0]
    return sum(per_seq), len(per_seq)
  if mode == "sequence_sum":
    return v.sum(), batch
  return v.sum(), batch * (length if max_tokens is None else max_tokens)


class MaskedReductionsTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.x, self.mask = _data()

  def test_matches_numpy_oracle(self):
    axes = (None, 0, 1, (0, 1))

    @jax.jit
    def run(x, m):
      out = {}
      for a in axes:
        out[f"sum{a}"] = _masked.masked_sum(x, m, axis=a)
        out[f"mean{a}"] = _masked.masked_mean(x, m, axis=a)
        for ddof in (0, 1):
          out[f"var{a}{ddof}"] = _masked.masked_var(x, m, axis=a, ddof=ddof)
      for shift in (True, False):
        out[f"white{shift}"] = _masked.masked_whiten(
          x, m, shift_mean=shift, epsilon=1e-6
        )
      return out

    got = run(self.x, self.mask)
    x, m = self.x, self.mask
    for a in axes:
      np.testing.assert_allclose(
        got[f"sum{a}"], _np_sum(x, m, a), rtol=1e-5, atol=1e-6
      )
      np.testing.assert_allclose(
        got[f"mean{a}"], _np_mean(x, m, a), rtol=1e-5, atol=1e-6
      )
      for ddof in (0, 1):
        np.testing.assert_allclose(
          got[f"var{a}{ddof}"], _np_var(x, m, a, ddof), rtol=1e-5, atol=1e-6
        )
    for shift in (True, False):
      np.testing.assert_allclose(
        got[f"white{shift}"],
        _np_whiten(x, m, shift, 1e-6),
        rtol=1e-5,
        atol=1e-5,
      )

  def test_whitened_entries_have_zero_mean_unit_std(self):
    out = jax.jit(_masked.masked_whiten)(self.x, self.mask)
    sel = np.asarray(out)[self.mask]
    self.assertAlmostEqual(float(sel.mean()), 0.0, places=5)
    self.assertAlmostEqual(float(sel.std(ddof=1)), 1.0, places=4)
    self.assertTrue(np.all(np.asarray(out)[~self.mask] == 0.0))

  def test_mean_gradient_is_mask_over_count(self):
    g = testing.grads(_masked.masked_mean, (self.x, self.mask), 0)
    np.testing.assert_allclose(g, self.mask / self.mask.sum(), rtol=1e-6)

  def test_nan_padding_is_inert(self):
    x_nan = testing.with_nan_padding(self.x, self.mask)
    c = np.random.default_rng(1).normal(size=self.x.shape).astype(np.float32)
    fns = {
      "sum": lambda x, m: _masked.masked_sum(x, m, axis=1),
      "mean": lambda x, m: _masked.masked_mean(x, m, axis=0),
      "var": lambda x, m: _masked.masked_var(x, m, ddof=1),
      "whiten": lambda x, m: _masked.masked_whiten(x, m) * c,
    }

    def run(x, m):
      return {
        k: jax.value_and_grad(lambda x, f=f: jnp.sum(f(x, m)))(x)
        for k, f in fns.items()
      }

    run = jax.jit(run)
    clean, dirty = run(self.x, self.mask), run(x_nan, self.mask)
    for k in fns:
      self.assertTrue(np.isfinite(dirty[k][0]), k)
      np.testing.assert_array_equal(dirty[k][0], clean[k][0], err_msg=k)
      np.testing.assert_array_equal(dirty[k][1], clean[k][1], err_msg=k)
      self.assertTrue(np.all(np.asarray(dirty[k][1])[~self.mask] == 0), k)

  def test_empty_selection_is_zero_with_zero_gradient(self):
    x = np.full((2, 3), np.nan, np.float32)
    mask = np.zeros((2, 3), bool)

    def total(x):
      return (
        _masked.masked_mean(x, mask)
        + _masked.masked_var(x, mask)
        + jnp.sum(_masked.masked_whiten(x, mask))
      )

    value, grad = jax.jit(jax.value_and_grad(total))(x)
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(grad, np.zeros_like(x))

  def test_safe_divide(self):
    num = jnp.array([1.0, 2.0, 3.0])
    den = jnp.array([2.0, 0.0, 4.0])
    value, grad = jax.jit(
      jax.value_and_grad(lambda d: jnp.sum(_masked.safe_divide(num, d)))
    )(den)
    np.testing.assert_allclose(value, 0.5 + 0.75)
    np.testing.assert_allclose(grad, [-0.25, 0.0, -3.0 / 16])

  def test_bf16_in_f32_out(self):
    x = self.x.astype(jnp.bfloat16)
    outs = jax.jit(
      lambda x, m: (
        _masked.masked_sum(x, m),
        _masked.masked_mean(x, m),
        _masked.masked_var(x, m),
        _masked.masked_whiten(x, m),
        _masked.aggregate_token_loss(x, m).value(),
        _masked.aggregate_sequence_loss(x[:, 0]).value(),
      )
    )(x, self.mask)
    for out in outs:
      self.assertEqual(out.dtype, jnp.float32)

  def test_shape_contract(self):
    with self.assertRaises(jaxtyping.TypeCheckError):
      _masked.masked_mean(self.x, self.mask[:, :-1])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _masked.masked_mean(self.x, self.mask.astype(np.float32))
    with self.assertRaises(jaxtyping.TypeCheckError):
      _masked.aggregate_token_loss(self.x[0], self.mask[0])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _masked.aggregate_sequence_loss(self.x[:, 0], self.mask[:-1, 0])

  def test_vmap(self):
    out = jax.jit(jax.vmap(_masked.masked_mean))(self.x, self.mask)
    np.testing.assert_allclose(
      out, _np_mean(self.x, self.mask, 1), rtol=1e-5, atol=1e-6
    )


class AggregateTokenLossTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.x, self.mask = _data()

  def test_matches_numpy_oracle(self):
    cases = [(mode, None) for mode in _MODES] + [("constant_norm", 10)]
    run = jax.jit(
      lambda x, m: [
        _masked.aggregate_token_loss(x, m, mode=mode, max_tokens=mt)
        for mode, mt in cases
      ]
    )
    for (mode, mt), got in zip(cases, run(self.x, self.mask), strict=True):
      total, weight = _np_aggregate(self.x, self.mask, mode, mt)
      np.testing.assert_allclose(got.total, total, rtol=1e-5, err_msg=mode)
      np.testing.assert_allclose(got.weight, weight, err_msg=mode)
      np.testing.assert_allclose(
        got.value(), total / weight, rtol=1e-5, err_msg=mode
      )

  def test_micro_batch_invariance_of_value_and_gradient(self):
    """Splitting into 1, 2, 4, 8 micro-batches and merging is exact."""
    x = testing.with_nan_padding(self.x, self.mask)
    splits = (1, 2, 4, 8)

    def accumulate(x, mode, k):
      parts = [
        _masked.aggregate_token_loss(xs, ms, mode=mode)
        for xs, ms in zip(jnp.split(x, k), np.split(self.mask, k), strict=True)
      ]
      merged = functools.reduce(_masked.WeightedMean.merge, parts)
      return merged.total / merged.weight, merged

    @jax.jit
    def run(x):
      out = {}
      for mode in _MODES:
        for k in splits:
          grad, merged = jax.grad(
            functools.partial(accumulate, mode=mode, k=k), has_aux=True
          )(x)
          out[mode, k] = (merged.value(), merged.weight, grad)
      return out

    out = run(x)
    for mode in _MODES:
      value, weight, grad = out[mode, 1]
      self.assertTrue(np.isfinite(value))
      self.assertTrue(np.all(np.isfinite(grad)))
      np.testing.assert_array_equal(np.asarray(grad)[~self.mask], 0.0)
      for k in splits[1:]:
        v_k, w_k, g_k = out[mode, k]
        np.testing.assert_allclose(v_k, value, rtol=1e-6, err_msg=(mode, k))
        np.testing.assert_array_equal(w_k, weight, err_msg=(mode, k))
        np.testing.assert_allclose(
          g_k, grad, rtol=1e-6, atol=1e-8, err_msg=(mode, k)
        )

  def test_token_mean_gradient_is_one_over_token_count(self):
    g = testing.grads(
      lambda x, m: _masked.aggregate_token_loss(x, m).value(),
      (self.x, self.mask),
      0,
    )
    np.testing.assert_allclose(g, self.mask / self.mask.sum(), rtol=1e-6)

  def test_fully_masked_batch_is_finite_with_zero_weight(self):
    x = np.full((3, 4), np.nan, np.float32)
    mask = np.zeros((3, 4), bool)

    @jax.jit
    def run(x):
      out = {}
      for mode in _MODES:

        def value(x, mode=mode):
          agg = _masked.aggregate_token_loss(x, mask, mode=mode)
          return agg.value(), agg

        out[mode] = jax.value_and_grad(value, has_aux=True)(x)
      return out

    for mode, ((value, agg), grad) in run(x).items():
      self.assertEqual(float(value), 0.0, mode)
      self.assertEqual(float(agg.total), 0.0, mode)
      np.testing.assert_array_equal(grad, np.zeros_like(x), err_msg=mode)
      # Length-normalised modes give the empty batch no weight; the
      # constant-normaliser modes count it, by definition.
      want = {
        "token_mean": 0,
        "sequence_mean": 0,
        "sequence_sum": 3,
        "constant_norm": 12,
      }[mode]
      self.assertEqual(float(agg.weight), want, mode)

  def test_empty_sequence_adds_nothing_to_sequence_mean(self):
    with_empty = jax.jit(
      lambda x, m: _masked.aggregate_token_loss(x, m, mode="sequence_mean")
    )(self.x, self.mask)
    rows = self.mask.any(-1)
    without = jax.jit(
      lambda x, m: _masked.aggregate_token_loss(x, m, mode="sequence_mean")
    )(self.x[rows], self.mask[rows])
    np.testing.assert_allclose(with_empty.total, without.total, rtol=1e-6)
    np.testing.assert_array_equal(with_empty.weight, without.weight)

  @parameterized.parameters(
    dict(kwargs=dict(mode="mean"), name="mode"),
    dict(kwargs=dict(mode="token_mean", max_tokens=4), name="max_tokens"),
    dict(kwargs=dict(mode="constant_norm", max_tokens=0), name="max_tokens"),
  )
  def test_bad_hyperparameters_raise(self, kwargs, name):
    with self.assertRaisesRegex(ValueError, name):
      _masked.aggregate_token_loss(self.x, self.mask, **kwargs)


class AggregateSequenceLossTest(absltest.TestCase):
  def test_matches_oracle_and_nan_rows_are_inert(self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=8).astype(np.float32)
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    x_nan = testing.with_nan_padding(x, keep)
    fn = jax.jit(
      jax.value_and_grad(
        lambda x, m: _masked.aggregate_sequence_loss(x, m).value()
      )
    )
    value, grad = fn(x_nan, keep)
    np.testing.assert_allclose(
      value, x[keep].astype(np.float64).mean(), rtol=1e-6
    )
    np.testing.assert_allclose(grad, keep / keep.sum(), rtol=1e-6)
    no_mask = jax.jit(lambda x: _masked.aggregate_sequence_loss(x))(x)
    np.testing.assert_allclose(no_mask.value(), x.mean(), rtol=1e-6)
    self.assertEqual(float(no_mask.weight), 8.0)

  def test_weighted_mean_value_is_safe(self):
    empty = _masked.WeightedMean(jnp.float32(0.0), jnp.float32(0.0))
    self.assertEqual(float(empty.value()), 0.0)
    a = _masked.WeightedMean(jnp.float32(3.0), jnp.float32(2.0))
    b = _masked.WeightedMean(jnp.float32(5.0), jnp.float32(6.0))
    self.assertEqual(float(a.merge(b).value()), 1.0)
    self.assertEqual(float(a.merge(empty).value()), 1.5)


class AxisNameTest(absltest.TestCase):
  """Under shard_map and pmap, each device gets the global statistic."""

  def setUp(self):
    super().setUp()
    x, mask = _data(batch=16, length=5, seed=7)
    self.x = testing.with_nan_padding(x, mask)
    self.mask = mask

  def _all(self, x, m, axis_name):
    """Every axis_name-aware function in _masked, as a dict."""
    out = {
      "sum": _masked.masked_sum(x, m, axis_name=axis_name),
      "sum0": _masked.masked_sum(x, m, axis=0, axis_name=axis_name),
      "mean": _masked.masked_mean(x, m, axis_name=axis_name),
      "mean0": _masked.masked_mean(x, m, axis=0, axis_name=axis_name),
      "var": _masked.masked_var(x, m, ddof=1, axis_name=axis_name),
      "var0": _masked.masked_var(x, m, axis=0, axis_name=axis_name),
      "seq": tuple(
        _masked.aggregate_sequence_loss(x[:, 0], m[:, 0], axis_name=axis_name)
      ),
      "psum": tuple(
        _masked.WeightedMean(
          jnp.sum(jnp.where(m, x, 0.0)), jnp.sum(m, dtype=jnp.float32)
        ).psum(axis_name)
      ),
    }
    for mode in _MODES:
      out[mode] = tuple(
        _masked.aggregate_token_loss(x, m, mode=mode, axis_name=axis_name)
      )
    return out

  def _check(self, got, want, whitened_got, whitened_want):
    for k in want:
      for g, w in zip(
        jax.tree.leaves(got[k]), jax.tree.leaves(want[k]), strict=True
      ):
        g, w = np.asarray(g), np.asarray(w)
        self.assertTrue(np.all(np.isfinite(g)), k)
        # Every device holds the global value (leading axis: device).
        np.testing.assert_allclose(
          g, np.broadcast_to(w, g.shape), rtol=2e-6, atol=1e-6, err_msg=k
        )
    np.testing.assert_allclose(
      whitened_got, whitened_want, rtol=1e-5, atol=1e-6
    )

  def _global(self):
    return jax.jit(
      lambda x, m: (self._all(x, m, None), _masked.masked_whiten(x, m))
    )(self.x, self.mask)

  def test_shard_map_matches_global(self):
    mesh = testing.data_mesh(8)

    def per_device(x, m):
      stats = self._all(x, m, "data")
      # Add a leading device axis so out_specs can gather every copy.
      stats = jax.tree.map(lambda a: a[None], stats)
      return stats, _masked.masked_whiten(x, m, axis_name="data")

    fn = jax.jit(
      jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=(P("data"), P("data")),
      )
    )
    got, whitened = fn(self.x, self.mask)
    want, want_whitened = self._global()
    self._check(got, want, whitened, want_whitened)

  def test_pmap_matches_global(self):
    def per_device(x, m):
      return (
        self._all(x, m, "data"),
        _masked.masked_whiten(x, m, axis_name="data"),
      )

    fn = jax.pmap(per_device, axis_name="data", devices=jax.devices()[:8])
    got, whitened = fn(self.x.reshape(8, 2, 5), self.mask.reshape(8, 2, 5))
    want, want_whitened = self._global()
    self._check(got, want, np.asarray(whitened).reshape(16, 5), want_whitened)

  def test_jit_on_sharded_arrays_matches_unsharded(self):
    testing.assert_sharded_equals_unsharded(
      lambda x, m: (self._all(x, m, None), _masked.masked_whiten(x, m)),
      (self.x, self.mask),
      rtol=2e-6,
    )


if __name__ == "__main__":
  absltest.main()
