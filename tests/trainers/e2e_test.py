"""2-step ``runlocal`` runs of every trainer config, in-process, and bad input.

Each ``configs/<x>.py:runlocal`` run goes through
``trainers.get_trainer(config.trainer).run(config, workdir)`` (what
``alignment.main`` calls) with the progress bar off, and must end with a
finite loss, parameters that changed, a metrics JSONL, TensorBoard events,
curve PNGs and a final checkpoint. Runs are made once per module and shared
by the assertions. The bad-input tests check the non-finite guard (the
latest checkpoint stays the last good one) and a checkpoint of another model
shape in the workdir.
"""

import json
import pathlib
import re
import tempfile
from unittest import mock

import jax
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from alignment import trainers
from alignment.trainers import _setup, common
from tests.trainers import _util

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (config file, trainer result name, metrics that must be present)
CASES = {
  "sft": ("sft", ("nll",)),
  "preference": ("preference", ("reward_accuracy", "reward_margin")),
  "reward_model": ("reward_model", ("accuracy", "margin")),
  "rl": ("rl", ("reward", "gold_reward", "kl_sequence", "entropy")),
  "online_preference": ("online_preference", ("score", "pairs_kept")),
}

_TMP = None
_CACHE = None
_RUNS: dict = {}


def setUpModule():
  global _TMP, _CACHE
  _TMP = tempfile.TemporaryDirectory(prefix="alignment-e2e-")
  _CACHE = _util.compilation_cache()
  _CACHE.__enter__()


def tearDownModule():
  _CACHE.__exit__(None, None, None)
  _TMP.cleanup()


def _run(name: str):
  """Runs ``configs/<name>.py:runlocal`` once; returns a dict of results."""
  if name in _RUNS:
    if isinstance(_RUNS[name], BaseException):
      raise _RUNS[name]
    return _RUNS[name]
  config = _util.load_config(name, "runlocal")
  config.progress = False
  if name in ("rl", "online_preference"):
    # runlocal's 4 prompts do not split over this process's 8 devices.
    config.batch_size = jax.device_count()
  workdir = pathlib.Path(_TMP.name) / name
  initial = []
  real_setup = _setup.setup_run

  def spy(*args, **kwargs):
    run = real_setup(*args, **kwargs)
    initial.append(jax.device_get(run.state["params"]))
    return run

  try:
    with mock.patch.object(_setup, "setup_run", spy):
      out = trainers.get_trainer(config.trainer).run(config, str(workdir))
  except Exception as e:  # noqa: BLE001 - re-raised by every test
    _RUNS[name] = e
    raise
  state = out[0]
  _RUNS[name] = dict(
    config=config,
    workdir=workdir,
    initial=initial[0],
    final=jax.device_get(state["params"]),
    out=out,
  )
  return _RUNS[name]


class EndToEndTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(n, n) for n in CASES])
  def test_runlocal_trains_and_writes_outputs(self, name):
    res = _run(name)
    config, workdir = res["config"], res["workdir"]
    stage, keys = CASES[name]
    steps = config.total_steps
    self.assertEqual(steps, 2)

    rows = common.read_metrics(workdir / f"metrics_{stage}.jsonl")
    self.assertEqual([r["step"] for r in rows], list(range(1, steps + 1)))
    for row in rows:
      self.assertTrue(np.isfinite(row["loss"]), msg=row)
      for key in keys:
        self.assertIn(key, row)
        self.assertTrue(np.all(np.isfinite(row[key])), msg=(key, row))

    # Parameters changed, and stayed finite.
    leaves0 = jax.tree.leaves(res["initial"])
    leaves1 = jax.tree.leaves(res["final"])
    self.assertLen(leaves1, len(leaves0))
    changed = [
      not np.array_equal(a, b) for a, b in zip(leaves0, leaves1, strict=True)
    ]
    self.assertGreater(sum(changed), len(changed) // 2, msg=name)
    for leaf in leaves1:
      self.assertTrue(np.isfinite(leaf).all())

    png = workdir / f"curves_{stage}.png"
    self.assertTrue(png.read_bytes().startswith(PNG_MAGIC))
    events = list((workdir / "tensorboard" / stage).glob("events.out.*"))
    self.assertNotEmpty(events)
    self.assertGreater(events[0].stat().st_size, 0)
    ckpt = common.Checkpointer(workdir / "checkpoints", async_save=False)
    self.assertEqual(ckpt.latest_step(), steps)
    ckpt.close()

  def test_reward_model_is_evaluated(self):
    res = _run("reward_model")
    report = res["out"][2]
    on_disk = json.loads(
      (res["workdir"] / "eval_reward_model.json").read_text()
    )
    self.assertEqual(report, on_disk)
    self.assertGreater(report["eval_pairs"], 0)
    for key in ("eval_accuracy", "eval_ece", "eval_brier"):
      self.assertBetween(report[key], 0.0, 1.0)
    png = res["workdir"] / "reliability_reward_model.png"
    self.assertTrue(png.read_bytes().startswith(PNG_MAGIC))

  @parameterized.named_parameters(
    ("rl", "rl", "rl_history.json"),
    ("online_preference", "online_preference", "online_history.json"),
  )
  def test_online_history_matches_metrics(self, name, history_file):
    res = _run(name)
    history = json.loads((res["workdir"] / history_file).read_text())
    rows = common.read_metrics(res["workdir"] / f"metrics_{name}.jsonl")
    self.assertLen(history, res["config"].total_steps)
    for h, r in zip(history, rows, strict=True):
      self.assertEqual(h["step"], r["step"])
      self.assertAlmostEqual(h["loss"], r["loss"], places=6)


class BadInputTest(parameterized.TestCase):
  """Non-finite loss and a checkpoint of another model in the workdir."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = pathlib.Path(_TMP.name) / "nonfinite"
    config = _util.load_config("sft", "runlocal")
    config.progress = False
    config.total_steps = 5
    config.checkpoint.every = 1
    config.checkpoint.keep = 10
    config.optimizer.schedule = "constant"
    config.optimizer.grad_clip_norm = 0.0
    config.optimizer.learning_rate = 1e30  # the first update overflows
    cls.config = config
    cls.error = None
    try:
      trainers.get_trainer("sft").run(config, str(cls.workdir))
    except common.NonFiniteLossError as e:
      cls.error = e

  def setUp(self):
    super().setUp()
    self.assertIsNotNone(self.error, "lr=1e30 did not stop the run")

  def test_error_names_the_step_and_batch(self):
    msg = str(self.error)
    m = re.search(r"at step (\d+) \(batch #(\d+) of the data stream", msg)
    self.assertIsNotNone(m, msg=msg)
    bad_step, batch = int(m.group(1)), int(m.group(2))
    self.assertEqual(batch, bad_step - 1)
    self.assertGreaterEqual(bad_step, 2)  # step 1 still had the init params
    self.assertIn(f"the latest checkpoint is step {bad_step - 1}", msg)
    self.assertRegex(
      msg, r"non-finite loss=(nan|-?inf|[-0-9.e]+) or grad_norm=(nan|inf)"
    )
    # Only the good steps were logged.
    rows = common.read_metrics(self.workdir / "metrics_sft.jsonl")
    self.assertEqual([r["step"] for r in rows], list(range(1, bad_step)))
    self.assertTrue(all(np.isfinite(r["loss"]) for r in rows))

  def test_latest_checkpoint_is_the_last_good_step(self):
    msg = str(self.error)
    bad_step = int(re.search(r"at step (\d+)", msg).group(1))
    ckpt = common.Checkpointer(self.workdir / "checkpoints", async_save=False)
    self.assertEqual(ckpt.latest_step(), bad_step - 1)
    self.assertEqual(list(ckpt.manager.all_steps()), list(range(1, bad_step)))
    ckpt.close()
    # No half-written step directory is left behind.
    names = sorted(p.name for p in (self.workdir / "checkpoints").iterdir())
    self.assertEqual(names, [str(s) for s in range(1, bad_step)])

  def test_checkpoint_of_another_model_shape_is_a_clear_error(self):
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.model.overrides.d_ff = 96  # the checkpoint has d_ff=128
    with self.assertRaises(common.CheckpointMismatchError) as ctx:
      trainers.get_trainer("sft").run(config, str(self.workdir))
    msg = str(ctx.exception)
    self.assertIn("does not match this run's model/optimiser", msg)
    self.assertRegex(
      msg,
      r"mlp/(up|gate)_kernel/value: checkpoint shape \(64, 128\), run "
      r"shape \(64, 96\)",
    )
    self.assertNotIn("missing in checkpoint", msg)
    self.assertNotIn("only in checkpoint", msg)
    self.assertIn("Use a fresh --workdir", msg)
    self.assertIsInstance(ctx.exception, ValueError)


class TrainLoopTest(absltest.TestCase):
  """The loop's guard on a cheap step function (no model)."""

  def test_nan_at_step_three_keeps_checkpoint_two(self):
    workdir = pathlib.Path(_TMP.name) / "loop_nan"

    def step_fn(state, frozen, batch):
      del frozen
      loss = jax.numpy.where(batch > 2, jax.numpy.nan, 1.0 * batch)
      new = dict(state, step=state["step"] + 1, params=state["params"] + 1)
      return new, {"loss": loss, "grad_norm": jax.numpy.float32(1.0)}

    state = {
      "params": jax.numpy.zeros(3),
      "step": jax.numpy.int32(0),
      "rng": jax.random.key_data(jax.random.key(0)),
    }
    ckpt = common.Checkpointer(workdir / "ckpt", save_every=1)
    with self.assertRaisesRegex(
      common.NonFiniteLossError,
      r"at step 3 \(batch #2 .*latest checkpoint is step 2",
    ):
      common.train_loop(
        step_fn=step_fn,
        state=state,
        frozen=None,
        batches=iter(np.arange(1, 10, dtype=np.float32)),
        total_steps=6,
        workdir=workdir,
        checkpointer=ckpt,
        progress=False,
      )
    self.assertEqual(ckpt.latest_step(), 2)
    restored, extra = ckpt.restore(jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(restored["params"], [2.0, 2.0, 2.0])
    self.assertEqual(extra["step"], 2)
    ckpt.close()


if __name__ == "__main__":
  absltest.main()
