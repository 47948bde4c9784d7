"""`trainers.common.make_optimizer`: names, clipping and the bf16 first moment."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from alignment import config_lib
from alignment.trainers import common


def _block(**kw):
  block = config_lib.optimizer(1e-2, 100)
  block.schedule = "constant"
  block.update(kw)
  return block


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "w": jax.random.normal(k1, (16, 8)),
    "b": jax.random.normal(k2, (8,)),
  }


def _grads(step):
  k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(1), step))
  return {"w": jax.random.normal(k1, (16, 8)), "b": jax.random.normal(k2, (8,))}


def _run(block, steps=5):
  tx = common.make_optimizer(block, 100)
  params = _params()
  state = tx.init(params)
  for step in range(steps):
    updates, state = tx.update(_grads(step), state, params)
    params = jax.tree.map(jnp.add, params, updates)
  return params, state


def _mu_leaves(state):
  """The first-moment leaves of an optax state (``mu`` fields)."""
  out = []

  def visit(node):
    if hasattr(node, "mu"):
      out.extend(jax.tree.leaves(node.mu))
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)

  visit(state)
  return out


class MuDtypeTest(parameterized.TestCase):
  def test_default_config_keeps_float32(self):
    block = config_lib.optimizer(1e-3, 10)
    self.assertEqual(block.mu_dtype, "float32")
    _, state = _run(_block(), steps=1)
    mus = _mu_leaves(state)
    self.assertLen(mus, 2)
    self.assertTrue(all(m.dtype == jnp.float32 for m in mus))

  @parameterized.parameters("adamw", "adam", "lion")
  def test_bfloat16_first_moment_is_stored_bf16(self, name):
    params, state = _run(_block(name=name, mu_dtype="bfloat16"))
    mus = _mu_leaves(state)
    self.assertLen(mus, 2)
    self.assertTrue(all(m.dtype == jnp.bfloat16 for m in mus))
    # Parameters and (for Adam) the second moment stay float32.
    self.assertTrue(
      all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    )
    nus = [
      leaf
      for node in jax.tree.leaves(state, is_leaf=lambda n: hasattr(n, "nu"))
      if hasattr(node, "nu")
      for leaf in jax.tree.leaves(node.nu)
    ]
    self.assertTrue(all(n.dtype == jnp.float32 for n in nus))

  @parameterized.parameters("adamw", "adam")
  def test_bfloat16_moment_tracks_the_float32_run(self, name):
    ref, ref_state = _run(_block(name=name))
    got, got_state = _run(_block(name=name, mu_dtype="bfloat16"))
    # The moment itself: float32 run's mu rounded to bf16 within a few ulp.
    for a, b in zip(_mu_leaves(ref_state), _mu_leaves(got_state), strict=True):
      np.testing.assert_allclose(
        np.asarray(b, np.float32), np.asarray(a), rtol=2e-2, atol=1e-3
      )
    # Parameters after 5 Adam steps of lr 1e-2: each moved ~5e-2; bf16
    # rounding of mu changes that by well under a percent of the move.
    p0 = _params()
    for a, b, init in zip(
      jax.tree.leaves(ref),
      jax.tree.leaves(got),
      jax.tree.leaves(p0),
      strict=True,
    ):
      moved = np.abs(np.asarray(a) - np.asarray(init)).max()
      self.assertGreater(moved, 1e-2)
      np.testing.assert_allclose(
        np.asarray(b), np.asarray(a), atol=2e-2 * moved
      )

  def test_adamw_state_drops_two_bytes_a_parameter(self):
    def nbytes(block):
      tx = common.make_optimizer(block, 100)
      params = _params()
      state = jax.eval_shape(tx.init, params)
      return sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves((params, state))
        if hasattr(x, "dtype")
      )

    full = nbytes(_block())
    half_mu = nbytes(_block(mu_dtype="bfloat16"))
    n = 16 * 8 + 8
    self.assertEqual(full - half_mu, 2 * n)  # 4 -> 2 bytes per element

  def test_memory_planner_counts_the_bf16_moment(self):
    from alignment.sharding import planner  # noqa: PLC0415

    full = planner.plan(
      "tiny",
      mesh="data:1,fsdp:1,tensor:1",
      tx=common.make_optimizer(_block(), 10),
    )
    bf16 = planner.plan(
      "tiny",
      mesh="data:1,fsdp:1,tensor:1",
      tx=common.make_optimizer(_block(mu_dtype="bfloat16"), 10),
    )
    # Per device, one data shard: AdamW's mu goes from 4 to 2 bytes.
    self.assertEqual(full.opt_state - bf16.opt_state, 2 * full.num_params)

  def test_bad_mu_dtype_names_the_key_and_choices(self):
    with self.assertRaisesRegex(
      ValueError, r"config.optimizer.mu_dtype='float16'.*bfloat16"
    ):
      common.make_optimizer(_block(mu_dtype="float16"), 10)

  @parameterized.parameters("sgd", "adafactor")
  def test_mu_dtype_on_an_optimiser_without_first_moment_is_an_error(
    self, name
  ):
    with self.assertRaisesRegex(ValueError, rf"name='{name}'"):
      common.make_optimizer(_block(name=name, mu_dtype="bfloat16"), 10)

  def test_float32_is_accepted_everywhere(self):
    for name in common.OPTIMIZERS:
      common.make_optimizer(_block(name=name), 10)

  def test_block_without_the_field_still_builds(self):
    block = ml_collections.ConfigDict(
      dict(name="adamw", learning_rate=1e-3, schedule="constant")
    )
    common.make_optimizer(block, 10)


if __name__ == "__main__":
  absltest.main()
