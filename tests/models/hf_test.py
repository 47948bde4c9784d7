"""Hugging Face export, round trips, errors and sharded loading.

``export_check.json`` (written by ``tests/oracles/hf_models.py
--check_export``) records that ``transformers`` 5.23 loads our exports of
every golden model and reproduces the golden logits and greedy tokens.
"""

import copy
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx
from safetensors import numpy as safetensors_numpy

from alignment.models import hf, partitioning
from tests.models.tiny import DATA, HF_INPUTS, HF_MANIFEST

INPUTS = HF_INPUTS


def _tmpdir(test) -> str:
  tmp = tempfile.TemporaryDirectory()
  test.addCleanup(tmp.cleanup)
  return tmp.name


def _params(model):
  return {
    p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))
  }


class ExportTest(parameterized.TestCase):
  def test_transformers_loads_our_exports(self):
    report = json.loads((DATA / "export_check.json").read_text())
    self.assertEqual(set(report["models"]), set(HF_MANIFEST["models"]))
    for name, entry in report["models"].items():
      self.assertTrue(entry["match"], (name, entry))
      self.assertEqual(entry["loaded_as"], HF_MANIFEST["models"][name]["class"])

  @parameterized.parameters(
    ("gpt2", "causal_lm", None),
    ("gpt_neox", "causal_lm", None),
    ("qwen3", "causal_lm", 20_000),
    ("llama_tied", "causal_lm", None),
    ("qwen2", "causal_lm", None),
    ("mistral", "causal_lm", None),
    ("llama_scaled", "causal_lm", None),
    ("llama_seqcls", "reward", None),
  )
  def test_export_then_import_is_bit_identical(self, name, kind, shard):
    config, model = hf.load_hf_checkpoint(DATA / name, kind=kind)
    out = pathlib.Path(_tmpdir(self)) / name
    hf.export_hf_checkpoint(
      model, config, out, kind=kind, max_shard_bytes=shard
    )
    if shard:
      self.assertTrue((out / "model.safetensors.index.json").exists())
      self.assertGreater(len(list(out.glob("model-*.safetensors"))), 1)
    config2, model2 = hf.load_hf_checkpoint(out, kind=kind)
    self.assertEqual(config2, config)
    want, got = _params(model), _params(model2)
    self.assertEqual(set(want), set(got))
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
      self.assertEqual(got[path].dtype, want[path].dtype)

  def test_bfloat16_export_round_trip(self):
    config, model = hf.load_hf_checkpoint(
      DATA / "gpt_neox", param_dtype="bfloat16"
    )
    out = pathlib.Path(_tmpdir(self)) / "neox"
    hf.export_hf_checkpoint(model, config, out)
    self.assertEqual(
      json.loads((out / "config.json").read_text())["dtype"], "bfloat16"
    )
    _, model2 = hf.load_hf_checkpoint(out, param_dtype="bfloat16")
    want, got = _params(model), _params(model2)
    for path in want:
      self.assertEqual(got[path].dtype, np.dtype("bfloat16"))
      np.testing.assert_array_equal(
        got[path].astype(np.float32), want[path].astype(np.float32)
      )

  def test_reward_from_causal_checkpoint_initialises_score(self):
    _, lm = hf.load_hf_checkpoint(DATA / "llama")
    _, rm = hf.load_hf_checkpoint(DATA / "llama", kind="reward", seed=3)
    lm_params, rm_params = _params(lm), _params(rm)
    np.testing.assert_array_equal(
      rm_params[("transformer", "embedding")],
      lm_params[("transformer", "embedding")],
    )
    self.assertEqual(rm_params[("score",)].shape, (32, 1))
    self.assertGreater(np.abs(rm_params[("score",)]).sum(), 0)

  def test_unexpressible_config_raises(self):
    config, model = hf.load_hf_checkpoint(DATA / "llama")
    bad = config.replace(qk_norm=True)
    with self.assertRaisesRegex(ValueError, "qk_norm"):
      hf.export_hf_checkpoint(model, bad, _tmpdir(self))
    with self.assertRaisesRegex(ValueError, "kind"):
      hf.export_hf_checkpoint(model, config, _tmpdir(self), kind="value")


class ErrorTest(absltest.TestCase):
  def _copy(self, name="llama"):
    out = pathlib.Path(_tmpdir(self)) / name
    shutil.copytree(DATA / name, out)
    return out

  def test_missing_tensor_names_it(self):
    path = self._copy()
    tensors = safetensors_numpy.load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors_numpy.save_file(
      tensors, path / "model.safetensors", metadata={"format": "pt"}
    )
    with self.assertRaisesRegex(
      ValueError, r"model\.layers\.1\.mlp\.up_proj\.weight"
    ):
      hf.load_hf_checkpoint(path)

  def test_shape_mismatch_names_tensor(self):
    path = self._copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (path / "config.json").write_text(json.dumps(cfg))
    with self.assertRaisesRegex(ValueError, r"gate_proj\.weight.*shape"):
      hf.load_hf_checkpoint(path)

  def test_unknown_architecture_lists_supported(self):
    path = self._copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "bert", ["BertModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with self.assertRaisesRegex(ValueError, r"bert.*gpt_neox.*qwen3"):
      hf.load_hf_checkpoint(path)

  def test_unsupported_rope_type_raises(self):
    cfg = json.loads((DATA / "llama" / "config.json").read_text())
    cfg["rope_parameters"] = {
      "rope_type": "yarn",
      "rope_theta": 1e4,
      "factor": 2.0,
    }
    with self.assertRaisesRegex(ValueError, "yarn"):
      hf.config_from_hf(cfg)

  def test_legacy_config_fields(self):
    llama = json.loads((DATA / "llama_scaled" / "config.json").read_text())
    legacy = copy.deepcopy(llama)
    params = legacy.pop("rope_parameters")
    legacy["rope_theta"] = params.pop("rope_theta")
    legacy["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    self.assertEqual(hf.config_from_hf(legacy), hf.config_from_hf(llama))
    neox = json.loads((DATA / "gpt_neox" / "config.json").read_text())
    legacy = copy.deepcopy(neox)
    params = legacy.pop("rope_parameters")
    legacy |= {
      "rotary_pct": params["partial_rotary_factor"],
      "rotary_emb_base": params["rope_theta"],
    }
    self.assertEqual(hf.config_from_hf(legacy), hf.config_from_hf(neox))
    self.assertEqual(hf.config_from_hf(neox).rotary_pct, 0.5)


class ShardedLoadTest(absltest.TestCase):
  def test_load_with_mesh_places_shards(self):
    mesh = jax.make_mesh(
      (4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    rules = (
      ("batch", "fsdp"),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
    )
    _, model = hf.load_hf_checkpoint(DATA / "qwen2", mesh=mesh, rules=rules)
    _, plain = hf.load_hf_checkpoint(DATA / "qwen2")
    sharded = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    up = sharded[("transformer", "layers", 0, "mlp", "up_kernel")]
    self.assertEqual(up.sharding.spec, jax.P("fsdp", "tensor"))
    self.assertEqual(up.addressable_shards[0].data.shape, (8, 24))
    for path, value in _params(plain).items():
      np.testing.assert_array_equal(np.asarray(sharded[path]), value)
    tokens = INPUTS["tokens"]
    want = plain(tokens)
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
      got = jax.jit(lambda t: model(t))(tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
