"""One packed row per preference pair: the prompt is run once, not twice.

A pair's chosen and rejected sequences share their prompt. Instead of the
two ``[B, L]`` rows ``[prompt | chosen]`` and ``[prompt | rejected]`` the
model reads one row

  ``[prompt | chosen completion | rejected completion | pad]``

of static length ``L + min(C, L)`` (``C``: the longest completion, EOS
included; ``config.data.max_completion_len``) with segment ids ``1, 2, 3``
and prefix ids ``0, 1, 1`` (`models.Transformer` ``prefix_ids``): both
completions attend causally to the prompt and to themselves, the rejected
tokens never to the chosen ones, and every token keeps the position it has
in its unpacked row. Every hidden state of a real token is then the one the
unpacked forward computes (up to float summation order), so losses and
gradients are the same; the model runs ``P + T_c + T_r`` tokens per pair
instead of ``2 (P + T)``.

:func:`unpack` gathers the packed hidden states (or any ``[B, L_packed,
...]`` activations) back into the unpacked ``[2B, L, ...]`` layout
(chosen rows, then rejected rows), so everything downstream (fused log-
probs, WPO normalisers, token KL, SparsePO activations, reward heads at the
last token) is unchanged.

Rows may be right- or left-padded as the data layer makes them
(``PreferenceBatch``: right-padded ``[prompt, completion, eos, pad]``;
online pairs: a left-padded prompt, then the sampled completion). The
prompt of a row is everything before its first completion token; its tail
(from there to the last real or completion token) is carried into the
packed row as it is, with its attention mask and positions. A pair can be
packed when both rows have the same tokens and attention mask before the
first completion token, at the same index, and the packed row fits. :func:`check_shared_prompt` verifies this on the host
(clear ``ValueError``); inside the jitted step a pair that cannot be packed
gets NaN hidden states (so the loss is NaN and the train loop stops), never
silently wrong values.

References:
  Wang et al., `Accelerating Direct Preference Optimization with Prefix
  Sharing <https://arxiv.org/abs/2410.20305>`_, 2024.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from alignment.models.transformer import default_positions

# Segment ids of the packed row (0: padding after the pair).
PROMPT, CHOSEN, REJECTED = 1, 2, 3


def _model_kwargs(packed) -> dict:
  """Keyword arrays of `Transformer.__call__` for packed rows (the
  ``model_kwargs()`` of :class:`PackedPairs` and :class:`PackedGroups`)."""
  return {
    "attention_mask": packed.attention_mask,
    "positions": packed.positions,
    "segment_ids": packed.segment_ids,
    "prefix_ids": packed.prefix_ids,
  }


class PackedPairs(NamedTuple):
  """A batch of pairs packed one per row (``Lp`` = packed length)."""

  tokens: jnp.ndarray
  """int32 ``[B, Lp]``."""
  attention_mask: jnp.ndarray
  """bool ``[B, Lp]``."""
  positions: jnp.ndarray
  """int32 ``[B, Lp]``: each token's position in its unpacked row."""
  segment_ids: jnp.ndarray
  """int32 ``[B, Lp]``: prompt 1, chosen 2, rejected 3, padding 0."""
  prefix_ids: jnp.ndarray
  """int32 ``[B, Lp]``: 1 on both completions (they read the prompt)."""
  chosen_index: jnp.ndarray
  """int32 ``[B, L]``: packed index of each chosen-row position."""
  rejected_index: jnp.ndarray
  """int32 ``[B, L]``: packed index of each rejected-row position."""
  last_index: jnp.ndarray
  """int32 ``[B, 2]``: packed index of the last real token of chosen and
  rejected (what a reward head reads)."""
  valid: jnp.ndarray
  """bool ``[B]``: the pair could be packed exactly."""

  model_kwargs = _model_kwargs


def packed_length(length: int, completion_len: int) -> int:
  """Static packed length for ``[B, L]`` rows and completions of at most
  ``completion_len`` tokens: ``L + min(completion_len, L)``."""
  if completion_len < 1:
    raise ValueError(f"completion_len must be >= 1, got {completion_len}.")
  return int(length) + min(int(completion_len), int(length))


def _layout(xp, attn, comp):
  """Per row: the first completion index ``p`` (the prompt is everything
  before it; no completion: every real token) and the length ``n`` of the
  tail from ``p`` to the last real or completion token. Works on NumPy
  (host check) and jax.numpy (jitted packing) arrays."""
  length = attn.shape[1]

  def end(mask):  # one past the last True (0 if none)
    return xp.where(
      xp.any(mask, axis=1), length - xp.argmax(mask[:, ::-1], axis=1), 0
    )

  end_real = end(attn)
  p = xp.where(xp.any(comp, axis=1), xp.argmax(comp, axis=1), end_real)
  n = xp.maximum(xp.maximum(end_real, end(comp)) - p, 0)
  return p, n


def _pair_problems(xp, ct, ca, cc, rt, ra, rc, packed_len):
  """``(p_c, p_r, n_c, n_r, same_prompt, fits)`` per pair."""
  pc, nc = _layout(xp, ca, cc)
  pr, nr = _layout(xp, ra, rc)
  t = xp.arange(ct.shape[1])[None, :]
  before = t < pc[:, None]
  same = xp.all(~before | ((ca == ra) & (~ca | (ct == rt))), axis=1) & (
    pc == pr
  )
  fits = pc + nc + nr <= packed_len
  return pc, pr, nc, nr, same, fits


def pack_pairs(
  chosen_tokens,
  chosen_attention_mask,
  chosen_completion_mask,
  rejected_tokens,
  rejected_attention_mask,
  rejected_completion_mask,
  *,
  packed_len: int,
) -> PackedPairs:
  """Packs each pair as ``[prompt | chosen | rejected | pad]`` (jittable).

  Args:
    chosen_tokens: int ``[B, L]``.
    chosen_attention_mask: bool ``[B, L]``.
    chosen_completion_mask: bool ``[B, L]``, True on the completion.
    rejected_tokens: int ``[B, L]`` (same ``L``: pad first).
    rejected_attention_mask: bool ``[B, L]``.
    rejected_completion_mask: bool ``[B, L]``.
    packed_len: static packed length (:func:`packed_length`), ``>= L``.

  Returns:
    A :class:`PackedPairs`.
  """
  ct, ca, cc = chosen_tokens, chosen_attention_mask, chosen_completion_mask
  rt, ra = rejected_tokens, rejected_attention_mask
  rc = rejected_completion_mask
  b, length = ct.shape
  if packed_len < length:
    raise ValueError(
      f"packed_len={packed_len} is shorter than the rows ({length})."
    )
  p, _, nc, nr, same, fits = _pair_problems(
    jnp, ct, ca, cc, rt, ra, rc, packed_len
  )
  end_c = (p + nc)[:, None]  # end of [prompt | chosen] in the packed row
  j = jnp.arange(packed_len)[None, :]
  in_c = j < end_c
  in_r = (j >= end_c) & (j < end_c + nr[:, None])
  src_c = jnp.broadcast_to(jnp.minimum(j, length - 1), (b, packed_len))
  src_r = jnp.clip(p[:, None] + j - end_c, 0, length - 1)

  def take(x, idx):
    return jnp.take_along_axis(x, idx, axis=1)

  def merge(xc, xr, fill):
    return jnp.where(
      in_c, take(xc, src_c), jnp.where(in_r, take(xr, src_r), fill)
    )

  tokens = merge(ct, rt, 0).astype(jnp.int32)
  attn = merge(ca, ra, False)
  positions = merge(default_positions(ca), default_positions(ra), 0)
  segment_ids = jnp.where(
    in_c,
    jnp.where(j < p[:, None], PROMPT, CHOSEN),
    jnp.where(in_r, REJECTED, 0),
  ).astype(jnp.int32)
  prefix_ids = jnp.where((in_c & (j >= p[:, None])) | in_r, PROMPT, 0).astype(
    jnp.int32
  )
  t = jnp.arange(length)[None, :]
  chosen_index = jnp.broadcast_to(t, (b, length)).astype(jnp.int32)
  rejected_index = jnp.where(t < p[:, None], t, t - p[:, None] + end_c)
  rejected_index = jnp.minimum(rejected_index, packed_len - 1).astype(jnp.int32)

  def last_real(a):
    return jnp.maximum(length - 1 - jnp.argmax(a[:, ::-1], axis=1), 0)

  last_index = jnp.stack(
    [
      last_real(ca),
      jnp.take_along_axis(rejected_index, last_real(ra)[:, None], axis=1)[:, 0],
    ],
    axis=1,
  ).astype(jnp.int32)
  return PackedPairs(
    tokens,
    attn,
    positions.astype(jnp.int32),
    segment_ids,
    prefix_ids,
    chosen_index,
    rejected_index,
    last_index,
    same & fits,
  )


def pack_batch(batch, *, completion_len: int) -> PackedPairs:
  """:func:`pack_pairs` of a ``PreferenceBatch`` (rows padded to one
  length; packed length :func:`packed_length`)."""
  arrays = _padded(batch, jnp)
  return pack_pairs(
    *arrays, packed_len=packed_length(arrays[0].shape[1], completion_len)
  )


def _padded(batch, xp):
  names = ("tokens", "attention_mask", "completion_mask")
  chosen = [xp.asarray(getattr(batch, f"chosen_{n}")) for n in names]
  rejected = [xp.asarray(getattr(batch, f"rejected_{n}")) for n in names]
  length = max(chosen[0].shape[1], rejected[0].shape[1])

  def pad(x):
    extra = length - x.shape[1]
    return xp.pad(x, ((0, 0), (0, extra))) if extra else x

  return [pad(x) for x in chosen + rejected]


def unpack(x, packed: PackedPairs):
  """``[B, Lp, ...]`` packed activations → ``[2B, L, ...]`` unpacked rows.

  Rows ``0..B-1`` are the chosen sequences, ``B..2B-1`` the rejected ones,
  each position holding the value the unpacked forward computes there
  (padding positions hold arbitrary values). Pairs that could not be
  packed (``packed.valid`` False) get NaN.
  """
  extra = (1,) * (x.ndim - 2)

  def gather(index):
    return jnp.take_along_axis(x, index.reshape(index.shape + extra), axis=1)

  out = jnp.concatenate(
    [gather(packed.chosen_index), gather(packed.rejected_index)], axis=0
  )
  valid = jnp.concatenate([packed.valid, packed.valid])
  return jnp.where(valid.reshape((-1, 1) + extra), out, jnp.nan).astype(x.dtype)


def check_shared_prompt(batch, *, completion_len: int, where: str) -> None:
  """Host-side check that every pair of a ``PreferenceBatch`` can be packed.

  Args:
    batch: a ``PreferenceBatch`` of NumPy (or host-readable) arrays.
    completion_len: the completion bound the packed length is sized for.
    where: the config key that switched packing on (named in the error).

  Raises:
    ValueError: naming the first offending pair and what is wrong.
  """
  ct, ca, cc, rt, ra, rc = (np.asarray(x) for x in _padded(batch, np))
  packed_len = packed_length(ct.shape[1], completion_len)
  p, pr, nc, nr, same, fits = _pair_problems(
    np, ct, ca, cc, rt, ra, rc, packed_len
  )
  off = f" or set {where}=False."
  for i in range(ct.shape[0]):
    if not same[i]:
      raise ValueError(
        f"{where}=True packs chosen and rejected of a pair on their "
        f"shared prompt, but pair {i} of the batch has different prompts "
        f"({int(p[i])} tokens before the chosen completion, {int(pr[i])} "
        "before the rejected one, or different tokens); use pairs that "
        "share the prompt token for token" + off
      )
    if not fits[i]:
      raise ValueError(
        f"{where}=True: pair {i} needs {int(p[i] + nc[i] + nr[i])} tokens "
        f"packed, more than {packed_len} (rows of {ct.shape[1]} + "
        f"completions of at most {completion_len} tokens): raise "
        "config.data.max_completion_len to the data's longest completion "
        "(EOS included)" + off
      )


class CheckedBatches:
  """Wraps a preference iterator: every batch passes
  :func:`check_shared_prompt` before it is used (other attributes, e.g.
  ``get_state``, are the wrapped iterator's)."""

  def __init__(self, batches, *, completion_len: int, where: str):
    self._batches = batches
    self._completion_len = completion_len
    self._where = where

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._batches)
    check_shared_prompt(
      batch, completion_len=self._completion_len, where=self._where
    )
    return batch

  def __getattr__(self, name):
    return getattr(self._batches, name)


def completion_bound(config) -> int | None:
  """The longest completion (EOS included) of ``config.data``, or None."""
  data = config.get("data", None)
  if data is None or data.get("max_completion_len", None) is None:
    return None
  return int(data.max_completion_len)


SHARE_PROMPT_DEFAULT = True
"""Default of ``config.share_prompt`` (exact: same losses and gradients)."""


def share_prompt_bound(config, completion_len: int | None = None):
  """The completion bound of the packed rows, or None when
  ``config.share_prompt`` is False.

  Args:
    config: a trainer config (``share_prompt``; ``data.max_completion_len``).
    completion_len: overrides ``config.data.max_completion_len`` (online
      pairs: ``config.online.max_new_tokens``).

  Raises:
    ValueError: sharing is on and no bound is known.
  """
  if not bool(config.get("share_prompt", SHARE_PROMPT_DEFAULT)):
    return None
  bound = (
    completion_len if completion_len is not None else (completion_bound(config))
  )
  if bound is None:
    raise ValueError(
      "config.share_prompt=True sizes the packed rows [prompt | chosen | "
      "rejected] by the longest completion: set "
      "config.data.max_completion_len (EOS included), or set "
      "config.share_prompt=False."
    )
  if int(bound) < 1:
    raise ValueError(
      f"config.data.max_completion_len must be >= 1, got {bound}."
    )
  return int(bound)


# ----------------------------------------------------------------------------
# Groups of sampled completions (GRPO-style rollouts)
# ----------------------------------------------------------------------------


class PackedGroups(NamedTuple):
  """Rollout rows packed one group per row: ``[prompt | c_1 | ... | c_G]``.

  ``B`` groups of ``G`` rows, ``Lp = P + G·T`` packed length.
  """

  tokens: jnp.ndarray
  """int32 ``[B, Lp]``."""
  attention_mask: jnp.ndarray
  """bool ``[B, Lp]``."""
  positions: jnp.ndarray
  """int32 ``[B, Lp]``: each token's position in its unpacked row."""
  segment_ids: jnp.ndarray
  """int32 ``[B, Lp]``: prompt 1, completion ``g`` ``2 + g``."""
  prefix_ids: jnp.ndarray
  """int32 ``[B, Lp]``: 1 on the completions (they read the prompt)."""
  index: jnp.ndarray
  """int32 ``[B, G·L]``: packed index of every position of the group's
  ``G`` unpacked rows (row-major)."""
  valid: jnp.ndarray
  """bool ``[B]``: the group's rows share their prompt exactly."""

  model_kwargs = _model_kwargs


def pack_groups(
  tokens, attention_mask, *, group: int, completion_len: int
) -> PackedGroups:
  """Packs each group of ``G`` sampled rows on their shared prompt (jittable).

  The rows are those of a rollout (``sampling.Sampler``, ``rl.Rollout``):
  ``[N, L]`` with ``N = B·G`` prompt-major (rows ``b·G .. b·G + G - 1``
  are the samples of prompt ``b``), each row the (left-padded) prompt in
  its first ``P = L - T`` columns and a completion of ``T =
  completion_len`` columns after it. Group ``b`` becomes one row

    ``[prompt | completion_1 | ... | completion_G]``

  of length ``P + G·T``, with segment ids ``1, 2, .., G + 1`` and prefix
  ids ``0, 1, .., 1`` (`models.Transformer` ``prefix_ids``): every
  completion reads the prompt and itself, never a sibling, and every token
  keeps its unpacked position. The hidden state of every real token is
  then the one the unpacked forward computes (up to float summation
  order), and the prompt runs once per group instead of ``G`` times.

  Args:
    tokens: int ``[N, L]``.
    attention_mask: bool ``[N, L]``.
    group: ``G`` (static), ``N`` a multiple of it.
    completion_len: ``T`` (static), ``1 <= T < L``.

  Returns:
    A :class:`PackedGroups`; a group whose rows differ anywhere in their
    first ``P`` columns (tokens where the mask is True, or the mask) is
    not ``valid`` (:func:`unpack_groups` gives it NaN).

  Raises:
    ValueError: the static shapes do not fit (named).
  """
  n, length = tokens.shape
  g, t = int(group), int(completion_len)
  if g < 1 or n % g:
    raise ValueError(
      f"pack_groups: {n} rows do not split into groups of {g} "
      "(config.rl.num_generations)."
    )
  if not 1 <= t < length:
    raise ValueError(
      f"pack_groups: completion_len={t} must be in [1, {length}) for rows "
      f"of {length} tokens (prompt columns first)."
    )
  b, p = n // g, length - t
  tok = jnp.asarray(tokens).reshape(b, g, length)
  attn = jnp.asarray(attention_mask).reshape(b, g, length)
  pos = default_positions(jnp.asarray(attention_mask)).reshape(b, g, length)
  pt, pa = tok[:, :, :p], attn[:, :, :p]
  same_mask = pa == pa[:, :1]
  same_tok = ~pa | (pt == pt[:, :1])
  valid = jnp.all(same_mask & same_tok, axis=(1, 2))

  def packed(x):  # [B, G, L] -> [B, P + G·T]
    return jnp.concatenate([x[:, 0, :p], x[:, :, p:].reshape(b, g * t)], 1)

  member = jnp.repeat(jnp.arange(g, dtype=jnp.int32), t)
  segment_ids = jnp.concatenate([jnp.full((p,), PROMPT, jnp.int32), 2 + member])
  prefix_ids = jnp.concatenate(
    [jnp.zeros((p,), jnp.int32), jnp.full((g * t,), PROMPT, jnp.int32)]
  )
  u = jnp.arange(length, dtype=jnp.int32)[None, :]
  k = jnp.arange(g, dtype=jnp.int32)[:, None]
  index = jnp.where(u < p, u, p + k * t + (u - p)).reshape(1, g * length)
  lp = p + g * t
  return PackedGroups(
    packed(tok).astype(jnp.int32),
    packed(attn),
    packed(pos).astype(jnp.int32),
    jnp.broadcast_to(segment_ids, (b, lp)),
    jnp.broadcast_to(prefix_ids, (b, lp)),
    jnp.broadcast_to(index, (b, g * length)),
    valid,
  )


def unpack_groups(x, packed: PackedGroups, group: int):
  """``[B, Lp, ...]`` packed activations → ``[B·G, L, ...]`` unpacked rows.

  Each position holds the value the unpacked forward computes there
  (padding positions hold arbitrary values); the rows of a group that was
  not ``valid`` are NaN.
  """
  b = x.shape[0]
  extra = (1,) * (x.ndim - 2)
  index = packed.index
  out = jnp.take_along_axis(x, index.reshape(index.shape + extra), axis=1)
  out = jnp.where(packed.valid.reshape((b, 1) + extra), out, jnp.nan)
  return out.reshape((b * group, index.shape[1] // group) + x.shape[2:])
