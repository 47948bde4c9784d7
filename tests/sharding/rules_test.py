"""Rule-table coverage, FSDP byte counts from the compiled step, mesh errors.

* Every parameter of every model preset (and of the reward / value /
  ensemble heads, and the KV cache) carries logical axis names that the
  default rule table covers, and with fsdp=8 every preset's per-device
  parameter bytes are at most 1.15/8 of the whole.
* With fsdp=8 on 8 fake devices, the compiled train step's parameter and
  optimiser bytes per device (its memory analysis) are at most 1.15/8 of the
  single-device program's.
* Bad meshes and batches fail at start with errors naming the numbers.
"""

import jax
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import nnx
from jax.sharding import AbstractMesh

from alignment import config_lib, models, sharding
from alignment.sharding import partition, planner
from alignment.trainers import common

RULES = config_lib.DEFAULT_RULES
RULE_NAMES = {name for name, _ in RULES}
FSDP8 = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"))


def _logical_axes(module):
  """``{path: (logical names, shape)}`` of every nnx.Param."""
  state = nnx.state(module, nnx.Param)
  out = {}
  for path, var in jax.tree_util.tree_flatten_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]:
    axes = var.get_metadata().get("out_sharding")
    out[jax.tree_util.keystr(path)] = (axes, tuple(np.shape(var)))
  return out


class RuleCoverageTest(parameterized.TestCase):
  @parameterized.named_parameters(
    (name.replace(".", "_").replace("-", "_"), name) for name in models.PRESETS
  )
  def test_every_preset_parameter_is_covered_and_fsdp_splits_it(self, name):
    # One block is representative: every block has the same parameters.
    cfg = models.get_preset(name, n_layers=1)
    abstract = nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0)))
    axes = _logical_axes(abstract)
    self.assertNotEmpty(axes)
    for path, (names, shape) in axes.items():
      self.assertIsNotNone(names, f"{name}{path} has no logical axes")
      self.assertLen(names, len(shape), f"{name}{path}")
      for n in names:
        if n is not None:
          self.assertIn(n, RULE_NAMES, f"{name}{path}: no rule for {n!r}")
    params = nnx.state(abstract, nnx.Param)
    shardings = sharding.state_shardings(params, FSDP8, RULES)
    total = per_device = 0
    for (path, leaf), shard in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(shardings),
      strict=True,
    ):
      key = jax.tree_util.keystr(path).removesuffix(".value")
      full = planner.tree_bytes([leaf])
      mine = planner.shard_bytes(leaf.shape, leaf.dtype, shard)
      total += full
      per_device += mine
      if "embed" in axes[key][0]:  # every D-wide weight is split 8 ways
        self.assertEqual(mine * 8, full, f"{name}{key}: {shard}")
    self.assertLessEqual(per_device, 1.15 / 8 * total, name)

  @parameterized.parameters(
    ("reward", {}),
    ("value", {}),
    ("ensemble_heads", {"num_heads": 3}),
    ("ensemble_stacked", {"num_members": 3}),
  )
  def test_heads_and_ensemble_members_are_covered(self, kind, kwargs):
    cfg = models.get_preset("tiny", n_layers=1)
    abstract = nnx.eval_shape(
      lambda: models.build_model(kind, cfg, rngs=nnx.Rngs(0), **kwargs)
    )
    axes = _logical_axes(abstract)
    seen = set()
    for path, (names, shape) in axes.items():
      self.assertLen(names or (), len(shape), f"{kind}{path}")
      for n in names:
        if n is not None:
          self.assertIn(n, RULE_NAMES, f"{kind}{path}: no rule for {n!r}")
          seen.add(n)
    if kind == "ensemble_stacked":
      # The member axis is placed by its own rule (replicated by default).
      self.assertIn("members", seen)

  def test_kv_cache_axes_are_covered(self):
    for n in models.CACHE_AXES:
      self.assertIn(n, RULE_NAMES)
    spec = sharding.logical_to_spec(
      models.CACHE_AXES,
      RULES,
      AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")),
    )
    self.assertEqual(tuple(spec), (("data", "fsdp"), "tensor"))


def _sft_step_memory(mesh):
  cfg = models.get_preset("tiny", vocab_size=256)
  workload = planner.Workload("sft", batch=8, seq_len=16)
  stats = planner.compile_step(cfg, workload, mesh, RULES)
  return stats


class CompiledFsdpBytesTest(absltest.TestCase):
  def test_fsdp8_param_and_optimizer_bytes_are_an_eighth(self):
    devices = jax.devices()
    fsdp = sharding.make_mesh(
      [("data", 1), ("fsdp", 8), ("tensor", 1)], devices[:8]
    )
    single = sharding.make_mesh(
      [("data", 1), ("fsdp", 1), ("tensor", 1)], devices[:1]
    )
    cfg = models.get_preset("tiny", vocab_size=256)
    setup = planner.abstract_setup(cfg, "causal_lm", single, RULES)
    state_bytes = planner.tree_bytes(setup.params) + planner.tree_bytes(
      setup.opt_state
    )
    one = _sft_step_memory(single)
    eight = _sft_step_memory(fsdp)
    # The single-device program's arguments are the whole train state.
    self.assertGreaterEqual(one.argument_size_in_bytes, state_bytes)
    # Arguments (params + Adam moments + batch) and outputs (the new state)
    # per device: an eighth, plus a few replicated scalars.
    self.assertLessEqual(
      eight.argument_size_in_bytes, 1.15 / 8 * one.argument_size_in_bytes
    )
    self.assertLessEqual(
      eight.output_size_in_bytes, 1.15 / 8 * one.output_size_in_bytes
    )
    # The state is donated: the new state reuses the old buffers.
    self.assertGreater(eight.alias_size_in_bytes, 0.9 / 8 * state_bytes)


class MeshErrorTest(absltest.TestCase):
  def test_mesh_size_must_match_device_count(self):
    with self.assertRaisesRegex(ValueError, r"has 6 devices but 8"):
      sharding.make_mesh([("data", 2), ("fsdp", 3), ("tensor", 1)])
    with self.assertRaisesRegex(ValueError, r"multiply to 3.*8 available"):
      sharding.make_mesh([("data", -1), ("fsdp", 3)])
    with self.assertRaisesRegex(ValueError, r"at most one -1"):
      sharding.make_mesh([("data", -1), ("fsdp", -1)])

  def test_rule_naming_a_missing_mesh_axis(self):
    mesh = AbstractMesh((8,), ("data",))
    with self.assertRaisesRegex(ValueError, r"mesh has no axis 'fsdp'"):
      sharding.logical_to_spec(("embed",), RULES, mesh)

  def test_axis_that_does_not_divide_a_parameter(self):
    cfg = models.get_preset("tiny", n_layers=1)  # n_kv_heads = 2
    abstract = nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    mesh = AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
    with self.assertRaisesRegex(
      ValueError, r"k_kernel.*dimension 1 has size 2.*'tensor' of size 4"
    ):
      sharding.state_shardings(params, mesh, RULES, strict=True)
    # Without strict, the axis is dropped for that dimension (logged).
    shardings = sharding.state_shardings(params, mesh, RULES)
    k = shardings["transformer"]["layers"][0]["attn"]["k_kernel"]
    self.assertEqual(tuple(k.spec), ("fsdp",))

  def test_batch_not_divisible_by_shards_or_processes(self):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    with self.assertRaisesRegex(
      ValueError, r"global batch of 6 rows .* 4 batch shards"
    ):
      partition.check_batch_size(6, mesh, RULES)
    partition.check_batch_size(8, mesh, RULES)
    with self.assertRaisesRegex(ValueError, r"3 rows on this process.*4"):
      sharding.shard_batch({"tokens": np.zeros((3, 4), np.int32)}, mesh, RULES)
    # One process holds every row.
    self.assertEqual(partition.process_batch_slice(8, mesh, RULES), slice(0, 8))

  def test_process_count_must_divide_the_batch(self):
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 8)])
    original = jax.process_count
    try:
      jax.process_count = lambda: 4
      with self.assertRaisesRegex(
        ValueError, r"6 rows is not divisible by the 4 processes"
      ):
        partition.check_batch_size(6, mesh, RULES)
    finally:
      jax.process_count = original


class EnsembleMembersTest(absltest.TestCase):
  def test_member_axis_placed_by_its_rule(self):
    # ("members", "fsdp") ahead of the defaults: each fsdp group holds its
    # members whole-width (the embed dims give fsdp up to them); with 3
    # members fsdp=2 does not divide the member axis, and the members keep
    # the default placement (embed over fsdp).
    rules = (("members", "fsdp"), *RULES)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    cfg = models.get_preset("tiny", n_layers=1)

    def specs(num_members):
      abstract = nnx.eval_shape(
        lambda: models.build_model(
          "ensemble_stacked", cfg, rngs=nnx.Rngs(0), num_members=num_members
        )
      )
      shardings = sharding.state_shardings(
        nnx.state(abstract, nnx.Param), mesh, rules
      )
      return {
        jax.tree_util.keystr(p): tuple(s.spec)
        for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
      }

    two, three = specs(2), specs(3)
    q = next(k for k in two if k.endswith("['q_kernel'].value"))
    self.assertEqual(two[q], ("fsdp", None, "tensor"))  # [M, D, H, N]
    self.assertEqual(three[q], (None, "fsdp", "tensor"))
    for key, spec in two.items():
      self.assertEqual(spec[:1], ("fsdp",), key)  # every stacked parameter

    # The sharded forward (inside the activation context) equals one device.
    model = common.create_sharded_model(
      lambda rngs: models.build_model(
        "ensemble_stacked", cfg, rngs=rngs, num_members=2
      ),
      0,
      mesh,
      rules,
    )
    tokens = np.arange(4 * 6, dtype=np.int32).reshape(4, 6) % 200
    batch = sharding.shard_batch({"tokens": tokens}, mesh, rules)["tokens"]

    @jax.jit
    def forward(params, rest, tokens):
      return nnx.merge(model.graphdef, params, rest)(tokens)

    with sharding.activation_context(mesh, rules):
      got = forward(model.params, model.rest, batch)
    host = jax.device_get((model.params, model.rest))
    want = forward(*host, tokens)  # one device
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      self.assertEqual(a.shape[0], 2)  # [M, ...]
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class PlannerStepsTest(absltest.TestCase):
  def test_workload_validation_names_the_numbers(self):
    with self.assertRaisesRegex(ValueError, r"trainer must be one of"):
      planner.Workload("ppo", batch=2, seq_len=8)
    with self.assertRaisesRegex(ValueError, r"batch must be >= 1, got 0"):
      planner.Workload("sft", batch=0, seq_len=8)
    with self.assertRaisesRegex(ValueError, r"6 rows .* microbatches=4"):
      planner.Workload("sft", batch=6, seq_len=8, microbatches=4)

  def test_optimizer_shardings_match_trainers_common(self):
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 8), ("tensor", 1)])
    cfg = models.get_preset("tiny", vocab_size=256, n_layers=1)
    tx = optax.adamw(1e-3)
    setup = planner.abstract_setup(cfg, "causal_lm", mesh, RULES, tx)
    want = common.opt_state_shardings(
      tx, setup.params, setup.param_shardings, mesh
    )
    jax.tree.map(
      lambda a, b: self.assertEqual(a.spec, b.spec),
      setup.opt_shardings,
      want,
    )


if __name__ == "__main__":
  absltest.main()
