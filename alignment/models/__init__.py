"""Flax NNX models: decoder backbone, LM and reward/value heads, HF I/O.

The only package that imports Flax. Public API:

* `ModelConfig`, `PRESETS`, `get_preset` (``config.py``);
* `Transformer`, `CausalLM`, `KVCache`, `init_cache` (``transformer.py``);
* `RewardModel`, `ValueModel`, `GaussianRewardModel`,
  `MultiObjectiveRewardModel`, `PreferenceEmbeddingModel`,
  `MultiHeadEnsembleRewardModel`, `StackedEnsemble`, `build_model`, `KINDS`
  (``heads.py``);
* `load_hf_checkpoint`, `export_hf_checkpoint` (``hf.py``);
* `axis_rules`, `constrain`, `logical_to_mesh`, `param_shardings`
  (``partitioning.py``).
"""

from alignment.models.config import PRESETS, ModelConfig, get_preset
from alignment.models.heads import (
  KINDS,
  GaussianReward,
  GaussianRewardModel,
  MultiHeadEnsembleRewardModel,
  MultiObjective,
  MultiObjectiveRewardModel,
  PreferenceEmbeddingModel,
  RewardModel,
  StackedEnsemble,
  ValueModel,
  build_model,
  last_token_index,
)
from alignment.models.hf import (
  SUPPORTED_ARCHITECTURES,
  export_hf_checkpoint,
  load_hf_checkpoint,
)
from alignment.models.partitioning import (
  axis_rules,
  constrain,
  logical_to_mesh,
  param_logical_axes,
  param_shardings,
)
from alignment.models.transformer import (
  CACHE_AXES,
  CausalLM,
  KVCache,
  Transformer,
  init_cache,
)

__all__ = [
  "CACHE_AXES",
  "KINDS",
  "PRESETS",
  "SUPPORTED_ARCHITECTURES",
  "CausalLM",
  "GaussianReward",
  "GaussianRewardModel",
  "KVCache",
  "ModelConfig",
  "MultiHeadEnsembleRewardModel",
  "MultiObjective",
  "MultiObjectiveRewardModel",
  "PreferenceEmbeddingModel",
  "RewardModel",
  "StackedEnsemble",
  "Transformer",
  "ValueModel",
  "axis_rules",
  "build_model",
  "constrain",
  "export_hf_checkpoint",
  "get_preset",
  "init_cache",
  "last_token_index",
  "load_hf_checkpoint",
  "logical_to_mesh",
  "param_logical_axes",
  "param_shardings",
]
