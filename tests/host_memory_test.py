"""Tests for alignment/host_memory.py: freed step memory stays mapped.

The behaviour is measured, not assumed: a child process (the setting is
process-wide and binds before threads allocate) runs a jitted function
whose 64 MiB output is freed every call, from a worker thread as XLA's
runtime does, and counts minor page faults per call. Under glibc's
defaults each call faults the whole output in again (16k pages); under
``keep`` (by ``configure`` or by the environment of ``keep_env``) the
pages are reused. Faults are counted per call over calls 10-49 and the
median is compared: a single late growth of the heap (the output plus the
256 MiB top pad, faulted once when touched) must not decide the result,
as it did once on CI when it fell into a 10-call window's mean.
"""

import os
import platform
import subprocess
import sys
import textwrap

from absl.testing import absltest, parameterized

from alignment import host_memory
from tests.trainers import _util

_GLIBC = platform.libc_ver()[0] == "glibc"

_PROBE = textwrap.dedent(
  """
  import os, resource, sys, threading
  from alignment import host_memory
  mode = sys.argv[1]
  if mode != "env":
    print("mode", host_memory.configure(mode))
  import jax, jax.numpy as jnp
  x = jnp.ones((16 * 1024 * 1024,), jnp.float32)  # 64 MiB
  f = jax.jit(lambda x: x * 2.0)
  out = {}

  def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

  def work():
    per_call = []
    for i in range(50):
      start = faults()
      y = f(x)
      y.block_until_ready()
      del y
      if i >= 10:
        per_call.append(faults() - start)
    per_call.sort()
    out["median"] = per_call[len(per_call) // 2]

  t = threading.Thread(target=work)
  t.start()
  t.join()
  print("faults_per_call", out["median"])
  """
)


def _faults_per_call(mode, **env):
  child_env = _util.subprocess_env(**env)
  child_env.pop(host_memory.ENV_VAR, None)
  child_env.pop("LD_PRELOAD", None)
  for key in host_memory.keep_env():
    if key not in env:
      child_env.pop(key, None)
  proc = subprocess.run(
    [sys.executable, "-c", _PROBE, mode],
    env=child_env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = dict(
    line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line
  )
  return float(lines["faults_per_call"]), lines.get("mode")


class ResolveTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    for key in (host_memory.ENV_VAR, "LD_PRELOAD", "JAX_PLATFORMS"):
      self.enter_context(absltest.mock.patch.dict(os.environ, {key: ""}))

  def test_default_is_the_c_librarys(self):
    self.assertEqual(host_memory.resolve(), "system")
    self.assertEqual(host_memory.configure(), "system")

  def test_explicit_modes(self):
    self.assertEqual(host_memory.resolve("keep"), "keep")
    self.assertEqual(host_memory.resolve(" System "), "system")

  def test_environment_variable_is_the_default(self):
    with absltest.mock.patch.dict(os.environ, {host_memory.ENV_VAR: "system"}):
      self.assertEqual(host_memory.resolve(), "system")

  @parameterized.parameters(
    ("cpu", "keep"), ("tpu", "system"), ("cuda,cpu", "system")
  )
  def test_auto_follows_jax_platforms(self, platforms, expected):
    with absltest.mock.patch.dict(os.environ, {"JAX_PLATFORMS": platforms}):
      self.assertEqual(host_memory.resolve("auto"), expected)

  def test_auto_without_platforms_looks_for_accelerator_plugins(self):
    real = host_memory.importlib.util.find_spec

    def fake(found):
      return lambda name: object() if name == found else real(name)

    for module in ("libtpu", "jax_plugins"):
      with absltest.mock.patch.object(
        host_memory.importlib.util, "find_spec", fake(module)
      ):
        self.assertEqual(host_memory.resolve("auto"), "system", module)
    with absltest.mock.patch.object(
      host_memory.importlib.util, "find_spec", lambda name: None
    ):
      self.assertEqual(host_memory.resolve("auto"), "keep")

  def test_auto_leaves_a_preloaded_allocator_alone(self):
    with absltest.mock.patch.dict(
      os.environ, {"LD_PRELOAD": "libjemalloc.so.2", "JAX_PLATFORMS": "cpu"}
    ):
      self.assertEqual(host_memory.resolve(), "system")

  def test_bad_mode_names_the_variable_and_the_choices(self):
    with self.assertRaisesRegex(
      ValueError, r"ALIGNMENT_MALLOC='often'.*auto, keep, system"
    ):
      host_memory.resolve("often")

  def test_keep_env_mirrors_the_mallopt_settings(self):
    env = host_memory.keep_env()
    self.assertEqual(env["MALLOC_ARENA_MAX"], "1")
    self.assertEqual(env["MALLOC_MMAP_MAX_"], "0")
    self.assertLen(env, len(host_memory.KEEP_SETTINGS))

  def test_keep_without_glibc_is_an_error(self):
    with absltest.mock.patch.object(host_memory, "_mallopt", lambda: None):
      with self.assertRaisesRegex(RuntimeError, "ALIGNMENT_MALLOC=system"):
        host_memory.configure("keep")
      self.assertEqual(host_memory.configure("system"), "system")


@absltest.skipUnless(_GLIBC, "the setting is glibc's")
class PageFaultTest(absltest.TestCase):
  def test_system_faults_every_freed_output_in_again(self):
    faults, mode = _faults_per_call("system")
    self.assertEqual(mode, "system")
    self.assertGreater(faults, 12000)  # 64 MiB = 16384 pages, every call

  def test_keep_reuses_the_pages(self):
    faults, mode = _faults_per_call("keep")
    self.assertEqual(mode, "keep")
    # Far below one refault per call (16384 pages): the typical call
    # reuses the heap's pages; a rare late growth does not move the median.
    self.assertLess(faults, 4000)

  def test_keep_env_does_the_same_from_the_environment(self):
    faults, _ = _faults_per_call("env", **host_memory.keep_env())
    # Far below one refault per call (16384 pages): the typical call
    # reuses the heap's pages; a rare late growth does not move the median.
    self.assertLess(faults, 4000)

  def test_main_rejects_a_bad_mode_before_starting(self):
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "alignment.main",
        f"--config={_util.CONFIGS / 'sft.py'}:runlocal",
        "--workdir=/nonexistent/never-written",
      ],
      env=_util.subprocess_env(**{host_memory.ENV_VAR: "often"}),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("ALIGNMENT_MALLOC='often'", proc.stderr)
    self.assertIn("auto, keep, system", proc.stderr)


if __name__ == "__main__":
  absltest.main()
