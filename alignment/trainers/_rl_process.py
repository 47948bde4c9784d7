"""Inputs of the process-credit estimators for the online RL trainer.

``advantages.REGISTRY`` holds three estimators that need more than one
reward per sample; the RL trainer derives their inputs here, only when the
configured estimator is one of them (nothing runs otherwise):

* ``pure_min`` (PURE, Cheng et al. 2025): ``step_rewards`` ``[B, G, S]``
  from a process reward model (PRM) read at the end of every step,
  ``step_mask``, ``step_lengths`` and, with
  ``config.reward.verifiable_rewards``, the configured scalar reward as
  ``verifiable_rewards`` ``[B, G]``.
* ``igpo`` (Wang et al. 2025): ``information_gain`` ``[B, G, S]``, the
  change after each turn of the current policy's length-normalised,
  teacher-forced probability of the record's ground-truth answer,
  ``outcome_rewards`` (the configured scalar reward) and ``turn_mask``.
* ``prime`` (Cui et al. 2025): ``process_rewards`` ``[B, G, T]``, the
  implicit token rewards ``β (log π_φ − log π_ref)`` of an implicit PRM
  ``π_φ`` (a causal LM initialised from the reference, updated online every
  iteration on the rollout with the cross-entropy loss of
  :func:`implicit_prm_loss`), and ``outcome_rewards``.

Steps and turns. A rollout is one completion, so steps (PURE) and turns
(IGPO) are segments of it: :func:`segment_steps` cuts the completion after
every ``config.reward.step_separator`` token (the separator belongs to the
step it ends; ``""``: every token is a step, which is how the synthetic
task's step data labels its letters; ``"auto"``: ``""`` for synthetic data,
``"\\n"`` otherwise, the data pipeline's own rule for step data). EOS joins
the last step. A completion with more than ``S = config.reward.max_steps``
steps (0: ``config.rl.max_new_tokens``, so nothing is ever merged) has its
surplus steps merged into step ``S``, which then ends at the completion's
last step end (logged as ``step_overflow``). IGPO's turns are agent /
environment exchanges in the paper; here they are segments of one
completion (no multi-turn environment), which is what makes the estimator
usable on ordinary rollouts.

Every estimator's output is spread back to tokens: a step's value goes to
every token of the step (``advantages.broadcast_step_values``).
"""

import json
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jaxtyping import Bool, Float, Int

from alignment import advantages as adv_lib
from alignment import models, ops
from alignment import sharding as sharding_lib
from alignment.array_types import In, Out, typechecked
from alignment.trainers import _setup, common

__all__ = [
  "DERIVED_INPUTS",
  "PRIME_NORMS",
  "PRIME_UPDATES",
  "PROCESS_ESTIMATORS",
  "ImplicitPRMLossAux",
  "ProcessInputs",
  "Steps",
  "answer_cutoffs",
  "answer_logps",
  "check",
  "implicit_prm_loss",
  "load_process_reward_model",
  "prime_batch_norm",
  "prm_step_rewards",
  "segment_steps",
  "separator_id",
  "token_advantages",
]

PROCESS_ESTIMATORS = ("pure_min", "igpo", "prime")
STEP_ESTIMATORS = ("pure_min", "igpo")
DERIVED_INPUTS = (
  "step_rewards",
  "step_mask",
  "step_lengths",
  "information_gain",
  "outcome_rewards",
  "turn_mask",
  "process_rewards",
)
"""Estimator arrays derived here (``verifiable_rewards`` is optional)."""
PRIME_UPDATES = ("before", "after")
"""``config.reward.implicit_prm.update``: the PRM update runs ``before`` the
rewards are computed (verl recipe default: two PRM forward passes) or
``after`` (rewards from the PRM that has not yet seen this rollout)."""
PRIME_NORMS = ("batch_norm", "none")
"""``config.reward.implicit_prm.norm``: ``batch_norm`` divides the implicit
rewards by ``max |Σ_{s≥t} r_s| + 1e-6`` over the batch (verl recipe
``prime_norm`` default); ``none`` keeps ``β (log π_φ − log π_ref)``."""


# ----------------------------------------------------------------------------
# Config.


def _reward(config):
  return config.get("reward", ml_collections.ConfigDict())


def max_steps(config) -> int:
  """``S``: ``config.reward.max_steps``, 0 meaning ``max_new_tokens``."""
  s = int(_reward(config).get("max_steps", 0) or 0)
  return s if s > 0 else int(config.rl.max_new_tokens)


def separator_text(config) -> str:
  sep = _reward(config).get("step_separator", "auto")
  if sep == "auto":
    return "" if config.data.get("source", "") == "synthetic" else "\n"
  return sep


def separator_id(config, tokenizer) -> int | None:
  """Token id of ``config.reward.step_separator`` (None: every token)."""
  text = separator_text(config)
  if text == "":
    return None
  ids = tokenizer.encode(text)
  if len(ids) != 1:
    raise ValueError(
      f"config.reward.step_separator={text!r} is {len(ids)} tokens ({ids}) "
      "for this tokenizer; a step separator must be exactly one token "
      "(or '' for one step per token, 'auto' for the data's default)."
    )
  return int(ids[0])


def check(config, name: str) -> None:
  """Fails at start on a config these derived inputs cannot serve."""
  if name not in PROCESS_ESTIMATORS:
    return
  reward = _reward(config)
  sep = reward.get("step_separator", "auto")
  if not isinstance(sep, str):
    raise ValueError(
      f"config.reward.step_separator={sep!r}; valid choices are 'auto', '' "
      "(every token is a step) or a one-token string such as '\\n'."
    )
  steps = reward.get("max_steps", 0)
  if not isinstance(steps, int) or steps < 0:
    raise ValueError(
      f"config.reward.max_steps={steps!r}; it must be an int >= 0 (0: "
      "config.rl.max_new_tokens, so no step is ever merged)."
    )
  if config.kl.mode == "reward":
    raise ValueError(
      f"config.advantage.name={name!r} takes step or token rewards, so a "
      "KL penalty in the sequence reward has no single place; use "
      "config.kl.mode='loss' (or 'none')."
    )
  if name == "pure_min" and not reward.get("process_model", ""):
    raise ValueError(
      "config.advantage.name='pure_min' scores steps with a process reward "
      "model: set config.reward.process_model to the workdir of a reward-"
      "model run with loss prm_hard, prm_soft or prm_scan (its "
      "checkpoints/, same config.model as this run)."
    )
  if name == "prime":
    prm = reward.get("implicit_prm", ml_collections.ConfigDict())
    update = prm.get("update", "before")
    if update not in PRIME_UPDATES:
      raise ValueError(
        f"config.reward.implicit_prm.update={update!r}; valid choices are "
        f"{PRIME_UPDATES}."
      )
    norm = prm.get("norm", "batch_norm")
    if norm not in PRIME_NORMS:
      raise ValueError(
        f"config.reward.implicit_prm.norm={norm!r}; valid choices are "
        f"{PRIME_NORMS}."
      )
    for key in ("beta", "learning_rate"):
      value = prm.get(key, 1.0)
      if not value > 0:
        raise ValueError(
          f"config.reward.implicit_prm.{key}={value!r}; it must be > 0."
        )


# ----------------------------------------------------------------------------
# Steps.


class Steps(NamedTuple):
  """Segmentation of ``[N, T]`` completions into ``S`` steps.

  Attributes:
    token_step_index: int32 ``[N, T]`` step of every completion token, -1
      outside the completion.
    step_mask: bool ``[N, S]``, True on real steps (a prefix of each row).
    step_lengths: int32 ``[N, S]`` tokens per step (sum: completion length).
    step_ends: int32 ``[N, S]`` completion index of the token a step is
      scored at: its last token that is not EOS (EOS only for a completion
      that is nothing but EOS); 0 on padding steps.
    overflow: bool ``[N]``, True where steps beyond ``S`` were merged into
      the last one.
  """

  token_step_index: jax.Array
  step_mask: jax.Array
  step_lengths: jax.Array
  step_ends: jax.Array
  overflow: jax.Array


@typechecked
def segment_steps(
  completion_tokens: Int[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  max_steps: int,
  separator_id: int | None,
  eos_id: int,
) -> Steps:
  """Cuts each completion into steps after every separator token.

  Step ``s`` is the run of completion tokens after the ``s``-th separator
  up to and including the ``s+1``-th (the separator ends its step, as in
  the reward-model trainer's step data, whose PRM reads each step at its
  last token); content after the last separator is one more step; EOS
  joins the last step. ``separator_id=None`` makes every non-EOS token a
  step. Rows with more than ``max_steps`` steps keep the first
  ``max_steps - 1`` and merge the rest into the last (``overflow``).

  Args:
    completion_tokens: sampled ids ``[B, T]``.
    completion_mask: bool ``[B, T]``, True up to and including EOS.
    max_steps: ``S`` >= 1.
    separator_id: the separator's token id, or None.
    eos_id: end-of-sequence id.

  Returns:
    :class:`Steps` (``[B, T]`` and ``[B, S]`` arrays).
  """
  if max_steps < 1:
    raise ValueError(f"segment_steps: max_steps must be >= 1, got {max_steps}.")
  tokens = jnp.asarray(completion_tokens)
  mask = jnp.asarray(completion_mask, bool)
  n, t = tokens.shape
  content = mask & (tokens != eos_id)
  ends = content if separator_id is None else content & (tokens == separator_id)
  ends_i = ends.astype(jnp.int32)
  before = jnp.cumsum(ends_i, axis=1) - ends_i  # separators strictly before
  n_ends = jnp.sum(ends_i, axis=1)
  tail = jnp.any(content & (before == n_ends[:, None]), axis=1)
  n_steps = n_ends + tail.astype(jnp.int32)
  n_steps = jnp.maximum(n_steps, jnp.any(mask, axis=1).astype(jnp.int32))
  index = jnp.minimum(before, n_steps[:, None] - 1)
  index = jnp.minimum(index, max_steps - 1)
  index = jnp.where(mask, index, -1)
  rows = jnp.arange(n)[:, None]
  # Scatter into S + 1 slots; slot S collects what belongs to no step.
  slot = jnp.where(index >= 0, index, max_steps)
  lengths = jnp.zeros((n, max_steps + 1), jnp.int32).at[rows, slot].add(1)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
  content_slot = jnp.where(content, slot, max_steps)
  end_content = (
    jnp.full((n, max_steps + 1), -1, jnp.int32)
    .at[rows, content_slot]
    .max(jnp.where(content, pos, -1))
  )
  end_any = (
    jnp.full((n, max_steps + 1), -1, jnp.int32)
    .at[rows, slot]
    .max(jnp.where(mask, pos, -1))
  )
  step_mask = (
    jnp.arange(max_steps)[None] < jnp.minimum(n_steps, max_steps)[:, None]
  )
  step_ends = jnp.where(
    end_content[:, :max_steps] >= 0,
    end_content[:, :max_steps],
    end_any[:, :max_steps],
  )
  return Steps(
    token_step_index=index.astype(jnp.int32),
    step_mask=step_mask,
    step_lengths=jnp.where(step_mask, lengths[:, :max_steps], 0),
    step_ends=jnp.where(step_mask, step_ends, 0),
    overflow=n_steps > max_steps,
  )


# ----------------------------------------------------------------------------
# PURE: a process reward model read at every step end.


@typechecked
def prm_step_rewards(
  step_logits: Float[In, "B S"], step_mask: Bool[In, "B S"]
) -> Float[Out, "B S"]:
  r"""PURE's step reward ``p(correct) − p(wrong) = 2σ(x) − 1``.

  The reward-model trainer's PRM objectives (``prm_hard``, ``prm_soft``,
  ``prm_scan``) train a binary correctness logit ``x`` per step with a
  sigmoid cross-entropy, so ``p(correct) = σ(x)``; PURE (Cheng et al.
  2025, Sec. 4) scores a step by ``p(correct) − p(wrong)`` in ``[-1, 1]``.

  Args:
    step_logits: the PRM's logit at each step's last token ``[B, S]``.
    step_mask: bool ``[B, S]`` of real steps.

  Returns:
    float32 ``[B, S]`` in ``[-1, 1]``, 0 on padding; no gradient.
  """
  mask = jnp.asarray(step_mask, bool)
  x = jnp.where(mask, jnp.asarray(step_logits, jnp.float32), 0.0)
  return jax.lax.stop_gradient(jnp.where(mask, 2.0 * jax.nn.sigmoid(x) - 1, 0))


def load_process_reward_model(path: str, model_block, mesh, rules):
  """The PRM of a reward-model workdir: ``(params, graphdef, rest)``.

  Reads the latest checkpoint of ``<path>/checkpoints`` written by the
  reward-model trainer with a ``prm_*`` objective (a ``ValueModel`` read at
  step ends), restoring only its parameters, straight into this mesh. The
  architecture is ``model_block`` (the RL run's ``config.model``); a
  checkpoint of another architecture or head fails naming the path.
  """
  where = "config.reward.process_model"
  directory = pathlib.Path(path) / "checkpoints"
  if not path or not directory.is_dir():
    raise ValueError(
      f"{where}={path!r}: no checkpoints/ there; give the workdir of a "
      "reward-model run with loss prm_hard, prm_soft or prm_scan."
    )
  init_from = model_block.get("init_from", "") or ""
  if init_from:  # the architecture of the HF checkpoint the policy loads
    cfg = models.hf.config_from_hf(
      json.loads((pathlib.Path(init_from) / "config.json").read_text()),
      dtype=model_block.get("dtype", "float32"),
      param_dtype=model_block.get("param_dtype", "float32"),
    )
  else:
    cfg = _setup.model_config(model_block)
  abstract = nnx.eval_shape(
    lambda: models.build_model("value", cfg, rngs=nnx.Rngs(0))
  )
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  shardings = sharding_lib.state_shardings(params, mesh, rules)
  manager = ocp.CheckpointManager(
    directory,
    item_handlers={
      "state": ocp.PyTreeCheckpointHandler(),
      "extra": ocp.JsonCheckpointHandler(),
    },
  )
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"{where}={path!r}: checkpoints/ holds no checkpoint.")
  target = {
    "params": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params,
      shardings,
    )
  }
  restore_args = jax.tree.map(
    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target
  )
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True
        )
      ),
    )
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"{where}={path!r}: step {step} is not a process reward model of "
      "this config.model (a ValueModel trained with prm_hard, prm_soft or "
      f"prm_scan): {e}"
    ) from e
  finally:
    manager.close()
  return restored.state["params"], graphdef, rest


# ----------------------------------------------------------------------------
# IGPO: teacher-forced answer probabilities after each turn.


@typechecked
def answer_cutoffs(
  step_ends: Int[In, "B S"], step_mask: Bool[In, "B S"]
) -> Int[Out, "B K"]:
  """Completion tokens kept before the answer: ``[0, e_1 + 1, ...]``.

  Column 0 (no completion) gives IGPO's ``p_0``; column ``s + 1`` keeps the
  completion through the end of turn ``s`` (``K = S + 1``); padding turns
  keep nothing (their values are masked later).
  """
  ends = jnp.where(jnp.asarray(step_mask, bool), step_ends + 1, 0)
  return jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends], 1).astype(
    jnp.int32
  )


def answer_logps(
  model,
  prompt_tokens,
  prompt_mask,
  completion_tokens,
  cutoffs,
  answer_tokens,
  answer_mask,
  *,
  pad_id: int,
  chunk_size: int,
):
  """Mean log-prob of the answer after each prefix of the completion.

  For every sample and cutoff ``c`` (one column of ``cutoffs``) the
  sequence ``prompt + completion[:c] + answer`` is teacher-forced through
  ``model`` (temperature 1) and the answer tokens' log-probs averaged:
  ``(1/A) Σ_j log π(a_j | x, y_{<c}, a_{<j})``. The ``K`` prefixes run one
  after another (``lax.map``), each a batch of ``N`` rows of length
  ``P + T + A``, so memory is that of one forward pass.

  Args:
    model: causal LM (``hidden``, ``unembedding``).
    prompt_tokens: ``[N, P]`` left-padded; prompt_mask: ``[N, P]``.
    completion_tokens: ``[N, T]``.
    cutoffs: int ``[N, K]`` completion tokens kept.
    answer_tokens: ``[N, A]`` right-padded; answer_mask: bool ``[N, A]``.
    pad_id: filler id.
    chunk_size: the fused kernel's row chunk.

  Returns:
    float32 ``[N, K]``; no gradient.
  """
  n, t = completion_tokens.shape
  a = answer_tokens.shape[1]
  j = jnp.arange(t + a)[None]
  answer_len = jnp.sum(answer_mask, axis=1, dtype=jnp.int32)[:, None]
  padded_completion = jnp.concatenate(
    [completion_tokens, jnp.full((n, a), pad_id, completion_tokens.dtype)], 1
  )

  def one(c):
    c = c[:, None]
    keep = j < c
    offset = jnp.clip(j - c, 0, a - 1)
    is_answer = (j >= c) & (j - c < answer_len)
    tail = jnp.where(
      keep,
      padded_completion,
      jnp.where(
        is_answer, jnp.take_along_axis(answer_tokens, offset, 1), pad_id
      ),
    )
    tokens = jnp.concatenate(
      [prompt_tokens, tail.astype(prompt_tokens.dtype)], 1
    )
    attn = jnp.concatenate([prompt_mask, keep | is_answer], 1)
    targets = jnp.concatenate(
      [jnp.zeros((n, prompt_tokens.shape[1] - 1), bool), is_answer], 1
    )
    hidden = model.hidden(tokens, attention_mask=attn)
    lp = ops.fused_token_logps(
      hidden[:, :-1],
      model.unembedding(),
      tokens[:, 1:],
      chunk_size=chunk_size,
      where=targets,
    )
    total = jnp.sum(jnp.where(targets, lp, 0.0), axis=1)
    return ops.safe_divide(total, jnp.sum(targets, 1, dtype=jnp.float32))

  out = jax.lax.map(one, jnp.moveaxis(jnp.asarray(cutoffs), 1, 0))
  return jax.lax.stop_gradient(jnp.moveaxis(out, 0, 1))


def answer_texts(config, records, task) -> list[str]:
  """The ground-truth answer of every record.

  ``record[config.reward.answer_key]`` (the field the verifier reward
  reads). The synthetic letters task's prompts carry no answer; its
  stand-in is the prompt's preferred letters ``S(x)``
  (``LettersTask.preferred_letters``), the set the gold reward counts.
  """
  key = _reward(config).get("answer_key", "answer")
  out = []
  for i, r in enumerate(records):
    if key in r and r[key] is not None and str(r[key]):
      out.append(str(r[key]))
    elif task is not None:
      out.append(task.preferred_letters(r["prompt"]))
    else:
      raise ValueError(
        "config.advantage.name='igpo' needs each prompt's ground-truth "
        f"answer in field config.reward.answer_key={key!r}; record {i} has "
        f"{sorted(r)}."
      )
  return out


def encode_answers(texts, tokenizer):
  """``(tokens [N, A], mask [N, A])``, ``A`` a power of two >= 4."""
  ids = [tokenizer.encode(s) for s in texts]
  if any(not x for x in ids):
    raise ValueError("igpo: a ground-truth answer encodes to no tokens.")
  width = max(4, 1 << math.ceil(math.log2(max(len(x) for x in ids))))
  tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(ids), width), bool)
  for i, x in enumerate(ids):
    tokens[i, : len(x)] = x
    mask[i, : len(x)] = True
  return tokens, mask


# ----------------------------------------------------------------------------
# PRIME: the implicit PRM and its online update.


class ImplicitPRMLossAux(NamedTuple):
  """``score`` ``[B]``: ``β Σ_t (log π_φ − log π_ref)``, the implicit
  outcome logit; ``accuracy`` ``[B]``: 1 where ``score > 0`` agrees with
  ``label > 0.5``."""

  score: jax.Array
  accuracy: jax.Array


@typechecked
def implicit_prm_loss(
  prm_token_logps: Float[In, "B T"],
  ref_token_logps: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  labels: Float[In, "B"],
  *,
  beta: float = 0.05,
) -> tuple[Float[Out, "B"], ImplicitPRMLossAux]:
  r"""PRIME's cross-entropy loss of the implicit PRM on outcome labels.

  .. math::
    s = β \sum_t (\log π_φ(y_t | y_{<t}) − \log π_{ref}(y_t | y_{<t})),
    \qquad \ell = −[y \log σ(s) + (1 − y) \log σ(−s)]

  (Cui et al. 2025, Eq. 4; verl recipe ``compute_ce_dpo_loss_rm``, which
  averages ``ℓ`` over the batch). At ``π_φ = π_ref`` it is ``log 2``.

  Args:
    prm_token_logps: log-probs of the sampled tokens under ``π_φ``
      ``[B, T]``; receives gradient.
    ref_token_logps: under the frozen reference; no gradient.
    completion_mask: bool ``[B, T]`` (masked before any arithmetic).
    labels: outcome labels in ``[0, 1]`` (1: correct); no gradient.
    beta: β > 0 (recipe ``beta_train`` 0.05).

  Returns:
    ``(loss [B], aux)``, float32, not reduced.

  References:
    Cui et al., `Process Reinforcement through Implicit Rewards
    <https://arxiv.org/abs/2502.01456>`_, 2025.
  """
  if not beta > 0:
    raise ValueError(f"implicit_prm_loss: beta must be > 0, got {beta}.")
  mask = jnp.asarray(completion_mask, bool)
  lp = jnp.where(mask, jnp.asarray(prm_token_logps, jnp.float32), 0.0)
  ref = jax.lax.stop_gradient(
    jnp.where(mask, jnp.asarray(ref_token_logps, jnp.float32), 0.0)
  )
  y = jax.lax.stop_gradient(jnp.asarray(labels, jnp.float32))
  score = beta * jnp.sum(lp - ref, axis=-1)
  loss = -(y * jax.nn.log_sigmoid(score) + (1 - y) * jax.nn.log_sigmoid(-score))
  acc = ((score > 0) == (y > 0.5)).astype(jnp.float32)
  return loss, ImplicitPRMLossAux(jax.lax.stop_gradient(score), acc)


@typechecked
def prime_batch_norm(
  token_rewards: Float[In, "B T"], completion_mask: Bool[In, "B T"]
) -> Float[Out, "B T"]:
  r"""verl PRIME recipe's ``prime_norm="batch_norm"`` of implicit rewards.

  ``r / (max_{b,t} |Σ_{s≥t} r_{b,s}| + 10^{-6})`` over the whole batch, so
  the largest return-to-go has magnitude ~1 whatever β.

  Args:
    token_rewards: implicit token rewards ``[B, T]``; no gradient.
    completion_mask: bool ``[B, T]``.

  Returns:
    float32 ``[B, T]``, 0 on masked tokens; no gradient.
  """
  mask = jnp.asarray(completion_mask, bool)
  r = jax.lax.stop_gradient(
    jnp.where(mask, jnp.asarray(token_rewards, jnp.float32), 0.0)
  )
  to_go = jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1)
  return r / (jnp.max(jnp.abs(to_go)) + 1e-6)


def _implicit_prm_optimizer(config, total_steps):
  prm = _reward(config).implicit_prm
  block = ml_collections.ConfigDict(
    dict(
      name="adamw",
      learning_rate=float(prm.learning_rate),
      schedule="constant",
      weight_decay=float(prm.get("weight_decay", 0.0)),
      grad_clip_norm=float(prm.get("grad_clip_norm", 1.0)),
    )
  )
  return common.make_optimizer(block, total_steps)


def make_implicit_prm_loss(graphdef, rest, *, beta, chunk_size):
  """``loss_fn(params, frozen, batch, rng)`` of the implicit PRM update.

  ``batch``: ``tokens``, ``attention_mask``, ``loss_mask``,
  ``ref_token_logps`` (temperature 1) and ``labels`` ``[N]``.
  """

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    model = nnx.merge(graphdef, params, rest)
    hidden = model.hidden(
      batch["tokens"], attention_mask=batch["attention_mask"]
    )
    lp = ops.fused_token_logps(
      hidden[:, :-1],
      model.unembedding(),
      batch["tokens"][:, 1:],
      chunk_size=chunk_size,
      where=batch["loss_mask"],
    )
    loss, aux = implicit_prm_loss(
      lp,
      batch["ref_token_logps"],
      batch["loss_mask"],
      batch["labels"],
      beta=beta,
    )
    wm = ops.aggregate_sequence_loss(loss)
    return wm, {
      "prm_loss": wm.value(),
      "prm_accuracy": jnp.mean(aux.accuracy),
    }

  return loss_fn


# ----------------------------------------------------------------------------
# Estimator call.


def token_advantages(config, fn, ahyper, seq_rewards, loss_mask, group, extra):
  """``[N, L-1]`` token advantages of a process estimator.

  Args:
    config: the RL config.
    fn: the estimator (``advantages.REGISTRY[config.advantage.name]``).
    ahyper: its hyperparameters.
    seq_rewards: ``[N]`` final sequence rewards (outcome / verifiable).
    loss_mask: ``[N, L-1]`` completion targets.
    group: ``G``.
    extra: the arrays :meth:`ProcessInputs.derive` made.
  """
  from alignment.trainers import _lm  # noqa: PLC0415

  name = config.advantage.name
  n = seq_rewards.shape[0]
  b = n // group

  def grp(x):
    return jnp.asarray(x).reshape((b, group) + x.shape[1:])

  for key in {
    "pure_min": ("step_rewards", "steps"),
    "igpo": ("information_gain", "steps"),
    "prime": ("process_rewards",),
  }[name]:
    if key not in extra:
      raise ValueError(
        f"config.advantage.name={name!r} needs {key!r} from the rollout; "
        "pass ProcessInputs.derive's arrays in compute_advantages(extra=...)."
      )
  outcome = grp(jnp.asarray(seq_rewards, jnp.float32))
  if name == "prime":
    avail = {
      "process_rewards": grp(extra["process_rewards"]),
      "outcome_rewards": outcome,
      "completion_mask": grp(loss_mask),
    }
    return _lm.call_by_name(fn, avail, ahyper, name).reshape(loss_mask.shape)
  steps = extra["steps"]
  if name == "pure_min":
    avail = {
      "step_rewards": grp(extra["step_rewards"]),
      "step_mask": grp(steps.step_mask),
      "step_lengths": grp(steps.step_lengths.astype(jnp.float32)),
    }
    if _reward(config).get("verifiable_rewards", False):
      avail["verifiable_rewards"] = outcome
  else:
    avail = {
      "information_gain": grp(extra["information_gain"]),
      "outcome_rewards": outcome,
      "turn_mask": grp(steps.step_mask),
    }
  step_adv = _lm.call_by_name(fn, avail, ahyper, name).reshape(n, -1)
  t = steps.token_step_index.shape[1]
  index = steps.token_step_index
  completion_mask = index >= 0
  tokens = adv_lib.broadcast_step_values(step_adv, index, completion_mask)
  pad = loss_mask.shape[1] - t
  return jnp.concatenate([jnp.zeros((n, pad), jnp.float32), tokens], 1)


# ----------------------------------------------------------------------------
# The trainer's side.


class ProcessInputs:
  """Per-iteration derivation of the process estimators' inputs.

  Built by the RL trainer when ``config.advantage.name`` is in
  :data:`PROCESS_ESTIMATORS`; holds the jitted forward passes, the PRM
  (``pure_min``) and the implicit PRM's train state (``prime``).
  """

  def __init__(
    self,
    config,
    *,
    tokenizer,
    task,
    policy,
    reference_params,
    mesh,
    rules,
    process_reward_model=None,
  ):
    self.config = config
    self.name = config.advantage.name
    self.tokenizer = tokenizer
    self.task = task
    self.mesh, self.rules = mesh, rules
    self.policy = policy  # ShardedModel (igpo, prime); None for pure_min
    self.max_steps = max_steps(config)
    self.separator = separator_id(config, tokenizer)
    self.chunk = config.get("logps_chunk_size", 2048)
    self.state = None  # prime: the implicit PRM's train state
    self.state_shardings = None
    self._segment = jax.jit(
      lambda tok, m: segment_steps(
        tok,
        m,
        max_steps=self.max_steps,
        separator_id=self.separator,
        eos_id=tokenizer.eos_id,
      )
    )
    if self.name == "pure_min":
      if process_reward_model is None:
        process_reward_model = load_process_reward_model(
          _reward(config).process_model, config.model, mesh, rules
        )
      self.prm_params, gd, rest = process_reward_model

      @jax.jit
      def score(params, tokens, attn, step_ends, step_mask, prompt_len):
        prm = nnx.merge(gd, params, rest)
        values = prm(tokens, attention_mask=attn)
        logits = jnp.take_along_axis(values, step_ends + prompt_len, axis=1)
        return prm_step_rewards(logits, step_mask)

      self._score = score
    if self.name == "igpo":
      gd, rest = policy.graphdef, policy.rest

      @jax.jit
      def answers(params, p_tok, p_mask, c_tok, cutoffs, a_tok, a_mask):
        return answer_logps(
          nnx.merge(gd, params, rest),
          p_tok,
          p_mask,
          c_tok,
          cutoffs,
          a_tok,
          a_mask,
          pad_id=tokenizer.pad_id,
          chunk_size=self.chunk,
        )

      self._answers = answers
    if self.name == "prime":
      self._init_implicit_prm(reference_params)

  # -- prime --------------------------------------------------------------

  def _init_implicit_prm(self, reference_params):
    config, policy = self.config, self.policy
    prm = _reward(config).implicit_prm
    self.beta = float(prm.beta)
    self.update = prm.get("update", "before")
    self.norm = prm.get("norm", "batch_norm")
    self.threshold = float(prm.get("threshold", 0.5))
    tx = _implicit_prm_optimizer(
      config, config.total_steps * config.rl.num_minibatches
    )
    params = _setup.frozen_copy(reference_params, policy.param_shardings)
    opt_sh = common.opt_state_shardings(
      tx, params, policy.param_shardings, self.mesh
    )
    repl = sharding_lib.replicated(self.mesh)
    self.state_shardings = {
      "params": policy.param_shardings,
      "opt_state": opt_sh,
      "step": repl,
      "rng": repl,
    }
    state = common.train_state(
      params,
      jax.jit(tx.init, out_shardings=opt_sh)(params),
      0,
      jax.random.key(config.seed + 29),
    )
    self.state = jax.device_put(state, self.state_shardings)
    loss_fn = make_implicit_prm_loss(
      policy.graphdef, policy.rest, beta=self.beta, chunk_size=self.chunk
    )
    self._prm_step = jax.jit(
      common.make_train_step(
        loss_fn, tx, num_microbatches=config.get("microbatches", 1)
      ),
      out_shardings=(self.state_shardings, None),
      donate_argnums=(0,),
    )
    gd, rest = policy.graphdef, policy.rest
    chunk = self.chunk

    @jax.jit
    def logps(params, tokens, attn, loss_mask):
      model = nnx.merge(gd, params, rest)
      hidden = model.hidden(tokens, attention_mask=attn)
      return ops.fused_token_logps(
        hidden[:, :-1],
        model.unembedding(),
        tokens[:, 1:],
        chunk_size=chunk,
        where=loss_mask,
      )

    self._logps = logps

  def _update_implicit_prm(self, tokens, attn, loss_mask, ref_lp, labels):
    n = tokens.shape[0]
    k = self.config.rl.num_minibatches
    size = n // k
    metrics = []
    for m in range(k):
      rows = slice(m * size, (m + 1) * size)
      batch = {
        "tokens": tokens[rows],
        "attention_mask": attn[rows],
        "loss_mask": loss_mask[rows],
        "ref_token_logps": ref_lp[rows],
        "labels": labels[rows],
      }
      batch = sharding_lib.shard_batch(
        jax.device_get(batch), self.mesh, self.rules
      )
      self.state, out = self._prm_step(self.state, None, batch)
      metrics.append(jax.device_get(out))
    return {
      "prm_loss": float(np.mean([x["prm_loss"] for x in metrics])),
      "prm_accuracy": float(np.mean([x["prm_accuracy"] for x in metrics])),
    }

  # -- per iteration ------------------------------------------------------

  def derive(
    self,
    policy_params,
    sample,
    tokens,
    attn,
    loss_mask,
    seq_rewards,
    records,
    ref_logps,
    reference_logps_fn,
  ):
    """Arrays the estimator needs, and metrics to log.

    Args:
      policy_params: the policy that sampled the rollout.
      sample: the sampler's output (prompt/completion tokens and masks).
      tokens, attn: ``[N, P+T]`` rollout; loss_mask: ``[N, P+T-1]``.
      seq_rewards: ``[N]`` final sequence rewards (PRIME's outcomes).
      records: ``N`` prompt records (IGPO's answers).
      ref_logps: ``[N, P+T-1]`` reference log-probs at the sampling
        temperature.
      reference_logps_fn: ``() -> [N, P+T-1]`` reference log-probs at
        temperature 1 (called only if the sampling temperature is not 1).

    Returns:
      ``(extra, metrics)``.
    """
    extra, metrics = {}, {}
    p_len = sample.prompt_tokens.shape[1]
    if self.name in STEP_ESTIMATORS:
      steps = self._segment(sample.completion_tokens, sample.completion_mask)
      extra["steps"] = steps
      metrics["step_count"] = float(
        jnp.mean(jnp.sum(steps.step_mask, axis=1, dtype=jnp.float32))
      )
      metrics["step_overflow"] = float(jnp.mean(steps.overflow))
    if self.name == "pure_min":
      r = self._score(
        self.prm_params, tokens, attn, steps.step_ends, steps.step_mask, p_len
      )
      extra["step_rewards"] = r
      metrics["step_reward"] = float(ops.masked_mean(r, steps.step_mask))
    elif self.name == "igpo":
      texts = answer_texts(self.config, records, self.task)
      a_tok, a_mask = encode_answers(texts, self.tokenizer)
      cut = answer_cutoffs(steps.step_ends, steps.step_mask)
      lp = self._answers(
        policy_params,
        sample.prompt_tokens,
        sample.prompt_mask,
        sample.completion_tokens,
        cut,
        jnp.asarray(a_tok),
        jnp.asarray(a_mask),
      )
      extra["answer_logps"] = lp
      gain = adv_lib.information_gain_rewards(
        lp[:, 1:], lp[:, 0], steps.step_mask
      )
      extra["information_gain"] = gain
      last = jnp.take_along_axis(
        lp[:, 1:],
        jnp.maximum(jnp.sum(steps.step_mask, 1, keepdims=True) - 1, 0),
        1,
      )[:, 0]
      metrics["answer_prob"] = float(jnp.mean(jnp.exp(last)))
      metrics["information_gain"] = float(
        ops.masked_mean(gain, steps.step_mask)
      )
    elif self.name == "prime":
      ref1 = (
        ref_logps
        if float(self.config.rl.temperature) == 1.0
        else reference_logps_fn()
      )
      labels = (jnp.asarray(seq_rewards) > self.threshold).astype(jnp.float32)
      if self.update == "after":
        prm_lp = self._logps(self.state["params"], tokens, attn, loss_mask)
      metrics.update(
        self._update_implicit_prm(tokens, attn, loss_mask, ref1, labels)
      )
      if self.update == "before":
        prm_lp = self._logps(self.state["params"], tokens, attn, loss_mask)
      r = adv_lib.prime_token_rewards(prm_lp, ref1, loss_mask, beta=self.beta)
      metrics["implicit_reward"] = float(
        jnp.mean(jnp.sum(jnp.where(loss_mask, r, 0.0), 1))
      )
      if self.norm == "batch_norm":
        r = prime_batch_norm(r, loss_mask)
      extra["process_rewards"] = r
    return extra, metrics
