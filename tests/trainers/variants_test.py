"""Every named objective through its trainer's loss and train step.

For each preference loss, reward-model loss, policy loss and advantage
estimator, the trainer's ``loss_fn`` wrapped by ``common.make_train_step`` is
traced with ``jax.eval_shape`` on an abstract tiny model and a synthetic
batch (nothing is compiled). Objectives whose inputs a trainer cannot
supply must fail with a ValueError that names the missing arrays; the
expected sets are listed here, so a regression (or a newly supported
objective) shows up as a failure.

One numeric check, on a model-free loss, pins the exact gradient
accumulation of ``common.accumulate_gradients``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import nnx

from alignment import advantages, losses, models, ops
from alignment.data import batches as data_batches
from alignment.trainers import common, online_preference, preference, rl
from alignment.trainers import reward_model as rm
from tests.trainers import _util

B, L, G = 4, 12, 4  # pairs / rows, sequence length, RL group size
PROMPT = 4  # prompt tokens at the front of every row
MODEL = models.get_preset("tiny", n_layers=1)
TX = optax.adamw(1e-3)

# Objectives a trainer cannot feed, with the arrays it must say are missing.
# Losses that need a guidance model: without config.token_rewards.checkpoint
# they fail at start naming the key (tests/trainers/preference_inputs_test.py
# runs them with one).
PREFERENCE_NEED_GUIDANCE = ("t_reg", "tgdpo")
REWARD_MODEL_UNSUPPORTED = {  # with a plain (non-ensemble) reward model
  "bt_adaptive_margin": [
    "ensemble_chosen_rewards",
    "ensemble_rejected_rewards",
  ],
  "bt_regression": ["chosen_targets", "rejected_targets"],
  "bt_ties_davidson": ["ties"],
  "bt_ties_rao_kupper": ["ties"],
  "multi_objective_regression": ["rewards", "targets"],
}
ADVANTAGE_UNSUPPORTED = {  # estimator -> regex of rl._check's error
  "pass_at_k": re.escape("'pass_at_k' needs hyperparameters ['k']"),
}
# Process estimators: token advantages from derived step / token inputs
# (trainers/_rl_process.py; tests/trainers/rl_process_test.py).
PROCESS_ESTIMATORS = ("igpo", "prime", "pure_min")
# Losses that take one advantage per sequence ([B] only).
SEQUENCE_ADVANTAGE_LOSSES = ("empg", "gmpo")


def _named(names):
  return [(n, n) for n in names]


def _abstract(kind="causal_lm", **kwargs):
  module = nnx.eval_shape(
    lambda: models.build_model(kind, MODEL, rngs=nnx.Rngs(0), **kwargs)
  )
  return nnx.split(module, nnx.Param, ...)


def _state(params):
  return {
    "params": params,
    "opt_state": jax.eval_shape(TX.init, params),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }


def _rows(rng, n, length=L):
  tokens = rng.integers(0, 256, (n, length)).astype(np.int32)
  attn = np.ones((n, length), bool)
  attn[0, -2:] = False  # one right-padded row
  comp = attn.copy()
  comp[:, :PROMPT] = False
  return tokens, attn, comp


def _preference_batch(*, margin=False, ref=False):
  rng = np.random.default_rng(0)
  c = _rows(rng, B)
  r = _rows(rng, B, L - 2)  # different lengths: the trainer pads
  return data_batches.PreferenceBatch(
    *c,
    *r,
    np.array([True] * (B - 1) + [False]),
    ref_chosen_logps=-np.ones(B, np.float32) if ref else None,
    ref_rejected_logps=-2 * np.ones(B, np.float32) if ref else None,
    margin=np.linspace(0, 1, B).astype(np.float32) if margin else None,
  )


def _unpaired_batch(kl=True):
  rng = np.random.default_rng(1)
  t = _rows(rng, B)
  k = _rows(rng, B) if kl else (None, None, None)
  return data_batches.UnpairedBatch(
    *t, np.array([True, False, True, False]), np.ones(B, bool), *k
  )


def _assert_step_shapes(test, out, state):
  new_state, metrics = out
  test.assertEqual(
    jax.tree.structure(new_state["params"]), jax.tree.structure(state["params"])
  )
  for a, b in zip(
    jax.tree.leaves(new_state["params"]),
    jax.tree.leaves(state["params"]),
    strict=True,
  ):
    test.assertEqual((a.shape, a.dtype), (b.shape, b.dtype))
  for key in ("loss", "loss_weight", "grad_norm", "param_norm"):
    test.assertEqual(metrics[key].shape, ())
    test.assertEqual(metrics[key].dtype, jnp.float32)


def _cfg(name, arg):
  return _util.load_config(name, arg)


# ---------------------------------------------------------------------------
# Offline and online preference optimisation
# ---------------------------------------------------------------------------


class PreferenceVariantsTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.graphdef, cls.params, cls.rest = _abstract()

  def _trace(self, config, batch, *, extra=(), microbatches=1, frozen="ref"):
    loss_fn, kind, needs_ref = preference.make_loss_fn(
      self.graphdef, self.rest, config, extra
    )
    step = common.make_train_step(loss_fn, TX, num_microbatches=microbatches)
    state = _state(self.params)
    ref = self.params if (needs_ref and frozen == "ref") else None
    out = jax.eval_shape(step, state, ref, batch)
    _assert_step_shapes(self, out, state)
    return kind, needs_ref, out[1]

  @parameterized.named_parameters(*_named(sorted(losses.PREFERENCE_LOSSES)))
  def test_offline_trainer_traces_or_names_missing_arrays(self, name):
    config = _cfg("preference", f"loss={name},runlocal")
    if name in PREFERENCE_NEED_GUIDANCE:
      with self.assertRaisesRegex(
        ValueError, r"config\.token_rewards\.checkpoint is empty"
      ):
        preference.loss_spec(config)
      return
    _, _, kind, _ = preference.loss_spec(config)
    batch = _preference_batch() if kind == "preference" else _unpaired_batch()
    got_kind, needs_ref, metrics = self._trace(config, batch)
    self.assertEqual(got_kind, kind)
    self.assertEqual(kind == "unpaired", name in ("kto", "bco"))
    # Reference-free objectives are exactly those that name no ref_ array.
    self.assertEqual(
      needs_ref, name not in ("cpo", "orpo", "simpo"), msg=f"{name}"
    )
    if kind == "preference":
      self.assertIn("policy_chosen_logps", metrics)

  def test_precomputed_reference_logps_need_no_reference_model(self):
    config = _cfg("preference", "loss=dpo,runlocal")
    _, _, metrics = self._trace(
      config, _preference_batch(ref=True), frozen=None
    )
    self.assertIn("reward_accuracy", metrics)

  def test_kto_without_mismatched_rows_and_microbatches(self):
    config = _cfg("preference", "loss=kto,runlocal")
    self._trace(config, _unpaired_batch(kl=False))
    self._trace(config, _unpaired_batch(), microbatches=2)

  @parameterized.parameters("dpo", "dno", "copg_preference", "ipo")
  def test_online_trainer_supplies_reward_scores(self, name):
    config = _cfg("online_preference", f"loss={name},runlocal")
    extra = ("chosen_rewards", "rejected_rewards")
    preference.loss_spec(config, extra)
    rng = np.random.default_rng(2)
    c, r = _rows(rng, B), _rows(rng, B)
    batch = online_preference.OnlinePairBatch(
      *c,
      *r,
      np.ones(B, bool),
      np.linspace(1, 2, B).astype(np.float32),
      np.zeros(B, np.float32),
    )
    self._trace(config, batch, extra=extra)

  def test_make_pairs_picks_best_and_worst_per_group(self):
    rng = np.random.default_rng(3)
    n = 2 * G
    out = type(
      "Out",
      (),
      dict(
        prompt_tokens=jnp.asarray(rng.integers(0, 9, (n, 3)), jnp.int32),
        prompt_mask=jnp.ones((n, 3), bool),
        completion_tokens=jnp.arange(n * 2, dtype=jnp.int32).reshape(n, 2),
        completion_mask=jnp.ones((n, 2), bool),
      ),
    )
    scores = jnp.asarray([0.1, 0.9, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0])
    pairs = online_preference.make_pairs(out, scores, G, 0.0)
    np.testing.assert_allclose(pairs.chosen_rewards, [0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(pairs.rejected_rewards, [0.1, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(pairs.chosen_tokens[:, 3:], [[2, 3], [8, 9]])
    np.testing.assert_array_equal(pairs.rejected_tokens[0, 3:], [0, 1])
    # A group whose scores tie forms no usable pair.
    np.testing.assert_array_equal(pairs.example_mask, [True, False])
    # Only completion tokens are scored.
    self.assertFalse(np.asarray(pairs.chosen_completion_mask[:, :3]).any())


# ---------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------


class RewardModelVariantsTest(parameterized.TestCase):
  def _trace(self, config, *, margin=False):
    kind, kwargs = rm.model_kind(config)
    graphdef, params, rest = _abstract(kind, **kwargs)
    loss_fn = rm.make_loss_fn(graphdef, rest, config)
    dkind = rm.data_kind(config)
    rng = np.random.default_rng(4)
    if dkind == "preference":
      batch = _preference_batch(margin=margin)
    elif dkind == "ranked":
      k = 3
      t, a, c = _rows(rng, B * k)
      batch = data_batches.RankedBatch(
        t.reshape(B, k, L),
        a.reshape(B, k, L),
        c.reshape(B, k, L),
        rng.normal(size=(B, k)).astype(np.float32),
        np.array([[True] * k] * (B - 1) + [[True, True, False]]),
        np.ones(B, bool),
      )
    else:
      s = 3
      t, a, _ = _rows(rng, B)
      batch = data_batches.StepBatch(
        t,
        a,
        np.tile(np.array([5, 7, 9], np.int32), (B, 1)),
        rng.uniform(size=(B, s)).round().astype(np.float32),
        np.array([[True] * s] * (B - 1) + [[True, False, False]]),
        np.ones(B, bool),
      )
    step = common.make_train_step(loss_fn, TX)
    state = _state(params)
    out = jax.eval_shape(step, state, None, batch)
    _assert_step_shapes(self, out, state)
    return kind, dkind, out[1]

  @parameterized.named_parameters(*_named(sorted(losses.REWARD_MODEL_LOSSES)))
  def test_trainer_traces_or_names_missing_arrays(self, name):
    config = _cfg("reward_model", f"loss={name},runlocal")
    margin = name == "scaled_bt"  # needs the data's margin column
    if name in REWARD_MODEL_UNSUPPORTED:
      # At start (rm.loss_spec: no data can feed it) or, for a missing data
      # column, when the objective is called.
      missing = REWARD_MODEL_UNSUPPORTED[name]
      with self.assertRaisesRegex(
        ValueError,
        re.escape(name) + "'? needs arrays " + re.escape(repr(missing)),
      ):
        rm.loss_spec(config)
        self._trace(config, margin=margin)
      return
    rm.loss_spec(config)
    kind, dkind, metrics = self._trace(config, margin=margin)
    expected_kind = {
      "gaussian_bt": "gaussian_reward",
      "gaussian_bt_sampled": "gaussian_reward",
      "brme": "ensemble_stacked",
      "multi_objective": "multi_objective_reward",
      "gpm": "preference_embedding",
      "prm_hard": "value",
      "prm_soft": "value",
      "prm_scan": "value",
    }.get(name, "reward")
    self.assertEqual(kind, expected_kind)
    self.assertIn("rm_loss", metrics)
    if dkind == "preference":
      self.assertIn("accuracy", metrics)

  def test_scaled_bt_without_margin_names_it(self):
    config = _cfg("reward_model", "loss=scaled_bt,runlocal")
    with self.assertRaisesRegex(ValueError, r"needs arrays \['magnitude'\]"):
      self._trace(config)

  @parameterized.parameters(
    ("bradley_terry", "heads"),
    ("bradley_terry", "stacked"),
    ("bt_adaptive_margin", "heads"),
    ("bt_adaptive_margin", "stacked"),
  )
  def test_ensembles(self, name, ensemble):
    config = _cfg(
      "reward_model", f"loss={name},ensemble={ensemble},members=2,runlocal"
    )
    kind, _, metrics = self._trace(config)
    self.assertEqual(kind, f"ensemble_{ensemble}")
    self.assertIn("accuracy", metrics)


# ---------------------------------------------------------------------------
# Online RL: policy losses x estimators
# ---------------------------------------------------------------------------


def _rollout(advantage_shape, *, critic):
  n = 2 * G
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, 256, (n, L)).astype(np.int32)
  attn = np.ones((n, L), bool)
  attn[1, -3:] = False
  loss_mask = np.zeros((n, L - 1), bool)
  loss_mask[:, PROMPT - 1 :] = attn[:, PROMPT:]
  lp = -rng.uniform(0.1, 3.0, (n, L - 1)).astype(np.float32)
  adv = rng.normal(size=advantage_shape(n)).astype(np.float32)
  values = rng.normal(size=(n, L - 1)).astype(np.float32) if critic else None
  return rl.Rollout(
    tokens,
    attn,
    loss_mask,
    lp,
    lp + 0.01,
    lp - 0.02,
    adv,
    rng.normal(size=n).astype(np.float32),
    values,
    values,
  )


class PolicyVariantsTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.policy = _abstract("causal_lm")
    cls.value = _abstract("value")

  def _trace(self, config):
    critic = config.advantage.name == "gae"
    loss_fn = rl.make_policy_loss(
      self.policy[0],
      self.policy[2],
      self.value[0] if critic else None,
      self.value[2] if critic else None,
      config,
    )
    params = {"policy": self.policy[1]}
    if critic:
      params["value"] = self.value[1]
    token_level = config.advantage.name in ("gae", "reinforce_pp")
    ro = _rollout(
      (lambda n: (n, L - 1)) if token_level else (lambda n: (n,)),
      critic=critic,
    )
    step = common.make_train_step(loss_fn, TX)
    state = _state(params)
    out = jax.eval_shape(step, state, None, ro)
    _assert_step_shapes(self, out, state)
    return out[1]

  @parameterized.product(
    name=sorted(losses.POLICY_LOSSES), advantage=("grpo", "gae")
  )
  def test_policy_loss_with_estimator(self, name, advantage):
    config = _cfg("rl", f"loss={name},advantage={advantage},runlocal")
    if advantage == "gae" and name in SEQUENCE_ADVANTAGE_LOSSES:
      with self.assertRaisesRegex(
        ValueError, f"'{name}' takes one advantage per sequence.*'gae'"
      ):
        rl._check(config)
      return
    rl._check(config)
    metrics = self._trace(config)
    self.assertIn("policy_loss", metrics)
    self.assertIn("kl_k3", metrics)
    self.assertEqual("value_loss" in metrics, advantage == "gae")

  @parameterized.parameters(
    dict(correction="tis"),
    dict(correction="mis"),
    dict(correction="icepop"),
    dict(kl_mode="reward", entropy=0.01),
    dict(kl_mode="none", aggregation="constant_norm"),
  )
  def test_loss_options(
    self, correction="none", kl_mode="loss", entropy=0.0, aggregation=None
  ):
    config = _cfg("rl", "loss=grpo,runlocal")
    config.off_policy.correction = correction
    config.kl.mode = kl_mode
    config.entropy_coefficient = entropy
    if aggregation:
      config.loss_aggregation = aggregation
    rl._check(config)
    metrics = self._trace(config)
    self.assertIn("clip_fraction", metrics)

  @parameterized.named_parameters(*_named(sorted(advantages.REGISTRY)))
  def test_estimator_in_the_trainer(self, name):
    config = _cfg("rl", f"advantage={name},runlocal")
    config.reward.process_model = "unused-here"  # pure_min's PRM workdir
    if name in ADVANTAGE_UNSUPPORTED:
      with self.assertRaisesRegex(ValueError, ADVANTAGE_UNSUPPORTED[name]):
        rl._check(config)
      return
    _, _, ahyper = rl._check(config)
    n = 2 * G
    rng = np.random.default_rng(6)
    loss_mask = np.zeros((n, L - 1), bool)
    loss_mask[:, PROMPT - 1 : L - 3] = True
    values = jnp.zeros((n, L - 1)) if name == "gae" else None
    # Rollout arrays of remax (greedy baseline) and gdpo (K components).
    extra = {
      "baseline_rewards": np.zeros(n // G, np.float32),
      "reward_components": np.zeros((n, 2), np.float32),
    }
    if name in PROCESS_ESTIMATORS:  # S = 3 steps of the completion
      t = L - PROMPT
      extra["steps"] = rl._rl_process.Steps(
        np.zeros((n, t), np.int32),
        np.ones((n, 3), bool),
        np.ones((n, 3), np.int32),
        np.zeros((n, 3), np.int32),
        np.zeros(n, bool),
      )
      extra["step_rewards"] = np.zeros((n, 3), np.float32)
      extra["information_gain"] = np.zeros((n, 3), np.float32)
      extra["process_rewards"] = np.zeros((n, L - 1), np.float32)
    adv, returns = jax.eval_shape(
      lambda r, ln, m, v, e: rl.compute_advantages(
        config, ahyper, r, ln, m, v, G, e
      ),
      rng.normal(size=n).astype(np.float32),
      np.full(n, L - 3 - PROMPT + 1, np.int32),
      loss_mask,
      values,
      extra,
    )
    token_level = name in (
      "gae",
      "reinforce_pp",
      "lambda_returns",
      "discounted_returns",
      *PROCESS_ESTIMATORS,
    )
    self.assertEqual(adv.shape, (n, L - 1) if token_level else (n,))
    self.assertEqual(returns is not None, name == "gae")


# ---------------------------------------------------------------------------
# Exact gradient accumulation (numeric, model-free)
# ---------------------------------------------------------------------------


class AccumulationTest(parameterized.TestCase):
  def test_microbatches_give_the_full_batch_gradient_and_metrics(self):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 5, 3)).astype(np.float32)
    mask = rng.uniform(size=(8, 5)) < 0.6
    mask[3] = False  # a row with no tokens
    batch = {"x": x, "mask": mask}
    params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}

    def loss_fn(p, frozen, b, key):
      del frozen, key
      per_token = jnp.tanh(b["x"] @ p["w"]) ** 2
      wm = ops.aggregate_token_loss(per_token, b["mask"], mode="token_mean")
      return wm, {"mean_x": ops.masked_mean(b["x"][..., 0], b["mask"])}

    def full(m):
      return jax.jit(
        lambda p, b: common.accumulate_gradients(
          loss_fn, p, None, b, jax.random.key(0), m
        )
      )(params, batch)

    want = full(1)
    # The full-batch value, straight from the definition.
    direct = jax.grad(lambda p: loss_fn(p, None, batch, None)[0].value())(
      params
    )
    np.testing.assert_allclose(want[1]["w"], direct["w"], rtol=1e-6)
    for m in (2, 4, 8):
      got = full(m)
      np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
      np.testing.assert_allclose(got[1]["w"], want[1]["w"], rtol=1e-5)
      np.testing.assert_allclose(got[2], mask.sum())
      np.testing.assert_allclose(got[3]["mean_x"], want[3]["mean_x"], rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "does not split into 3 micro"):
      full(3)


if __name__ == "__main__":
  absltest.main()
