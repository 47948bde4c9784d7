"""Fixed-shape batches: NumPy on the host, the same fields on the device.

Sequences for training are *right*-padded ``[prompt, completion, eos, pad…]``
rows: ``attention_mask`` is True on real tokens and ``completion_mask`` on the
tokens a loss scores (the completion and its EOS). Next-token log-probs are
read at ``tokens[:, 1:]`` with ``completion_mask[:, 1:]``. Prompts for
generation are *left*-padded so every row's last prompt token is at the same
position. Optional fields are ``None`` when absent (pytrees skip them).
Every batch carries ``example_mask`` ``[B]``: False on filler rows of a
final partial batch, which losses ignore.
"""

from typing import NamedTuple

import numpy as np


class SFTBatch(NamedTuple):
  """Supervised fine-tuning: ``tokens``/masks ``[B, L]``."""

  tokens: np.ndarray
  attention_mask: np.ndarray
  completion_mask: np.ndarray
  example_mask: np.ndarray


class PreferenceBatch(NamedTuple):
  """Pairwise preferences (DPO family, Bradley–Terry reward models).

  ``chosen_*``/``rejected_*`` are ``[B, L]``; ``ref_chosen_logps`` and
  ``ref_rejected_logps`` ``[B]`` hold precomputed reference sequence
  log-probs (or None); ``margin`` ``[B]`` an optional preference strength;
  ``chosen_score`` / ``rejected_score`` ``[B]`` optional per-response scores
  (ratings or a gold reward; reward-model regression targets);
  ``subset_id`` ``[B]`` int32 optional category of each pair (an index into
  the iterator's ``subset_names``, e.g. RewardBench-style subsets);
  ``chosen_ratings`` / ``rejected_ratings`` ``[B, K]`` optional per-response
  attribute ratings (HelpSteer-style; NaN where a response is unrated;
  multi-attribute reward-model regression targets).
  """

  chosen_tokens: np.ndarray
  chosen_attention_mask: np.ndarray
  chosen_completion_mask: np.ndarray
  rejected_tokens: np.ndarray
  rejected_attention_mask: np.ndarray
  rejected_completion_mask: np.ndarray
  example_mask: np.ndarray
  ref_chosen_logps: np.ndarray | None = None
  ref_rejected_logps: np.ndarray | None = None
  margin: np.ndarray | None = None
  chosen_score: np.ndarray | None = None
  rejected_score: np.ndarray | None = None
  subset_id: np.ndarray | None = None
  chosen_ratings: np.ndarray | None = None
  rejected_ratings: np.ndarray | None = None


class UnpairedBatch(NamedTuple):
  """Unpaired thumbs-up/down feedback (KTO, BCO): ``labels`` bool ``[B]``.

  ``kl_*`` hold mismatched rows (prompt ``i`` with the completion of row
  ``(i + 1) mod B``) from which KTO estimates its KL reference point z0.
  """

  tokens: np.ndarray
  attention_mask: np.ndarray
  completion_mask: np.ndarray
  labels: np.ndarray
  example_mask: np.ndarray
  kl_tokens: np.ndarray | None = None
  kl_attention_mask: np.ndarray | None = None
  kl_completion_mask: np.ndarray | None = None
  ref_logps: np.ndarray | None = None


class RankedBatch(NamedTuple):
  """K scored responses per prompt: ``tokens`` ``[B, K, L]``, ``scores``
  ``[B, K]`` (higher is better), ``list_mask`` ``[B, K]``."""

  tokens: np.ndarray
  attention_mask: np.ndarray
  completion_mask: np.ndarray
  scores: np.ndarray
  list_mask: np.ndarray
  example_mask: np.ndarray


class StepBatch(NamedTuple):
  """Step-labelled solutions (process reward models).

  ``step_positions`` ``[B, S]`` index the token that ends each step,
  ``step_labels`` ``[B, S]`` are in [0, 1] (hard 0/1 or Monte-Carlo soft
  labels), ``step_mask`` ``[B, S]`` marks real steps.
  """

  tokens: np.ndarray
  attention_mask: np.ndarray
  step_positions: np.ndarray
  step_labels: np.ndarray
  step_mask: np.ndarray
  example_mask: np.ndarray


class PromptBatch(NamedTuple):
  """Prompts for generation, left-padded: ``prompt_tokens`` ``[B, P]``.

  ``prompt_index`` ``[B]`` points into the host-side list of prompt records
  (reference answers, raw text) that rule-based rewards need.
  """

  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  prompt_index: np.ndarray
  example_mask: np.ndarray
