"""A ``sequence`` mesh axis shards the token dimension of the activations.

Opt-in by rule: ``("length", "sequence")`` ahead of the defaults and a
``sequence`` axis in the mesh. The models' constraints then split hidden
states, queries, keys/values and the MLP activations along their length;
attention gathers keys and values along the sequence axis (each device
keeps its queries, so the ``[B, H, L, S]`` scores are split ``L`` ways),
and GSPMD reshards where a length does not divide. Checked on 8 fake
devices (fsdp=2, sequence=2, tensor=2): the value and gradient of summed
completion log-probs (``trainers._lm.completion_token_logps``, the fused
kernel every trainer uses) equal one device's, and the compiled program
holds ``[B/2, L/2, D]`` hidden tiles.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from alignment import config_lib, models, sharding
from alignment.trainers import _lm, common

RULES = (("length", "sequence"), *config_lib.DEFAULT_RULES)
MESH = (("data", 1), ("fsdp", 2), ("sequence", 2), ("tensor", 2))
B, L = 4, 16


def _constraints(stablehlo: str) -> set[str]:
  return set(
    re.findall(r"sdy\.sharding_constraint %\S+ <@\w+, (.*)", stablehlo)
  )


class SequenceAxisTest(absltest.TestCase):
  def test_sequence_sharded_logps_and_grads_equal_one_device(self):
    cfg = models.get_preset("tiny", n_layers=1)
    mesh = sharding.make_mesh(MESH)
    model = common.create_sharded_model(
      lambda rngs: models.build_model("causal_lm", cfg, rngs=rngs),
      0,
      mesh,
      RULES,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (B, L)).astype(np.int32)
    attn = np.ones((B, L), bool)
    attn[0, -3:] = False

    def summed_logps(params, rest, tokens, attn):
      lm = nnx.merge(model.graphdef, params, rest)
      lp, mask = _lm.completion_token_logps(
        lm, tokens, attn, attn, chunk_size=32
      )
      return jnp.sum(jnp.where(mask, lp, 0.0))

    fn = jax.jit(jax.value_and_grad(summed_logps))
    batch = sharding.shard_batch({"t": tokens, "a": attn}, mesh, RULES)
    args = (model.params, model.rest, batch["t"], batch["a"])
    with sharding.activation_context(mesh, RULES):
      lowered = fn.lower(*args)
      compiled = lowered.compile()
      value, grads = compiled(*args)
    host = jax.device_get((model.params, model.rest))
    want_value, want_grads = fn(*host, tokens, attn)  # one device
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for a, b in zip(
      jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    d, h, n = cfg.d_model, cfg.n_heads, cfg.head_dim
    constraints = _constraints(lowered.as_text())
    self.assertIn(
      f'[{{"fsdp"}}, {{"sequence"}}, {{}}]> : tensor<{B}x{L}x{d}xf32>',
      constraints,
    )
    self.assertIn(
      f'[{{"fsdp"}}, {{"sequence"}}, {{"tensor"}}, {{}}]> : '
      f"tensor<{B}x{L}x{h}x{n}xf32>",
      constraints,
    )
    hlo = compiled.as_text()
    self.assertIn(f"f32[{B // 2},{L // 2},{d}]", hlo)  # hidden tiles
    self.assertIn(f"f32[{B // 2},{L // 2},{h // 2},{n}]", hlo)  # queries

  def test_a_sequence_rule_needs_the_mesh_axis(self):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    with self.assertRaisesRegex(ValueError, r"mesh has no axis 'sequence'"):
      sharding.logical_to_spec(("batch", "length"), RULES, mesh)


if __name__ == "__main__":
  absltest.main()
