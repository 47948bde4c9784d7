"""DPO, reward-model and GRPO train steps: 1 device == 8 devices.

Each step is built as its trainer builds it (``create_sharded_model`` on a
mesh from ``alignment.sharding.make_mesh``, optimiser state born sharded,
``jit`` with ``out_shardings`` and a donated state, batches placed with
``shard_batch``, traced and run inside the activation context of mesh and
rules, as ``_setup.in_mesh_context`` runs every trainer) and run for 3 steps
on a fixed synthetic batch, once on a 1-device mesh and once on 8 fake CPU
devices with data=2, fsdp=2, tensor=2. Losses and final parameters must
agree to 1e-5 (SGD with momentum; see ``_train`` for why not Adam). The
8-device DPO step's program must carry the models' activation sharding
constraints, and every trainer's ``run`` must enter that context.
"""

import re
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

from alignment import config_lib, models, trainers
from alignment import sharding as sharding_lib
from alignment.data import batches as data_batches
from alignment.models import partitioning
from alignment.trainers import _packing, _setup, common, preference, rl
from alignment.trainers import reward_model as rm
from tests.trainers import _util

MODEL = models.get_preset("tiny", n_layers=1)
RULES = config_lib.DEFAULT_RULES
STEPS = 3
B, L, G, PROMPT = 4, 12, 4, 4

_CACHE = None
_RESULTS: dict = {}


def setUpModule():
  global _CACHE
  _CACHE = _util.compilation_cache()
  _CACHE.__enter__()


def tearDownModule():
  _CACHE.__exit__(None, None, None)


def _mesh(n):
  if n == 1:
    spec = [("data", 1), ("fsdp", 1), ("tensor", 1)]
    return sharding_lib.make_mesh(spec, devices=jax.devices()[:1])
  return sharding_lib.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


def _rows(rng, n, length=L):
  tokens = rng.integers(0, 256, (n, length)).astype(np.int32)
  attn = np.ones((n, length), bool)
  attn[0, -3:] = False
  comp = attn.copy()
  comp[:, :PROMPT] = False
  return tokens, attn, comp


def _pairs():
  rng = np.random.default_rng(0)
  chosen, rejected = _rows(rng, B), _rows(rng, B)
  rejected[0][:, :PROMPT] = chosen[0][:, :PROMPT]  # a pair shares its prompt
  return data_batches.PreferenceBatch(
    *chosen, *rejected, np.array([True, True, True, False])
  )


def _rollout():
  n = 2 * G
  rng = np.random.default_rng(1)
  tokens, attn, _ = _rows(rng, n)
  # The sampler's layout: a group's G rows share the prompt columns.
  tokens[:, :PROMPT] = np.repeat(tokens[::G, :PROMPT], G, axis=0)
  attn[:, :PROMPT] = np.repeat(attn[::G, :PROMPT], G, axis=0)
  loss_mask = np.zeros((n, L - 1), bool)
  loss_mask[:, PROMPT - 1 :] = attn[:, PROMPT:]
  old = np.where(loss_mask, -rng.uniform(1, 6, (n, L - 1)), 0.0)
  old = old.astype(np.float32)
  rewards = rng.normal(size=(2, G)).astype(np.float32)
  adv = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(
    1, keepdims=True
  )
  return rl.Rollout(
    tokens,
    attn,
    loss_mask,
    old,
    old,
    old - 0.1,
    adv.reshape(n).astype(np.float32),
    rewards.reshape(n),
  )


def _train(trainer, n_devices):
  """Cached :func:`_train_uncached`."""
  if (trainer, n_devices) not in _RESULTS:
    _RESULTS[trainer, n_devices] = _train_uncached(trainer, n_devices)
  return _RESULTS[trainer, n_devices]


def _train_uncached(trainer, n_devices):
  """3 steps of ``trainer`` on an n-device mesh.

  Returns:
    ``(losses, final params, programs)``; ``programs`` has the step's
    StableHLO traced outside and inside the activation context and its
    compiled HLO (8-device DPO only, else None).
  """
  mesh = _mesh(n_devices)
  if trainer == "dpo":
    config = _util.load_config("preference", "loss=dpo,runlocal")
    kind, kwargs, batch = "causal_lm", {}, _pairs()
  elif trainer == "reward_model":
    config = _util.load_config("reward_model", "runlocal")
    kind, kwargs = rm.model_kind(config)
    batch = _pairs()
  else:
    config = _util.load_config("rl", "loss=grpo,advantage=grpo,runlocal")
    config.loss_aggregation = "token_mean"
    config.rl.num_generations = G
    config.rl.max_new_tokens = L - PROMPT
    kind, kwargs, batch = "causal_lm", {}, _rollout()
  # SGD with momentum: parameter differences stay proportional to gradient
  # differences. (Adam divides tiny gradients by their own root mean
  # square, so float32 reduction-order noise in a near-zero gradient can
  # move a parameter by a sizeable fraction of the learning rate.)
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = "constant"  # warmup would zero the first step
  model = common.create_sharded_model(
    lambda rngs: models.build_model(kind, MODEL, rngs=rngs, **kwargs),
    0,
    mesh,
    RULES,
  )
  frozen, frozen_sh = None, None
  if trainer == "dpo":
    loss_fn, _, _ = preference.make_loss_fn(model.graphdef, model.rest, config)
    frozen = _setup.frozen_copy(model.params, model.param_shardings)
    frozen_sh = model.param_shardings
  elif trainer == "reward_model":
    loss_fn = rm.make_loss_fn(model.graphdef, model.rest, config)
  else:
    loss_fn = rl.make_policy_loss(
      model.graphdef, model.rest, None, None, config
    )
  params, param_sh = model.params, model.param_shardings
  if trainer == "grpo":
    params, param_sh = {"policy": params}, {"policy": param_sh}
  tx = common.make_optimizer(config.optimizer, STEPS)
  opt_sh = common.opt_state_shardings(tx, params, param_sh, mesh)
  repl = sharding_lib.replicated(mesh)
  state_sh = {
    "params": param_sh,
    "opt_state": opt_sh,
    "step": repl,
    "rng": repl,
  }
  state = common.train_state(
    params,
    jax.jit(tx.init, out_shardings=opt_sh)(params),
    0,
    jax.random.key(0),
  )
  state = jax.device_put(state, state_sh)
  step = jax.jit(
    common.make_train_step(loss_fn, tx),
    in_shardings=(state_sh, frozen_sh, None),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )
  device_batch = sharding_lib.shard_batch(batch, mesh, RULES)
  programs = None
  if trainer == "dpo" and n_devices > 1:
    # Traced without the context: the models' constraints are no-ops.
    outside = step.lower(state, frozen, device_batch).as_text()
  with sharding_lib.activation_context(mesh, RULES):
    lowered = step.lower(state, frozen, device_batch)
    compiled = lowered.compile()
    if trainer == "dpo" and n_devices > 1:
      programs = (outside, lowered.as_text(), compiled.as_text())
    losses = []
    for _ in range(STEPS):
      state, metrics = compiled(state, frozen, device_batch)
      losses.append(float(metrics["loss"]))
  leaves = jax.tree.leaves(state["params"])
  if n_devices > 1:  # really spread over the 8 devices
    sharded = [x for x in leaves if len(x.sharding.device_set) == 8]
    assert sharded and any(
      not x.sharding.is_fully_replicated for x in sharded
    ), "no parameter is split over the mesh"
  return losses, jax.device_get(state["params"]), programs


class ShardedTrainStepTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("dpo", "dpo"), ("reward_model", "reward_model"), ("grpo", "grpo")
  )
  def test_8_devices_equal_1_device(self, trainer):
    losses_1, params_1, _ = _train(trainer, 1)
    losses_8, params_8, _ = _train(trainer, 8)
    self.assertTrue(np.all(np.isfinite(losses_1)))
    self.assertLen(set(losses_1), STEPS)  # the steps did something
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-5)
    for a, b in zip(
      jax.tree.leaves(params_8), jax.tree.leaves(params_1), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def test_dpo_step_carries_the_activation_constraints(self):
    outside, inside, compiled = _train("dpo", 8)[2]
    # One packed row [prompt | chosen | rejected] per pair (share_prompt;
    # runlocal completions of at most 9 tokens).
    rows, length = B, _packing.packed_length(L, 9)
    d, h, kv = MODEL.d_model, MODEL.n_heads, MODEL.n_kv_heads
    n, f = MODEL.head_dim, MODEL.d_ff
    self.assertNotIn("sharding_constraint", outside)
    batch = '{"data", "fsdp"}'
    want = {
      # hidden states [B, L, D] (embed -> fsdp is taken by the batch)
      f"[{batch}, {{}}, {{}}]> : tensor<{rows}x{length}x{d}xf32>",
      # queries, keys/values [B, L, heads, N]: heads over tensor
      f'[{batch}, {{}}, {{"tensor"}}, {{}}]> : '
      f"tensor<{rows}x{length}x{h}x{n}xf32>",
      f'[{batch}, {{}}, {{"tensor"}}, {{}}]> : '
      f"tensor<{rows}x{length}x{kv}x{n}xf32>",
      # MLP hidden [B, L, F]: F over tensor
      f'[{batch}, {{}}, {{"tensor"}}]> : tensor<{rows}x{length}x{f}xf32>',
    }
    found = set(
      re.findall(r"sdy\.sharding_constraint %\S+ <@\w+, (.*)", inside)
    )
    for constraint in want:
      self.assertTrue(
        any(constraint in x for x in found), (constraint, sorted(found))
      )
    # Partitioned: every [b, L, ...] activation holds 1/4 of the rows
    # (data x fsdp), and the MLP / attention tiles are split over tensor.
    local = rows // 4
    leading = {
      int(m)
      for m in re.findall(rf"f32\[(\d+),{length},\d+(?:,\d+)?\]", compiled)
    }
    self.assertEqual(leading, {local})
    self.assertIn(f"f32[{local},{length},{f // 2}]", compiled)
    self.assertIn(f"f32[{local},{length},{h // 2},{n}]", compiled)


class MeshContextTest(absltest.TestCase):
  def test_setup_fails_at_start_naming_the_numbers(self):
    config = _util.load_config("sft", "runlocal")
    config.checkpoint.enabled = False
    with tempfile.TemporaryDirectory() as tmp:

      def setup():
        _setup.setup_run(config, tmp, kind="causal_lm", total_steps=1)

      config.mesh = [["data", 3], ["fsdp", 1], ["tensor", 1]]
      with self.assertRaisesRegex(ValueError, r"has 3 devices but 8"):
        setup()
      config.mesh = [["data", 2], ["fsdp", 2], ["tensor", 2]]
      config.batch_size = 6
      with self.assertRaisesRegex(
        ValueError, r"config.batch_size of 6 rows .* 4 batch shards"
      ):
        setup()
      config.batch_size = 8
      config.mesh = [["data", 1], ["fsdp", 2], ["tensor", 4]]
      config.model.strict_sharding = True  # tiny: 2 KV heads
      with self.assertRaisesRegex(
        ValueError, r"k_kernel.*dimension 1 has size 2.*'tensor' of size 4"
      ):
        setup()

  def test_every_trainer_runs_inside_its_mesh_context(self):
    config = _util.load_config("sft", "runlocal")
    config.mesh = [["data", 2], ["fsdp", 2], ["tensor", 2]]
    config.logical_axis_rules = [["batch", "data"], ["vocab", "tensor"]]

    def probe(config, workdir):
      del config, workdir
      mesh = jax.sharding.get_abstract_mesh()
      return dict(mesh.shape), partitioning.current_rules()

    self.assertTrue(jax.sharding.get_abstract_mesh().empty)
    shape, rules = _setup.in_mesh_context(probe)(config, "unused")
    self.assertEqual(shape, {"data": 2, "fsdp": 2, "tensor": 2})
    self.assertEqual(rules, (("batch", "data"), ("vocab", "tensor")))
    self.assertTrue(jax.sharding.get_abstract_mesh().empty)  # left again
    self.assertEqual(partitioning.current_rules(), ())
    # The pipeline takes its mesh from its SFT stage's block.
    outer = {"sft": config}
    shape, _ = _setup.in_mesh_context(config_of=lambda c: c["sft"])(probe)(
      outer, "unused"
    )
    self.assertEqual(shape, {"data": 2, "fsdp": 2, "tensor": 2})
    for name, module in trainers.REGISTRY.items():
      wrapped = getattr(module.run, "__wrapped__", None)
      self.assertIsNotNone(wrapped, f"{name}.run is not in_mesh_context")


if __name__ == "__main__":
  absltest.main()
