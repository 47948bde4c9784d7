"""The benchmark harness's own logic: our worker's steps and runtime settings.

The benchmarks themselves run outside the suite (``make bench``); these
tests keep the code they run from rotting: our side's DPO, reward-model and
GRPO steps build and train on the suite's 8-device mesh (data-parallel, as
the ``d<n>`` runtime setting runs them), and the settings strings map to the
environment the workers get.
"""

import pathlib
import sys
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest, parameterized

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import ours  # noqa: E402
import run_all  # noqa: E402

SHAPES = {
  "dpo": dict(batch=8, prompt_len=8, completion_len=7),
  "rm": dict(batch=8, prompt_len=8, completion_len=7),
  "grpo": dict(batch=2, num_generations=4, prompt_len=6, completion_len=5),
}


class OursWorkerTest(parameterized.TestCase):
  @parameterized.parameters("dpo", "rm", "grpo")
  def test_step_trains_on_the_mesh(self, task):
    spec = ours.spec_for(task, "tiny", learning_rate=1e-3, **SHAPES[task])
    built = ours.build(spec)
    self.assertEqual(built.info["devices"], jax.device_count())
    _, args = built.train
    built.step()  # GRPO's arguments (its rollout) exist after one step
    before = jax.tree.map(np.asarray, args()[0]["params"])
    built.step()
    state = args()[0]
    self.assertEqual(int(state["step"]), 2)
    leaves = jax.tree.leaves(state["params"])
    self.assertTrue(all(np.isfinite(np.asarray(x)).all() for x in leaves))
    moved = [
      float(np.abs(np.asarray(a) - b).max())
      for a, b in zip(leaves, jax.tree.leaves(before), strict=True)
    ]
    self.assertGreater(max(moved), 0.0)
    if task != "grpo":  # pair batches are split over the data axis
      batch = args()[2]
      self.assertEqual(
        len(batch.chosen_tokens.sharding.device_set), jax.device_count()
      )

  def test_tokens_per_step_counts_both_completions(self):
    spec = ours.spec_for("rm", "tiny", **SHAPES["rm"])
    built = ours.build(spec)
    length = 8 + 7 + 1  # prompt + completion + EOS
    self.assertEqual(built.tokens_per_step, 2 * 8 * length)


class RuntimeSettingsTest(absltest.TestCase):
  def test_allocator_threads_devices(self):
    env = run_all.runtime_env("jemalloc,t1,d2", "/lib/libjemalloc.so.2")
    self.assertEqual(env["LD_PRELOAD"], "/lib/libjemalloc.so.2")
    self.assertEqual(env["OMP_NUM_THREADS"], "1")
    self.assertIn(
      "--xla_force_host_platform_device_count=2", env["XLA_FLAGS"].split()
    )
    self.assertEqual(env["MALLOC_CONF"], run_all.JEMALLOC_CONF)
    self.assertIn("dirty_decay_ms:-1", env["MALLOC_CONF"])
    self.assertEqual(run_all.runtime_env("glibc", "/x.so"), {})

  def test_glibc_keep_is_alignment_mains_keep_for_every_framework(self):
    from alignment import host_memory  # noqa: PLC0415

    env = run_all.runtime_env("glibc-keep,t1", None)
    self.assertEqual(
      {k: v for k, v in env.items() if k.startswith("MALLOC")},
      host_memory.keep_env(),
    )
    self.assertNotIn("LD_PRELOAD", env)

  def test_unknown_allocator_names_the_choices(self):
    with self.assertRaisesRegex(ValueError, "glibc, glibc-keep, jemalloc"):
      run_all.runtime_env("tcmalloc,d2", None)

  def test_devices_setting_keeps_other_xla_flags(self):
    with mock.patch.dict("os.environ", {"XLA_FLAGS": "--xla_cpu_foo=1"}):
      env = run_all.runtime_env("glibc,d4", None)
    self.assertEqual(
      env["XLA_FLAGS"].split(),
      ["--xla_cpu_foo=1", "--xla_force_host_platform_device_count=4"],
    )

  def test_single_device_drops_only_the_device_part(self):
    self.assertEqual(run_all.single_device("glibc,d2"), "glibc")
    self.assertEqual(run_all.single_device("jemalloc,t1,d8"), "jemalloc,t1")
    self.assertEqual(run_all.single_device("jemalloc"), "jemalloc")


if __name__ == "__main__":
  absltest.main()
