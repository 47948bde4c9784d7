"""Model → per-token log-probs glue shared by the trainers.

Log-probs always go through the fused, chunked kernel
(``ops.fused_token_logps``) from the final hidden states and the unembedding
matrix, so the ``[B, L, V]`` logits never exist.
"""

import inspect
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from alignment import ops


def completion_token_logps(model, tokens, attention_mask, completion_mask, *,
                           chunk_size: int = 2048, temperature: float = 1.0,
                           return_entropy: bool = False,
                           segment_ids=None):
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
    ``[B, L-1]``. ``mask`` is ``completion_mask[:, 1:] & attention_mask[:, 1:]``.
  """
  kwargs = {"attention_mask": attention_mask}
  if segment_ids is not None:
    kwargs["segment_ids"] = segment_ids
  hidden = model.hidden(tokens, **kwargs)
  out = ops.fused_token_logps(
      hidden[:, :-1], model.unembedding(), tokens[:, 1:],
      chunk_size=chunk_size, temperature=temperature,
      return_entropy=return_entropy)
  mask = jnp.logical_and(completion_mask[:, 1:], attention_mask[:, 1:])
  if return_entropy:
    token_logps, entropy = out
    return token_logps, mask, entropy
  return out, mask


def pad_to_same_length(*arrays, pad_value=0):
  """Right-pads ``[B, L_i]`` arrays to the longest ``L``."""
  length = max(a.shape[1] for a in arrays)
  return [jnp.pad(a, ((0, 0), (0, length - a.shape[1])),
                  constant_values=pad_value) if a.shape[1] < length else a
          for a in arrays]


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


def check_hyperparameters(fn: Callable, hyper: Mapping, where: str,
                          fn_name: str) -> None:
  """Fails at start if a config key is not a hyperparameter of ``fn``."""
  _, _, valid = split_kwargs(fn)
  unknown = sorted(set(hyper) - valid)
  if unknown:
    raise ValueError(
        f"{where}: {unknown} are not hyperparameters of {fn_name}; valid "
        f"ones are {sorted(valid)}.")


def call_by_name(fn: Callable, available: Mapping[str, jax.Array],
                 hyper: Mapping, fn_name: str):
  """Calls ``fn`` with the arrays it names, taken from ``available``."""
  arrays, required, _ = split_kwargs(fn)
  missing = [a for a in required if a not in available]
  if missing:
    raise ValueError(
        f"{fn_name} needs arrays {missing}, which this trainer does not "
        f"provide; it provides {sorted(available)}.")
  args = {a: available[a] for a in arrays if a in available}
  return fn(**args, **dict(hyper))


def masked_batch_mean(x, mask):
  """Mean of ``x [B]`` over rows where ``mask`` is True (0 if none)."""
  x = jnp.asarray(x, jnp.float32)
  return ops.safe_divide(jnp.sum(jnp.where(mask, x, 0.0)),
                         jnp.sum(mask, dtype=jnp.float32))
