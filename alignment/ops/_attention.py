"""Memory-efficient (FlashAttention-style) attention in pure JAX.

``blockwise_attention(q, k, v, allowed)`` equals masked softmax attention
``softmax(q k^T / sqrt(N), where allowed) v`` but never holds the
``[B, H, L, S]`` scores, neither in the forward pass nor among the values
autodiff saves for the backward pass. Queries are cut into blocks of
``q_block`` rows and keys/values into blocks of ``kv_block`` columns; the
forward pass runs an online softmax over the key blocks of each query block
(running row maximum ``m``, normaliser ``l`` and un-normalised output) and
saves only the output and the per-row log-sum-exp ``m + log l``. The
backward pass (a ``jax.custom_vjp``) is FlashAttention-2's: for each key
block it recomputes the probabilities ``P = exp(S - lse)`` of every query
block and accumulates

  dV_j += P^T dO,  dP = dO V_j^T,  dS = P * (dP - D),
  dQ_i += dS K_j / sqrt(N),  dK_j += dS^T Q_i / sqrt(N),

with ``D = rowsum(dO * O)`` computed once. Blocks in which no query may see
any key (above the causal diagonal, across packed segments) are skipped
(``lax.cond``), so a causal mask costs about half the matmuls.

Extra memory is a few ``[B, H, q_block, kv_block]`` float32 tiles plus
float32 gradient accumulators the size of ``q``, ``k`` and ``v``, against
``O(B H L S)`` for the dense product (whose scores and probabilities a
training step keeps for every layer). The price is one recomputation of the
``Q K^T`` products in the backward pass.

References:
  Dao et al., `FlashAttention: Fast and Memory-Efficient Exact Attention
  with IO-Awareness <https://arxiv.org/abs/2205.14135>`_, 2022;
  Dao, `FlashAttention-2: Faster Attention with Better Parallelism and Work
  Partitioning <https://arxiv.org/abs/2307.08691>`_, 2023 (Algorithms 1-2);
  Rabe and Staats, `Self-attention Does Not Need O(n^2) Memory
  <https://arxiv.org/abs/2112.05682>`_, 2021.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float

from alignment.array_types import In, Out, typechecked

__all__ = [
  "ATTENTION_DEFAULT_KV_BLOCK",
  "ATTENTION_DEFAULT_Q_BLOCK",
  "blockwise_attention",
  "dense_attention",
]

ATTENTION_DEFAULT_Q_BLOCK = 128
"""Default query rows per block; see ``bench/attention.py``."""

ATTENTION_DEFAULT_KV_BLOCK = 128
"""Default key/value columns per block; see ``bench/attention.py``."""

_F32 = jnp.float32
_MASK_VALUE = float(np.finfo(np.float32).min)


class _Static(NamedTuple):
  """Hashable static configuration of the kernel."""

  q_block: int  # query rows per block (divides the padded L)
  kv_block: int  # key columns per block (divides the padded S)
  scale: float  # N ** -0.5


def _slice(x, block: int, size: int, axis: int):
  return jax.lax.dynamic_slice_in_dim(x, block * size, size, axis=axis)


def _scores(q_i, k_j, a_ij, scale):
  """Scaled float32 scores ``[B, KV, G, q, s]``, ``-inf`` where masked."""
  s = jnp.einsum("bkgqn,bksn->bkgqs", q_i, k_j, preferred_element_type=_F32)
  return jnp.where(a_ij[:, None, None], s * scale, -jnp.inf)


def _skip_unless(active, fn, carry):
  """``fn()`` if any entry of ``active`` is True, else ``carry``."""
  return jax.lax.cond(jnp.any(active), fn, lambda: carry)


def _fwd_q_block(q_i, k, v, a_i, st: _Static):
  """Online softmax of one query block over all key blocks.

  Returns ``(out_i [B, KV, G, q, N] in q's dtype, lse_i [B, KV, G, q])``;
  rows with no allowed key get output 0 and ``lse = +inf`` (so the
  backward pass's ``exp(s - lse)`` is 0 there).
  """
  n_kv = k.shape[2] // st.kv_block
  m0 = jnp.full(q_i.shape[:-1], -jnp.inf, _F32)
  acc0 = jnp.zeros(q_i.shape, _F32)

  def step(carry, j):
    m, l, acc = carry
    a_ij = _slice(a_i, j, st.kv_block, 2)

    def run():
      k_j = _slice(k, j, st.kv_block, 2)
      v_j = _slice(v, j, st.kv_block, 2)
      s = _scores(q_i, k_j, a_ij, st.scale)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      # A row with nothing allowed so far keeps m = -inf; shift it by 0 so
      # that exp(-inf - shift) is 0 instead of NaN.
      shift = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      p = jnp.exp(s - shift[..., None])
      rescale = jnp.exp(m - shift)
      pv = jnp.einsum(
        "bkgqs,bksn->bkgqn",
        p.astype(v_j.dtype),
        v_j,
        preferred_element_type=_F32,
      )
      return (
        m_new,
        l * rescale + jnp.sum(p, axis=-1),
        acc * rescale[..., None] + pv,
      )

    return _skip_unless(a_ij, run, carry), None

  init = (m0, jnp.zeros_like(m0), acc0)
  if n_kv == 1:
    m, l, acc = step(init, 0)[0]
  else:
    (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(n_kv))
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  out = jnp.where(seen[..., None], acc / safe_l[..., None], 0.0)
  lse = jnp.where(seen, m + jnp.log(safe_l), jnp.inf)
  return out.astype(q_i.dtype), lse


def _forward(q, k, v, allowed, st: _Static):
  """``(out [B, KV, G, L, N], lse [B, KV, G, L])`` over padded inputs."""
  n_q = q.shape[3] // st.q_block
  if n_q == 1:
    return _fwd_q_block(q, k, v, allowed, st)

  def body(i, carry):
    out, lse = carry
    q_i = _slice(q, i, st.q_block, 3)
    a_i = _slice(allowed, i, st.q_block, 1)
    out_i, lse_i = _fwd_q_block(q_i, k, v, a_i, st)
    start = i * st.q_block
    out = jax.lax.dynamic_update_slice_in_dim(out, out_i, start, axis=3)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_i, start, axis=3)
    return out, lse

  out = jnp.zeros(q.shape, q.dtype)
  lse = jnp.zeros(q.shape[:-1], _F32)
  return jax.lax.fori_loop(0, n_q, body, (out, lse))


def _bwd_kv_block(j, dq, q, k, v, allowed, lse, do, delta, st: _Static):
  """Gradients from key block ``j``: ``(dq updated, dk_j, dv_j)`` (f32)."""
  n_q = q.shape[3] // st.q_block
  k_j = _slice(k, j, st.kv_block, 2)
  v_j = _slice(v, j, st.kv_block, 2)
  a_j = _slice(allowed, j, st.kv_block, 2)
  zeros = jnp.zeros(k_j.shape, _F32)

  def step(carry, i):
    dq, dk_j, dv_j = carry
    a_ij = _slice(a_j, i, st.q_block, 1)

    def run():
      q_i = _slice(q, i, st.q_block, 3)
      do_i = _slice(do, i, st.q_block, 3)
      lse_i = _slice(lse, i, st.q_block, 3)
      delta_i = _slice(delta, i, st.q_block, 3)
      s = _scores(q_i, k_j, a_ij, st.scale)
      p = jnp.exp(s - lse_i[..., None])
      dv_new = dv_j + jnp.einsum(
        "bkgqs,bkgqn->bksn",
        p.astype(do_i.dtype),
        do_i,
        preferred_element_type=_F32,
      )
      dp = jnp.einsum(
        "bkgqn,bksn->bkgqs", do_i, v_j, preferred_element_type=_F32
      )
      ds = p * (dp - delta_i[..., None]) * st.scale
      dq_i = _slice(dq, i, st.q_block, 3) + jnp.einsum(
        "bkgqs,bksn->bkgqn",
        ds.astype(k_j.dtype),
        k_j,
        preferred_element_type=_F32,
      )
      dk_new = dk_j + jnp.einsum(
        "bkgqs,bkgqn->bksn",
        ds.astype(q_i.dtype),
        q_i,
        preferred_element_type=_F32,
      )
      start = i * st.q_block
      dq_new = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, start, axis=3)
      return dq_new, dk_new, dv_new

    return _skip_unless(a_ij, run, carry), None

  init = (dq, zeros, zeros)
  if n_q == 1:
    return step(init, 0)[0]
  return jax.lax.scan(step, init, jnp.arange(n_q))[0]


def _backward(q, k, v, allowed, out, lse, do, st: _Static):
  """FlashAttention-2 backward: key blocks outer, query blocks inner."""
  delta = jnp.sum(do.astype(_F32) * out.astype(_F32), axis=-1)
  dq = jnp.zeros(q.shape, _F32)
  n_kv = k.shape[2] // st.kv_block
  args = (q, k, v, allowed, lse, do, delta, st)
  if n_kv == 1:
    return _bwd_kv_block(0, dq, *args)

  def body(j, carry):
    dq, dk, dv = carry
    dq, dk_j, dv_j = _bwd_kv_block(j, dq, *args)
    start = j * st.kv_block
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, start, axis=2)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, start, axis=2)
    return dq, dk, dv

  dkv = jnp.zeros(k.shape, _F32)
  return jax.lax.fori_loop(0, n_kv, body, (dq, dkv, dkv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, allowed, st: _Static):
  return _forward(q, k, v, allowed, st)[0]


def _attention_fwd(q, k, v, allowed, st: _Static):
  out, lse = _forward(q, k, v, allowed, st)
  return out, (q, k, v, allowed, out, lse)


def _attention_bwd(st: _Static, residuals, do):
  q, k, v, allowed, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, allowed, out, lse, do.astype(q.dtype), st)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_to(x, axis: int, size: int, value=0):
  extra = size - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _check_blocks(q_block: int, kv_block: int) -> None:
  for name, value in (("q_block", q_block), ("kv_block", kv_block)):
    if int(value) != value or value < 1:
      raise ValueError(
        f"blockwise_attention: {name} must be an integer >= 1, got {value!r}."
      )


@typechecked
def blockwise_attention(
  q: Float[In, "B KV G L N"],
  k: Float[In, "B KV S N"],
  v: Float[In, "B KV S N"],
  allowed: Bool[In, "B L S"],
  *,
  q_block: int = ATTENTION_DEFAULT_Q_BLOCK,
  kv_block: int = ATTENTION_DEFAULT_KV_BLOCK,
) -> Float[Out, "B KV G L N"]:
  r"""Masked grouped-query softmax attention, computed block by block.

  .. math::
    o_{i} = \sum_{j \in A(i)} \frac{\exp(q_i \cdot k_j / \sqrt{N})}
      {\sum_{j' \in A(i)} \exp(q_i \cdot k_{j'} / \sqrt{N})} v_j,
    \qquad A(i) = \{j : \mathrm{allowed}_{ij}\}

  for every batch row, key/value head and query head of its group, with
  ``o_i = 0`` when ``A(i)`` is empty (padded query rows). Same values and
  gradients (w.r.t. ``q``, ``k``, ``v``) as :func:`dense_attention`, in
  ``O(B H L N + B L S)`` memory instead of ``O(B H L S)``: an online softmax
  over key blocks in the forward pass, FlashAttention-2's recomputing
  backward pass (a ``jax.custom_vjp``; FlashAttention-2 Algorithms 1 and
  2). Empty rows give output 0 and zero gradients, never NaN. Blocks with
  no allowed entry are skipped.

  The ``Q K^T`` and ``P V`` matmuls run in the inputs' dtype with float32
  accumulation; the softmax statistics are float32; the output has ``q``'s
  dtype.

  Args:
    q: queries ``[B, KV, G, L, N]``: ``G = H / KV`` query heads share each
      key/value head (grouped-query attention).
    k: keys ``[B, KV, S, N]``.
    v: values ``[B, KV, S, N]``.
    allowed: bool ``[B, L, S]``, True where query ``i`` may attend key
      ``j`` (causal, padding, packed-segment and sliding-window masks
      combined).
    q_block: query rows per block, >= 1. ``L`` is zero-padded internally
      to a multiple of ``min(q_block, L)`` (padded rows are masked).
    kv_block: key columns per block, >= 1. ``S`` is padded likewise to a
      multiple of ``min(kv_block, S)`` (padded keys are masked).

  Returns:
    ``[B, KV, G, L, N]`` attention output in ``q``'s dtype.

  References:
    Dao, `FlashAttention-2: Faster Attention with Better Parallelism and
    Work Partitioning <https://arxiv.org/abs/2307.08691>`_, 2023.
  """
  _check_blocks(q_block, kv_block)
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  allowed = jnp.asarray(allowed)
  length, keys, head_dim = q.shape[3], k.shape[2], q.shape[4]
  qb, kb = min(int(q_block), length), min(int(kv_block), keys)
  padded_l = -(-length // qb) * qb
  padded_s = -(-keys // kb) * kb
  st = _Static(q_block=qb, kv_block=kb, scale=float(head_dim) ** -0.5)
  out = _attention(
    _pad_to(q, 3, padded_l),
    _pad_to(k, 2, padded_s),
    _pad_to(v, 2, padded_s),
    _pad_to(_pad_to(allowed, 1, padded_l, False), 2, padded_s, False),
    st,
  )
  return out[:, :, :, :length]


def _dense_forward(q, k, v, allowed):
  """Output and the float32 probabilities (0 on rows with no allowed key)."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bkgln,bksn->bkgls", q, k, preferred_element_type=_F32)
  scores = jnp.where(allowed[:, None, None], scores * scale, _MASK_VALUE)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  expd = jnp.exp(scores - peak)
  # Rows with no allowed key are zeroed through the per-row normaliser
  # ([..., L, 1]), not by a select over the [..., L, S] probabilities, which
  # cost one more pass over the scores (tiny DPO step's [8, 2, 2, 192, 192]
  # scores: forward + backward about 1.2x faster without it, XLA:CPU).
  seen = jnp.any(allowed, axis=-1)[:, None, None, :, None]
  probs = expd * (seen / jnp.sum(expd, axis=-1, keepdims=True))
  out = jnp.einsum("bkgls,bksn->bkgln", probs.astype(v.dtype), v)
  return out.astype(q.dtype), probs


@jax.custom_vjp
def _dense(q, k, v, allowed):
  return _dense_forward(q, k, v, allowed)[0]


def _dense_fwd(q, k, v, allowed):
  out, probs = _dense_forward(q, k, v, allowed)
  return out, (q, k, v, allowed, out, probs)


def _dense_bwd(residuals, do):
  q, k, v, allowed, out, probs = residuals
  scale = q.shape[-1] ** -0.5
  dv = jnp.einsum(
    "bkgls,bkgln->bksn", probs.astype(do.dtype), do, preferred_element_type=_F32
  )
  dp = jnp.einsum("bkgln,bksn->bkgls", do, v, preferred_element_type=_F32)
  delta = jnp.sum(do.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
  ds = probs * (dp - delta) * scale
  dq = jnp.einsum(
    "bkgls,bksn->bkgln", ds.astype(k.dtype), k, preferred_element_type=_F32
  )
  dk = jnp.einsum(
    "bkgls,bkgln->bksn", ds.astype(q.dtype), q, preferred_element_type=_F32
  )
  mask_cotangent = np.zeros(allowed.shape, jax.dtypes.float0)
  return (
    dq.astype(q.dtype),
    dk.astype(k.dtype),
    dv.astype(v.dtype),
    mask_cotangent,
  )


_dense.defvjp(_dense_fwd, _dense_bwd)


@typechecked
def dense_attention(
  q: Float[In, "B KV G L N"],
  k: Float[In, "B KV S N"],
  v: Float[In, "B KV S N"],
  allowed: Bool[In, "B L S"],
) -> Float[Out, "B KV G L N"]:
  r"""The same attention with the full ``[B, KV, G, L, S]`` scores.

  The reference :func:`blockwise_attention` is tested against, and the
  model's ``attention_impl="dense"`` training path: float32 scores, masked
  entries set to the float32 minimum, float32 probabilities cast to ``v``'s
  dtype for the ``P V`` product. Rows with no allowed key (whose softmax
  would be uniform over all ``S`` keys) are set to 0, so they give zero
  gradients.

  The backward pass is written out (a ``jax.custom_vjp`` that keeps the
  float32 probabilities ``P`` and the output ``O``):

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
    dQ = dS K / sqrt(N),  dK = dS^T Q / sqrt(N),

  four products and one elementwise pass, where autodiff of the masked
  softmax adds the mask's select, the max-shift and the normaliser's
  broadcasts to every ``[B, KV, G, L, S]`` cotangent (``bench/attention.py``
  measures the difference; at the tiny model's head size 16 the gradient
  is about 1.5x faster).

  Args:
    q: queries ``[B, KV, G, L, N]``.
    k: keys ``[B, KV, S, N]``.
    v: values ``[B, KV, S, N]``.
    allowed: bool ``[B, L, S]``, True where query ``i`` may attend key
      ``j``.

  Returns:
    ``[B, KV, G, L, N]`` attention output in ``q``'s dtype.
  """
  return _dense(
    jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed)
  )
