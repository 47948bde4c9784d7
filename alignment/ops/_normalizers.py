"""Per-token log normalisers of the policy, without ``[B, T, V]`` logits.

``fused_token_log_normalizers(hidden, unembedding)`` returns, for every
position, a statistic of the whole next-token distribution
``π(·|x, y_{<t}) = softmax(hidden @ unembedding)``:

* ``"sampled"``: ``log Σ_v π(v|·)²``, the probability that a token sampled
  from the policy equals another independent sample (WPO's sampled weight
  alignment, Zhou et al. 2024; TRL's ``use_weighting`` subtracts the same
  ``log_sum_sq_probs`` from each token log-prob);
* ``"greedy"``: ``log max_v π(v|·)``;
* ``"none"``: 0.

It is the chunked twin of ``losses.wpo_token_log_normalizers(logits)``: the
``B·T`` rows are cut into chunks of ``chunk_size`` (a ``lax.map``) and the
vocabulary into tiles of ``vocab_chunk_size`` reduced online, so at most one
``[chunk, vocab_chunk]`` tile of logits exists at a time. Forward only: the
result is a weight statistic, computed under ``stop_gradient``.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Float

from alignment.array_types import In, Out, typechecked

__all__ = [
  "LOG_NORMALIZER_ALIGNMENTS",
  "fused_token_log_normalizers",
]

LOG_NORMALIZER_ALIGNMENTS = ("sampled", "greedy", "none")
"""Valid ``alignment`` values of :func:`fused_token_log_normalizers`."""


def _tile_stats(h_c, w_v):
  """Running-max stats of one ``[C, Vc]`` tile: ``(m, Σ e, Σ e²)``.

  ``e = exp(z - m)`` with ``m`` the row maximum, so every sum is >= 1.
  """
  z = jax.lax.dot_general(
    h_c, w_v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )
  m = jnp.max(z, axis=1)
  e = jnp.exp(z - m[:, None])
  return m, jnp.sum(e, axis=1), jnp.sum(e * e, axis=1)


def _merge(a, b):
  """Combines the stats of two vocabulary tiles of the same rows."""
  m0, s0, q0 = a
  m1, s1, q1 = b
  m = jnp.maximum(m0, m1)
  r0, r1 = jnp.exp(m0 - m), jnp.exp(m1 - m)
  return m, r0 * s0 + r1 * s1, r0 * r0 * q0 + r1 * r1 * q1


def _row_chunk(h_c, w, vocab_chunk: int, alignment: str):
  """Log normalisers of one row chunk ``[C, D]`` -> ``[C]``."""
  vocab = w.shape[1]
  n_full, tail = divmod(vocab, vocab_chunk)

  def body(v, stats):
    w_v = jax.lax.dynamic_slice_in_dim(w, v * vocab_chunk, vocab_chunk, axis=1)
    return _merge(stats, _tile_stats(h_c, w_v))

  stats = _tile_stats(h_c, w[:, :vocab_chunk])
  if n_full > 1:
    stats = jax.lax.fori_loop(1, n_full, body, stats)
  if tail:
    stats = _merge(stats, _tile_stats(h_c, w[:, n_full * vocab_chunk :]))
  _, s, q = stats
  # log π_max = max z - logsumexp z = -log Σ e; log Σ π² = log Σ e² - 2 log Σ e.
  if alignment == "greedy":
    return -jnp.log(s)
  return jnp.log(q) - 2.0 * jnp.log(s)


@typechecked
def fused_token_log_normalizers(
  hidden: Float[In, "B T D"],
  unembedding: Float[In, "D V"],
  *,
  alignment: str = "sampled",
  chunk_size: int = 1024,
  vocab_chunk_size: int | None = 4096,
) -> Float[Out, "B T"]:
  r"""WPO's per-token log normalisers from hidden states, chunked.

  With ``z = hidden @ unembedding`` and ``π = softmax(z)`` at each position:

  .. math::
    \log Z_t = \begin{cases}
      \log\sum_v \pi(v|x, y_{<t})^2 & \text{sampled (WPO's default)}\\
      \log\max_v \pi(v|x, y_{<t}) & \text{greedy}\\
      0 & \text{none}
    \end{cases}

  computed as ``logsumexp(2z) - 2·logsumexp(z)`` and ``max z -
  logsumexp(z)`` with an online (running-max) reduction over vocabulary
  tiles, so the ``[B, T, V]`` logits never exist. Equals
  ``losses.wpo_token_log_normalizers(hidden @ unembedding)`` (the same
  quantity TRL's ``use_weighting`` subtracts from each token log-prob).

  Args:
    hidden: final hidden states ``[B, T, D]`` aligned with the scored tokens
      (``h[:, :-1]`` for next-token prediction); no gradient flows into it.
    unembedding: the LM-head matrix ``[D, V]``; no gradient.
    alignment: ``"sampled"`` (the paper's default), ``"greedy"`` or
      ``"none"``.
    chunk_size: rows (tokens) per ``lax.map`` step, >= 1; ``B·T`` is padded
      to a multiple of ``min(chunk_size, B·T)``.
    vocab_chunk_size: vocabulary columns per tile, >= 1, or None for the
      whole vocabulary at once.

  Returns:
    float32 ``[B, T]``, not masked (apply the completion mask yourself),
    under ``stop_gradient``; every value is <= 0 (a log-probability).

  References:
    Zhou et al., `WPO: Enhancing RLHF with Weighted Preference Optimization
    <https://arxiv.org/abs/2406.11827>`_, 2024.
  """
  if alignment not in LOG_NORMALIZER_ALIGNMENTS:
    raise ValueError(
      "fused_token_log_normalizers: alignment must be one of "
      f"{LOG_NORMALIZER_ALIGNMENTS}, got {alignment!r}."
    )
  if chunk_size < 1:
    raise ValueError(
      f"fused_token_log_normalizers: chunk_size must be >= 1, got {chunk_size}."
    )
  if vocab_chunk_size is not None and vocab_chunk_size < 1:
    raise ValueError(
      "fused_token_log_normalizers: vocab_chunk_size must be >= 1 or None, "
      f"got {vocab_chunk_size}."
    )
  batch, length, width = hidden.shape
  if alignment == "none":
    return jnp.zeros((batch, length), jnp.float32)
  hidden = jax.lax.stop_gradient(jnp.asarray(hidden))
  unembedding = jax.lax.stop_gradient(jnp.asarray(unembedding))
  dtype = jnp.promote_types(hidden.dtype, unembedding.dtype)
  vocab = unembedding.shape[1]
  vocab_chunk = (
    vocab if vocab_chunk_size is None else min(vocab_chunk_size, vocab)
  )
  rows = batch * length
  chunk = max(1, min(chunk_size, rows))
  n_chunks = -(-rows // chunk)
  h = hidden.astype(dtype).reshape(rows, width)
  if n_chunks * chunk > rows:
    h = jnp.pad(h, ((0, n_chunks * chunk - rows), (0, 0)))
  w = unembedding.astype(dtype)
  out = jax.lax.map(
    lambda h_c: _row_chunk(h_c, w, vocab_chunk, alignment),
    h.reshape(n_chunks, chunk, width),
  )
  return out.reshape(-1)[:rows].reshape(batch, length)
