"""The default pipeline (`make run`), shortened: every stage runs and the
report, plots and per-stage outputs are written."""

import json
import os
import pathlib
import subprocess

import pytest

from alignment import config_lib
from tests.trainers import _util

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(arg):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "pipeline_config", ROOT / "configs" / "pipeline.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# XLA:CPU's abort when a collective's rendezvous never completes.
_RENDEZVOUS_ABORT = "Termination timeout for"
_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


def _child_xla_flags():
  """The suite's XLA flags with the rendezvous timeout set to 180 s."""
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith(_TIMEOUT_FLAG)
  ]
  return " ".join([*flags, f"{_TIMEOUT_FLAG}=180"])


def _run_quick_pipeline(workdir):
  return subprocess.run(
    [
      _util.PYTHON,
      "-m",
      "alignment.main",
      "--config=configs/pipeline.py:quick",
      f"--workdir={workdir}",
    ]
    + [
      f"--config.{stage}.progress=False"
      for stage in ("sft", "reward_model", "dpo", "grpo")
    ],
    cwd=ROOT,
    env=_util.subprocess_env(XLA_FLAGS=_child_xla_flags()),
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )


@pytest.mark.slow
def test_quick_pipeline_runs_every_stage(tmp_path):
  # In a child process (`make run`'s command line, the suite's 8 CPU
  # devices): a native abort there fails this test with the child's stderr
  # instead of taking down the test worker with the message swallowed by
  # pytest's capture. Four times in full-suite runs (never in isolation)
  # the child's RL stage aborted in XLA:CPU's collective rendezvous ("all
  # gather ... Expected 8 threads to join the rendezvous, but only 7 of
  # them arrived"), the last time after a 600 s wait: a hang of the 8 fake
  # devices' threads on 2 loaded cores, not a slow device, and not
  # deterministic (the run is seeded). The child then gets 180 s and, on
  # that abort only, one fresh run; any other failure fails at once.
  proc = _run_quick_pipeline(tmp_path)
  if proc.returncode != 0 and _RENDEZVOUS_ABORT in proc.stderr:
    tmp_path = tmp_path / "rerun"
    proc = _run_quick_pipeline(tmp_path)
  assert proc.returncode == 0, proc.stderr[-6000:]
  report = json.loads((tmp_path / "report.json").read_text())
  for name in ("sft", "dpo", "grpo"):
    policy = report["policies"][name]
    assert 0.0 <= policy["gold_reward"] <= 1.0
    assert policy["kl_to_reference"] == policy["kl_to_reference"]  # finite
  assert report["policies"]["sft"]["kl_to_reference"] == pytest.approx(
    0.0, abs=1e-4
  )
  assert 0.0 <= report["reward_model"]["eval_accuracy"] <= 1.0
  for path in (
    "report.json",
    "report.md",
    "report.png",
    "sft/curves_sft.png",
    "reward_model/reliability_reward_model.png",
    "dpo/metrics_preference.jsonl",
    "grpo/metrics_rl.jsonl",
    "data/pairs_train.jsonl",
    "pairs.done",
  ):
    assert (tmp_path / path).exists(), path
  saved = json.loads((tmp_path / "report.json").read_text())
  assert set(saved["policies"]) == {"sft", "dpo", "grpo"}
  assert "DPO changes the gold reward" in (tmp_path / "report.md").read_text()


def test_seed_is_shared_by_every_stage():
  config = _config("seed=3")
  assert [
    s.seed for s in (config.sft, config.reward_model, config.dpo, config.grpo)
  ] == [3, 3, 3, 3]
  config.seed = 5
  assert config.grpo.seed == 5
  assert config_lib  # configs import only config_lib (checked elsewhere)
