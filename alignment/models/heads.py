"""Reward, value, uncertainty and ensemble heads on the shared backbone.

Every model here owns a `Transformer` as ``.transformer`` (so Hugging Face
weights load into any of them) and small heads on its final-normed hidden
states. Sequence-level heads read the hidden state of the last real token
(the last True of ``attention_mask``), which handles left and right padding.
All outputs are float32.

Kinds (`build_model` names):

* ``causal_lm``: `CausalLM` (logits / hidden + unembedding).
* ``reward``: `RewardModel`, a scalar per sequence ``[B]`` (Bradley–Terry RM;
  exports as ``*ForSequenceClassification`` with ``num_labels=1``).
* ``value``: `ValueModel`, a scalar per token ``[B, L]`` (PPO critic).
* ``gaussian_reward``: `GaussianRewardModel`, mean and log-variance ``[B]``.
* ``multi_objective_reward``: `MultiObjectiveRewardModel`, K rewards and
  (optionally gated) simplex weights.
* ``preference_embedding``: `PreferenceEmbeddingModel`, a unit-norm
  ``[B, 2k]`` preference representation (GPM).
* ``ensemble_heads``: `MultiHeadEnsembleRewardModel`, M linear heads on one
  backbone, ``[M, B]``.
* ``ensemble_stacked``: `StackedEnsemble`, M whole members with stacked
  parameters (leading ``members`` axis) run under ``nnx.vmap``, ``[M, ...]``.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Bool, Float, Int

from alignment.array_types import In, Out, typechecked
from alignment.models.config import ModelConfig
from alignment.models.transformer import CausalLM, KeySeq, Transformer, _param


@typechecked
def last_token_index(attention_mask: Bool[In, "B L"]) -> Int[Out, "B"]:
  """Index of the last True of each row (``L - 1`` for an all-False row)."""
  mask = jnp.asarray(attention_mask)
  length = mask.shape[1]
  return (length - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


def _gather(hidden, index):
  """``hidden[b, index[b]]`` → ``[B, D]``."""
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def _f32(x):
  return x.astype(jnp.float32)


class _Backbone(nnx.Module):
  """Shared plumbing: the transformer and last-token features."""

  def hidden(self, tokens, **kwargs):
    """Final-normed hidden states ``[B, L, D]`` of the backbone."""
    return self.transformer(tokens, **kwargs)

  def _features(self, tokens, attention_mask, positions, index=None):
    """float32 ``[B, D]`` hidden state at ``index`` (default: last real).

    Only that position runs through the last block
    (``Transformer(output_index=...)``).
    """
    b, length = jnp.shape(tokens)
    if index is None:
      if attention_mask is None:
        index = jnp.full((b,), length - 1, jnp.int32)
      else:
        index = last_token_index(attention_mask)
    hidden = self.transformer(
      tokens,
      positions=positions,
      attention_mask=attention_mask,
      output_index=jnp.asarray(index, jnp.int32)[:, None],
    )
    return _f32(hidden[:, 0])

  def score_at(self, tokens, index, **kwargs):
    """The head's output at ``R`` token indices per row, in one forward.

    For packed rows holding several sequences (a shared prompt and its
    completions: ``segment_ids`` / ``prefix_ids``) each sequence is read at
    its own last token.

    Args:
      tokens: int ``[B, L]`` ids.
      index: int ``[B, R]`` token indices read in each row.
      **kwargs: `Transformer.__call__` keyword arrays (``attention_mask``,
        ``positions``, ``segment_ids``, ``prefix_ids``).

    Returns:
      The output of ``__call__`` for ``R * B`` sequences, r-major (output
      row ``r * B + b`` reads ``index[b, r]``).
    """
    index = jnp.asarray(index, jnp.int32)
    features = self.transformer(tokens, output_index=index, **kwargs)
    features = jnp.swapaxes(features, 0, 1)  # [R, B, D]
    return self._head(_f32(features.reshape(-1, features.shape[-1])))


class RewardModel(_Backbone):
  """Scalar reward at the last real token (``score`` head, no bias)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.transformer = Transformer(config, rngs=rngs)
    keys = KeySeq(rngs.params())
    self.score = _param(keys, config, (config.d_model, 1), ("embed", None))

  @typechecked
  def __call__(
    self,
    tokens: Int[In, "B L"],
    *,
    attention_mask: Bool[In, "B L"] | None = None,
    positions: Int[In, "B L"] | None = None,
  ) -> Float[Out, "B"]:
    """Rewards ``[B]`` (float32) of the sequences ``tokens``.

    Args:
      tokens: prompt + completion ids, left or right padded.
      attention_mask: True on real tokens (default: all).
      positions: optional position ids (default: running count).
    """
    return self._head(self._features(tokens, attention_mask, positions))

  def _head(self, features):
    return (features @ _f32(self.score[...]))[:, 0]


class ValueModel(_Backbone):
  """Per-token scalar value (PPO critic): linear head with bias."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.transformer = Transformer(config, rngs=rngs)
    keys = KeySeq(rngs.params())
    self.value_kernel = _param(
      keys, config, (config.d_model, 1), ("embed", None)
    )
    self.value_bias = _param(keys, config, (1,), (None,), "zeros")

  @typechecked
  def __call__(
    self,
    tokens: Int[In, "B L"],
    *,
    attention_mask: Bool[In, "B L"] | None = None,
    positions: Int[In, "B L"] | None = None,
    segment_ids: Int[In, "B L"] | None = None,
  ) -> Float[Out, "B L"]:
    """Values ``[B, L]`` (float32): ``V(s_t)`` after reading token ``t``."""
    hidden = self.transformer(
      tokens,
      positions=positions,
      attention_mask=attention_mask,
      segment_ids=segment_ids,
    )
    out = jnp.einsum(
      "bld,do->blo",
      hidden,
      self.value_kernel[...],
      preferred_element_type=jnp.float32,
    )
    return out[..., 0] + _f32(self.value_bias[...])[0]


class GaussianReward(NamedTuple):
  """Outputs of `GaussianRewardModel`, float32 ``[B]`` each."""

  mean: Float[Out, "B"]
  log_variance: Float[Out, "B"]


class GaussianRewardModel(_Backbone):
  """Reward as a Gaussian: mean and log-variance at the last real token.

  Trained with a Gaussian/probabilistic BT likelihood, the variance gives
  an uncertainty estimate for uncertainty-penalised rewards.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.transformer = Transformer(config, rngs=rngs)
    keys = KeySeq(rngs.params())
    self.head_kernel = _param(
      keys, config, (config.d_model, 2), ("embed", None)
    )
    self.head_bias = _param(keys, config, (2,), (None,), "zeros")

  @typechecked
  def __call__(
    self,
    tokens: Int[In, "B L"],
    *,
    attention_mask: Bool[In, "B L"] | None = None,
    positions: Int[In, "B L"] | None = None,
  ) -> GaussianReward:
    return self._head(self._features(tokens, attention_mask, positions))

  def _head(self, features):
    out = (
      features @ _f32(self.head_kernel[...]) + _f32(self.head_bias[...])[None]
    )
    return GaussianReward(mean=out[:, 0], log_variance=out[:, 1])


class MultiObjective(NamedTuple):
  """Outputs of `MultiObjectiveRewardModel`.

  Attributes:
    rewards: ``[B, K]`` per-objective rewards.
    weights: ``[B, K]`` simplex weights (gating network, or uniform).
    score: ``[B]`` ``sum_k weights * rewards``.
  """

  rewards: Float[Out, "B K"]
  weights: Float[Out, "B K"]
  score: Float[Out, "B"]


class MultiObjectiveRewardModel(_Backbone):
  """K rewards from one backbone, mixed by an optional gating network.

  With ``gating=True`` an MLP on the hidden state at ``gate_index``
  (ArmoRM gates on the last prompt token) gives ``softmax(logits /
  temperature)`` weights; otherwise the weights are uniform ``1/K``.

  References:
    Wang et al., `Interpretable Preferences via Multi-Objective Reward
    Modeling and Mixture-of-Experts <https://arxiv.org/abs/2406.12845>`_,
    2024.
  """

  def __init__(
    self,
    config: ModelConfig,
    *,
    num_objectives: int = 4,
    gating: bool = False,
    gating_hidden: int = 256,
    gating_layers: int = 2,
    temperature: float = 1.0,
    rngs: nnx.Rngs,
  ):
    if num_objectives < 1:
      raise ValueError(f"num_objectives must be >= 1, got {num_objectives}.")
    if gating_layers < 1:
      raise ValueError(f"gating_layers must be >= 1, got {gating_layers}.")
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}.")
    self.config = config
    self.num_objectives = num_objectives
    self.gating = gating
    self.temperature = temperature
    self.transformer = Transformer(config, rngs=rngs)
    keys = KeySeq(rngs.params())
    self.reward_kernel = _param(
      keys, config, (config.d_model, num_objectives), ("embed", None)
    )
    self.reward_bias = _param(keys, config, (num_objectives,), (None,), "zeros")
    if gating:
      dims = (
        [config.d_model]
        + [gating_hidden] * (gating_layers - 1)
        + [num_objectives]
      )
      self.gate_kernels = nnx.List(
        [
          _param(keys, config, (a, b), (None, None))
          for a, b in zip(dims[:-1], dims[1:], strict=True)
        ]
      )
      self.gate_biases = nnx.List(
        [_param(keys, config, (b,), (None,), "zeros") for b in dims[1:]]
      )

  @typechecked
  def __call__(
    self,
    tokens: Int[In, "B L"],
    *,
    attention_mask: Bool[In, "B L"] | None = None,
    positions: Int[In, "B L"] | None = None,
    gate_index: Int[In, "B"] | None = None,
  ) -> MultiObjective:
    """Per-objective rewards, weights and their weighted sum.

    Args:
      tokens: prompt + completion ids.
      attention_mask: True on real tokens.
      positions: optional position ids.
      gate_index: token index whose hidden state feeds the gate (e.g. the
        last prompt token); default: the last real token.
    """
    hidden = self.transformer(
      tokens, positions=positions, attention_mask=attention_mask
    )
    b, length = hidden.shape[:2]
    last = (
      last_token_index(attention_mask)
      if attention_mask is not None
      else jnp.full((b,), length - 1, jnp.int32)
    )
    features = _f32(_gather(hidden, last))
    gate = None
    if self.gating and gate_index is not None:
      gate = _f32(_gather(hidden, jnp.asarray(gate_index, jnp.int32)))
    return self._head(features, gate)

  def _head(self, features, gate_features=None):
    """Outputs from last-token features (the gate reads
    ``gate_features``, default the same features)."""
    rewards = (
      features @ _f32(self.reward_kernel[...])
      + _f32(self.reward_bias[...])[None]
    )
    if self.gating:
      h = features if gate_features is None else gate_features
      n = len(self.gate_kernels)
      for i, (w, bias) in enumerate(
        zip(self.gate_kernels, self.gate_biases, strict=True)
      ):
        h = h @ _f32(w[...]) + _f32(bias[...])[None]
        if i < n - 1:
          h = jax.nn.relu(h)
      weights = jax.nn.softmax(h / self.temperature, axis=-1)
    else:
      weights = jnp.full_like(rewards, 1.0 / self.num_objectives)
    return MultiObjective(
      rewards=rewards,
      weights=weights,
      score=jnp.sum(weights * rewards, axis=-1),
    )


class PreferenceEmbeddingModel(_Backbone):
  """General Preference Model: a ``2k``-dim preference embedding.

  The score of ``y_i`` over ``y_j`` is ``<R v_i, v_j>`` with ``R`` the
  block-diagonal skew-symmetric operator (blocks ``[[0, -1], [1, 0]]``);
  the embeddings are L2-normalised (``normalize=True``), as in the paper.

  References:
    Zhang et al., `General Preference Modeling with Preference
    Representations for Aligning Language Models
    <https://arxiv.org/abs/2410.02197>`_, 2024.
  """

  def __init__(
    self,
    config: ModelConfig,
    *,
    embed_dim: int = 8,
    normalize: bool = True,
    rngs: nnx.Rngs,
  ):
    if embed_dim < 2 or embed_dim % 2:
      raise ValueError(f"embed_dim must be even and >= 2, got {embed_dim}.")
    self.config = config
    self.normalize = normalize
    self.transformer = Transformer(config, rngs=rngs)
    keys = KeySeq(rngs.params())
    self.embed_kernel = _param(
      keys, config, (config.d_model, embed_dim), ("embed", None)
    )

  @typechecked
  def __call__(
    self,
    tokens: Int[In, "B L"],
    *,
    attention_mask: Bool[In, "B L"] | None = None,
    positions: Int[In, "B L"] | None = None,
  ) -> Float[Out, "B E"]:
    """Preference embeddings ``[B, 2k]`` (float32, unit norm if asked)."""
    return self._head(self._features(tokens, attention_mask, positions))

  def _head(self, features):
    v = features @ _f32(self.embed_kernel[...])
    if self.normalize:
      norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
      v = v / jnp.maximum(norm, 1e-12)
    return v


class MultiHeadEnsembleRewardModel(_Backbone):
  """M independent linear reward heads on one shared backbone → ``[M, B]``.

  References:
    Coste et al., `Reward Model Ensembles Help Mitigate Overoptimization
    <https://arxiv.org/abs/2310.02743>`_, 2023.
  """

  def __init__(
    self, config: ModelConfig, *, num_heads: int = 4, rngs: nnx.Rngs
  ):
    if num_heads < 1:
      raise ValueError(f"num_heads must be >= 1, got {num_heads}.")
    self.config = config
    self.transformer = Transformer(config, rngs=rngs)
    keys = KeySeq(rngs.params())
    self.heads_kernel = _param(
      keys, config, (num_heads, config.d_model), ("members", "embed")
    )
    self.heads_bias = _param(keys, config, (num_heads,), ("members",), "zeros")

  @typechecked
  def __call__(
    self,
    tokens: Int[In, "B L"],
    *,
    attention_mask: Bool[In, "B L"] | None = None,
    positions: Int[In, "B L"] | None = None,
  ) -> Float[Out, "M B"]:
    """Rewards of every head, float32 ``[M, B]``."""
    return self._head(self._features(tokens, attention_mask, positions))

  def _head(self, features):
    out = (
      features @ _f32(self.heads_kernel[...]).T
      + _f32(self.heads_bias[...])[None]
    )
    return out.T


MEMBER_KINDS = (
  "reward",
  "value",
  "gaussian_reward",
  "causal_lm",
  "multi_objective_reward",
  "preference_embedding",
)


class StackedEnsemble(nnx.Module):
  """M whole models with stacked parameters, run with ``nnx.vmap``.

  Members are created with ``nnx.split_rngs`` + ``nnx.vmap`` so every
  parameter gets a leading ``members`` axis (logical name ``"members"``,
  shardable over a mesh axis); the forward pass maps over that axis with
  the inputs broadcast, so the outputs get a leading ``[M]`` axis.
  """

  def __init__(
    self,
    config: ModelConfig,
    *,
    num_members: int = 4,
    member_kind: str = "reward",
    rngs: nnx.Rngs,
    **member_kwargs,
  ):
    if num_members < 1:
      raise ValueError(f"num_members must be >= 1, got {num_members}.")
    if member_kind not in MEMBER_KINDS:
      raise ValueError(
        f"member_kind must be one of {MEMBER_KINDS}, got {member_kind!r}."
      )
    self.config = config
    self.num_members = num_members
    self.member_kind = member_kind

    @nnx.split_rngs(splits=num_members)
    @nnx.vmap(
      in_axes=(0,),
      out_axes=0,
      transform_metadata={nnx.PARTITION_NAME: "members"},
    )
    def create(rngs):
      return build_model(member_kind, config, rngs=rngs, **member_kwargs)

    self.members = create(rngs)

  def __call__(self, tokens, **kwargs):
    """Every member's output with a leading ``[M]`` axis.

    Args:
      tokens: int ``[B, L]`` ids, shared by all members.
      **kwargs: keyword arrays forwarded to each member
        (``attention_mask``, ``positions``, ...), shared by all members.
    """

    @nnx.vmap(in_axes=(0, None, None), out_axes=0)
    def run(member, tokens, kwargs):
      return member(tokens, **kwargs)

    return run(self.members, tokens, kwargs)

  def score_at(self, tokens, index, **kwargs):
    """Every member's `score_at` (see ``_Backbone.score_at``) with a
    leading ``[M]`` axis."""

    @nnx.vmap(in_axes=(0, None, None, None), out_axes=0)
    def run(member, tokens, index, kwargs):
      return member.score_at(tokens, index, **kwargs)

    return run(self.members, tokens, index, kwargs)


_KINDS: dict[str, Callable[..., nnx.Module]] = {
  "causal_lm": CausalLM,
  "reward": RewardModel,
  "value": ValueModel,
  "gaussian_reward": GaussianRewardModel,
  "multi_objective_reward": MultiObjectiveRewardModel,
  "preference_embedding": PreferenceEmbeddingModel,
  "ensemble_heads": MultiHeadEnsembleRewardModel,
  "ensemble_stacked": StackedEnsemble,
}
KINDS = tuple(_KINDS)


def build_model(
  kind: str, config: ModelConfig, rngs: nnx.Rngs | None = None, **kwargs
) -> nnx.Module:
  """Builds a model of ``kind`` on ``config``.

  Args:
    kind: one of `KINDS`.
    config: the backbone's `ModelConfig`.
    rngs: ``nnx.Rngs`` for the initialisers (default ``nnx.Rngs(0)``).
    **kwargs: head options (``num_objectives``, ``gating``, ``embed_dim``,
      ``num_heads``, ``num_members``, ``member_kind``, ...).

  Returns:
    The randomly initialised module.

  Raises:
    ValueError: unknown ``kind`` (the message lists the valid ones).
  """
  if kind not in _KINDS:
    raise ValueError(f"Unknown model kind {kind!r}; valid kinds: {KINDS}.")
  if rngs is None:
    rngs = nnx.Rngs(0)
  return _KINDS[kind](config, rngs=rngs, **kwargs)
