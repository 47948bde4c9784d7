"""Tests of `ModelConfig`, the presets and their parameter counts."""

import dataclasses

import jax
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment.models import config as config_lib
from tests.models import tiny

# Parameter counts published for the real checkpoints (model cards /
# ``sum(p.numel() for p in model.parameters())`` of the HF models).
PUBLISHED = {
  "gpt2": 124_439_808,
  "pythia-160m": 162_322_944,
  "pythia-1b": 1_011_781_632,
  "pythia-6.9b": 6_857_302_016,
  "llama-3.2-1b": 1_235_814_400,
  "llama-3-8b": 8_030_261_248,
  "llama-3-70b": 70_553_706_496,
  "qwen2.5-0.5b": 494_032_768,
  "qwen2.5-7b": 7_615_616_512,
  "qwen3-8b": 8_190_735_360,
  "tinyllama-1.1b": 1_100_048_384,
  "smollm-135m": 134_515_008,
  "mistral-7b": 7_241_732_096,
}


def _count(config):
  model = tiny.abstract(config)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))


class PresetTest(parameterized.TestCase):
  @parameterized.parameters(*sorted(PUBLISHED))
  def test_num_params_matches_published_count(self, name):
    self.assertEqual(config_lib.PRESETS[name].num_params(), PUBLISHED[name])

  @parameterized.parameters(
    tiny.ROPE,
    tiny.LEARNED,
    tiny.NEOX,
    config_lib.PRESETS["tiny"],
    config_lib.PRESETS["qwen3-0.6b"].replace(n_layers=2, vocab_size=128),
  )
  def test_num_params_counts_the_built_model(self, config):
    self.assertEqual(config.num_params(), _count(config))

  def test_tiny_and_small(self):
    tiny_cfg = config_lib.get_preset("tiny")
    self.assertEqual(tiny_cfg.vocab_size, 260)
    self.assertEqual(
      (
        tiny_cfg.d_model,
        tiny_cfg.n_layers,
        tiny_cfg.n_heads,
        tiny_cfg.n_kv_heads,
      ),
      (64, 2, 4, 2),
    )
    self.assertEqual(
      (tiny_cfg.pad_id, tiny_cfg.bos_id, tiny_cfg.eos_id), (256, 257, 258)
    )
    small = config_lib.get_preset("small")
    self.assertEqual(small.vocab_size, 32000)
    self.assertBetween(small.num_params(), 20e6, 50e6)
    self.assertAlmostEqual(
      config_lib.memory_gib(small), small.num_params() * 4 / 2**30
    )

  def test_every_preset_is_valid_and_hashable(self):
    for name, config in config_lib.PRESETS.items():
      self.assertEqual(config_lib.get_preset(name), config)
      hash(config)
      self.assertEqual(config.d_model % 8, 0, name)

  def test_get_preset_errors_list_valid_names(self):
    with self.assertRaisesRegex(ValueError, r"'llama-3-8b'.*'tiny'"):
      config_lib.get_preset("llama-9")
    with self.assertRaisesRegex(ValueError, "n_layerz"):
      config_lib.get_preset("tiny", n_layerz=3)
    self.assertEqual(config_lib.get_preset("tiny", n_layers=3).n_layers, 3)


class ModelConfigTest(parameterized.TestCase):
  def test_rope_scaling_is_frozen_and_round_trips(self):
    config = config_lib.PRESETS["llama-3.2-1b"]
    self.assertIsInstance(config.rope_scaling, config_lib.FrozenMapping)
    self.assertEqual(config.rope_scaling["factor"], 32.0)
    as_dict = config.to_dict()
    self.assertIsInstance(as_dict["rope_scaling"], dict)
    self.assertEqual(config_lib.ModelConfig(**as_dict), config)
    self.assertEqual(hash(config_lib.ModelConfig(**as_dict)), hash(config))
    self.assertEqual(
      dataclasses.asdict(config)["rope_scaling"], dict(config.rope_scaling)
    )

  def test_dtypes_are_normalised_to_names(self):
    config = tiny.ROPE.replace(param_dtype=np.float32, dtype="bfloat16")
    self.assertEqual(
      (config.param_dtype, config.dtype), ("float32", "bfloat16")
    )
    self.assertEqual(
      config.replace(param_dtype="bfloat16").bytes_per_param(), 2
    )

  @parameterized.parameters(
    ("n_heads", 5, "multiple of n_kv_heads"),
    ("norm", "batch", "norm must be one of"),
    ("activation", "tanh", "activation must be one of"),
    ("positions", "alibi", "positions must be one of"),
    ("architecture", "bert", "architecture must be one of"),
    ("rotary_pct", 0.0, "rotary_pct"),
    ("rotary_pct", 0.375, "must be even"),
    ("norm_eps", 0.0, "norm_eps"),
    ("sliding_window", 0, "sliding_window"),
    ("d_model", 0, "d_model"),
    ("dtype", "int8", "dtype must be one of"),
    ("rope_scaling", {"rope_type": "yarn"}, "rope_type"),
    ("rope_scaling", 2.0, "rope_scaling"),
  )
  def test_invalid_fields_raise(self, field, value, message):
    with self.assertRaisesRegex(ValueError, message):
      tiny.ROPE.replace(**{field: value})

  def test_derived_properties(self):
    self.assertEqual(tiny.NEOX.rotary_dim, 4)
    self.assertTrue(tiny.ROPE.gated)
    self.assertFalse(tiny.LEARNED.gated)


if __name__ == "__main__":
  absltest.main()
