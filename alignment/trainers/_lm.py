"""Model → per-token log-probs glue shared by the trainers.

Log-probs always go through the fused, chunked kernel
(``ops.fused_token_logps``) from the final hidden states and the unembedding
matrix, so the ``[B, L, V]`` logits never exist.
"""

import inspect
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from alignment import ops
from alignment.trainers import _packing


def completion_token_logps(
  model,
  tokens,
  attention_mask,
  completion_mask,
  *,
  chunk_size: int = 2048,
  temperature: float = 1.0,
  return_entropy: bool = False,
  segment_ids=None,
):
  """Next-token log-probs of a right-padded batch, aligned to ``tokens[:, 1:]``.

  Args:
    model: a causal LM with ``hidden(tokens, attention_mask=...)`` and
      ``unembedding()``.
    tokens: int32 ``[B, L]``.
    attention_mask: bool ``[B, L]``, True on real tokens.
    completion_mask: bool ``[B, L]``, True on the tokens to score.
    chunk_size: token chunk of the fused log-prob kernel.
    temperature: logits are divided by it (sampling temperature).
    return_entropy: also return the per-token entropy.
    segment_ids: optional packing segment ids ``[B, L]``.

  Returns:
    ``(token_logps [B, L-1], mask [B, L-1])`` and, if requested, entropy
    ``[B, L-1]``. ``mask`` is ``completion_mask[:, 1:] & attention_mask[:, 1:]``;
    log-probs and entropies are 0 (no gradient) where it is False: only
    the scored positions are computed.
  """
  kwargs = {"attention_mask": attention_mask}
  if segment_ids is not None:
    kwargs["segment_ids"] = segment_ids
  hidden = model.hidden(tokens, **kwargs)
  mask = jnp.logical_and(completion_mask[:, 1:], attention_mask[:, 1:])
  # Only the scored positions go through the LM head (0 elsewhere).
  out = ops.fused_token_logps(
    hidden[:, :-1],
    model.unembedding(),
    tokens[:, 1:],
    chunk_size=chunk_size,
    temperature=temperature,
    return_entropy=return_entropy,
    where=mask,
  )
  if return_entropy:
    token_logps, entropy = out
    return token_logps, mask, entropy
  return out, mask


def pad_to_same_length(*arrays, pad_value=0):
  """Right-pads ``[B, L_i]`` arrays to the longest ``L``."""
  length = max(a.shape[1] for a in arrays)
  return [
    jnp.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=pad_value)
    if a.shape[1] < length
    else a
    for a in arrays
  ]


def split_kwargs(fn: Callable) -> tuple[list[str], list[str], set[str]]:
  """Array parameters, required array parameters and hyperparameters of fn.

  Arrays are the positional-or-keyword parameters; hyperparameters are the
  keyword-only ones (the loss template's convention).
  """
  sig = inspect.signature(inspect.unwrap(fn))
  arrays, required, hyper = [], [], set()
  for name, p in sig.parameters.items():
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
      arrays.append(name)
      if p.default is p.empty:
        required.append(name)
    elif p.kind == p.KEYWORD_ONLY:
      hyper.add(name)
  return arrays, required, hyper


def check_hyperparameters(
  fn: Callable, hyper: Mapping, where: str, fn_name: str
) -> None:
  """Fails at start if a config key is not a hyperparameter of ``fn``."""
  _, _, valid = split_kwargs(fn)
  unknown = sorted(set(hyper) - valid)
  if unknown:
    raise ValueError(
      f"{where}: {unknown} are not hyperparameters of {fn_name}; valid "
      f"ones are {sorted(valid)}."
    )


def call_by_name(
  fn: Callable, available: Mapping[str, jax.Array], hyper: Mapping, fn_name: str
):
  """Calls ``fn`` with the arrays it names, taken from ``available``."""
  arrays, required, _ = split_kwargs(fn)
  missing = [a for a in required if a not in available]
  if missing:
    raise ValueError(
      f"{fn_name} needs arrays {missing}, which this trainer does not "
      f"provide; it provides {sorted(available)}."
    )
  args = {a: available[a] for a in arrays if a in available}
  return fn(**args, **dict(hyper))


def masked_batch_mean(x, mask):
  """Mean of ``x [B]`` over rows where ``mask`` is True (0 if none)."""
  x = jnp.asarray(x, jnp.float32)
  return ops.safe_divide(
    jnp.sum(jnp.where(mask, x, 0.0)), jnp.sum(mask, dtype=jnp.float32)
  )


# --------------------------------------------------------------------------
# One forward, several per-token statistics (WPO, SparsePO, guidance models)

ACTIVATION_SETS = ("modules", "layers")
"""Which module outputs :func:`completion_forward` captures: ``"modules"``
(the embedding, every norm / attention / MLP / decoder-layer output and the
final norm) or ``"layers"`` (the residual stream after each decoder layer)."""

_LAYER_OUTPUT = re.compile(r"\['layers'\]\[\d+\]\['__call__'\]")


class CompletionForward(NamedTuple):
  """What one forward of a causal LM gives the preference trainer.

  Every per-position field is aligned with ``tokens[:, 1:]`` (position ``t``
  holds what predicts token ``t + 1``).
  """

  token_logps: jax.Array
  """float32 ``[B, L-1]`` log-probs of the next tokens (not masked)."""
  mask: jax.Array
  """bool ``[B, L-1]``: ``completion_mask[:, 1:] & attention_mask[:, 1:]``."""
  hidden: jax.Array
  """Final hidden states ``[B, L-1, D]`` that predict the next tokens."""
  unembedding: jax.Array
  """The LM head ``[D, V]``."""
  activations: tuple = ()
  """Captured module outputs, each ``[B, L-1, D']`` (empty unless asked)."""


def _captured_outputs(intermediates, batch: int, length: int, which: str):
  """Distinct ``[B, L, D']`` module outputs from ``nnx.capture``."""
  leaves = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  out, seen = [], set()
  for path, leaf in leaves:
    if getattr(leaf, "ndim", 0) != 3 or leaf.shape[:2] != (batch, length):
      continue
    if which == "layers" and not _LAYER_OUTPUT.search(
      jax.tree_util.keystr(path)
    ):
      continue
    if id(leaf) in seen:  # hidden() and the final norm return one array
      continue
    seen.add(id(leaf))
    out.append(leaf)
  return tuple(out)


def completion_forward(
  model,
  tokens,
  attention_mask,
  completion_mask,
  *,
  chunk_size: int = 2048,
  capture: str | None = None,
  packing: "_packing.PackedPairs | None" = None,
) -> CompletionForward:
  """Log-probs, hidden states and (optionally) activations in one forward.

  Like :func:`completion_token_logps` (same fused kernel, same values) but
  also returns the hidden states and the LM head, from which the caller can
  compute further per-token statistics of the full next-token distribution
  (WPO's normalisers, per-token KL) without a second forward. With
  ``capture``, the outputs of the model's submodules are recorded with
  ``nnx.capture`` (SparsePO's activation-based masks).

  Args:
    model: a causal LM with ``hidden(tokens, attention_mask=...)`` and
      ``unembedding()``.
    tokens: int32 ``[B, L]``.
    attention_mask: bool ``[B, L]``.
    completion_mask: bool ``[B, L]``, True on the tokens to score.
    chunk_size: token chunk of the fused log-prob kernel.
    capture: None, or one of :data:`ACTIVATION_SETS`.
    packing: optional `_packing.PackedPairs` of the pairs whose unpacked
      rows ``[chosen; rejected]`` are ``tokens``: the model then reads the
      packed rows (each prompt once) and every per-position output is
      gathered back into the unpacked ``[2B, L-1, ...]`` layout, with the
      same values.

  Returns:
    A :class:`CompletionForward`.
  """
  if capture is not None and capture not in ACTIVATION_SETS:
    raise ValueError(
      f"capture must be None or one of {ACTIVATION_SETS}, got {capture!r}."
    )
  if packing is None:
    inputs, kwargs = tokens, {"attention_mask": attention_mask}
    restore = lambda x: x  # noqa: E731
  else:
    inputs, kwargs = packing.tokens, packing.model_kwargs()
    restore = lambda x: _packing.unpack(x, packing)  # noqa: E731
  batch, length = inputs.shape

  def forward(m, t):
    return m.hidden(t, **kwargs)

  activations = ()
  if capture is None:
    hidden = restore(forward(model, inputs))
  else:
    hidden, intermediates = nnx.capture(
      forward, nnx.Intermediate, method_outputs=nnx.Intermediate
    )(model, inputs)
    hidden = restore(hidden)
    activations = tuple(
      restore(a)[:, :-1]
      for a in _captured_outputs(intermediates, batch, length, capture)
    )
  unembedding = model.unembedding()
  mask = jnp.logical_and(completion_mask[:, 1:], attention_mask[:, 1:])
  token_logps = ops.fused_token_logps(
    hidden[:, :-1],
    unembedding,
    tokens[:, 1:],
    chunk_size=chunk_size,
    where=mask,
  )
  return CompletionForward(
    token_logps, mask, hidden[:, :-1], unembedding, activations
  )


def chunked_token_kl(
  policy_hidden,
  policy_unembedding,
  ref_hidden,
  ref_unembedding,
  *,
  chunk_size: int = 2048,
):
  """Per-position ``KL(π_ref(·|s_t) ‖ π(·|s_t))`` without ``[B, T, V]``.

  ``Σ_v q_v (log q_v - log p_v)`` with ``p = softmax(h W)`` (policy) and
  ``q = softmax(h_ref W_ref)`` (reference, no gradient): the per-token KL of
  TDPO and SparsePO (``losses.reference_token_kl`` on logits). The ``B·T``
  rows go through a ``lax.map`` in chunks of ``chunk_size``, each chunk
  under ``jax.checkpoint``, so forward and backward hold one ``[chunk, V]``
  tile per model at a time. Gradients flow into the policy's hidden states
  and unembedding only.

  Args:
    policy_hidden: ``[B, T, D]`` policy hidden states (aligned with targets).
    policy_unembedding: policy LM head ``[D, V]``.
    ref_hidden: ``[B, T, D']`` reference hidden states.
    ref_unembedding: reference LM head ``[D', V]``.
    chunk_size: rows per chunk.

  Returns:
    float32 ``[B, T]``, not masked.
  """
  batch, length, width = policy_hidden.shape
  ref_width = ref_hidden.shape[-1]
  rows = batch * length
  chunk = max(1, min(chunk_size, rows))
  n = -(-rows // chunk)
  pad = n * chunk - rows
  h = jnp.pad(policy_hidden.reshape(rows, width), ((0, pad), (0, 0)))
  hr = jnp.pad(
    jax.lax.stop_gradient(ref_hidden).reshape(rows, ref_width),
    ((0, pad), (0, 0)),
  )
  wr = jax.lax.stop_gradient(ref_unembedding)

  @jax.checkpoint
  def one(h_c, hr_c, w):
    log_p = jax.nn.log_softmax(
      jnp.dot(h_c, w, preferred_element_type=jnp.float32), axis=-1
    )
    log_q = jax.nn.log_softmax(
      jnp.dot(hr_c, wr, preferred_element_type=jnp.float32), axis=-1
    )
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)

  out = jax.lax.map(
    lambda xs: one(xs[0], xs[1], policy_unembedding),
    (h.reshape(n, chunk, width), hr.reshape(n, chunk, ref_width)),
  )
  return out.reshape(-1)[:rows].reshape(batch, length)
