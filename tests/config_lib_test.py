"""Tests for alignment/config_lib.py: hyperparameters without a default.

A keyword-only hyperparameter with no default (``pass_at_k``'s ``k``) must
appear in the config block (so ``--config.advantage.k=4`` works and the
block lists every hyperparameter), as a ``None`` typed by its annotation,
and be rejected at start, naming the key, while it is unset: by
``config_lib.check_required`` (called by ``alignment.main``) and by the RL
trainer's own check.
"""

import tempfile

import ml_collections
from absl import flags
from absl.testing import absltest
from ml_collections import config_flags

from alignment import advantages, config_lib
from alignment.trainers import rl
from tests.trainers import _util


def _needs_k(rewards, *, k: int, scale: float = 1.0):
  del rewards
  return k * scale


def _needs_string_annotations(rewards, *, k: "int", name: "str", x: "list"):
  del rewards, k, name, x


class RequiredHyperparametersTest(absltest.TestCase):
  def test_block_lists_required_key_as_typed_none(self):
    self.assertIn(
      "k", config_lib.required_keys(advantages.REGISTRY["pass_at_k"])
    )
    block = config_lib.advantage("pass_at_k")
    self.assertIn("k", block)
    self.assertIsNone(block.k)
    # Every keyword-only hyperparameter is there, required or not.
    self.assertEqual(
      set(block.keys()) - {"name"},
      set(config_lib._keyword_defaults(advantages.REGISTRY["pass_at_k"])),
    )
    block.lock()
    block.k = 4
    self.assertEqual(block.k, 4)
    self.assertIsInstance(block.k, int)
    with self.assertRaisesRegex(TypeError, "k"):
      block.k = "four"
    # An explicit override is taken as is.
    self.assertEqual(config_lib.advantage("pass_at_k", k=2).k, 2)

  def test_defaults_and_placeholders_of_any_function(self):
    got = config_lib._keyword_defaults(_needs_k)
    self.assertEqual(got["scale"], 1.0)
    self.assertIsInstance(got["k"], ml_collections.FieldReference)
    self.assertIsNone(got["k"].get())
    self.assertIs(got["k"].get_type(), int)
    self.assertEqual(config_lib.required_keys(_needs_k), ["k"])
    types = {
      k: v.get_type()
      for k, v in config_lib._keyword_defaults(
        _needs_string_annotations
      ).items()
    }
    self.assertEqual(types, {"k": int, "name": str, "x": object})

  def test_check_required_names_the_key_until_set(self):
    config = _util.load_config("rl", "advantage=pass_at_k,runlocal")
    self.assertEqual(config_lib.unset_required(config), ["config.advantage.k"])
    with self.assertRaisesRegex(
      ValueError, r"\['config.advantage.k'\] have no default.*--config"
    ):
      config_lib.check_required(config)
    config.lock()
    config.advantage.k = 2
    config_lib.check_required(config)  # set: passes
    # Nested stage configs (the pipeline's) are searched too.
    outer = ml_collections.ConfigDict(
      {"grpo": _util.load_config("rl", "advantage=pass_at_k,runlocal")}
    )
    self.assertEqual(
      config_lib.unset_required(outer), ["config.grpo.advantage.k"]
    )
    # Every shipped config variant sets what it needs.
    for name in _util.CONFIG_NAMES:
      self.assertEqual(config_lib.unset_required(_util.load_config(name)), [])

  def test_rl_trainer_rejects_the_placeholder_at_start(self):
    config = _util.load_config("rl", "advantage=pass_at_k,runlocal")
    with self.assertRaisesRegex(
      ValueError,
      r"'pass_at_k' needs hyperparameters \['k'\].*--config.advantage.k=",
    ):
      rl._check(config)
    config.advantage.k = 2
    _, _, ahyper = rl._check(config)
    self.assertEqual(ahyper["k"], 2)

  def test_command_line_sets_the_required_key(self):
    path = _util.CONFIGS / "rl.py"
    argv = [
      "prog",
      f"--config={path}:advantage=pass_at_k,runlocal",
      "--config.advantage.k=3",
    ]
    values = flags.FlagValues()
    # sys_argv: config_flags finds the --config.* overrides there.
    config_flags.DEFINE_config_file(
      "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    self.assertEqual(values.config.advantage.k, 3)
    self.assertIsInstance(values.config.advantage.k, int)
    config_lib.check_required(values.config)

  def test_main_rejects_an_unset_key_before_training(self):
    from alignment import main  # noqa: PLC0415 - defines the global flags

    path = _util.CONFIGS / "rl.py"
    with tempfile.TemporaryDirectory() as workdir:
      flags.FLAGS(
        [
          "prog",
          f"--config={path}:advantage=pass_at_k,runlocal",
          f"--workdir={workdir}",
        ]
      )
      try:
        with self.assertRaisesRegex(
          ValueError, r"\[.config.advantage.k.\] have no default"
        ):
          main.main(["prog"])
      finally:
        flags.FLAGS.unparse_flags()


if __name__ == "__main__":
  absltest.main()
