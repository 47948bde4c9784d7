"""Hugging Face checkpoints (safetensors) in and out, without torch.

:func:`load_hf_checkpoint` reads ``config.json`` and the safetensors file(s)
(single ``model.safetensors`` or sharded with
``model.safetensors.index.json``) of a Llama, Mistral, Qwen2, Qwen3, GPT-2 or
GPT-NeoX checkpoint. Tensors are memory-mapped; each is converted to our
layout as a NumPy view and, with a mesh, placed with
``jax.make_array_from_callback`` so every device reads only its own shard
(no full copy of the model in host or device memory; at most one tensor's
rows are touched at a time).

:func:`export_hf_checkpoint` writes ``config.json`` + ``model.safetensors``
(optionally sharded) that ``transformers`` loads with
``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification``; a
`RewardModel` exports as ``<Arch>ForSequenceClassification`` with
``score.weight`` and ``num_labels=1``.
"""

import dataclasses
import json
import logging
import os
import pathlib
import struct
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_numpy

from alignment.models.config import ModelConfig
from alignment.models.heads import build_model

# model_type -> (CausalLM class, SequenceClassification class)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
  "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
  "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
  "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
  "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
  "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
  "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification"),
}
_BASE_MODELS = {
  "LlamaModel": "llama",
  "MistralModel": "mistral",
  "Qwen2Model": "qwen2",
  "Qwen3Model": "qwen3",
  "GPT2Model": "gpt2",
  "GPTNeoXModel": "gpt_neox",
}
_ARCH_TO_TYPE = {
  cls: t for t, classes in SUPPORTED_ARCHITECTURES.items() for cls in classes
} | _BASE_MODELS
_PREFIXES = {
  "llama": "model.",
  "mistral": "model.",
  "qwen2": "model.",
  "qwen3": "model.",
  "gpt2": "transformer.",
  "gpt_neox": "gpt_neox.",
}
_EXPORT_KINDS = ("causal_lm", "reward")
_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": bool,
}


# --------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------


def _model_type(hf: dict[str, Any]) -> str:
  model_type = hf.get("model_type")
  if model_type in SUPPORTED_ARCHITECTURES:
    return model_type
  for arch in hf.get("architectures") or ():
    if arch in _ARCH_TO_TYPE:
      return _ARCH_TO_TYPE[arch]
  raise ValueError(
    f"config.json: unsupported model_type {model_type!r} / architectures "
    f"{hf.get('architectures')}; supported model_type values: "
    f"{sorted(SUPPORTED_ARCHITECTURES)}, architectures: "
    f"{sorted(_ARCH_TO_TYPE)}."
  )


def _field(hf: dict[str, Any], *names, default=KeyError):
  for name in names:
    if hf.get(name) is not None:
      return hf[name]
  if default is KeyError:
    raise ValueError(f"config.json: missing field {names[0]!r}.")
  return default


def _first(value):
  if isinstance(value, (list, tuple)):
    return value[0] if value else None
  return value


def _rope(hf: dict[str, Any], default_pct: float):
  """(theta, scaling or None, rotary_pct) from old or new style fields."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = params.get(
    "rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
  )
  pct = params.get(
    "partial_rotary_factor",
    hf.get("partial_rotary_factor", hf.get("rotary_pct", default_pct)),
  )
  source = legacy or params
  kind = source.get("rope_type", source.get("type", "default"))
  if kind in ("default", None):
    return float(theta), None, float(pct)
  if kind not in ("linear", "llama3"):
    raise ValueError(
      f"config.json: unsupported rope_scaling rope_type {kind!r}; "
      "supported: 'default', 'linear', 'llama3'."
    )
  keys = (
    ("factor",)
    if kind == "linear"
    else (
      "factor",
      "low_freq_factor",
      "high_freq_factor",
      "original_max_position_embeddings",
    )
  )
  missing = [k for k in keys if k not in source]
  if missing:
    raise ValueError(f"config.json: rope_scaling ({kind}) misses {missing}.")
  scaling = {"rope_type": kind} | {k: source[k] for k in keys}
  return float(theta), scaling, float(pct)


def config_from_hf(
  hf: dict[str, Any], *, dtype: str = "float32", param_dtype: str = "float32"
) -> ModelConfig:
  """Maps a Hugging Face ``config.json`` dict to a `ModelConfig`.

  Args:
    hf: the parsed ``config.json``.
    dtype: compute dtype of the returned config.
    param_dtype: parameter dtype of the returned config.

  Returns:
    The `ModelConfig` (``architecture`` = the HF ``model_type``).

  Raises:
    ValueError: unknown ``model_type``/``architectures`` (listing the
      supported ones), a missing field, or a feature we do not implement
      (named).
  """
  model_type = _model_type(hf)
  ids = dict(
    pad_id=_first(hf.get("pad_token_id")),
    bos_id=_first(hf.get("bos_token_id")),
    eos_id=_first(hf.get("eos_token_id")),
  )
  if ids["eos_id"] is None:
    ids["eos_id"] = 0
  if ids["pad_id"] is None:
    ids["pad_id"] = ids["eos_id"]
  common = dict(
    dtype=dtype,
    param_dtype=param_dtype,
    init_std=float(hf.get("initializer_range", 0.02)),
    architecture=model_type,
    **ids,
  )
  if model_type == "gpt2":
    d = _field(hf, "n_embd", "hidden_size")
    heads = _field(hf, "n_head", "num_attention_heads")
    if hf.get("scale_attn_by_inverse_layer_idx"):
      raise ValueError(
        "config.json: scale_attn_by_inverse_layer_idx=True is unsupported."
      )
    if not hf.get("scale_attn_weights", True):
      raise ValueError("config.json: scale_attn_weights=False is unsupported.")
    act = hf.get("activation_function", "gelu_new")
    acts = {
      "gelu_new": "gelu_new",
      "gelu_pytorch_tanh": "gelu_new",
      "gelu_fast": "gelu_new",
      "gelu": "gelu",
      "relu": "relu",
    }
    if act not in acts:
      raise ValueError(
        f"config.json: activation_function {act!r} is unsupported; "
        f"supported: {sorted(acts)}."
      )
    return ModelConfig(
      vocab_size=hf["vocab_size"],
      d_model=d,
      n_layers=_field(hf, "n_layer", "num_hidden_layers"),
      n_heads=heads,
      n_kv_heads=heads,
      head_dim=d // heads,
      d_ff=hf.get("n_inner") or 4 * d,
      max_len=_field(hf, "n_positions", "max_position_embeddings"),
      norm="layer",
      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      activation=acts[act],
      positions="learned",
      qkv_bias=True,
      attn_out_bias=True,
      mlp_bias=True,
      tie_embeddings=True,
      **common,
    )
  if model_type == "gpt_neox":
    d = _field(hf, "hidden_size")
    heads = _field(hf, "num_attention_heads")
    theta, scaling, pct = _rope(hf, 0.25)
    act = hf.get("hidden_act", "gelu")
    acts = {
      "gelu": "gelu",
      "gelu_new": "gelu_new",
      "gelu_fast": "gelu_new",
      "gelu_pytorch_tanh": "gelu_new",
      "relu": "relu",
    }
    if act not in acts:
      raise ValueError(
        f"config.json: hidden_act {act!r} is unsupported for gpt_neox; "
        f"supported: {sorted(acts)}."
      )
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
      vocab_size=hf["vocab_size"],
      d_model=d,
      n_layers=_field(hf, "num_hidden_layers"),
      n_heads=heads,
      n_kv_heads=heads,
      head_dim=d // heads,
      d_ff=_field(hf, "intermediate_size"),
      max_len=hf.get("max_position_embeddings", 2048),
      norm="layer",
      norm_eps=hf.get("layer_norm_eps", 1e-5),
      activation=acts[act],
      rope_theta=theta,
      rope_scaling=scaling,
      rotary_pct=pct,
      parallel_residual=bool(hf.get("use_parallel_residual", True)),
      qkv_bias=bias,
      attn_out_bias=bias,
      mlp_bias=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **common,
    )
  # Llama family.
  d = _field(hf, "hidden_size")
  heads = _field(hf, "num_attention_heads")
  theta, scaling, pct = _rope(hf, 1.0)
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(
      f"config.json: hidden_act {act!r} is unsupported for {model_type}; "
      "supported: 'silu'."
    )
  if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    raise ValueError(
      f"config.json: use_sliding_window=True is unsupported for {model_type}."
    )
  window = hf.get("sliding_window") if model_type == "mistral" else None
  attention_bias = bool(hf.get("attention_bias", False))
  return ModelConfig(
    vocab_size=hf["vocab_size"],
    d_model=d,
    n_layers=_field(hf, "num_hidden_layers"),
    n_heads=heads,
    n_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or d // heads,
    d_ff=_field(hf, "intermediate_size"),
    max_len=hf.get("max_position_embeddings", 2048),
    norm="rms",
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    activation="swiglu",
    rope_theta=theta,
    rope_scaling=scaling,
    rotary_pct=pct,
    qkv_bias=attention_bias or model_type == "qwen2",
    attn_out_bias=attention_bias and model_type != "qwen2",
    mlp_bias=bool(hf.get("mlp_bias", False)),
    qk_norm=model_type == "qwen3",
    sliding_window=window,
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    **common,
  )


def _expressible(config: ModelConfig) -> None:
  """Raises if the HF class of ``config.architecture`` cannot hold it."""
  arch = config.architecture
  want: dict[str, Any]
  if arch == "gpt2":
    want = dict(
      norm="layer",
      positions="learned",
      qkv_bias=True,
      attn_out_bias=True,
      mlp_bias=True,
      tie_embeddings=True,
      parallel_residual=False,
      qk_norm=False,
      sliding_window=None,
      n_kv_heads=config.n_heads,
      head_dim=config.d_model // config.n_heads,
    )
  elif arch == "gpt_neox":
    want = dict(
      norm="layer",
      positions="rope",
      mlp_bias=True,
      attn_out_bias=config.qkv_bias,
      qk_norm=False,
      sliding_window=None,
      n_kv_heads=config.n_heads,
      head_dim=config.d_model // config.n_heads,
    )
  else:
    want = dict(
      norm="rms",
      positions="rope",
      activation="swiglu",
      parallel_residual=False,
      rotary_pct=1.0,
      qk_norm=arch == "qwen3",
    )
    if arch == "qwen2":
      want |= dict(qkv_bias=True, attn_out_bias=False, mlp_bias=False)
    else:
      want |= dict(attn_out_bias=config.qkv_bias)
      if arch != "llama":
        want |= dict(mlp_bias=False)
    if arch != "mistral":
      want |= dict(sliding_window=None)
  for name, value in want.items():
    if getattr(config, name) != value:
      raise ValueError(
        f"cannot export architecture {arch!r}: ModelConfig.{name} is "
        f"{getattr(config, name)!r}, the Hugging Face class needs {value!r}."
      )


def config_to_hf(
  config: ModelConfig, *, kind: str = "causal_lm"
) -> dict[str, Any]:
  """The ``config.json`` dict of ``config`` for ``kind`` ("causal_lm" or
  "reward")."""
  _expressible(config)
  arch = config.architecture
  classes = SUPPORTED_ARCHITECTURES[arch]
  out: dict[str, Any] = {
    "architectures": [classes[_EXPORT_KINDS.index(kind)]],
    "model_type": arch,
    "vocab_size": config.vocab_size,
    "bos_token_id": config.bos_id,
    "eos_token_id": config.eos_id,
    "pad_token_id": config.pad_id,
    "initializer_range": config.init_std,
    "tie_word_embeddings": config.tie_embeddings,
    "dtype": config.param_dtype,
    "torch_dtype": config.param_dtype,
  }
  if kind == "reward":
    out |= {
      "num_labels": 1,
      "id2label": {"0": "LABEL_0"},
      "label2id": {"LABEL_0": 0},
    }
  act = (
    {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "swiglu": "silu"}[
      config.activation
    ]
    if config.activation in ("gelu", "gelu_new", "relu", "swiglu")
    else None
  )
  if act is None:
    raise ValueError(f"cannot export activation {config.activation!r}.")
  if arch == "gpt2":
    return out | {
      "n_embd": config.d_model,
      "n_layer": config.n_layers,
      "n_head": config.n_heads,
      "n_inner": config.d_ff,
      "n_positions": config.max_len,
      "n_ctx": config.max_len,
      "layer_norm_epsilon": config.norm_eps,
      "activation_function": act,
      "scale_attn_weights": True,
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
    }
  rope = {"rope_theta": config.rope_theta}
  if config.rope_scaling is not None:
    rope["rope_scaling"] = dict(config.rope_scaling)
  if arch == "gpt_neox":
    return (
      out
      | rope
      | {
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_ff,
        "max_position_embeddings": config.max_len,
        "layer_norm_eps": config.norm_eps,
        "hidden_act": act,
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": config.rope_theta,
        "use_parallel_residual": config.parallel_residual,
        "attention_bias": config.qkv_bias,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
      }
    )
  out |= rope | {
    "hidden_size": config.d_model,
    "num_hidden_layers": config.n_layers,
    "num_attention_heads": config.n_heads,
    "num_key_value_heads": config.n_kv_heads,
    "head_dim": config.head_dim,
    "intermediate_size": config.d_ff,
    "max_position_embeddings": config.max_len,
    "rms_norm_eps": config.norm_eps,
    "hidden_act": act,
    "attention_dropout": 0.0,
  }
  if arch in ("llama", "qwen3"):
    out["attention_bias"] = config.qkv_bias
  if arch == "llama":
    out["mlp_bias"] = config.mlp_bias
  if arch == "mistral":
    out["sliding_window"] = config.sliding_window
  if arch in ("qwen2", "qwen3"):
    out |= {
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": config.n_layers,
    }
  return out


# --------------------------------------------------------------------------
# Tensor name / layout maps
# --------------------------------------------------------------------------

Path = tuple


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor ↔ one or more of our parameters.

  ``to_ours`` maps the HF array to views in our layout (one per path);
  ``to_hf`` is its inverse.
  """

  hf_name: str
  hf_shape: tuple[int, ...]
  ours: tuple[Path, ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  optional: bool = False


def _same(name, shape, path, optional=False) -> _Entry:
  return _Entry(
    name, tuple(shape), (path,), lambda w: (w,), lambda x: x, optional
  )


def _linear(name, d_in, d_out, path) -> _Entry:
  """torch Linear ``[out, in]`` ↔ our ``[in, out]``."""
  return _Entry(name, (d_out, d_in), (path,), lambda w: (w.T,), lambda x: x.T)


def _split_out(name, d_in, heads, n, path) -> _Entry:
  """torch Linear ``[heads*n, in]`` ↔ our ``[in, heads, n]``."""
  return _Entry(
    name,
    (heads * n, d_in),
    (path,),
    lambda w: (w.T.reshape(d_in, heads, n),),
    lambda x: x.reshape(d_in, heads * n).T,
  )


def _split_in(name, heads, n, d_out, path) -> _Entry:
  """torch Linear ``[out, heads*n]`` ↔ our ``[heads, n, out]``."""
  return _Entry(
    name,
    (d_out, heads * n),
    (path,),
    lambda w: (w.T.reshape(heads, n, d_out),),
    lambda x: x.reshape(heads * n, d_out).T,
  )


def _bias_heads(name, heads, n, path) -> _Entry:
  return _Entry(
    name,
    (heads * n,),
    (path,),
    lambda w: (w.reshape(heads, n),),
    lambda x: x.reshape(-1),
  )


def _norm(prefix, c: ModelConfig, path) -> list[_Entry]:
  out = [_same(prefix + ".weight", (c.d_model,), path + ("scale",))]
  if c.norm == "layer":
    out.append(_same(prefix + ".bias", (c.d_model,), path + ("bias",)))
  return out


def _llama_layer(c: ModelConfig, p: str, path: Path) -> list[_Entry]:
  d, h, kv, n, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
  a, m = path + ("attn",), path + ("mlp",)
  out = _norm(p + "input_layernorm", c, path + ("attn_norm",))
  out += _norm(p + "post_attention_layernorm", c, path + ("mlp_norm",))
  s = p + "self_attn."
  out += [
    _split_out(s + "q_proj.weight", d, h, n, a + ("q_kernel",)),
    _split_out(s + "k_proj.weight", d, kv, n, a + ("k_kernel",)),
    _split_out(s + "v_proj.weight", d, kv, n, a + ("v_kernel",)),
    _split_in(s + "o_proj.weight", h, n, d, a + ("o_kernel",)),
  ]
  if c.qkv_bias:
    out += [
      _bias_heads(s + "q_proj.bias", h, n, a + ("q_bias",)),
      _bias_heads(s + "k_proj.bias", kv, n, a + ("k_bias",)),
      _bias_heads(s + "v_proj.bias", kv, n, a + ("v_bias",)),
    ]
  if c.attn_out_bias:
    out.append(_same(s + "o_proj.bias", (d,), a + ("o_bias",)))
  if c.qk_norm:
    out += [
      _same(s + "q_norm.weight", (n,), a + ("q_norm",)),
      _same(s + "k_norm.weight", (n,), a + ("k_norm",)),
    ]
  out += [
    _linear(p + "mlp.gate_proj.weight", d, f, m + ("gate_kernel",)),
    _linear(p + "mlp.up_proj.weight", d, f, m + ("up_kernel",)),
    _linear(p + "mlp.down_proj.weight", f, d, m + ("down_kernel",)),
  ]
  if c.mlp_bias:
    out += [
      _same(p + "mlp.gate_proj.bias", (f,), m + ("gate_bias",)),
      _same(p + "mlp.up_proj.bias", (f,), m + ("up_bias",)),
      _same(p + "mlp.down_proj.bias", (d,), m + ("down_bias",)),
    ]
  return out


def _gpt2_layer(c: ModelConfig, p: str, path: Path) -> list[_Entry]:
  d, h, n, f = c.d_model, c.n_heads, c.head_dim, c.d_ff
  a, m = path + ("attn",), path + ("mlp",)
  out = _norm(p + "ln_1", c, path + ("attn_norm",))
  out += _norm(p + "ln_2", c, path + ("mlp_norm",))
  qkv = (a + ("q_kernel",), a + ("k_kernel",), a + ("v_kernel",))
  out.append(
    _Entry(
      p + "attn.c_attn.weight",
      (d, 3 * d),
      qkv,
      lambda w: tuple(
        w[:, i * d : (i + 1) * d].reshape(d, h, n) for i in range(3)
      ),
      lambda q, k, v: np.concatenate(
        [x.reshape(d, d) for x in (q, k, v)], axis=1
      ),
    )
  )
  qkv_b = (a + ("q_bias",), a + ("k_bias",), a + ("v_bias",))
  out.append(
    _Entry(
      p + "attn.c_attn.bias",
      (3 * d,),
      qkv_b,
      lambda w: tuple(w[i * d : (i + 1) * d].reshape(h, n) for i in range(3)),
      lambda q, k, v: np.concatenate([x.reshape(-1) for x in (q, k, v)]),
    )
  )
  out.append(
    _Entry(
      p + "attn.c_proj.weight",
      (d, d),
      (a + ("o_kernel",),),
      lambda w: (w.reshape(h, n, d),),
      lambda x: x.reshape(h * n, d),
    )
  )
  out.append(_same(p + "attn.c_proj.bias", (d,), a + ("o_bias",)))
  out += [
    _same(p + "mlp.c_fc.weight", (d, f), m + ("up_kernel",)),
    _same(p + "mlp.c_fc.bias", (f,), m + ("up_bias",)),
    _same(p + "mlp.c_proj.weight", (f, d), m + ("down_kernel",)),
    _same(p + "mlp.c_proj.bias", (d,), m + ("down_bias",)),
  ]
  return out


def _neox_layer(c: ModelConfig, p: str, path: Path) -> list[_Entry]:
  d, h, n, f = c.d_model, c.n_heads, c.head_dim, c.d_ff
  a, m = path + ("attn",), path + ("mlp",)
  out = _norm(p + "input_layernorm", c, path + ("attn_norm",))
  out += _norm(p + "post_attention_layernorm", c, path + ("mlp_norm",))
  # query_key_value rows are [head, (q | k | v), n].
  qkv = (a + ("q_kernel",), a + ("k_kernel",), a + ("v_kernel",))
  out.append(
    _Entry(
      p + "attention.query_key_value.weight",
      (3 * d, d),
      qkv,
      lambda w: tuple(
        w.reshape(h, 3, n, d)[:, i].transpose(2, 0, 1) for i in range(3)
      ),
      lambda q, k, v: np.stack(
        [x.transpose(1, 2, 0) for x in (q, k, v)], axis=1
      ).reshape(3 * d, d),
    )
  )
  if c.qkv_bias:
    qkv_b = (a + ("q_bias",), a + ("k_bias",), a + ("v_bias",))
    out.append(
      _Entry(
        p + "attention.query_key_value.bias",
        (3 * d,),
        qkv_b,
        lambda w: tuple(w.reshape(h, 3, n)[:, i] for i in range(3)),
        lambda q, k, v: np.stack([q, k, v], axis=1).reshape(-1),
      )
    )
  out.append(
    _split_in(p + "attention.dense.weight", h, n, d, a + ("o_kernel",))
  )
  if c.attn_out_bias:
    out.append(_same(p + "attention.dense.bias", (d,), a + ("o_bias",)))
  out += [
    _linear(p + "mlp.dense_h_to_4h.weight", d, f, m + ("up_kernel",)),
    _same(p + "mlp.dense_h_to_4h.bias", (f,), m + ("up_bias",)),
    _linear(p + "mlp.dense_4h_to_h.weight", f, d, m + ("down_kernel",)),
    _same(p + "mlp.dense_4h_to_h.bias", (d,), m + ("down_bias",)),
  ]
  return out


def tensor_map(
  config: ModelConfig, kind: str = "causal_lm", prefix: str | None = None
) -> list[_Entry]:
  """The HF tensors of ``config`` and the parameters they map to.

  Args:
    config: the model config (``architecture`` picks the naming scheme).
    kind: ``"causal_lm"`` (adds the LM head unless tied), ``"reward"`` (adds
      ``score.weight``, optional on import) or any other kind (backbone
      only).
    prefix: backbone prefix in the checkpoint (default: the standard one,
      e.g. ``"model."``); ``""`` for bare base-model files.

  Returns:
    A list of entries (HF name, HF shape, our state paths, converters).
  """
  arch = config.architecture
  c = config
  p = _PREFIXES[arch] if prefix is None else prefix
  t = ("transformer",)
  v, d = c.vocab_size, c.d_model
  if arch == "gpt2":
    out = [
      _same(p + "wte.weight", (v, d), t + ("embedding",)),
      _same(p + "wpe.weight", (c.max_len, d), t + ("position_embedding",)),
    ]
    layer, layer_prefix, final = _gpt2_layer, p + "h.", p + "ln_f"
    head = "lm_head.weight"
  elif arch == "gpt_neox":
    out = [_same(p + "embed_in.weight", (v, d), t + ("embedding",))]
    layer, layer_prefix = _neox_layer, p + "layers."
    final, head = p + "final_layer_norm", "embed_out.weight"
  else:
    out = [_same(p + "embed_tokens.weight", (v, d), t + ("embedding",))]
    layer, layer_prefix = _llama_layer, p + "layers."
    final, head = p + "norm", "lm_head.weight"
  for i in range(c.n_layers):
    out += layer(c, f"{layer_prefix}{i}.", t + ("layers", i))
  out += _norm(final, c, t + ("final_norm",))
  if kind == "causal_lm" and not c.tie_embeddings:
    out.append(_linear(head, d, v, ("lm_head",)))
  if kind == "reward":
    out.append(
      _Entry(
        "score.weight",
        (1, d),
        (("score",),),
        lambda w: (w.T,),
        lambda x: x.T,
        optional=True,
      )
    )
  return out


# --------------------------------------------------------------------------
# Reading safetensors lazily
# --------------------------------------------------------------------------


class _Checkpoint:
  """Memory-mapped tensors of one or several safetensors files."""

  def __init__(self, directory: pathlib.Path):
    index = directory / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      single = directory / "model.safetensors"
      files = (
        [single.name]
        if single.exists()
        else sorted(p.name for p in directory.glob("*.safetensors"))
      )
      if not files:
        raise FileNotFoundError(
          f"no model.safetensors or model.safetensors.index.json in {directory}"
        )
    self._tensors: dict[str, tuple[pathlib.Path, dict, int]] = {}
    for name in files:
      path = directory / name
      with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
      header.pop("__metadata__", None)
      for key, info in header.items():
        self._tensors[key] = (path, info, 8 + size)
    self._maps: dict[pathlib.Path, np.memmap] = {}

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name][1]["shape"])

  def array(self, name: str) -> np.ndarray:
    """A read-only memory-mapped view (nothing is read until sliced)."""
    path, info, base = self._tensors[name]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(
        f"tensor {name}: unsupported safetensors dtype {info['dtype']}."
      )
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    raw = self._maps[path][base + start : base + end]
    return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _numpy_dtype(dtype) -> np.dtype:
  if str(dtype) == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def _place(view: np.ndarray, dtype, sharding):
  """A jax.Array of ``view`` in ``dtype``, read shard by shard."""
  dtype = _numpy_dtype(dtype)
  if sharding is None:
    return jax.device_put(np.asarray(view, dtype=dtype))
  return jax.make_array_from_callback(
    view.shape,
    sharding,
    lambda index: np.ascontiguousarray(view[index], dtype=dtype),
  )


def _detect_prefix(config: ModelConfig, ckpt: _Checkpoint) -> str:
  standard = _PREFIXES[config.architecture]
  embed = {"gpt2": "wte.weight", "gpt_neox": "embed_in.weight"}.get(
    config.architecture, "embed_tokens.weight"
  )
  for prefix in (standard, ""):
    if prefix + embed in ckpt:
      return prefix
  raise ValueError(
    f"checkpoint has no embedding tensor {standard + embed!r} (nor {embed!r})."
  )


def load_hf_checkpoint(
  path: str | os.PathLike,
  *,
  kind: str = "causal_lm",
  dtype: str = "float32",
  param_dtype: str = "float32",
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, Any]] | None = None,
  seed: int = 0,
  config_overrides: dict[str, Any] | None = None,
  **model_kwargs,
) -> tuple[ModelConfig, nnx.Module]:
  """Loads a Hugging Face checkpoint directory into one of our models.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or
      ``model.safetensors.index.json`` + shards).
    kind: a `build_model` kind. The backbone is always loaded; the LM head
      for ``"causal_lm"``; ``score.weight`` for ``"reward"`` when present.
      Head parameters not in the checkpoint (e.g. a reward head on an SFT
      checkpoint) are freshly initialised from ``seed``.
    dtype: compute dtype of the returned model.
    param_dtype: parameter dtype (tensors are converted on the fly).
    mesh: if given, every parameter is created directly with its sharding
      (logical axes → ``rules``), each device reading only its shard.
    rules: logical→mesh rule table (default: the current context's rules;
      with neither, parameters are replicated).
    seed: seed of freshly initialised head parameters.
    config_overrides: `ModelConfig` fields to change after reading
      ``config.json`` (e.g. ``remat=True``).
    **model_kwargs: head options forwarded to `build_model`.

  Returns:
    ``(config, model)``.

  Raises:
    ValueError: unsupported architecture (listing the supported ones), a
      missing backbone tensor or a shape mismatch (naming the tensor).
  """
  from alignment.models import partitioning  # noqa: PLC0415

  path = pathlib.Path(path)
  hf = json.loads((path / "config.json").read_text())
  config = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)
  if config_overrides:
    config = config.replace(**config_overrides)
  ckpt = _Checkpoint(path)
  prefix = _detect_prefix(config, ckpt)

  def make():
    return build_model(kind, config, rngs=nnx.Rngs(seed), **model_kwargs)

  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  shardings = None
  if mesh is not None:
    from alignment.sharding import partition  # noqa: PLC0415

    rules = partitioning.current_rules() if rules is None else tuple(rules)
    shardings = {
      p: getattr(v, "get_value", lambda v=v: v)()
      for p, v in nnx.to_flat_state(
        partition.state_shardings(state, mesh, rules)
      )
    }
  values: dict[Path, jax.Array] = {}
  used = set()
  for entry in tensor_map(config, kind, prefix):
    if entry.hf_name not in ckpt:
      if entry.optional:
        continue
      raise ValueError(
        f"checkpoint {path} is missing tensor {entry.hf_name!r} needed by "
        f"{config.architecture} ({kind})."
      )
    shape = ckpt.shape(entry.hf_name)
    if shape != entry.hf_shape:
      raise ValueError(
        f"tensor {entry.hf_name!r} has shape {shape} in the checkpoint, but "
        f"config.json implies {entry.hf_shape}."
      )
    used.add(entry.hf_name)
    views = entry.to_ours(ckpt.array(entry.hf_name))
    for our_path, view in zip(entry.ours, views, strict=True):
      var = flat[our_path]
      if tuple(view.shape) != tuple(var.shape):
        raise ValueError(
          f"tensor {entry.hf_name!r} maps to shape {view.shape} but "
          f"parameter {'/'.join(map(str, our_path))} has {var.shape}."
        )
      sharding = None if shardings is None else shardings[our_path]
      values[our_path] = _place(view, var.dtype, sharding)
  unused = sorted(set(ckpt.names()) - used)
  if unused:
    logging.info(
      "load_hf_checkpoint: %d tensors not used (e.g. %s)",
      len(unused),
      unused[:3],
    )
  missing = [p for p in flat if p not in values]
  if missing:
    bad = [p for p in missing if p[0] == "transformer"]
    if bad:
      raise ValueError(f"parameters without a checkpoint tensor: {bad[:5]}")
    out_shardings = (
      None if shardings is None else {p: shardings[p] for p in missing}
    )

    def init_missing():
      st = dict(nnx.to_flat_state(nnx.state(make())))
      return {p: st[p].get_value() for p in missing}

    values |= jax.jit(init_missing, out_shardings=out_shardings)()
  new_state = nnx.from_flat_state(
    [(p, var.replace(values[p])) for p, var in flat.items()]
  )
  return config, nnx.merge(graphdef, new_state)


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def _host_array(value) -> np.ndarray:
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value))


def export_hf_checkpoint(
  model: nnx.Module,
  config: ModelConfig,
  path: str | os.PathLike,
  *,
  kind: str = "causal_lm",
  max_shard_bytes: int | None = None,
) -> pathlib.Path:
  """Writes ``model`` as a Hugging Face checkpoint directory.

  Args:
    model: a `CausalLM` (``kind="causal_lm"``) or `RewardModel`
      (``kind="reward"``, exported as ``<Arch>ForSequenceClassification``
      with ``num_labels=1``).
    config: its `ModelConfig` (``architecture`` picks the HF class).
    path: output directory (created).
    kind: ``"causal_lm"`` or ``"reward"``.
    max_shard_bytes: if set, split the weights into
      ``model-0000i-of-0000n.safetensors`` files of at most this size plus
      ``model.safetensors.index.json``.

  Returns:
    The output directory. Tensors keep the parameter dtype. Only process 0
    writes files in a multi-process run.

  Raises:
    ValueError: unsupported ``kind``, or a config the HF class cannot
      express (naming the field).
  """
  if kind not in _EXPORT_KINDS:
    raise ValueError(f"kind must be one of {_EXPORT_KINDS}, got {kind!r}.")
  hf_config = config_to_hf(config, kind=kind)
  flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
  tensors: dict[str, np.ndarray] = {}
  for entry in tensor_map(config, kind):
    missing = [p for p in entry.ours if p not in flat]
    if missing:
      raise ValueError(
        f"model has no parameter {'/'.join(map(str, missing[0]))} for "
        f"tensor {entry.hf_name!r}; is kind={kind!r} right?"
      )
    arrays = [_host_array(flat[p]) for p in entry.ours]
    tensors[entry.hf_name] = np.ascontiguousarray(entry.to_hf(*arrays))
  path = pathlib.Path(path)
  if jax.process_index() != 0:
    return path
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  metadata = {"format": "pt"}
  if max_shard_bytes is None:
    safetensors_numpy.save_file(
      tensors, str(path / "model.safetensors"), metadata=metadata
    )
    return path
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors_numpy.save_file(shard, str(path / fname), metadata=metadata)
    weight_map |= {name: fname for name in shard}
  index = {
    "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
    "weight_map": weight_map,
  }
  (path / "model.safetensors.index.json").write_text(
    json.dumps(index, indent=2) + "\n"
  )
  return path
