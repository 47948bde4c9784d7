"""DPO, reward-model and GRPO train steps: 1 device == 8 devices.

Each step is built as its trainer builds it (``create_sharded_model`` on a
mesh from ``alignment.sharding.make_mesh``, optimiser state born sharded,
``jit`` with ``out_shardings`` and a donated state, batches placed with
``shard_batch``) and run for 3 steps on a fixed synthetic batch, once on a
1-device mesh and once on 8 fake CPU devices with data=2, fsdp=2, tensor=2.
Losses and final parameters must agree to 1e-5 (SGD with momentum; see
``_train`` for why not Adam).
"""

import jax
import numpy as np
from absl.testing import absltest, parameterized

from alignment import config_lib, models
from alignment import sharding as sharding_lib
from alignment.data import batches as data_batches
from alignment.trainers import _setup, common, preference, rl
from alignment.trainers import reward_model as rm
from tests.trainers import _util

MODEL = models.get_preset("tiny", n_layers=1)
RULES = config_lib.DEFAULT_RULES
STEPS = 3
B, L, G, PROMPT = 4, 12, 4, 4

_CACHE = None


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
  return data_batches.PreferenceBatch(
    *_rows(rng, B), *_rows(rng, B), np.array([True, True, True, False])
  )


def _rollout():
  n = 2 * G
  rng = np.random.default_rng(1)
  tokens, attn, _ = _rows(rng, n)
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
  """3 steps of ``trainer`` on an n-device mesh: (losses, final params)."""
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
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, frozen, device_batch)
    losses.append(float(metrics["loss"]))
  leaves = jax.tree.leaves(state["params"])
  if n_devices > 1:  # really spread over the 8 devices
    sharded = [x for x in leaves if len(x.sharding.device_set) == 8]
    assert sharded and any(
      not x.sharding.is_fully_replicated for x in sharded
    ), "no parameter is split over the mesh"
  return losses, jax.device_get(state["params"])


class ShardedTrainStepTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("dpo", "dpo"), ("reward_model", "reward_model"), ("grpo", "grpo")
  )
  def test_8_devices_equal_1_device(self, trainer):
    losses_1, params_1 = _train(trainer, 1)
    losses_8, params_8 = _train(trainer, 8)
    self.assertTrue(np.all(np.isfinite(losses_1)))
    self.assertLen(set(losses_1), STEPS)  # the steps did something
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-5)
    for a, b in zip(
      jax.tree.leaves(params_8), jax.tree.leaves(params_1), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
