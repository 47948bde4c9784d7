"""Model hyperparameters (`ModelConfig`) and named presets.

A `ModelConfig` is a frozen, hashable dataclass: it lives inside the NNX
graph definition, so it must be hashable and is never mutated. Dtypes are
stored as strings (``"float32"``, ``"bfloat16"``) and ``rope_scaling`` as a
hashable read-only mapping, so a config round-trips through
``dataclasses.asdict`` and ``ml_collections.ConfigDict``.

The real-architecture presets copy the public ``config.json`` values of the
named checkpoints; they are meant for memory planning
(`ModelConfig.num_params`) and for loading those checkpoints (see
`alignment.models.hf`), which reads the same values from the checkpoint.
"""

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

NORMS = ("rms", "layer")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "gelu_new", "relu", "silu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
POSITIONS = ("rope", "learned")
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16", "float64")
ATTENTION_IMPLS = ("dense", "blockwise", "auto")


class FrozenMapping(Mapping):
  """A read-only, hashable ``dict`` (for ``ModelConfig.rope_scaling``)."""

  def __init__(self, *args, **kwargs):
    self._items = dict(*args, **kwargs)

  def __getitem__(self, key):
    return self._items[key]

  def __iter__(self) -> Iterator:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._items.items())))

  def __eq__(self, other) -> bool:
    return isinstance(other, Mapping) and dict(self) == dict(other)

  def __repr__(self) -> str:
    return repr(self._items)

  def __deepcopy__(self, memo):
    return dict(self._items)


def _dtype_name(value: Any, field: str) -> str:
  try:
    name = np.dtype(value).name
  except TypeError as e:
    raise ValueError(f"{field} must be one of {DTYPES}, got {value!r}.") from e
  if name not in DTYPES:
    raise ValueError(f"{field} must be one of {DTYPES}, got {value!r}.")
  return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a decoder-only transformer.

  Attributes:
    vocab_size: V, number of token ids.
    d_model: D, residual stream width.
    n_layers: number of transformer blocks.
    n_heads: H, query heads.
    n_kv_heads: key/value heads (grouped-query attention); divides
      ``n_heads``.
    head_dim: N, width of one head (not necessarily ``d_model / n_heads``,
      e.g. Qwen3).
    d_ff: hidden width of the MLP.
    max_len: longest supported sequence (size of learned position tables;
      informative for RoPE).
    norm: ``"rms"`` (RMSNorm, Llama) or ``"layer"`` (LayerNorm, GPT-2/NeoX).
    norm_eps: epsilon inside the norms.
    activation: ``"swiglu"`` / ``"geglu"`` (gated MLPs) or ``"gelu"`` (erf),
      ``"gelu_new"`` (tanh approximation, GPT-2), ``"relu"``, ``"silu"``.
    positions: ``"rope"`` (rotary) or ``"learned"`` (absolute, GPT-2).
    rope_theta: RoPE base wavelength.
    rope_scaling: ``None`` or a mapping with ``rope_type`` in
      ``("linear", "llama3")`` and its fields (``factor``;
      ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings`` for Llama 3).
    rotary_pct: fraction of each head's dimensions that is rotated
      (GPT-NeoX partial rotary); the rest pass through.
    parallel_residual: ``x + attn(ln1(x)) + mlp(ln2(x))`` (GPT-NeoX) instead
      of the sequential residual.
    qkv_bias: biases on the q/k/v projections (Qwen2, GPT-2, NeoX).
    attn_out_bias: bias on the attention output projection.
    mlp_bias: biases on the MLP projections.
    qk_norm: RMS-normalise queries and keys per head before RoPE (Qwen3).
    sliding_window: if set, a query attends only to keys whose position is
      within the last ``sliding_window`` positions (Mistral v0.1).
    tie_embeddings: the unembedding is the transposed token embedding.
    param_dtype: dtype of the stored parameters.
    dtype: compute dtype of activations and matmuls; norms, softmax and RoPE
      run in float32.
    remat: rematerialise (gradient-checkpoint) each block.
    attention_impl: how calls without a KV cache (training, scoring)
      compute attention: ``"dense"`` (the ``[B, H, L, L]`` scores, memory
      growing as ``L²``), ``"blockwise"`` (``ops.blockwise_attention``:
      online softmax over ``attention_q_block x attention_kv_block``
      tiles with a recomputing FlashAttention-2 backward pass; the same
      values and gradients in memory linear in ``L``) or ``"auto"``
      (blockwise from ``transformer.AUTO_BLOCKWISE_MIN_LENGTH`` tokens,
      dense below). Prefill and decoding with a KV cache always use the
      dense path. Not a Hugging Face field: imports get the default.
    attention_q_block: query rows per tile of the blockwise path.
    attention_kv_block: key/value columns per tile of the blockwise path.
    init_std: standard deviation of the normal initialiser of kernels and
      embeddings.
    pad_id: padding token id.
    bos_id: beginning-of-sequence id.
    eos_id: end-of-sequence id.
    architecture: the Hugging Face family these weights follow, which names
      the tensors on import/export (``"llama"``, ``"mistral"``, ``"qwen2"``,
      ``"qwen3"``, ``"gpt2"``, ``"gpt_neox"``).
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  max_len: int = 2048
  norm: str = "rms"
  norm_eps: float = 1e-5
  activation: str = "swiglu"
  positions: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  rotary_pct: float = 1.0
  parallel_residual: bool = False
  qkv_bias: bool = False
  attn_out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"
  attention_q_block: int = 128
  attention_kv_block: int = 128
  init_std: float = 0.02
  pad_id: int = 0
  bos_id: int | None = 1
  eos_id: int = 2
  architecture: str = "llama"

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
    set_("dtype", _dtype_name(self.dtype, "dtype"))
    if self.rope_scaling is not None:
      if not isinstance(self.rope_scaling, Mapping):
        raise ValueError(
          f"rope_scaling must be None or a mapping, got {self.rope_scaling}"
        )
      set_("rope_scaling", FrozenMapping(self.rope_scaling))
    for name in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "n_kv_heads",
      "head_dim",
      "d_ff",
      "max_len",
      "attention_q_block",
      "attention_kv_block",
    ):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f"n_heads ({self.n_heads}) must be a multiple of "
        f"n_kv_heads ({self.n_kv_heads})."
      )
    choices = (
      ("norm", NORMS),
      ("activation", ACTIVATIONS),
      ("positions", POSITIONS),
      ("architecture", ARCHITECTURES),
      ("attention_impl", ATTENTION_IMPLS),
    )
    for name, valid in choices:
      if getattr(self, name) not in valid:
        raise ValueError(
          f"{name} must be one of {valid}, got {getattr(self, name)!r}."
        )
    if not 0.0 < self.rotary_pct <= 1.0:
      raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}.")
    if self.positions == "rope" and self.rotary_dim % 2:
      raise ValueError(
        f"int(head_dim * rotary_pct) = {self.rotary_dim} must be even."
      )
    if self.norm_eps <= 0:
      raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}.")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(
        f"sliding_window must be None or >= 1, got {self.sliding_window}."
      )
    if self.rope_scaling is not None:
      kind = self.rope_scaling.get(
        "rope_type", self.rope_scaling.get("type", "default")
      )
      if kind not in ROPE_TYPES:
        raise ValueError(
          f"rope_scaling rope_type must be one of {ROPE_TYPES}, got {kind!r}."
        )

  @property
  def rotary_dim(self) -> int:
    """Number of rotated dimensions per head (NeoX ``rotary_ndims``)."""
    return int(self.head_dim * self.rotary_pct)

  @property
  def gated(self) -> bool:
    """Whether the MLP has a gate projection (SwiGLU/GeGLU)."""
    return self.activation in GATED_ACTIVATIONS

  def replace(self, **overrides) -> "ModelConfig":
    """Returns a copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    """Plain ``dict`` (``rope_scaling`` as ``dict``), e.g. for ConfigDict."""
    out = dataclasses.asdict(self)
    if self.rope_scaling is not None:
      out["rope_scaling"] = dict(self.rope_scaling)
    return out

  def num_params(self, *, include_unembedding: bool = True) -> int:
    """Parameter count of the `CausalLM` built from this config.

    Args:
      include_unembedding: count the separate output matrix when the
        embeddings are untied.

    Returns:
      The exact number of scalars in the model's parameters.
    """
    d, n = self.d_model, self.head_dim
    q, kv = self.n_heads * n, self.n_kv_heads * n
    attn = d * (q + 2 * kv) + q * d
    attn += (q + 2 * kv) * self.qkv_bias + d * self.attn_out_bias
    attn += 2 * n * self.qk_norm
    n_in = 2 if self.gated else 1
    mlp = (n_in + 1) * d * self.d_ff
    mlp += (n_in * self.d_ff + d) * self.mlp_bias
    norm = d * (2 if self.norm == "layer" else 1)
    block = attn + mlp + 2 * norm
    total = self.n_layers * block + norm + self.vocab_size * d
    if self.positions == "learned":
      total += self.max_len * d
    if include_unembedding and not self.tie_embeddings:
      total += self.vocab_size * d
    return total

  def bytes_per_param(self) -> int:
    """Bytes of one stored parameter (``param_dtype``)."""
    return np.dtype(_numpy_dtype(self.param_dtype)).itemsize


def _numpy_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes  # noqa: PLC0415

    return ml_dtypes.bfloat16
  return np.dtype(name)


def _llama(**kw) -> ModelConfig:
  kw.setdefault("head_dim", kw["d_model"] // kw["n_heads"])
  return ModelConfig(architecture=kw.pop("architecture", "llama"), **kw)


def _gpt_neox(**kw) -> ModelConfig:
  return ModelConfig(
    head_dim=kw["d_model"] // kw["n_heads"],
    n_kv_heads=kw["n_heads"],
    norm="layer",
    activation="gelu",
    rotary_pct=0.25,
    parallel_residual=True,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    max_len=2048,
    pad_id=1,
    bos_id=0,
    eos_id=0,
    architecture="gpt_neox",
    **kw,
  )


def _llama3_scaling(factor: float, original: int) -> dict[str, Any]:
  return {
    "rope_type": "llama3",
    "factor": factor,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": original,
  }


PRESETS: dict[str, ModelConfig] = {
  # Byte-level toy model: 256 bytes + pad/bos/eos/unk (ByteTokenizer).
  "tiny": _llama(
    vocab_size=260,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=128,
    max_len=512,
    pad_id=256,
    bos_id=257,
    eos_id=258,
    tie_embeddings=True,
  ),
  # About 40M parameters (16M of them embeddings), Llama layout.
  "small": _llama(
    vocab_size=32000,
    d_model=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=4,
    d_ff=1408,
    max_len=2048,
    tie_embeddings=True,
    pad_id=0,
    bos_id=1,
    eos_id=2,
  ),
  "gpt2": ModelConfig(
    vocab_size=50257,
    d_model=768,
    n_layers=12,
    n_heads=12,
    n_kv_heads=12,
    head_dim=64,
    d_ff=3072,
    max_len=1024,
    norm="layer",
    activation="gelu_new",
    positions="learned",
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
    pad_id=50256,
    bos_id=50256,
    eos_id=50256,
    architecture="gpt2",
  ),
  "pythia-160m": _gpt_neox(
    vocab_size=50304, d_model=768, n_layers=12, n_heads=12, d_ff=3072
  ),
  "pythia-1b": _gpt_neox(
    vocab_size=50304, d_model=2048, n_layers=16, n_heads=8, d_ff=8192
  ),
  "pythia-6.9b": _gpt_neox(
    vocab_size=50432, d_model=4096, n_layers=32, n_heads=32, d_ff=16384
  ),
  "llama-3.2-1b": _llama(
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    d_ff=8192,
    max_len=131072,
    rope_theta=500000.0,
    rope_scaling=_llama3_scaling(32.0, 8192),
    tie_embeddings=True,
    pad_id=128004,
    bos_id=128000,
    eos_id=128001,
  ),
  "llama-3-8b": _llama(
    vocab_size=128256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    d_ff=14336,
    max_len=8192,
    rope_theta=500000.0,
    pad_id=128001,
    bos_id=128000,
    eos_id=128001,
  ),
  "llama-3-70b": _llama(
    vocab_size=128256,
    d_model=8192,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    d_ff=28672,
    max_len=8192,
    rope_theta=500000.0,
    pad_id=128001,
    bos_id=128000,
    eos_id=128001,
  ),
  "qwen2.5-0.5b": _llama(
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    d_ff=4864,
    max_len=32768,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=True,
    pad_id=151643,
    bos_id=151643,
    eos_id=151643,
    architecture="qwen2",
  ),
  "qwen2.5-7b": _llama(
    vocab_size=152064,
    d_model=3584,
    n_layers=28,
    n_heads=28,
    n_kv_heads=4,
    d_ff=18944,
    max_len=131072,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    pad_id=151643,
    bos_id=151643,
    eos_id=151643,
    architecture="qwen2",
  ),
  "qwen3-0.6b": _llama(
    vocab_size=151936,
    d_model=1024,
    n_layers=28,
    n_heads=16,
    n_kv_heads=8,
    head_dim=128,
    d_ff=3072,
    max_len=40960,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qk_norm=True,
    tie_embeddings=True,
    pad_id=151643,
    bos_id=151643,
    eos_id=151645,
    architecture="qwen3",
  ),
  "qwen3-8b": _llama(
    vocab_size=151936,
    d_model=4096,
    n_layers=36,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    d_ff=12288,
    max_len=40960,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qk_norm=True,
    pad_id=151643,
    bos_id=151643,
    eos_id=151645,
    architecture="qwen3",
  ),
  "tinyllama-1.1b": _llama(
    vocab_size=32000,
    d_model=2048,
    n_layers=22,
    n_heads=32,
    n_kv_heads=4,
    d_ff=5632,
    max_len=2048,
    pad_id=0,
    bos_id=1,
    eos_id=2,
  ),
  "smollm-135m": _llama(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    max_len=2048,
    tie_embeddings=True,
    pad_id=0,
    bos_id=0,
    eos_id=0,
  ),
  "mistral-7b": _llama(
    vocab_size=32000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    d_ff=14336,
    max_len=32768,
    sliding_window=4096,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    architecture="mistral",
  ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns preset ``name`` with some fields replaced.

  Args:
    name: a key of `PRESETS`.
    **overrides: `ModelConfig` fields to change (e.g. ``param_dtype=
      "bfloat16"``, ``remat=True``, ``n_layers=2``).

  Returns:
    The validated `ModelConfig`.

  Raises:
    ValueError: unknown preset name (the message lists the valid ones) or
      unknown/invalid field.
  """
  if name not in PRESETS:
    raise ValueError(
      f"Unknown model preset {name!r}; valid presets: {sorted(PRESETS)}."
    )
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
      f"Unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}."
    )
  return dataclasses.replace(PRESETS[name], **overrides)


def memory_gib(config: ModelConfig) -> float:
  """GiB taken by the parameters alone in ``config.param_dtype``."""
  return config.num_params() * config.bytes_per_param() / 2**30
