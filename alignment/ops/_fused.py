"""Fused LM head + log-softmax: per-token log-probs without ``[B, T, V]``.

``fused_token_logps(hidden, unembedding, targets)`` equals
``token_logps(hidden @ unembedding / temperature, targets)`` but never holds
the ``[B, T, V]`` logits, in the forward pass or in the backward pass. The
``B·T`` rows are cut into chunks of ``chunk_size`` rows and the vocabulary
into chunks of ``vocab_chunk_size`` columns; each ``[chunk, vocab_chunk]``
tile of logits is computed, reduced (online log-sum-exp) and dropped. The
backward pass (a ``jax.custom_vjp``) recomputes each tile from the saved
per-row log-sum-exp and accumulates the gradients of the hidden states and of
the unembedding tile by tile. Peak extra memory is a few tiles plus one
``[V, D]`` float32 gradient accumulator, instead of several ``[B, T, V]``
arrays; the price is one extra ``[B·T, D] x [D, V]`` matmul (the recompute).

When few rows are computed, tiling costs more than it saves (on XLA:CPU
the loops over row chunks and vocabulary tiles are slower than one large
product, and the recompute is a fourth matmul). So when the computed rows
fit ``dense_rows`` (by default as many as fit 32 MiB of float32 logits)
they take a *dense head* instead: one untiled ``[rows, D] x [D, V]``
product whose logits are kept from the forward pass for the backward pass
(three matmuls, no loops).

Internally the unembedding is used as ``W^T [V, D]`` (a tied embedding
table as it is stored), so vocabulary tiles are contiguous row blocks.

References:
  Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
  <https://arxiv.org/abs/2411.09009>`_, 2024 (the same idea as a Triton
  kernel); Hsu et al., `Liger Kernel <https://arxiv.org/abs/2410.10989>`_,
  2024 (chunked fused linear cross-entropy).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Int

from alignment.array_types import In, Out, typechecked

__all__ = [
  "fused_token_logps",
  "fused_dense_rows",
  "FUSED_DEFAULT_CHUNK_SIZE",
  "FUSED_DEFAULT_VOCAB_CHUNK_SIZE",
  "FUSED_DENSE_LOGITS_BYTES",
]

FUSED_DEFAULT_CHUNK_SIZE = 1024
"""Default rows (tokens) per tile; see ``bench/logprobs.py``."""

FUSED_DEFAULT_VOCAB_CHUNK_SIZE = 4096
"""Default vocabulary columns per tile; see ``bench/logprobs.py``."""

FUSED_DENSE_LOGITS_BYTES = 32 * 1024 * 1024
"""Default size of the dense head's kept float32 logits (see
``fused_token_logps``'s ``dense_rows`` and ``bench/logprobs.py``)."""


def fused_dense_rows(vocab_size: int, max_rows: int | None = None) -> int:
  """Default ``dense_rows`` of ``fused_token_logps``.

  As many rows as fit ``FUSED_DENSE_LOGITS_BYTES`` of float32 logits at
  ``vocab_size``, and at most ``max_rows``: pass an upper bound on the
  number of computed positions when one is known (e.g. batch x maximum
  completion length), so that the head is not wider than the work.
  """
  if vocab_size < 1:
    raise ValueError(
      f"fused_dense_rows: vocab_size must be >= 1, got {vocab_size}."
    )
  rows = FUSED_DENSE_LOGITS_BYTES // (4 * vocab_size)
  if max_rows is not None:
    if max_rows < 0:
      raise ValueError(
        f"fused_dense_rows: max_rows must be >= 0, got {max_rows}."
      )
    rows = min(rows, max_rows)
  return int(rows)


class _Static(NamedTuple):
  """Hashable static configuration of the kernel."""

  chunk: int  # rows per tile
  vocab_chunk: int  # columns per full tile (<= V)
  inv_temperature: float
  with_entropy: bool


def _dot(a, b, contract):
  """``a · b`` contracting dims ``contract``, float32 accumulation."""
  return jax.lax.dot_general(
    a, b, (contract, ((), ())), preferred_element_type=jnp.float32
  )


def _tile_logits(h_c, w_v, st: _Static):
  """``[C, D] x [Vc, D]^T -> [C, Vc]`` float32 logits / temperature."""
  z = _dot(h_c, w_v, ((1,), (1,)))
  if st.inv_temperature != 1.0:
    z = z * st.inv_temperature
  return z


def _vocab_tiles(vocab: int, vocab_chunk: int):
  """Number of full vocabulary tiles and the width of the tail tile."""
  return vocab // vocab_chunk, vocab % vocab_chunk


# Forward: per row chunk, an online log-sum-exp over vocabulary tiles. Per
# row: running max m, s = Σ exp(z - m), u = Σ exp(z - m) (z - m) (entropy
# only; relative to m so that no O(|z|) terms cancel) and the target's logit.
# Then lse = m + log s and H = lse - Σ p z = log s - u / s.


def _tile_stats(z, t_c, col0, with_entropy):
  """Stats of one tile on its own (the first tile of a row chunk)."""
  cols = col0 + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
  picked = jnp.sum(jnp.where(cols == t_c[:, None], z, 0.0), axis=1)
  m = jnp.max(z, axis=1)
  shifted = z - m[:, None]
  e = jnp.exp(shifted)
  u = jnp.sum(e * shifted, axis=1) if with_entropy else jnp.zeros_like(m)
  return m, jnp.sum(e, axis=1), u, picked


def _fwd_tile(stats, h_c, w_v, t_c, col0, st: _Static):
  """Folds one ``[C, Vc]`` tile into the running per-row stats."""
  z = _tile_logits(h_c, w_v, st)
  m1, s1, u1, p1 = _tile_stats(z, t_c, col0, st.with_entropy)
  if stats is None:
    return m1, s1, u1, p1
  m0, s0, u0, p0 = stats
  m = jnp.maximum(m0, m1)
  r0, r1 = jnp.exp(m0 - m), jnp.exp(m1 - m)
  # u relative to the new max: Σ e (z - m) = r (u_old + (m_old - m) s_old).
  u = r0 * (u0 + (m0 - m) * s0) + r1 * (u1 + (m1 - m) * s1)
  return m, r0 * s0 + r1 * s1, u, p0 + p1


def _fwd_rows(h_c, w, t_c, st: _Static):
  """Log-sum-exp, target logit and entropy of one row chunk ``[C]``."""
  vocab = w.shape[0]
  n_full, tail = _vocab_tiles(vocab, st.vocab_chunk)

  def body(v, stats):
    col0 = v * st.vocab_chunk
    w_v = jax.lax.dynamic_slice_in_dim(w, col0, st.vocab_chunk, axis=0)
    return _fwd_tile(stats, h_c, w_v, t_c, col0, st)

  stats = _fwd_tile(None, h_c, w[: st.vocab_chunk], t_c, 0, st)
  if n_full > 1:
    stats = jax.lax.fori_loop(1, n_full, body, stats)
  if tail:
    col0 = n_full * st.vocab_chunk
    stats = _fwd_tile(stats, h_c, w[col0:], t_c, col0, st)
  return _finish(stats, st)


def _finish(stats, st: _Static):
  """``(lse, target logit, entropy)`` from a row chunk's folded stats."""
  m, s, u, picked = stats
  log_s = jnp.log(s)
  entropy = log_s - u / s if st.with_entropy else jnp.zeros_like(s)
  return m + log_s, picked, entropy


def _skip_unless(active, fn, skipped):
  """``fn()`` if ``active`` (None: always), else ``skipped`` (same tree)."""
  if active is None:
    return fn()
  return jax.lax.cond(active, fn, lambda: skipped)


def _forward(h, w, t, n_active, st: _Static):
  """Row-chunked forward. ``h: [n, C, D]``, ``t: [n, C]`` -> ``[n, C]`` x3.

  Chunks ``>= n_active`` (None: all chunks run) are skipped (zeros).
  """
  if h.shape[0] == 1:
    return jax.tree.map(lambda x: x[None], _fwd_rows(h[0], w, t[0], st))
  zeros = jnp.zeros(h.shape[1], jnp.float32)

  def chunk(xs):
    i, h_c, t_c = xs
    return _skip_unless(
      None if n_active is None else i < n_active,
      lambda: _fwd_rows(h_c, w, t_c, st),
      (zeros, zeros, zeros),
    )

  return jax.lax.map(chunk, (jnp.arange(h.shape[0]), h, t))


# Backward: vocabulary tiles outer, row chunks inner. For a tile with logits
# z, p = exp(z - lse) and log p = z - lse,
#   d logp / dz = onehot(target) - p,
#   d H / dz    = -p (log p + H),
# so each tile's dz needs only per-row quantities saved by the forward pass.


def _bwd_tile(h_c, w_v, t_c, lse_c, ent_c, g_c, gent_c, col0, st: _Static):
  """Returns ``dz / temperature`` for one ``[C, Vc]`` tile (float32)."""
  z = _tile_logits(h_c, w_v, st)
  return _dz(z, t_c, lse_c, ent_c, g_c, gent_c, col0, st)


def _dz(z, t_c, lse_c, ent_c, g_c, gent_c, col0, st: _Static):
  """``dz / temperature`` of a tile from its logits ``z`` (float32)."""
  log_p = z - lse_c[:, None]
  p = jnp.exp(log_p)
  cols = col0 + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
  dz = jnp.where(cols == t_c[:, None], g_c[:, None], 0.0) - g_c[:, None] * p
  if st.with_entropy:
    dz = dz - gent_c[:, None] * p * (log_p + ent_c[:, None])
  if st.inv_temperature != 1.0:
    dz = dz * st.inv_temperature
  return dz


def _bwd_vocab_tile(
  dh, h, w_v, t, lse, ent, g, gent, n_active, col0, st: _Static
):
  """Adds one vocabulary tile's contribution to ``dh``; returns ``dw_v``.

  ``dh_c += dz [C, Vc] x w_v [Vc, D]`` and ``dw_v += dz^T h_c`` (a
  single-axis transposed-operand product, ``[Vc, D]``, that XLA:CPU runs
  without copying either operand).
  """
  compute_dtype = w_v.dtype

  def rows(dw_v, xs):
    i, dh_c, h_c, t_c, lse_c, ent_c, g_c, gent_c = xs

    def run():
      dz = _bwd_tile(h_c, w_v, t_c, lse_c, ent_c, g_c, gent_c, col0, st)
      dz = dz.astype(compute_dtype)
      return (
        dw_v + _dot(dz, h_c, ((0,), (0,))),
        dh_c + _dot(dz, w_v, ((1,), (0,))),
      )

    active = None if n_active is None else i < n_active
    return _skip_unless(active, run, (dw_v, dh_c))

  dw_v = jnp.zeros(w_v.shape, jnp.float32)
  xs = (jnp.arange(h.shape[0]), dh, h, t, lse, ent, g, gent)
  if h.shape[0] == 1:
    dw_v, dh_c = rows(dw_v, jax.tree.map(lambda x: x[0], xs))
    return dh_c[None], dw_v
  dw_v, dh = jax.lax.scan(rows, dw_v, xs)
  return dh, dw_v


def _backward(h, w, t, lse, ent, g, gent, n_active, st: _Static):
  """``(dh [n, C, D], dw [V, D])``; ``dw``'s row tiles are contiguous."""
  vocab = w.shape[0]
  n_full, tail = _vocab_tiles(vocab, st.vocab_chunk)
  dh = jnp.zeros(h.shape, jnp.float32)
  args = (t, lse, ent, g, gent, n_active)
  if n_full == 1 and not tail:
    return _bwd_vocab_tile(dh, h, w, *args, 0, st)
  dw = jnp.zeros(w.shape, jnp.float32)

  def body(v, carry):
    dh, dw = carry
    col0 = v * st.vocab_chunk
    w_v = jax.lax.dynamic_slice_in_dim(w, col0, st.vocab_chunk, axis=0)
    dh, dw_v = _bwd_vocab_tile(dh, h, w_v, *args, col0, st)
    return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_v, col0, axis=0)

  dh, dw = jax.lax.fori_loop(0, n_full, body, (dh, dw))
  if tail:
    col0 = n_full * st.vocab_chunk
    dh, dw_tail = _bwd_vocab_tile(dh, h, w[col0:], *args, col0, st)
    dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_tail, col0, axis=0)
  return dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(h, w, t, n_active, st: _Static):
  lse, picked, entropy = _forward(h, w, t, n_active, st)
  return picked - lse, entropy


def _fused_fwd(h, w, t, n_active, st: _Static):
  lse, picked, entropy = _forward(h, w, t, n_active, st)
  return (picked - lse, entropy), (h, w, t, n_active, lse, entropy)


def _float32(cotangents):
  """The (log-prob, entropy) cotangents as float32."""
  return tuple(jnp.asarray(c, jnp.float32) for c in cotangents)


def _fused_bwd(st: _Static, residuals, cotangents):
  h, w, t, n_active, lse, entropy = residuals
  g, gent = _float32(cotangents)
  dh, dw = _backward(h, w, t, lse, entropy, g, gent, n_active, st)
  return dh.astype(h.dtype), dw.astype(w.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# Dense head: one [R, V] tile, its logits kept as a residual. The backward
# pass is dz from the kept logits and two matmuls, no recompute, no loops.


def _dense_stats(h, w, t, st: _Static):
  z = _tile_logits(h, w, st)
  return (z, *_finish(_tile_stats(z, t, 0, st.with_entropy), st))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense(h, w, t, st: _Static):
  _, lse, picked, entropy = _dense_stats(h, w, t, st)
  return picked - lse, entropy


def _dense_fwd(h, w, t, st: _Static):
  z, lse, picked, entropy = _dense_stats(h, w, t, st)
  return (picked - lse, entropy), (h, w, t, z, lse, entropy)


def _dense_bwd(st: _Static, residuals, cotangents):
  h, w, t, z, lse, entropy = residuals
  g, gent = _float32(cotangents)
  dz = _dz(z, t, lse, entropy, g, gent, 0, st).astype(w.dtype)
  dh = _dot(dz, w, ((1,), (0,)))
  dw = _dot(dz, h, ((0,), (0,)))
  return dh.astype(h.dtype), dw.astype(w.dtype), None


_dense.defvjp(_dense_fwd, _dense_bwd)


@typechecked
def fused_token_logps(
  hidden: Float[In, "B T D"],
  unembedding: Float[In, "D V"],
  targets: Int[In, "B T"],
  *,
  chunk_size: int = FUSED_DEFAULT_CHUNK_SIZE,
  vocab_chunk_size: int | None = FUSED_DEFAULT_VOCAB_CHUNK_SIZE,
  temperature: float = 1.0,
  return_entropy: bool = False,
  where: Bool[In, "B T"] | None = None,
  dense_rows: int | None = None,
) -> Float[Out, "B T"] | tuple[Float[Out, "B T"], Float[Out, "B T"]]:
  r"""Per-token log-probs of ``targets`` under ``softmax(hidden @ W / τ)``.

  .. math::
    z_{bt} = h_{bt} W / \tau, \quad
    \log p_{bt} = z_{bt, y_{bt}} - \log\textstyle\sum_v \exp z_{bt, v}, \quad
    H_{bt} = -\textstyle\sum_v p_{bt,v} \log p_{bt,v}

  Same values and gradients (w.r.t. ``hidden`` and ``unembedding``) as
  ``token_logps(hidden @ unembedding / temperature, targets)``, without ever
  materialising the ``[B, T, V]`` logits: rows are processed in chunks of
  ``chunk_size`` tokens (``B·T`` flattened and zero-padded to a multiple) and
  the vocabulary in tiles of ``vocab_chunk_size`` with an online
  log-sum-exp. The backward pass recomputes each tile's logits. Padded rows
  are finite and dropped. Masking is the caller's job (apply the completion
  mask to the result); NaN in ``hidden`` rows is *not* inert here, since
  those rows enter the ``unembedding`` gradient as in the unfused product.

  The matmuls run in the inputs' dtype (promoted, so bf16 stays bf16 on
  accelerators) with float32 accumulation; everything after them is float32.

  Args:
    hidden: final hidden states ``[B, T, D]`` aligned with ``targets`` (for
      next-token prediction pass ``h[:, :-1]`` and ``tokens[:, 1:]``).
    unembedding: the LM-head matrix ``[D, V]`` (transpose a tied embedding
      table ``[V, D]`` yourself).
    targets: integer token ids in ``[0, V)``.
    chunk_size: rows (tokens) per tile, >= 1; ``B·T`` is padded to a
      multiple of ``min(chunk_size, B·T)``.
    vocab_chunk_size: vocabulary columns per tile, >= 1, or ``None`` for the
      whole vocabulary in each tile. The last tile may be narrower. The
      defaults (1024 x 4096, a 16 MiB float32 tile) were measured on a
      2-core CPU with ``bench/logprobs.py``; tiles from 256 x 1024 to
      4096 x 2048 were within noise there. Re-measure on accelerators.
    temperature: τ > 0, divides the logits (sampling temperature, so that
      the log-probs match the sampler's).
    return_entropy: also return the entropy of each position's
      distribution (differentiable, for entropy bonuses).
    where: optional bool ``[B, T]``, the positions to compute (e.g. the
      completion tokens). The others get log-prob and entropy 0 and no
      gradient, and cost nothing: rows are reordered so that the computed
      ones come first; unless the dense head takes them, they are cut into
      chunks of at most ``chunk_size`` rows (and at most
      ``max(128, B·T / 8)``), and chunks with no computed row are skipped,
      so the work scales with the number of True positions (rounded up to
      a chunk). NaN rows outside ``where`` are inert.
    dense_rows: the most computed rows that take the dense head instead
      of the tiles: one untiled ``[rows, V]`` product whose float32 logits
      are kept for the backward pass instead of recomputed (three matmuls,
      no loops). Faster where the work is small (2-core CPU, fwd + bwd of
      256 rows at V = 32000: 0.25 s vs 0.41 s tiled, with less memory;
      ``bench/logprobs.py --batch 1 --length 256``); at thousands of rows
      the tiles are as fast and leaner. Without ``where`` the head is taken
      when ``B·T <= dense_rows``. With ``where`` it is a ``[dense_rows, V]``
      product that costs all its rows, True or not, so it is taken (a
      ``lax.cond`` on the count) when the True positions fit in it and fill
      at least half of it; under ``grad`` the kept logits are then
      allocated whichever branch runs (a cond's residuals are those of
      both), so ``where`` with tiles costs up to this budget more memory
      (at B=4, T=1023, V=32000: 175 vs 143 MiB of XLA temp; pass 0 where
      that matters). ``None``: ``fused_dense_rows(V)``, as many rows
      as fit ``FUSED_DENSE_LOGITS_BYTES`` (32 MiB); 0: always tiles. Pass
      ``fused_dense_rows(V, bound)`` when a tighter upper bound on the True
      positions is known, to size the head to the work. Any value is
      exact.

  Returns:
    float32 log-probs ``[B, T]``, not masked (zero outside ``where``); with
    ``return_entropy`` a tuple ``(logps, entropy)``, both float32
    ``[B, T]``, entropy in nats.

  References:
    Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
    <https://arxiv.org/abs/2411.09009>`_, 2024.
  """
  if chunk_size < 1:
    raise ValueError(
      f"fused_token_logps: chunk_size must be >= 1, got {chunk_size}."
    )
  if vocab_chunk_size is not None and vocab_chunk_size < 1:
    raise ValueError(
      "fused_token_logps: vocab_chunk_size must be >= 1 or "
      f"None, got {vocab_chunk_size}."
    )
  if not temperature > 0:
    raise ValueError(
      f"fused_token_logps: temperature must be > 0, got {temperature}."
    )
  if dense_rows is not None and dense_rows < 0:
    raise ValueError(
      f"fused_token_logps: dense_rows must be >= 0 or None, got {dense_rows}."
    )
  batch, length, width = hidden.shape
  vocab = unembedding.shape[1]
  hidden = jnp.asarray(hidden)
  unembedding = jnp.asarray(unembedding)
  dtype = jnp.promote_types(hidden.dtype, unembedding.dtype)
  rows = batch * length
  h = hidden.astype(dtype).reshape(rows, width)
  t = jnp.asarray(targets, jnp.int32).reshape(rows)
  count = order = keep = None
  if where is not None:
    keep = jnp.asarray(where, bool).reshape(rows)
    order = jnp.argsort(~keep, stable=True)  # computed rows first
    keep = keep[order]
    # Rows outside ``where`` get 0 (finite) inputs: NaN there stays inert.
    h = jnp.where(keep[:, None], h[order], 0)
    t = jnp.where(keep, t[order], 0)
    count = jnp.sum(keep, dtype=jnp.int32)
  dense = fused_dense_rows(vocab) if dense_rows is None else dense_rows
  dense = min(dense, rows)
  # The kernel works on the [V, D] layout: vocabulary tiles are contiguous
  # row blocks (no strided slices), and for a tied embedding
  # (``unembedding = table.T``) the two transposes cancel, so neither the
  # table nor its gradient is ever copied into [D, V].
  w = unembedding.astype(dtype).T
  inv_temperature = 1.0 / float(temperature)
  entropy_too = bool(return_entropy)

  def dense_head(head):
    """Rows ``[:head]`` in one dense tile; the rest are not computed."""
    st = _Static(head, vocab, inv_temperature, entropy_too)
    logps, entropy = _dense(h[:head], w, t[:head], st)
    return tuple(jnp.pad(x, (0, rows - head)) for x in (logps, entropy))

  def tiles():
    chunk = max(1, min(chunk_size, rows))
    n_active = None
    if where is not None:
      # Chunks small enough that skipping whole ones pays: <= 1/8 of the
      # rows; chunks past the computed rows are skipped.
      chunk = min(chunk, max(128, 8 * -(-rows // 64)))
      n_active = (count + chunk - 1) // chunk
    n_chunks = -(-rows // chunk)
    pad = n_chunks * chunk - rows
    vocab_chunk = (
      vocab if vocab_chunk_size is None else min(vocab_chunk_size, vocab)
    )
    st = _Static(chunk, vocab_chunk, inv_temperature, entropy_too)
    logps, entropy = _fused(
      jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, width),
      w,
      jnp.pad(t, (0, pad)).reshape(n_chunks, chunk),
      n_active,
      st,
    )
    return logps.reshape(-1)[:rows], entropy.reshape(-1)[:rows]

  if where is None:
    logps, entropy = dense_head(rows) if rows <= dense else tiles()
  elif dense == 0:
    logps, entropy = tiles()
  else:
    # The head costs all its rows, True or not: taken when the True rows
    # fit and fill at least half of it (three fast matmuls per row instead
    # of four tiled ones at about 0.6 of the speed).
    logps, entropy = jax.lax.cond(
      (2 * count >= dense) & (count <= dense),
      lambda: dense_head(dense),
      tiles,
    )

  def unsort(x):
    if order is not None:
      x = jnp.zeros_like(x).at[order].set(jnp.where(keep, x, 0.0))
    return x.reshape(batch, length)

  if not return_entropy:
    return unsort(logps)
  return unsort(logps), unsort(entropy)
