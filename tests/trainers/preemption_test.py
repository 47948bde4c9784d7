"""The command line, preemption and determinism, in child processes.

Every run is ``python -m alignment.main --config=configs/sft.py:runlocal``
(8 steps, a checkpoint every 2) on one CPU device:

* the CLI trains and writes its outputs; a mistyped ``--config.*`` key, an
  unknown config arg or an unknown trainer fails at start, naming it;
* two runs of the same config and seed write identical metrics files and
  end with bitwise identical train states (determinism);
* a run killed with SIGKILL after its step-4 checkpoint, then restarted on
  the same workdir, ends bitwise identical to the uninterrupted run, with
  the same metrics file;
* SIGTERM saves a checkpoint at the current step and exits with 143; the
  restarted run again ends identical to the uninterrupted one.

Children share a persistent compilation cache, so only the first compiles.
"""

import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl.testing import absltest

from alignment.trainers import common
from tests.trainers import _util

STEPS, EVERY = 8, 2
ARGS = [
  "--config=configs/sft.py:runlocal",
  f"--config.total_steps={STEPS}",
  f"--config.checkpoint.every={EVERY}",
  "--config.checkpoint.keep=10",
  "--config.progress=False",
]
TIMEOUT = 600


def _cmd(workdir, *extra, slow=False):
  module = "tests.trainers._slow_main" if slow else "alignment.main"
  return [_util.PYTHON, "-m", module, *ARGS, f"--workdir={workdir}", *extra]


def _run(workdir, *extra):
  return subprocess.run(
    _cmd(workdir, *extra),
    cwd=_util.REPO,
    env=_util.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    check=False,
  )


def _checked(workdir, *extra):
  proc = _run(workdir, *extra)
  if proc.returncode:
    raise AssertionError(
      f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )
  return proc


def _start_slow(workdir, *extra, pause=0.5):
  return subprocess.Popen(
    _cmd(workdir, *extra, slow=True),
    cwd=_util.REPO,
    env=_util.subprocess_env(ALIGNMENT_TEST_STEP_SLEEP=str(pause)),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for(predicate, proc, what):
  deadline = time.monotonic() + TIMEOUT
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(
        f"child exited ({proc.returncode}) before {what}:\n"
        f"{proc.stderr.read()[-4000:]}"
      )
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def _steps_on_disk(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _final_state(workdir):
  """The latest checkpoint's train state as NumPy arrays."""
  manager = ocp.CheckpointManager(
    pathlib.Path(workdir).absolute() / "checkpoints",
    item_handlers={"state": ocp.StandardCheckpointHandler()},
  )
  step = manager.latest_step()
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )
  manager.close()
  return step, jax.tree.map(np.asarray, dict(restored.state))


def _metrics_text(workdir):
  return (pathlib.Path(workdir) / "metrics_sft.jsonl").read_text()


class CommandLineAndPreemptionTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory(prefix="alignment-preempt-")
    cls.root = pathlib.Path(cls._tmp.name)
    cls.reference = cls.root / "reference"
    cls.reference_proc = _checked(cls.reference)
    cls.reference_step, cls.reference_state = _final_state(cls.reference)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def assert_same_run(self, workdir):
    self.assertEqual(_metrics_text(workdir), _metrics_text(self.reference))
    step, state = _final_state(workdir)
    self.assertEqual(step, STEPS)
    self.assertEqual(
      jax.tree.structure(state), jax.tree.structure(self.reference_state)
    )
    for a, b in zip(
      jax.tree.leaves(state), jax.tree.leaves(self.reference_state), strict=True
    ):
      np.testing.assert_array_equal(a, b)  # bitwise on CPU

  def test_cli_trains_and_writes_outputs(self):
    rows = common.read_metrics(self.reference / "metrics_sft.jsonl")
    self.assertEqual([r["step"] for r in rows], list(range(1, STEPS + 1)))
    self.assertTrue(all(np.isfinite(r["loss"]) for r in rows))
    self.assertLen({r["loss"] for r in rows}, STEPS)
    self.assertEqual(self.reference_step, STEPS)
    self.assertEqual(
      _steps_on_disk(self.reference), list(range(EVERY, STEPS + 1, EVERY))
    )
    png = self.reference / "curves_sft.png"
    self.assertTrue(png.read_bytes().startswith(b"\x89PNG"))

  def test_mistyped_override_fails_naming_it(self):
    proc = _run(self.root / "typo", "--config.optimizer.learnign_rate=1")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("learnign_rate", proc.stderr)
    self.assertIn('Did you mean "learning_rate"', proc.stderr)
    self.assertFalse((self.root / "typo").exists())

  def test_unknown_arg_and_trainer_fail_naming_them(self):
    proc = subprocess.run(
      [
        _util.PYTHON,
        "-m",
        "alignment.main",
        "--config=configs/sft.py:runlcoal",
        f"--workdir={self.root / 'badarg'}",
      ],
      cwd=_util.REPO,
      env=_util.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
      check=False,
    )
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("unknown key 'runlcoal'", proc.stderr)
    proc = _run(self.root / "badtrainer", "--config.trainer=sfft")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("config.trainer='sfft'", proc.stderr)
    self.assertIn("'sft'", proc.stderr)

  def test_same_config_and_seed_give_identical_runs(self):
    workdir = self.root / "again"
    _checked(workdir)
    self.assert_same_run(workdir)

  def test_sigkill_then_restart_matches_uninterrupted_run(self):
    workdir = self.root / "killed"
    proc = _start_slow(workdir)
    _wait_for(lambda: 4 in _steps_on_disk(workdir), proc, "checkpoint 4")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    self.assertEqual(proc.returncode, -signal.SIGKILL)
    logged = common.read_metrics(workdir / "metrics_sft.jsonl")
    self.assertBetween(len(logged), 4, STEPS - 1)  # killed part-way
    self.assertLess(max(_steps_on_disk(workdir)), STEPS)
    _checked(workdir)
    self.assert_same_run(workdir)

  def test_copied_workdir_resumes_like_the_original(self):
    # Killed after its step-4 checkpoint, its data (written and built
    # under the workdir) and checkpoints then moved elsewhere (copied with
    # new mtimes, the original deleted): the copy resumes, since data
    # fingerprints follow file contents, not paths or mtimes, and ends
    # identical to the uninterrupted run.
    workdir = self.root / "to_move"
    proc = _start_slow(workdir, f"--config.data.data_dir={workdir / 'data'}")
    _wait_for(lambda: 4 in _steps_on_disk(workdir), proc, "checkpoint 4")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    moved = self.root / "moved" / "run"
    shutil.copytree(workdir, moved)
    shutil.rmtree(workdir)
    self.assertLess(max(_steps_on_disk(moved)), STEPS)
    proc = _checked(moved, f"--config.data.data_dir={moved / 'data'}")
    self.assertIn("resumed from", proc.stderr)
    self.assert_same_run(moved)

  def test_sigterm_saves_exits_143_and_resumes(self):
    workdir = self.root / "terminated"
    proc = _start_slow(workdir)
    _wait_for(
      lambda: len(common.read_metrics(workdir / "metrics_sft.jsonl")) >= 3,
      proc,
      "step 3",
    )
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    self.assertEqual(proc.returncode, 143, msg=stderr[-4000:])
    self.assertIn("SIGTERM received", stderr)
    logged = common.read_metrics(workdir / "metrics_sft.jsonl")
    stopped_at = logged[-1]["step"]
    self.assertBetween(stopped_at, 3, STEPS - 1)
    # The step it stopped at was checkpointed, even off the save interval.
    self.assertEqual(max(_steps_on_disk(workdir)), stopped_at)
    _checked(workdir)
    self.assert_same_run(workdir)


if __name__ == "__main__":
  absltest.main()
