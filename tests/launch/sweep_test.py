"""Tests for launch/sweep.py: commands per sweep point, --run and --collect.

Printing commands compiles nothing. ``--run`` executes a 2-point seed sweep
of the SFT ``runlocal`` config (2 steps each) in child processes and must
collect both runs' final metrics into one table.
"""

import contextlib
import io
import pathlib
import shlex
import subprocess
import tempfile
import textwrap

from absl.testing import absltest, parameterized

from tests.trainers import _util

SWEEP_PY = _util.REPO / "launch" / "sweep.py"
SWEEP = _util.load_module(SWEEP_PY, "_sweep_under_test")


def _points(name, arg):
  points = []
  _util.config_module(name).get_sweep(lambda **kw: points.append(kw))
  del arg
  return points


class PrintCommandsTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(n, n) for n in _util.CONFIG_NAMES])
  def test_one_command_per_sweep_point(self, name):
    arg = "quick" if name == "pipeline" else "runlocal"
    spec = f"configs/{name}.py:{arg}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      rc = SWEEP.main([spec, "--root=runs/sw", "--", "--config.progress=0"])
    self.assertEqual(rc, 0)
    lines = out.getvalue().splitlines()
    points = _points(name, arg)
    self.assertLen(lines, len(points))
    workdirs = set()
    for line, point in zip(lines, points, strict=True):
      argv = shlex.split(line)
      self.assertEqual(argv[1:3], ["-m", "alignment.main"])
      self.assertIn(f"--config={spec}", argv)
      workdir = [a for a in argv if a.startswith("--workdir=runs/sw/")]
      self.assertLen(workdir, 1)
      workdirs.add(workdir[0])
      for key, value in point.items():
        self.assertIn(f"--config.{key}={value}", argv)
      self.assertEqual(argv[-1], "--config.progress=0")
    self.assertLen(workdirs, len(points))

  def test_script_runs_from_the_command_line(self):
    proc = subprocess.run(
      [_util.PYTHON, str(SWEEP_PY), "configs/rl.py:runlocal", "--root=r"],
      cwd=_util.REPO,
      env=_util.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    self.assertEqual(proc.returncode, 0, msg=proc.stderr[-3000:])
    self.assertLen(proc.stdout.splitlines(), len(_points("rl", None)))

  def test_missing_sweep_key_is_reported(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / "bad.py"
      path.write_text(
        textwrap.dedent(
          f"""
          import importlib.util
          _s = importlib.util.spec_from_file_location(
              "_sft", {str(_util.CONFIGS / "sft.py")!r})
          _m = importlib.util.module_from_spec(_s)
          _s.loader.exec_module(_m)
          get_config = _m.get_config

          def get_sweep(add):
            add(**{{"optimizer.learnign_rate": 1.0}})
          """
        )
      )
      with self.assertRaisesRegex(
        SystemExit, "sweep point 0: config has no key 'optimizer.learnign_rate'"
      ):
        SWEEP.sweep_points(str(path))


class RunSweepTest(absltest.TestCase):
  def test_run_then_collect_a_two_point_sweep(self):
    with tempfile.TemporaryDirectory(prefix="alignment-sweep-") as tmp:
      tmp = pathlib.Path(tmp)
      config = tmp / "sft_seeds.py"
      config.write_text(
        textwrap.dedent(
          f'''
          """configs/sft.py with a 2-point seed sweep (test fixture)."""
          import importlib.util
          _s = importlib.util.spec_from_file_location(
              "_sft", {str(_util.CONFIGS / "sft.py")!r})
          _m = importlib.util.module_from_spec(_s)
          _s.loader.exec_module(_m)
          get_config = _m.get_config

          def get_sweep(add):
            for seed in (0, 1):
              add(seed=seed)
          '''
        )
      )
      root = tmp / "sweep"
      base = [_util.PYTHON, str(SWEEP_PY), f"{config}:runlocal"]
      proc = subprocess.run(
        [*base, f"--root={root}", "--run", "--", "--config.progress=False"],
        cwd=_util.REPO,
        env=_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
      )
      self.assertEqual(proc.returncode, 0, msg=proc.stderr[-4000:])
      self.assertEqual(proc.stdout.count("[sweep] "), 2)
      table = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
      self.assertLen(table, 4)  # header, rule, two runs
      header = [c.strip() for c in table[0].strip("|").split("|")]
      self.assertEqual(header[0], "run")
      self.assertIn("sft/loss", header)
      self.assertIn("sft/grad_norm", header)
      losses = []
      for row, seed in zip(table[2:], (0, 1), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        self.assertEqual(cells[0], f"00{seed}_seed={seed}")
        self.assertNotIn("-", cells[1:])  # every metric present
        losses.append(float(cells[header.index("sft/loss")]))
      self.assertNotEqual(losses[0], losses[1])  # seeds differ
      written = (root / "sweep_results.md").read_text().splitlines()
      self.assertEqual(written, table)
      # --collect rebuilds the same table without running anything.
      proc = subprocess.run(
        [*base, f"--root={root}", "--collect"],
        cwd=_util.REPO,
        env=_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
      )
      self.assertEqual(proc.returncode, 0, msg=proc.stderr[-3000:])
      self.assertNotIn("[sweep] ", proc.stdout)
      self.assertEqual(proc.stdout.splitlines(), table)


if __name__ == "__main__":
  absltest.main()
