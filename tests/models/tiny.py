"""Tiny configs and a cheap compile helper shared by the model tests."""

import json
import pathlib

import jax
import numpy as np

from alignment.models.config import ModelConfig

# Tiny graphs: XLA's backend optimisations cost more than they save here.
FAST_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}

BASE = dict(
  vocab_size=64,
  d_model=32,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  head_dim=8,
  d_ff=48,
  max_len=32,
  init_std=0.2,
  pad_id=0,
  bos_id=1,
  eos_id=2,
)

# Every RoPE-side switch at once: Llama-3 scaling, QK-norm, q/k/v and output
# biases, sliding window, GQA.
ROPE = ModelConfig(
  **BASE,
  rope_theta=500.0,
  qk_norm=True,
  qkv_bias=True,
  attn_out_bias=True,
  mlp_bias=True,
  sliding_window=5,
  rope_scaling={
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
  },
  architecture="qwen3",
)
# GPT-2 style: learned positions, LayerNorm, GELU, tied embeddings.
LEARNED = ModelConfig(
  **(BASE | dict(n_kv_heads=4)),
  norm="layer",
  activation="gelu_new",
  positions="learned",
  qkv_bias=True,
  attn_out_bias=True,
  mlp_bias=True,
  tie_embeddings=True,
  architecture="gpt2",
)
# GPT-NeoX style: partial rotary, parallel residual.
NEOX = ModelConfig(
  **(BASE | dict(n_kv_heads=4)),
  norm="layer",
  activation="gelu",
  rotary_pct=0.5,
  parallel_residual=True,
  qkv_bias=True,
  attn_out_bias=True,
  mlp_bias=True,
  architecture="gpt_neox",
)


def compile_fast(fn, *args):
  """``jax.jit(fn)`` lowered for ``args`` and compiled cheaply."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def build(config, kind="causal_lm", seed=0, **kwargs):
  """A model with random NumPy parameters (no compile at all).

  Kernels, embeddings and biases are ``N(0, config.init_std)``; norm scales
  are ``1 + N(0, 0.1)``. Tests of ``build_model``'s own initialisers use
  ``build_model`` directly.
  """
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  model = abstract(config, kind, **kwargs)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def fill(path, var):
    norm = path[-1] in ("scale", "q_norm", "k_norm")
    value = rng.normal(size=var.shape) * (0.1 if norm else config.init_std)
    value = (value + norm).astype(var.dtype)
    return var.replace(jax.numpy.asarray(value))

  flat = [(p, fill(p, v)) for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def abstract(config, kind="causal_lm", **kwargs):
  """The model with ShapeDtypeStruct parameters (no compute)."""
  from flax import nnx  # noqa: PLC0415

  from alignment.models import build_model  # noqa: PLC0415

  return nnx.eval_shape(
    lambda: build_model(kind, config, rngs=nnx.Rngs(0), **kwargs)
  )


DATA = pathlib.Path(__file__).resolve().parents[1] / "testdata" / "hf"
HF_MANIFEST = json.loads((DATA / "manifest.json").read_text())
HF_INPUTS = dict(np.load(DATA / "inputs.npz"))
