"""Gradient accumulation and data parallelism do not change policy gradients.

For every aggregation mode of ``ops.aggregate_token_loss`` and several policy
objectives, the gradient of the full-batch loss — with respect to the token
log-probs and to the weights of a tiny linear "model" that produces them —
equals the gradient accumulated over 1, 2, 4 and 8 micro-batches (sum the
gradients of each micro-batch's ``total``, divide by the summed ``weight``),
the gradient with the batch sharded over 8 devices under ``jit``, and the
gradient inside ``shard_map`` with ``axis_name``. TRL's ``bnpo`` reduction
(per-micro-batch token means, :func:`bnpo_aggregate`) is shown not to be.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from jax.sharding import PartitionSpec as P

from alignment.losses import _policy_gradient as pg
from alignment.ops import _masked
from tests import testing

B, T, D, V = 8, 6, 4, 5
LENGTHS = np.array([6, 1, 4, 0, 6, 2, 5, 3])  # uneven token counts
MICRO_BATCHES = (1, 2, 4, 8)
MODES = _masked.AGGREGATION_MODES
LOSSES = {
  "grpo": (pg.grpo_loss, dict(epsilon_high=0.28)),
  "cispo": (pg.cispo_loss, dict(epsilon_high=0.2)),
  "gmpo": (pg.gmpo_loss, dict(epsilon_low=0.1, epsilon_high=0.1)),
}


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  features = rng.randn(B, T, D).astype(np.float32)
  targets = rng.randint(0, V, (B, T)).astype(np.int32)
  weights = (0.5 * rng.randn(D, V)).astype(np.float32)
  mask = np.arange(T)[None, :] < LENGTHS[:, None]
  logps = np.asarray(_model(weights, features, targets))
  old = (logps + rng.uniform(-0.4, 0.4, (B, T))).astype(np.float32)
  advantages = rng.randn(B).astype(np.float32)
  return weights, dict(
    features=features,
    targets=targets,
    old_token_logps=old,
    advantages=advantages,
    completion_mask=mask,
  )


def _model(weights, features, targets):
  """Token log-probs of a linear softmax policy."""
  logits = jnp.einsum("btd,dv->btv", features, weights)
  logps = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logps, targets[..., None], axis=-1)[..., 0]


def _per_token(name, logps, batch):
  fn, kwargs = LOSSES[name]
  loss, _ = fn(
    logps,
    batch["old_token_logps"],
    batch["advantages"],
    batch["completion_mask"],
    **kwargs,
  )
  return loss


def _weighted_means(logps, batch, axis_name=None):
  """``(totals, weights)``, each ``[len(LOSSES), len(MODES)]``."""
  totals, weights = [], []
  for name in LOSSES:
    loss = _per_token(name, logps, batch)
    wms = [
      _masked.aggregate_token_loss(
        loss, batch["completion_mask"], mode=mode, axis_name=axis_name
      )
      for mode in MODES
    ]
    totals.append(jnp.stack([wm.total for wm in wms]))
    weights.append(jnp.stack([wm.weight for wm in wms]))
  return jnp.stack(totals), jnp.stack(weights)


def _model_vjp(weights, batch, cotangents):
  """Chain rule through the model: ``[L, M, B, T]`` → ``[L, M, D, V]``."""
  _, vjp = jax.vjp(
    lambda w: _model(w, batch["features"], batch["targets"]), weights
  )
  flat = cotangents.reshape(-1, *cotangents.shape[-2:])
  return jax.vmap(lambda c: vjp(c)[0])(flat).reshape(
    *cotangents.shape[:2], *weights.shape
  )


def _full(weights, batch):
  """Reference: gradients of the full-batch ``value()`` of every combo."""

  def values(w):
    lp = _model(w, batch["features"], batch["targets"])
    totals, weights_ = _weighted_means(lp, batch)
    return _masked.safe_divide(totals, weights_)

  def values_of_logps(lp):
    totals, weights_ = _weighted_means(lp, batch)
    return _masked.safe_divide(totals, weights_)

  logps = _model(weights, batch["features"], batch["targets"])
  return (jax.jacrev(values)(weights), jax.jacrev(values_of_logps)(logps))


def _accumulated(weights, batch, num_micro_batches):
  """Per micro-batch: gradients of ``total``; then sum and divide once."""
  micro = jax.tree.map(
    lambda x: x.reshape(
      num_micro_batches, B // num_micro_batches, *x.shape[1:]
    ),
    batch,
  )

  def one(mb):
    logps = _model(weights, mb["features"], mb["targets"])
    totals_of = lambda lp: _weighted_means(lp, mb)[0]  # noqa: E731
    _, weights_ = _weighted_means(logps, mb)
    grad_logps = jax.jacrev(totals_of)(logps)  # [L, M, b, T]
    return weights_, grad_logps, _model_vjp(weights, mb, grad_logps)

  weights_, grad_logps, grad_weights = jax.vmap(one)(micro)
  total_weight = jnp.sum(weights_, axis=0)[..., None, None]
  grad_logps = jnp.moveaxis(grad_logps, 0, 2).reshape(
    *grad_logps.shape[1:3], B, T
  )
  return (
    jnp.sum(grad_weights, axis=0) / total_weight,
    grad_logps / total_weight,
  )


def _assert_close(got, want, what):
  for g, w, part in zip(got, want, ("weights", "logps"), strict=True):
    w = np.asarray(w)
    for i, name in enumerate(LOSSES):
      for j, mode in enumerate(MODES):
        scale = np.max(np.abs(w[i, j]))
        assert scale > 0, (what, name, mode, part)
        np.testing.assert_allclose(
          g[i, j],
          w[i, j],
          rtol=1e-6,
          atol=1e-6 * scale,
          err_msg=f"{what}: {name} {mode} {part}",
        )


class AggregationInvarianceTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.weights, cls.batch = _batch()
    cls.full = jax.jit(_full)(cls.weights, cls.batch)

  def test_micro_batch_accumulation_equals_full_batch(self):
    accumulated = jax.jit(
      lambda w, b: [_accumulated(w, b, m) for m in MICRO_BATCHES]
    )(self.weights, self.batch)
    for m, got in zip(MICRO_BATCHES, accumulated, strict=True):
      _assert_close(got, self.full, f"{m} micro-batches")

  def test_data_parallel_equals_full_batch(self):
    # GSPMD: global arrays sharded over 8 devices along B.
    sharded = jax.jit(_full)(self.weights, testing.shard_leading(self.batch, 8))
    _assert_close(sharded, self.full, "jit, 8 devices")

    # shard_map: each device holds B/8 rows; axis_name psums totals and
    # weights, and autodiff reduces the gradient of the replicated weights.
    mesh = testing.data_mesh(8)

    def local(w, micro):
      lp = _model(w, micro["features"], micro["targets"])
      totals, weights_ = _weighted_means(lp, micro, axis_name="data")
      return _masked.safe_divide(totals, weights_)

    values = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()
    )
    got = jax.jit(jax.jacrev(values))(self.weights, self.batch)
    _assert_close((got, self.full[1]), self.full, "shard_map")

  def test_bnpo_per_micro_batch_normalisation_is_not_invariant(self):
    logps = _model(self.weights, self.batch["features"], self.batch["targets"])
    mask = self.batch["completion_mask"]

    def values(lp):
      loss, _ = pg.grpo_loss(
        lp, self.batch["old_token_logps"], self.batch["advantages"], mask
      )
      token_mean = _masked.aggregate_token_loss(loss, mask).value()
      return token_mean, [
        pg.bnpo_aggregate(loss, mask, num_micro_batches=m)
        for m in MICRO_BATCHES
      ]

    (token_mean, bnpo), (grad_tm, grad_bnpo) = jax.jit(
      lambda lp: (values(lp), jax.jacrev(values)(lp))
    )(logps)
    # One micro-batch: BNPO is the token mean.
    np.testing.assert_allclose(bnpo[0], token_mean, rtol=1e-6)
    np.testing.assert_allclose(grad_bnpo[0], grad_tm, rtol=1e-6, atol=1e-9)
    # More micro-batches with uneven token counts: value and gradient move.
    # A token's gradient is −A·ρ/(M·n_m) instead of −A·ρ/n, so tokens in
    # short micro-batches are over-weighted.
    for m, value, grad in zip(
      MICRO_BATCHES[1:], bnpo[1:], grad_bnpo[1:], strict=True
    ):
      self.assertGreater(abs(float(value - token_mean)), 1e-5, m)
      self.assertGreater(float(jnp.max(jnp.abs(grad - grad_tm))), 1e-3, m)
    # The WeightedMean route stays exact for the same split (see above);
    # BNPO coincides with it only when every micro-batch holds the same
    # number of tokens.
    equal = np.arange(T)[None, :] < np.full((B, 1), 3)

    def equal_counts(lp):
      loss, _ = pg.grpo_loss(
        lp, self.batch["old_token_logps"], self.batch["advantages"], equal
      )
      return (
        pg.bnpo_aggregate(loss, equal, num_micro_batches=4),
        _masked.aggregate_token_loss(loss, equal).value(),
      )

    bnpo_equal, token_mean_equal = jax.jit(equal_counts)(logps)
    np.testing.assert_allclose(bnpo_equal, token_mean_equal, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
