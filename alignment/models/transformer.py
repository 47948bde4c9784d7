"""Decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3 / GPT-2 / NeoX).

One module covers the supported families through `ModelConfig` switches:
grouped-query causal attention, RoPE (base ``theta``, Llama-3 or linear
scaling, NeoX partial rotary) or learned absolute positions, RMSNorm or
LayerNorm, SwiGLU or GELU MLPs, sequential or parallel residuals, q/k/v
biases, per-head QK-norm, sliding-window attention, optional ``nnx.remat``
per block, separate parameter / compute dtypes, and dense or blockwise
(FlashAttention-style, memory linear in ``L``) attention for calls without
a KV cache (``ModelConfig.attention_impl``).

Shapes use the glossary letters: ``B`` batch, ``L`` sequence, ``D`` width,
``H`` query heads, ``N`` head dim, ``V`` vocabulary; ``S`` is the KV-cache
length and ``KV`` the number of key/value heads.

Padding and packing: ``attention_mask`` (bool ``[B, L]``, True on real
tokens) hides padded keys; ``segment_ids`` restricts attention to tokens of
the same segment (packed sequences). Positions default to the running count
of real tokens (``cumsum(attention_mask) - 1``, restarting at every segment),
so left-padded prompts get the positions an unpadded prompt would. Without
a cache, a query with no key to attend to (padding before a row's first real
token) gets attention output 0, in both attention implementations.

KV cache: :meth:`Transformer.init_cache` returns a `KVCache`; calling the
model with ``cache=...`` writes the new keys/values at the next slot
(``cache.index``, shared by all rows) and returns ``(hidden, new_cache)``. The same call serves
prefill (``L`` prompt tokens) and decoding (``L = 1``).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from alignment import ops
from alignment.array_types import In, Out, typechecked
from alignment.models.config import ModelConfig
from alignment.models.partitioning import constrain

BATCH_LENGTH_EMBED = ("batch", "length", "embed")
CACHE_AXES = ("batch", "kv_heads", "length", "kv")
"""Logical axes of each layer's keys and values in a `KVCache`."""

_MASK_VALUE = float(np.finfo(np.float32).min)

AUTO_BLOCKWISE_MIN_LENGTH = 256
"""``attention_impl="auto"`` computes attention blockwise from this many
tokens (calls without a KV cache). On a 2-core CPU the blockwise training
step of the ``small`` preset's attention was already as fast as the dense
one at 128 tokens and faster from 256 (see ``bench/attention.py``)."""


def use_blockwise(config: ModelConfig, length: int) -> bool:
  """Whether a call without a KV cache over ``length`` tokens computes
  attention blockwise (``config.attention_impl``)."""
  if config.attention_impl == "auto":
    return length >= AUTO_BLOCKWISE_MIN_LENGTH
  return config.attention_impl == "blockwise"


class KVCache(NamedTuple):
  """Per-layer keys and values of the tokens seen so far.

  Keys and values are stored head-major, one buffer per layer: a decode
  step updates one slot of each buffer in place and attends over it with
  no copy or transpose of the cache (a stacked ``[layers, ...]`` buffer in
  ``[B, S, KV, N]`` order cost a slice and a transpose of every layer's
  cache at every step).

  Attributes:
    k: ``n_layers`` arrays ``[B, KV, S, N]``: keys (after RoPE / QK-norm).
    v: ``n_layers`` arrays ``[B, KV, S, N]``: values.
    key_positions: ``[B, S]`` int32 position id of each cached token; ``-1``
      marks empty slots and padding (never attended to).
    index: int32 scalar, the next slot (the same for every row: rows
      differ only in which slots hold padding, i.e. ``key_positions``).
  """

  k: tuple[Float[Array, "B KV S N"], ...]
  v: tuple[Float[Array, "B KV S N"], ...]
  key_positions: Int[Array, "B S"]
  index: Int[Array, ""]


def init_cache(
  config: ModelConfig, batch: int, max_len: int, dtype=None
) -> KVCache:
  """An empty `KVCache` for ``batch`` rows and ``max_len`` slots.

  Args:
    config: the model's config.
    batch: rows (B).
    max_len: cache slots (S): prompt plus generated tokens must fit (a
      chunk longer than the cache is an error; the caller keeps
      ``index + length <= max_len`` when decoding, as `Sampler` does).
    dtype: storage dtype of keys/values; defaults to ``config.dtype``.

  Returns:
    A `KVCache` of zeros with all slots empty and ``index`` 0.
  """
  if batch < 1 or max_len < 1:
    raise ValueError(
      f"batch and max_len must be >= 1, got {batch} and {max_len}."
    )
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  shape = (batch, config.n_kv_heads, max_len, config.head_dim)
  return KVCache(
    k=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)),
    v=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)),
    key_positions=jnp.full((batch, max_len), -1, jnp.int32),
    index=jnp.zeros((), jnp.int32),
  )


class KeySeq:
  """A stream of PRNG keys folded from one key with a Python counter.

  Modules draw one key from ``nnx.Rngs`` and derive the rest locally:
  every ``rngs.params()`` call updates a counter variable, which under
  ``nnx.eval_shape`` costs time proportional to the trace so far.
  """

  def __init__(self, key: jax.Array):
    self._key = key
    self._count = 0

  def __call__(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._count)
    self._count += 1
    return key

  def child(self) -> "KeySeq":
    return KeySeq(self())


def _param(
  keys: KeySeq | None, config: ModelConfig, shape, axes, init: str = "normal"
) -> nnx.Param:
  """A parameter annotated with logical axes (no eager sharding)."""
  dtype = jnp.dtype(config.param_dtype)
  if init == "normal":
    value = config.init_std * jax.random.normal(keys(), shape, jnp.float32)
    value = value.astype(dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value, eager_sharding=False, out_sharding=tuple(axes))


def _linear(x, kernel, n_in: int = 1):
  """``x [..., *in] @ kernel [*in, *out] -> [..., *out]`` as one 2-D matmul.

  The leading (batch, length) axes and the ``n_in`` contracted axes are
  flattened first. Besides being one plain GEMM in the forward pass, this
  makes autodiff's weight gradient a single-axis contraction
  ``x2d^T @ g2d`` that XLA:CPU runs as a transposed-operand dot with no
  copies; contracting ``[B, L, D]`` over two axes (as ``einsum`` /
  ``x @ w`` on a rank-3 ``x`` does) made it transpose the cotangent
  physically inside the preceding elementwise fusion, ~25% of a backbone's
  backward pass. The reshapes of row-major arrays are free.
  """
  lead = x.shape[: x.ndim - n_in]
  k = math.prod(kernel.shape[:n_in])
  out = kernel.shape[n_in:]
  y = x.reshape(-1, k) @ kernel.reshape(k, -1)
  return y.reshape(*lead, *out)


def _lead(x, ndim: int):
  """Adds leading unit axes so ``x`` has rank ``ndim`` (explicit
  broadcasting, compatible with ``jax_numpy_rank_promotion='raise'``)."""
  return x.reshape((1,) * (ndim - x.ndim) + x.shape)


class Norm(nnx.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32."""

  def __init__(
    self,
    config: ModelConfig,
    dim: int,
    axes=("embed",),
    *,
    rngs: nnx.Rngs | None = None,
  ):
    del rngs
    self.kind = config.norm
    self.eps = config.norm_eps
    self.scale = _param(None, config, (dim,), axes, "ones")
    self.bias = (
      _param(None, config, (dim,), axes, "zeros")
      if config.norm == "layer"
      else None
    )

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "rms":
      x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
    else:
      mean = jnp.mean(x, -1, keepdims=True)
      var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
      x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    x = x * _lead(self.scale[...].astype(jnp.float32), x.ndim)
    if self.bias is not None:
      x = x + _lead(self.bias[...].astype(jnp.float32), x.ndim)
    return x.astype(dtype)


def _rms(x, scale, eps):
  """Per-head RMSNorm (QK-norm) in float32."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)
  return (x * _lead(scale.astype(jnp.float32), x.ndim)).astype(dtype)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """float32 ``[rotary_dim / 2]`` inverse frequencies, scaling applied.

  ``theta^(-2i/d)`` for ``d = rotary_dim``; ``"linear"`` scaling divides by
  ``factor``; ``"llama3"`` scaling divides low frequencies by ``factor`` and
  interpolates the band between ``low_freq_factor`` and
  ``high_freq_factor`` (Llama 3.1).
  """
  dim = config.rotary_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  inv = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def _rope_tables(config: ModelConfig, positions):
  """cos/sin ``[B, L, rotary_dim]`` (the half table repeated twice)."""
  inv = jnp.asarray(rope_inverse_frequencies(config))
  freqs = positions.astype(jnp.float32)[..., None] * inv[None, None]
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(freqs), jnp.sin(freqs)


def _apply_rope(x, cos, sin):
  """Rotates the first ``rotary_dim`` dims of ``x`` [B, L, heads, N]."""
  rot = cos.shape[-1]
  dtype = x.dtype
  x_rot = x[..., :rot].astype(jnp.float32)
  half = rot // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], -1)
  out = x_rot * cos[:, :, None] + rotated * sin[:, :, None]
  out = out.astype(dtype)
  if rot == x.shape[-1]:
    return out
  return jnp.concatenate([out, x[..., rot:]], axis=-1)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with an optional KV cache."""

  def __init__(self, config: ModelConfig, *, keys: KeySeq):
    c = config
    d, h, kv, n = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    self.config = c
    self.q_kernel = _param(keys, c, (d, h, n), ("embed", "heads", "kv"))
    self.k_kernel = _param(keys, c, (d, kv, n), ("embed", "kv_heads", "kv"))
    self.v_kernel = _param(keys, c, (d, kv, n), ("embed", "kv_heads", "kv"))
    self.o_kernel = _param(keys, c, (h, n, d), ("heads", "kv", "embed"))
    if c.qkv_bias:
      self.q_bias = _param(keys, c, (h, n), ("heads", "kv"), "zeros")
      self.k_bias = _param(keys, c, (kv, n), ("kv_heads", "kv"), "zeros")
      self.v_bias = _param(keys, c, (kv, n), ("kv_heads", "kv"), "zeros")
    if c.attn_out_bias:
      self.o_bias = _param(keys, c, (d,), ("embed",), "zeros")
    if c.qk_norm:
      self.q_norm = _param(keys, c, (n,), ("kv",), "ones")
      self.k_norm = _param(keys, c, (n,), ("kv",), "ones")

  def __call__(self, x, cos, sin, allowed, cache=None, query_index=None):
    """Attention for ``x`` [B, L, D].

    Args:
      x: normed input.
      cos: RoPE table [B, L, rotary_dim] (None for learned positions).
      sin: same.
      allowed: bool [B, L, S]: query i may attend key j.
      cache: None, or ``(k_cache, v_cache, index)``: this layer's cache
        buffers ``[B, KV, S, N]`` and the first slot (int32 scalar) the
        ``L`` new keys/values are written to.
      query_index: optional int ``[B, R]`` (no cache): only the queries at
        these indices of ``x`` are computed (keys and values for all
        ``L``); the output is then ``[B, R, D]``.

    Returns:
      ``(out [B, L, D], (k_cache, v_cache) updated, or None)``.
    """
    c = self.config
    dtype = jnp.dtype(c.dtype)
    w = lambda p: p[...].astype(dtype)  # noqa: E731
    cos_q, sin_q, x_q = cos, sin, x
    if query_index is not None:
      take = lambda a: jnp.take_along_axis(a, query_index[..., None], 1)  # noqa: E731
      x_q = take(x)
      allowed = jnp.take_along_axis(allowed, query_index[..., None], 1)
      if cos is not None:
        cos_q, sin_q = take(cos), take(sin)
    q = _linear(x_q, w(self.q_kernel))
    k = _linear(x, w(self.k_kernel))
    v = _linear(x, w(self.v_kernel))
    if c.qkv_bias:
      q = q + _lead(w(self.q_bias), 4)
      k = k + _lead(w(self.k_bias), 4)
      v = v + _lead(w(self.v_bias), 4)
    if c.qk_norm:
      q = _rms(q, self.q_norm[...], c.norm_eps)
      k = _rms(k, self.k_norm[...], c.norm_eps)
    if cos is not None:
      q, k = _apply_rope(q, cos_q, sin_q), _apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    k = constrain(k, ("batch", "length", "kv_heads", "kv"))
    v = constrain(v, ("batch", "length", "kv_heads", "kv"))
    # Head-major layouts ([B, KV, G, L, N] and [B, KV, S, N]) before the
    # attention products: transposing q/k/v (L·N per head) instead of
    # letting XLA transpose the scores (L·S per head) in and out.
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    new_kv = None
    if cache is not None:
      k_cache, v_cache, index = cache
      start = (0, 0, index, 0)
      k_cache = jax.lax.dynamic_update_slice(
        k_cache, k.astype(k_cache.dtype), start
      )
      v_cache = jax.lax.dynamic_update_slice(
        v_cache, v.astype(v_cache.dtype), start
      )
      new_kv = (k_cache, v_cache)
      k, v = k_cache.astype(dtype), v_cache.astype(dtype)
    b, length = q.shape[:2]
    group = c.n_heads // c.n_kv_heads
    q = q.reshape(b, length, c.n_kv_heads, group, c.head_dim)
    q = jnp.transpose(q, (0, 2, 3, 1, 4))
    if cache is not None:
      # Prefill / decode: the dense product over the cache (one query per
      # row when decoding, where tiles would only add work).
      scores = jnp.einsum(
        "bkgln,bksn->bkgls", q, k, preferred_element_type=jnp.float32
      )
      scores = scores * (c.head_dim**-0.5)
      scores = jnp.where(allowed[:, None, None], scores, _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
      out = jnp.einsum("bkgls,bksn->bkgln", probs, v)
    elif use_blockwise(c, length):
      out = ops.blockwise_attention(
        q,
        k,
        v,
        allowed,
        q_block=c.attention_q_block,
        kv_block=c.attention_kv_block,
      )
    else:
      out = ops.dense_attention(q, k, v, allowed)
    out = jnp.transpose(out, (0, 3, 1, 2, 4))
    out = out.reshape(b, length, c.n_heads, c.head_dim)
    out = _linear(out, w(self.o_kernel), 2)
    if c.attn_out_bias:
      out = out + _lead(w(self.o_bias), 3)
    return out, new_kv


_ACTIVATIONS = {
  "swiglu": jax.nn.silu,
  "silu": jax.nn.silu,
  "geglu": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
}


class Mlp(nnx.Module):
  """Gated (SwiGLU/GeGLU) or plain two-layer MLP."""

  def __init__(self, config: ModelConfig, *, keys: KeySeq):
    c = config
    d, f = c.d_model, c.d_ff
    self.config = c
    if c.gated:
      self.gate_kernel = _param(keys, c, (d, f), ("embed", "mlp"))
    self.up_kernel = _param(keys, c, (d, f), ("embed", "mlp"))
    self.down_kernel = _param(keys, c, (f, d), ("mlp", "embed"))
    if c.mlp_bias:
      if c.gated:
        self.gate_bias = _param(keys, c, (f,), ("mlp",), "zeros")
      self.up_bias = _param(keys, c, (f,), ("mlp",), "zeros")
      self.down_bias = _param(keys, c, (d,), ("embed",), "zeros")

  def __call__(self, x):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    w = lambda p: p[...].astype(dtype)  # noqa: E731
    act = _ACTIVATIONS[c.activation]
    up = _linear(x, w(self.up_kernel))
    if c.mlp_bias:
      up = up + _lead(w(self.up_bias), up.ndim)
    if c.gated:
      gate = _linear(x, w(self.gate_kernel))
      if c.mlp_bias:
        gate = gate + _lead(w(self.gate_bias), gate.ndim)
      hidden = act(gate) * up
    else:
      hidden = act(up)
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    out = _linear(hidden, w(self.down_kernel))
    if c.mlp_bias:
      out = out + _lead(w(self.down_bias), out.ndim)
    return out


class Block(nnx.Module):
  """Pre-norm transformer block (sequential or parallel residual)."""

  def __init__(self, config: ModelConfig, *, keys: KeySeq):
    self.parallel = config.parallel_residual
    self.attn_norm = Norm(config, config.d_model)
    self.attn = Attention(config, keys=keys.child())
    self.mlp_norm = Norm(config, config.d_model)
    self.mlp = Mlp(config, keys=keys.child())

  def __call__(self, x, cos, sin, allowed, cache=None, query_index=None):
    """``(x', new_kv)``; with ``query_index`` ``[B, R]``, ``x'`` only at
    those indices (``[B, R, D]``), the block's output there unchanged."""
    attn, new_kv = self.attn(
      self.attn_norm(x), cos, sin, allowed, cache, query_index
    )
    if query_index is not None:
      x = jnp.take_along_axis(x, query_index[..., None], 1)
    if self.parallel:
      x = x + attn + self.mlp(self.mlp_norm(x))
    else:
      x = x + attn
      x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, BATCH_LENGTH_EMBED), new_kv


def _block_forward(block, x, cos, sin, allowed):
  return block(x, cos, sin, allowed)[0]


def default_positions(attention_mask, segment_ids=None):
  """Position ids: running count of real tokens, restarting per segment.

  Args:
    attention_mask: bool [B, L].
    segment_ids: optional int [B, L]; a new segment starts wherever the id
      changes.

  Returns:
    int32 [B, L]; padding positions get the last real position (>= 0).
  """
  m = attention_mask.astype(jnp.int32)
  count = jnp.cumsum(m, axis=1)
  if segment_ids is not None:
    start = jnp.concatenate(
      [
        jnp.ones_like(segment_ids[:, :1], bool),
        segment_ids[:, 1:] != segment_ids[:, :-1],
      ],
      axis=1,
    )
    idx = jnp.broadcast_to(jnp.arange(m.shape[1]), m.shape)
    first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    count = count - jnp.take_along_axis(count - m, first, axis=1)
  return jnp.maximum(count - 1, 0).astype(jnp.int32)


def shared_prefix_allowed(segment_ids, prefix_ids=None):
  """Which keys each query's segment admits, bool ``[B, L, L]``.

  Query ``i`` may attend to key ``j`` when both lie in the same segment or
  when ``j``'s segment is ``prefix_ids[i]`` (a nonzero id). The caller adds
  causality (packed order) and padding. Packing a preference pair as
  ``[prompt | chosen | rejected]`` with segments ``1, 2, 3`` and prefixes
  ``0, 1, 1`` lets both completions read the prompt but not each other.

  Args:
    segment_ids: int ``[B, L]``.
    prefix_ids: optional int ``[B, L]``.
  """
  keys = segment_ids[:, None, :]
  allowed = segment_ids[:, :, None] == keys
  if prefix_ids is not None:
    prefix = jnp.asarray(prefix_ids)[:, :, None]
    allowed = allowed | ((prefix == keys) & (prefix != 0))
  return allowed


def prefix_lengths(attention_mask, segment_ids, prefix_ids):
  """Real tokens in each token's prefix segment, int32 ``[B, L]``.

  Added to `default_positions` when ``prefix_ids`` are given, so that a
  completion packed after its prompt (and after sibling completions) gets
  the positions it has right after the prompt. A prefix segment is meant
  to precede every segment that uses it.
  """
  prefix = jnp.asarray(prefix_ids)
  inside = (segment_ids[:, None, :] == prefix[:, :, None]) & (
    attention_mask[:, None, :]
  )
  count = jnp.sum(inside, axis=-1, dtype=jnp.int32)
  return jnp.where(prefix != 0, count, 0)


class Transformer(nnx.Module):
  """Token embedding, ``n_layers`` blocks and the final norm.

  ``__call__`` returns the final-normed hidden states ``[B, L, D]`` (plus
  the updated cache when a cache is passed).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    keys = KeySeq(rngs.params())
    self.embedding = _param(
      keys, config, (config.vocab_size, config.d_model), ("vocab", "embed")
    )
    if config.positions == "learned":
      self.position_embedding = _param(
        keys, config, (config.max_len, config.d_model), (None, "embed")
      )
    self.layers = nnx.List(
      [Block(config, keys=keys.child()) for _ in range(config.n_layers)]
    )
    self.final_norm = Norm(config, config.d_model)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty `KVCache`; see :func:`init_cache`."""
    return init_cache(self.config, batch, max_len, dtype)

  def embed(self, tokens):
    """Token embeddings ``[B, L, D]`` in the compute dtype."""
    table = self.embedding[...].astype(jnp.dtype(self.config.dtype))
    # Gathered over fsdp first (as FSDP does for any weight): the lookup of
    # batch-sharded tokens then yields batch-sharded rows directly.
    table = constrain(table, ("vocab", None))
    return jnp.take(table, tokens, axis=0)

  @typechecked
  def __call__(
    self,
    tokens: Int[In, "B L"],
    *,
    positions: Int[In, "B L"] | None = None,
    attention_mask: Bool[In, "B L"] | None = None,
    segment_ids: Int[In, "B L"] | None = None,
    prefix_ids: Int[In, "B L"] | None = None,
    cache: KVCache | None = None,
    decode: bool = False,
    output_index: Int[In, "B R"] | None = None,
  ) -> Float[Out, "B _ D"] | tuple[Float[Out, "B L D"], KVCache]:
    """Final-normed hidden states of ``tokens``.

    Args:
      tokens: token ids.
      positions: position ids; default: running count of real tokens
        (continuing from the cache's last position when decoding).
      attention_mask: True on real tokens; False keys are never attended
        to. Default: all True.
      segment_ids: packed-sequence ids; tokens attend only within their
        segment. Not supported with a cache.
      prefix_ids: with ``segment_ids``, the segment each token may also
        attend to (causally, by packed order) as a shared prefix: 0 (or an
        id that does not occur) for none. Several segments may share one
        prefix (tree attention of depth one: a prompt and its sibling
        completions), and no completion sees a sibling. Default positions
        then continue from the prefix (its real-token count is added); see
        `shared_prefix_allowed`. Not supported with a cache.
      cache: a `KVCache` to write this chunk into (prefill or decode).
      decode: must be True only together with ``cache`` (kept for clarity
        at call sites: ``model(tok, cache=c, decode=True)``).
      output_index: optional int ``[B, R]`` (no cache): return only the
        hidden states at these token indices, ``[B, R, D]``, equal to
        ``take_along_axis(hidden, output_index)``. The last block then
        computes its keys and values at every position but its queries,
        attention output, residual and MLP only at these ``R`` (a reward
        model reads one or two positions per row: the last block costs
        about its K/V projections instead of all of it).

    Returns:
      ``[B, L, D]`` hidden states in ``config.dtype`` (``[B, R, D]`` with
      ``output_index``) or, with a cache, ``(hidden, new_cache)``.
    """
    c = self.config
    if decode and cache is None:
      raise ValueError("decode=True needs a cache (model.init_cache(...)).")
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are not supported with a KV cache.")
    if prefix_ids is not None and (segment_ids is None or cache is not None):
      raise ValueError(
        "prefix_ids need segment_ids and are not supported with a KV cache."
      )
    if output_index is not None and cache is not None:
      raise ValueError("output_index is not supported with a KV cache.")
    tokens = jnp.asarray(tokens)
    b, length = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, length), bool)
    attention_mask = jnp.asarray(attention_mask)
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids)
    if positions is None:
      positions = default_positions(attention_mask, segment_ids)
      if prefix_ids is not None:
        positions = positions + prefix_lengths(
          attention_mask, segment_ids, prefix_ids
        )
      if cache is not None:
        positions = (
          positions + (jnp.max(cache.key_positions, axis=1) + 1)[:, None]
        )
    positions = jnp.asarray(positions, jnp.int32)

    x = self.embed(tokens)
    if c.positions == "learned":
      table = self.position_embedding[...].astype(x.dtype)
      x = x + jnp.take(table, positions, axis=0)
      cos = sin = None
    else:
      cos, sin = _rope_tables(c, positions)
    x = constrain(x, BATCH_LENGTH_EMBED)

    if cache is None:
      q_idx = jnp.arange(length)
      allowed = q_idx[None, :, None] >= q_idx[None, None, :]
      allowed = allowed & attention_mask[:, None, :]
      if segment_ids is not None:
        allowed = allowed & shared_prefix_allowed(segment_ids, prefix_ids)
      key_positions = positions
    else:
      if length > cache.key_positions.shape[1]:
        raise ValueError(
          f"a chunk of {length} tokens does not fit a KV cache of "
          f"{cache.key_positions.shape[1]} slots (model.init_cache)."
        )
      q_slot = cache.index + jnp.arange(length)
      new_key_positions = jax.lax.dynamic_update_slice(
        cache.key_positions,
        jnp.where(attention_mask, positions, -1),
        (0, cache.index),
      )
      k_slot = jnp.arange(cache.key_positions.shape[1])
      allowed = (k_slot[None, None, :] <= q_slot[None, :, None]) & (
        new_key_positions[:, None, :] >= 0
      )
      key_positions = new_key_positions
    if c.sliding_window is not None:
      allowed = allowed & (
        positions[:, :, None] - key_positions[:, None, :] < c.sliding_window
      )

    new_k, new_v = [], []
    last = len(self.layers) - 1
    for i, block in enumerate(self.layers):
      if output_index is not None and i == last:
        index = jnp.asarray(output_index, jnp.int32)
        x = block(x, cos, sin, allowed, query_index=index)[0]
      elif cache is not None:
        x, (k_i, v_i) = block(
          x, cos, sin, allowed, (cache.k[i], cache.v[i], cache.index)
        )
        new_k.append(k_i)
        new_v.append(v_i)
      elif c.remat:
        x = nnx.remat(_block_forward)(block, x, cos, sin, allowed)
      else:
        x = block(x, cos, sin, allowed)[0]
    x = self.final_norm(x)
    if cache is None:
      return x
    new_cache = KVCache(
      k=tuple(new_k),
      v=tuple(new_v),
      key_positions=new_key_positions,
      index=cache.index + length,
    )
    return x, new_cache


class CausalLM(nnx.Module):
  """`Transformer` plus an (optionally tied) unembedding.

  Trainers use :meth:`hidden` and :meth:`unembedding` with the fused
  log-prob kernel (``alignment.ops.fused_token_logps``) so the ``[B, L, V]``
  logits are never materialised; ``__call__`` returns full logits for
  sampling and tests.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.transformer = Transformer(config, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _param(
        KeySeq(rngs.params()),
        config,
        (config.d_model, config.vocab_size),
        ("embed", "vocab"),
      )

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty `KVCache`; see :func:`init_cache`."""
    return init_cache(self.config, batch, max_len, dtype)

  def hidden(self, tokens, **kwargs):
    """Final-normed hidden states ``[B, L, D]``; same kwargs as
    `Transformer.__call__` (with a cache: ``(hidden, new_cache)``)."""
    return self.transformer(tokens, **kwargs)

  def unembedding(self) -> Float[Out, "D V"]:
    """The ``[D, V]`` output matrix in the compute dtype (tied: the
    transposed token embedding)."""
    dtype = jnp.dtype(self.config.dtype)
    if self.config.tie_embeddings:
      return self.transformer.embedding[...].astype(dtype).T
    return self.lm_head[...].astype(dtype)

  def logits(self, hidden: Float[In, "B L D"]) -> Float[Out, "B L V"]:
    """float32 logits ``hidden @ unembedding()``."""
    out = jnp.einsum(
      "bld,dv->blv",
      hidden,
      self.unembedding(),
      preferred_element_type=jnp.float32,
    )
    return constrain(out, ("batch", "length", "vocab"))

  def __call__(self, tokens, **kwargs):
    """float32 logits ``[B, L, V]`` (with a cache: ``(logits, cache)``).

    Args:
      tokens: int ``[B, L]`` token ids.
      **kwargs: ``positions``, ``attention_mask``, ``segment_ids``,
        ``prefix_ids``, ``cache``, ``decode`` as in `Transformer.__call__`.
    """
    out = self.hidden(tokens, **kwargs)
    if isinstance(out, tuple):
      return self.logits(out[0]), out[1]
    return self.logits(out)
