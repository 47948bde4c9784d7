"""Tests for configs/*.py: every documented variant builds, locks and names
registered trainers, losses and estimators; every sweep point applies.

Nothing here compiles: building a config imports only ml_collections and the
loss/advantage registries (for the hyperparameter defaults).
"""

import ml_collections
from absl.testing import absltest, parameterized

from alignment import advantages, config_lib, losses, trainers
from alignment.trainers import preference as preference_trainer
from alignment.trainers import reward_model as rm_trainer
from alignment.trainers import rl as rl_trainer
from tests.trainers import _util

SWEEP = _util.load_module(_util.REPO / "launch" / "sweep.py", "_sweep")

_PREF = sorted(losses.PREFERENCE_LOSSES)
_RM = sorted(losses.REWARD_MODEL_LOSSES)
_POLICY = sorted(losses.POLICY_LOSSES)
_ADV = sorted(advantages.REGISTRY)


def _variants():
  """(config name, arg) for every documented structural argument."""
  out = []
  for name in _util.CONFIG_NAMES:
    base = ["", "runlocal", "model=tiny", "model=tiny,runlocal"]
    if name == "pipeline":
      base = ["", "quick", "seed=2", "model=tiny,quick"]
    out += [(name, a) for a in base]
  out += [("preference", f"loss={n},runlocal") for n in _PREF]
  out += [("online_preference", f"loss={n},runlocal") for n in _PREF]
  out += [("reward_model", f"loss={n},runlocal") for n in _RM]
  out += [
    ("reward_model", f"ensemble={kind},members={m},runlocal")
    for kind in ("heads", "stacked")
    for m in (2, 4)
  ]
  out += [("rl", f"loss={n},runlocal") for n in _POLICY]
  out += [("rl", f"advantage={n},runlocal") for n in _ADV]
  out += [("rl", f"reward={r}") for r in rl_trainer.REWARD_SOURCES]
  out += [("online_preference", f"reward={r}") for r in ("gold", "model")]
  return out


def _registry_of(trainer: str):
  return {
    "sft": None,
    "preference": losses.PREFERENCE_LOSSES,
    "online_preference": losses.PREFERENCE_LOSSES,
    "reward_model": losses.REWARD_MODEL_LOSSES,
    "rl": losses.POLICY_LOSSES,
  }[trainer]


def _stages(config):
  """The trainer configs inside ``config`` (the pipeline has four)."""
  if config.trainer != "pipeline":
    return [("", config)]
  return [
    (k, config[k])
    for k in ("sft", "reward_model", "dpo", "grpo")
    if k in config and isinstance(config[k], ml_collections.ConfigDict)
  ]


def _set(config, dotted: str, value):
  node = config
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  setattr(node, leaf, value)


class ConfigFilesTest(parameterized.TestCase):
  @parameterized.parameters(*_variants())
  def test_builds_locks_and_names_registered_pieces(self, name, arg):
    config = _util.load_config(name, arg or None)
    config.lock()
    self.assertIn(config.trainer, trainers.REGISTRY)
    self.assertIs(
      trainers.get_trainer(config.trainer), trainers.REGISTRY[config.trainer]
    )
    for where, stage in _stages(config):
      with self.subTest(stage=where or name):
        self.assertIn(stage.trainer, trainers.REGISTRY)
        self.assertIsInstance(stage.total_steps, int)
        self.assertGreater(stage.total_steps, 0)
        self.assertIsInstance(stage.batch_size, int)
        registry = _registry_of(stage.trainer)
        if registry is not None:
          self.assertIn(stage.loss.name, registry)
          # Every hyperparameter in the block is one of the function's.
          fn = registry[stage.loss.name]
          hyper = {k for k in stage.loss.keys() if k != "name"}
          self.assertEqual(hyper, set(config_lib._keyword_defaults(fn)))
        if stage.trainer == "rl":
          self.assertIn(stage.advantage.name, advantages.REGISTRY)
        # Derived values follow total_steps (FieldReference, not a literal).
        self.assertEqual(stage.optimizer.warmup_steps, stage.total_steps // 10)
        if "runlocal" in arg:
          self.assertEqual(stage.model.preset, "tiny")
          self.assertLessEqual(stage.total_steps, 2)
    if arg.startswith("loss="):
      self.assertEqual(config.loss.name, arg.split(",")[0][len("loss=") :])
    if arg.startswith("advantage="):
      self.assertEqual(
        config.advantage.name, arg.split(",")[0][len("advantage=") :]
      )

  @parameterized.parameters(*_util.CONFIG_NAMES)
  def test_total_steps_override_propagates(self, name):
    config = _util.load_config(name, None)
    config.lock()
    for _, stage in _stages(config):
      stage.total_steps = 123
      self.assertEqual(stage.optimizer.warmup_steps, 12)

  @parameterized.parameters(*_util.CONFIG_NAMES)
  def test_every_sweep_point_exists_and_applies(self, name):
    for arg in (None, "runlocal" if name != "pipeline" else "quick"):
      spec = f"{_util.CONFIGS / name}.py" + (f":{arg}" if arg else "")
      points = SWEEP.sweep_points(spec)
      self.assertNotEmpty(points)
      self.assertLen({tuple(sorted(p.items())) for p in points}, len(points))
      for point in points:
        config = _util.load_config(name, arg)
        config.lock()
        for key, value in point.items():
          _set(config, key, value)  # raises on a missing key or bad type
          node = config
          for part in key.split("."):
            node = node[part]
          self.assertEqual(node, value)

  @parameterized.parameters(*_util.CONFIG_NAMES)
  def test_mistyped_key_fails_under_lock_with_suggestion(self, name):
    config = _util.load_config(name, None)
    config.lock()
    stage = _stages(config)[0][1]
    with self.assertRaisesRegex(
      AttributeError, 'Did you mean.*"learning_rate"'
    ):
      stage.optimizer.learnign_rate = 1.0
    with self.assertRaisesRegex(AttributeError, 'Did you mean.*"total_steps"'):
      stage.total_step = 3

  def test_mistyped_loss_hyperparameter_fails_under_lock(self):
    config = _util.load_config("preference", "loss=ipo")
    config.lock()
    with self.assertRaisesRegex(AttributeError, 'Did you mean.*"beta"'):
      config.loss.betta = 0.5

  @parameterized.parameters(*_util.CONFIG_NAMES)
  def test_parse_arg_rejects_unknown_key(self, name):
    with self.assertRaisesRegex(ValueError, "unknown key 'runlcoal'.*valid"):
      _util.load_config(name, "runlcoal")

  def test_parse_arg_types_and_errors(self):
    arg = config_lib.parse_arg(
      "a=3,b=0.5,c=x,flag", a=1, b=1.0, c="y", flag=False, other=True
    )
    self.assertEqual(
      (arg.a, arg.b, arg.c, arg.flag, arg.other), (3, 0.5, "x", True, True)
    )
    self.assertFalse(config_lib.parse_arg("flag=false", flag=True).flag)
    with self.assertRaisesRegex(ValueError, "members='many' is not a int"):
      _util.load_config("reward_model", "members=many")
    with self.assertRaisesRegex(
      ValueError, "runlocal='maybe' is not a boolean"
    ):
      _util.load_config("sft", "runlocal=maybe")
    with self.assertRaisesRegex(ValueError, "'loss' needs a value"):
      _util.load_config("preference", "loss")

  def test_unknown_names_fail_with_valid_choices(self):
    with self.assertRaisesRegex(ValueError, "unknown loss 'dpoo'.*'dpo'"):
      _util.load_config("preference", "loss=dpoo")
    with self.assertRaisesRegex(
      ValueError, "unknown advantage estimator 'rlo'.*'rloo'"
    ):
      _util.load_config("rl", "advantage=rlo")
    with self.assertRaisesRegex(ValueError, "config.trainer='sfft'.*'sft'"):
      trainers.get_trainer("sfft")

  def test_loss_from_the_wrong_family_fails_in_the_trainer(self):
    # config_lib.loss accepts any registered loss; the trainer rejects one
    # of another family before building anything.
    config = _util.load_config("preference", "loss=grpo,runlocal")
    with self.assertRaisesRegex(ValueError, "'grpo' is not a preference loss"):
      preference_trainer.loss_spec(config)
    config = _util.load_config("reward_model", "loss=dpo,runlocal")
    with self.assertRaisesRegex(ValueError, "'dpo' is not a reward-model"):
      rm_trainer.loss_spec(config)
    config = _util.load_config("rl", "loss=dpo,runlocal")
    with self.assertRaisesRegex(ValueError, "'dpo'; valid policy losses"):
      rl_trainer._check(config)

  def test_bad_trainer_options_fail_naming_the_key(self):
    config = _util.load_config("rl", "runlocal")
    config.kl.mode = "both"
    with self.assertRaisesRegex(ValueError, "config.kl.mode='both'"):
      rl_trainer._check(config)
    config = _util.load_config("rl", "runlocal")
    config.reward.shaping = ["clipp"]
    with self.assertRaisesRegex(
      ValueError, "config.reward.shaping has 'clipp'"
    ):
      rl_trainer._check(config)
    config = _util.load_config("rl", "runlocal")
    config.loss.epsilonn = 0.1
    with self.assertRaisesRegex(ValueError, r"\['epsilonn'\] are not hyper"):
      rl_trainer._check(config)
    config = _util.load_config("reward_model", "runlocal")
    config.ensemble.kind = "bagged"
    with self.assertRaisesRegex(ValueError, "config.ensemble.kind='bagged'"):
      rm_trainer.model_kind(config)


if __name__ == "__main__":
  absltest.main()
