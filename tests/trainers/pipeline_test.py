"""The default pipeline (`make run`), shortened: every stage runs and the
report, plots and per-stage outputs are written."""

import json
import pathlib

import pytest

from alignment import config_lib
from alignment.trainers import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(arg):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "pipeline_config", ROOT / "configs" / "pipeline.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.slow
def test_quick_pipeline_runs_every_stage(tmp_path):
  config = _config("quick")
  for stage in (config.sft, config.reward_model, config.dpo, config.grpo):
    stage.progress = False
  report = pipeline.run(config, str(tmp_path))
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
