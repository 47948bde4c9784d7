r"""Per-device memory planner: will a preset fit a mesh for a trainer?

For a model preset, a mesh, a batch, a sequence length and a trainer kind
(``sft``, ``dpo``, ``reward_model``, ``grpo``) the planner reports the bytes
each device holds, two ways, side by side:

* **analytic**: parameters, optimiser state and gradients from the exact
  shard shapes the rule table gives every parameter (``jax.eval_shape``, so
  nothing is allocated), plus a closed-form count of the activations a
  training step keeps for the backward pass (with and without per-block
  rematerialisation), the frozen reference model, the batch, and the
  sampler's KV cache;
* **compiled**: ``jax.jit(step).lower(abstract args).compile()
  .memory_analysis()`` of the same step on a mesh of real (or fake CPU)
  devices, when this process has enough devices for the mesh. Pod-sized
  meshes (``v5e-256``, ``v4-128``, ``64xH100``) need that topology (or
  libtpu's compile-only topologies) to compile; the CLI then prints the
  analytic figure only.

The steps compiled here are small, self-contained versions of the trainers'
(policy log-probs through ``ops.fused_token_logps``; DPO with a frozen
reference; Bradley–Terry on ``models.RewardModel``; GRPO's clipped surrogate
plus a k3 KL to a frozen reference), built with
``trainers.common.make_train_step``; the tests use them to check sharding
and multi-process equivalence.

Analytic model (per device; compute dtype ``a`` bytes, ``r`` local rows of
length ``L``, tensor-parallel degree ``t``; ``D`` width, ``H`` / ``KV``
query / key-value heads of width ``N``, ``F`` MLP width). A block keeps for
its backward pass, per token,

.. math::
  s_{block} = a\,[c_D D + (2H N + 2 KV N + (2{+}g) F)/t] + 4 H L / t

(``c_D`` = 4 norm inputs/outputs, 3 for parallel residuals; ``g`` = 1 for
gated MLPs; the last term is the float32 attention probabilities, which the
model materialises). Without remat the step keeps ``n_layers`` of these
(``n_layers - 1`` for the scalar reward heads, whose last block runs only
at the read positions apart from its keys and values); with remat the
``D``-wide block inputs plus one block's set. On top: one
block's backward working set, the fused LM head's tiles and float32
unembedding gradient (`WeightTemporaries`), every gradient at the end of the
backward pass (`Plan.step_peak` takes the larger end), the reference
forward, and the FSDP-gathered weights: two layers at a time (``gather=
"layer"``, what a scheduler that gathers just in time needs) or every layer
(``gather="all"``). GRPO's sampling phase holds the KV cache and a prefill
working set instead (`Plan.sampling_peak`).

What XLA:CPU makes of the step differs from that picture in two measured
ways, which `Plan.xla_cpu_estimate` models and the tests check against the
compiled figures (within 10% on the tiny and small presets): per-block
``jax.checkpoint`` of the unrolled layer stack saves nothing there (a toy
8-layer stack: 73 MB temp with or without it; inside ``lax.scan`` it drops
from 185 MB to 51 MB), and every layer's FSDP-gathered weights stay live
from the forward to the backward pass (fsdp=8 toy: 126 MB unrolled vs 19 MB
scanned with remat). TPU/GPU numbers need that topology to compile.

CLI::

  python -m alignment.sharding.planner                       # large table
  python -m alignment.sharding.planner --presets=llama-3-8b \
      --meshes=8xH100 --trainers=dpo --batch=8 --seq_len=4096
  python -m alignment.sharding.planner --presets=tiny,small --meshes=cpu-8 \
      --compile                                              # both figures
"""

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alignment.sharding import mesh as mesh_lib
from alignment.sharding import partition
from alignment.sharding import rules as rules_lib

TRAINERS = ("sft", "dpo", "reward_model", "grpo")
"""Trainer kinds the planner models."""

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MeshPreset:
  """A named accelerator slice and the default mesh used on it.

  Attributes:
    name: e.g. ``"v5e-256"``.
    num_devices: JAX devices (TPU chips; v4 chips are one megacore device).
    hbm_bytes: memory of one device, or None (host CPU).
    axes: default ``config.mesh`` for it (pure FSDP, the style guide's
      starting point).
    note: the hardware, in words.
  """

  name: str
  num_devices: int
  hbm_bytes: int | None
  axes: tuple[tuple[str, int], ...]
  note: str


def _fsdp(n: int) -> tuple[tuple[str, int], ...]:
  return (("data", 1), ("fsdp", n), ("tensor", 1))


MESHES: dict[str, MeshPreset] = {
  "cpu-8": MeshPreset("cpu-8", 8, None, _fsdp(8), "8 fake CPU devices"),
  "8xH100": MeshPreset(
    "8xH100", 8, 80 * 10**9, _fsdp(8), "one node, 8 x H100 80 GB"
  ),
  "64xH100": MeshPreset(
    "64xH100", 64, 80 * 10**9, _fsdp(64), "8 nodes, 8 x H100 80 GB each"
  ),
  "v4-128": MeshPreset(
    "v4-128", 64, 32 * GiB, _fsdp(64), "TPU v4-128: 64 chips, 32 GiB HBM"
  ),
  "v5e-256": MeshPreset(
    "v5e-256", 256, 16 * GiB, _fsdp(256), "TPU v5e-256: 256 chips, 16 GiB"
  ),
}
"""Named meshes of the CLI. v4 slices are named by TensorCores (2 per
chip, one JAX device per chip), v5e slices by chips."""

LARGE_PRESETS = ("llama-3.2-1b", "llama-3-8b", "qwen3-8b", "llama-3-70b")
"""Presets of the README table."""


@dataclasses.dataclass(frozen=True)
class Workload:
  """What one training step processes.

  Attributes:
    trainer: one of `TRAINERS`.
    batch: global batch: sequences (sft), preference pairs (dpo,
      reward_model) or prompts (grpo).
    seq_len: L, tokens per sequence (prompt + completion).
    num_samples: G, completions per prompt (grpo only).
    prompt_len: prompt tokens of a GRPO row (the sampler's prefill);
      defaults to ``seq_len // 4``.
    microbatches: gradient-accumulation micro-batches per step.
    chunk_size: row chunk of the fused log-prob kernel.
    reference: whether dpo/grpo carry a frozen reference model.
  """

  trainer: str
  batch: int
  seq_len: int
  num_samples: int = 4
  prompt_len: int | None = None
  microbatches: int = 1
  chunk_size: int = 2048
  reference: bool = True

  def __post_init__(self):
    if self.trainer not in TRAINERS:
      raise ValueError(
        f"trainer must be one of {TRAINERS}, got {self.trainer!r}."
      )
    for name in ("batch", "seq_len", "num_samples", "microbatches"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {self.seq_len}.")
    if self.batch_rows % self.microbatches:
      raise ValueError(
        f"the {self.batch} x {self.rows_per_example} = {self.batch_rows} "
        f"rows of a step do not split into microbatches={self.microbatches}."
      )

  @property
  def rows_per_example(self) -> int:
    """Sequences per batch element (pairs have two)."""
    if self.trainer in ("dpo", "reward_model"):
      return 2
    if self.trainer == "grpo":
      return self.num_samples
    return 1

  @property
  def batch_rows(self) -> int:
    """Leading dimension of the batch arrays."""
    if self.trainer == "grpo":
      return self.batch * self.num_samples
    return self.batch

  @property
  def has_reference(self) -> bool:
    return self.reference and self.trainer in ("dpo", "grpo")

  @property
  def model_kind(self) -> str:
    return "reward" if self.trainer == "reward_model" else "causal_lm"

  @property
  def prefill_len(self) -> int:
    if self.prompt_len is not None:
      return self.prompt_len
    return max(1, self.seq_len // 4)


# ----------------------------------------------------------------------------
# The steps (also used by the sharding tests)
# ----------------------------------------------------------------------------


def _policy_token_logps(model, tokens, attention_mask, chunk_size):
  """Next-token log-probs ``[R, L-1]`` through the fused kernel."""
  from alignment import ops  # noqa: PLC0415

  hidden = model.hidden(tokens, attention_mask=attention_mask)
  return ops.fused_token_logps(
    hidden[:, :-1],
    model.unembedding(),
    tokens[:, 1:],
    chunk_size=chunk_size,
  )


def _pairs_to_rows(x):
  """``[B, 2, ...] -> [2B, ...]`` (rows 2i, 2i+1 = pair i: no resharding
  of a batch sharded along B)."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def make_loss_fn(
  trainer: str,
  graphdef,
  rest,
  *,
  chunk_size: int = 2048,
  beta: float = 0.1,
  kl_beta: float = 0.04,
) -> Callable:
  """``loss_fn(params, frozen, batch, rng) -> (WeightedMean, metrics)``.

  Args:
    trainer: one of `TRAINERS`.
    graphdef: static graph of the model (`flax.nnx.split`).
    rest: its non-parameter state.
    chunk_size: rows per tile of the fused log-prob kernel.
    beta: DPO's β.
    kl_beta: weight of GRPO's k3 KL to the reference (0: no reference).

  Returns:
    The loss closure for `trainers.common.make_train_step`. Batches are
    dicts of arrays: ``tokens``, ``attention_mask``, ``completion_mask``
    (``[B, L]``, or ``[B, 2, L]`` for pairs: chosen then rejected) and,
    for grpo, ``old_token_logps [B, L-1]`` and ``advantages [B]``.
  """
  from flax import nnx  # noqa: PLC0415

  from alignment import losses, ops  # noqa: PLC0415

  if trainer not in TRAINERS:
    raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}.")

  def merge(params):
    return nnx.merge(graphdef, params, rest)

  def frozen_model(frozen):
    return merge(jax.lax.stop_gradient(frozen))

  def masked_logps(model, tokens, attn, comp):
    token_logps = _policy_token_logps(model, tokens, attn, chunk_size)
    mask = jnp.logical_and(comp[:, 1:], attn[:, 1:])
    return jnp.where(mask, token_logps, 0.0), mask

  def sft(params, frozen, batch, rng):
    del frozen, rng
    logps, mask = masked_logps(
      merge(params),
      batch["tokens"],
      batch["attention_mask"],
      batch["completion_mask"],
    )
    wm = ops.aggregate_token_loss(-logps, mask, mode="token_mean")
    return wm, {}

  def dpo(params, frozen, batch, rng):
    del rng
    b = batch["tokens"].shape[0]
    tokens = _pairs_to_rows(batch["tokens"])
    attn = _pairs_to_rows(batch["attention_mask"])
    comp = _pairs_to_rows(batch["completion_mask"])
    policy, _ = masked_logps(merge(params), tokens, attn, comp)
    ref, _ = masked_logps(frozen_model(frozen), tokens, attn, comp)
    policy = policy.sum(-1).reshape(b, 2)
    ref = ref.sum(-1).reshape(b, 2)
    loss, aux = losses.dpo_loss(
      policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=beta
    )
    wm = ops.aggregate_sequence_loss(loss)
    margin = aux.chosen_rewards - aux.rejected_rewards
    return wm, {"reward_margin": jnp.mean(margin)}

  def reward_model(params, frozen, batch, rng):
    del frozen, rng
    b = batch["tokens"].shape[0]
    rewards = merge(params)(
      _pairs_to_rows(batch["tokens"]),
      attention_mask=_pairs_to_rows(batch["attention_mask"]),
    ).reshape(b, 2)
    loss, _ = losses.bradley_terry_loss(rewards[:, 0], rewards[:, 1])
    wm = ops.aggregate_sequence_loss(loss)
    accuracy = jnp.mean((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32))
    return wm, {"accuracy": accuracy}

  def grpo(params, frozen, batch, rng):
    del rng
    tokens, attn = batch["tokens"], batch["attention_mask"]
    comp = batch["completion_mask"]
    logps, mask = masked_logps(merge(params), tokens, attn, comp)
    per_token, _ = losses.grpo_loss(
      logps, batch["old_token_logps"], batch["advantages"], mask
    )
    kl = jnp.zeros_like(per_token)
    if frozen is not None and kl_beta:
      ref, _ = masked_logps(frozen_model(frozen), tokens, attn, comp)
      kl = jnp.where(mask, ops.kl_k3(logps, ref), 0.0)
      per_token = per_token + kl_beta * kl
    wm = ops.aggregate_token_loss(per_token, mask, mode="sequence_mean")
    kl_mean = ops.safe_divide(jnp.sum(kl), jnp.sum(mask, dtype=jnp.float32))
    return wm, {"kl": kl_mean}

  return {"sft": sft, "dpo": dpo, "reward_model": reward_model, "grpo": grpo}[
    trainer
  ]


def batch_shapes(
  workload: Workload, vocab_size: int
) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes of one step's batch (what `make_loss_fn` reads)."""
  del vocab_size
  rows, length = workload.batch_rows, workload.seq_len
  if workload.trainer in ("dpo", "reward_model"):
    lead = (rows, 2, length)
  else:
    lead = (rows, length)
  out = {
    "tokens": jax.ShapeDtypeStruct(lead, jnp.int32),
    "attention_mask": jax.ShapeDtypeStruct(lead, jnp.bool_),
    "completion_mask": jax.ShapeDtypeStruct(lead, jnp.bool_),
  }
  if workload.trainer == "grpo":
    out["old_token_logps"] = jax.ShapeDtypeStruct(
      (rows, length - 1), jnp.float32
    )
    out["advantages"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
  return out


def synthetic_batch(
  workload: Workload, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """A deterministic batch with the shapes of `batch_shapes`.

  Rows are right-padded to random lengths >= 3/4 of ``seq_len``; the first
  quarter of each row is prompt (not in ``completion_mask``).
  """
  rng = np.random.default_rng(seed)
  shapes = batch_shapes(workload, vocab_size)
  lead = shapes["tokens"].shape
  length = lead[-1]
  tokens = rng.integers(0, vocab_size, size=lead, dtype=np.int32)
  lengths = rng.integers(max(2, (3 * length) // 4), length + 1, size=lead[:-1])
  pos = np.arange(length)
  attention_mask = pos < lengths[..., None]
  prompt = max(1, length // 4)
  completion_mask = attention_mask & (pos >= prompt)
  out = {
    "tokens": tokens,
    "attention_mask": attention_mask,
    "completion_mask": completion_mask,
  }
  if workload.trainer == "grpo":
    rows = lead[0]
    out["old_token_logps"] = (
      -rng.uniform(0.5, 6.0, size=(rows, length - 1))
    ).astype(np.float32)
    out["advantages"] = rng.standard_normal(rows).astype(np.float32)
  return out


# ----------------------------------------------------------------------------
# Abstract (never allocated) model, optimiser state and shardings
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class AbstractSetup:
  """Abstract train state and shardings of one model on one mesh."""

  graphdef: Any
  rest: Any
  params: Any  # ShapeDtypeStructs with shardings
  param_shardings: Any
  opt_state: Any
  opt_shardings: Any
  rest_shardings: Any


def _with_sharding(tree, shardings):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )


def default_optimizer():
  """What the trainers' configs use: global-norm clipping, then AdamW
  (two param-shaped moments in the parameter dtype). Clipping needs every
  gradient before the first update, so all gradients are live at once."""
  import optax  # noqa: PLC0415

  return optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.01)
  )


def abstract_setup(
  model_config, kind: str, mesh, rules, tx=None
) -> AbstractSetup:
  """Abstract params/optimiser state of ``kind`` on ``mesh`` (no memory).

  Args:
    model_config: a `models.ModelConfig`.
    kind: a `models.build_model` kind (``causal_lm``, ``reward``, ...).
    mesh: a ``Mesh`` or an ``AbstractMesh``.
    rules: the logical-axis rule table.
    tx: optax transformation (default `default_optimizer`).
  """

  tx = default_optimizer() if tx is None else tx
  graphdef, params, rest = _abstract_model(model_config, kind)
  p_shard = partition.state_shardings(params, mesh, rules)
  r_shard = partition.state_shardings(rest, mesh, rules)
  params = _with_sharding(jax.tree.map(_sds, params), p_shard)
  opt_abstract = jax.eval_shape(tx.init, params)
  o_shard = _opt_shardings(opt_abstract, params, p_shard, mesh)
  opt_state = _with_sharding(opt_abstract, o_shard)
  return AbstractSetup(
    graphdef, rest, params, p_shard, opt_state, o_shard, r_shard
  )


@functools.lru_cache(maxsize=8)
def _abstract_model(model_config, kind: str):
  """``(graphdef, params, rest)`` of an abstract model (cached: tracing a
  70B constructor takes seconds)."""
  from flax import nnx  # noqa: PLC0415

  from alignment import models  # noqa: PLC0415

  abstract = nnx.eval_shape(
    lambda: models.build_model(kind, model_config, rngs=nnx.Rngs(0))
  )
  return nnx.split(abstract, nnx.Param, ...)


def _sds(x):
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _opt_shardings(opt_abstract, params, param_shardings, mesh):
  """Like `trainers.common.opt_state_shardings` (param-shaped leaves get
  their parameter's sharding, the rest are replicated), from abstract
  values so it also works on an ``AbstractMesh``."""
  flat = {
    jax.tree_util.keystr(path): (tuple(leaf.shape), shard)
    for (path, leaf), shard in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(param_shardings),
      strict=True,
    )
  }

  def one(path, leaf):
    key = jax.tree_util.keystr(path)
    for p_key, (shape, shard) in flat.items():
      if key.endswith(p_key) and tuple(leaf.shape) == shape:
        return shard
    return NamedSharding(mesh, P())

  return jax.tree.map_with_path(one, opt_abstract)


def shard_bytes(shape: Sequence[int], dtype, sharding) -> int:
  """Bytes of the largest shard of an array on one device."""
  shard = sharding.shard_shape(tuple(shape)) if shape else ()
  return int(np.prod(shard, dtype=np.int64)) * np.dtype(dtype).itemsize


def tree_shard_bytes(tree) -> int:
  """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
  return sum(
    shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree)
  )


def tree_bytes(tree) -> int:
  """Unsharded bytes of a tree of arrays / ShapeDtypeStructs."""
  return sum(
    int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )


# ----------------------------------------------------------------------------
# The analytic model
# ----------------------------------------------------------------------------


def _axis_product(spec_entry, mesh) -> int:
  axes = rules_lib._as_tuple(spec_entry)  # noqa: SLF001
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _logical_degree(name: str, size: int, mesh, rules) -> int:
  """How many ways a dimension of logical ``name`` and ``size`` is split."""
  spec = rules_lib.logical_to_spec((name,), rules, mesh)
  entry = tuple(spec)[0] if tuple(spec) else None
  degree = _axis_product(entry, mesh)
  return degree if size % degree == 0 else 1


@dataclasses.dataclass(frozen=True)
class Activations:
  """Analytic activation bytes of one training step on one device."""

  saved: int  # kept for the backward pass (all blocks)
  working: int  # one block's backward working set, LM-head tiles
  frozen_forward: int  # peak of the no-grad reference forward

  @property
  def peak(self) -> int:
    return self.saved + max(self.working, self.frozen_forward)


def activation_bytes(
  model_config, workload: Workload, mesh, rules, *, remat: bool
) -> Activations:
  """Closed-form activation bytes per device (see the module docstring)."""
  c = model_config
  a = np.dtype(jnp.dtype(c.dtype)).itemsize
  rows = workload.batch_rows * (
    2 if workload.trainer in ("dpo", "reward_model") else 1
  )
  rows = rows // workload.microbatches
  shards = _logical_degree("batch", rows, mesh, rules)
  r = -(-rows // shards)
  length = workload.seq_len
  tokens = r * length
  t_heads = _logical_degree("heads", c.n_heads, mesh, rules)
  t_kv = _logical_degree("kv_heads", c.n_kv_heads, mesh, rules)
  t_mlp = _logical_degree("mlp", c.d_ff, mesh, rules)
  t_vocab = _logical_degree("vocab", c.vocab_size, mesh, rules)
  d, n, f = c.d_model, c.head_dim, c.d_ff
  h, kv = c.n_heads, c.n_kv_heads
  gated = 1 if c.gated else 0
  c_d = 3 if c.parallel_residual else 4
  # Per token, per block: D-wide norm inputs/outputs, q and attention
  # output, k and v, MLP pre-activations and product, float32 probs.
  per_token = (
    a
    * (
      c_d * d
      + 2 * h * n / t_heads
      + 2 * kv * n / t_kv
      + (2 + gated) * f / t_mlp
    )
    + 4 * h * length / t_heads
  )
  block = tokens * per_token
  if remat:
    saved = c.n_layers * tokens * a * d + block
  elif workload.model_kind == "reward":
    # Scalar heads read one position per sequence
    # (``Transformer(output_index=...)``): the last block keeps only its
    # normed input and keys / values at every token, and they are freed
    # once its (small) backward is done, before the next block's working
    # set peaks: the peak holds the other blocks' saved sets.
    saved = (c.n_layers - 1) * block
  else:
    saved = c.n_layers * block
  # Backward of one block: gradients of its activations (about one block's
  # saved set) and of the attention scores (float32, probs-sized).
  scores = tokens * 4 * h * length / t_heads
  working = block + scores
  if workload.model_kind == "causal_lm":
    # Fused LM head: the hidden rows it saves and one set of [C, Vc]
    # float32 tiles (logits, probabilities, their gradient).
    chunk = min(workload.chunk_size, tokens)
    vocab_chunk = min(4096, c.vocab_size // t_vocab)
    working += tokens * a * d + 3 * chunk * vocab_chunk * 4
  frozen_forward = 0
  if workload.has_reference:
    # No saved set: one block's activations plus the LM-head tiles.
    frozen_forward = block + scores
  return Activations(int(saved), int(working), int(frozen_forward))


def _unsharded_over(shape, spec, mesh, drop: set[str]) -> int:
  """Elements per device of an array whose ``drop`` axes are gathered."""
  n = 1
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  for size, entry in zip(shape, entries, strict=True):
    axes = [x for x in rules_lib._as_tuple(entry) if x not in drop]  # noqa: SLF001
    degree = int(np.prod([mesh.shape[x] for x in axes])) if axes else 1
    n *= -(-size // degree)
  return n


@dataclasses.dataclass(frozen=True)
class WeightTemporaries:
  """Per-device bytes of weight-sized temporaries of a training step.

  ``U`` is one device's shard of the unembedding in float32.

  Attributes:
    lm_head_backward: the fused log-prob kernel's backward holds its
      float32 unembedding gradient twice (the full-tile accumulator and the
      concatenated ``[D, V]`` result): ``2 U``.
    lm_head_tied: with tied embeddings, that gradient (transposed) waits
      until the embedding-lookup gradient is added to it at the end of the
      backward pass: ``2 U``, else 0.
    unembedding_copy: the fused LM head reads the unembedding as ``[V, D]``
      (``ops.fused_token_logps``): a tied table is used as stored (the two
      transposes cancel), an untied ``lm_head [D, V]`` is materialised
      transposed (compute dtype); the policy's copy lives from its forward
      to its backward, and so does the frozen reference's (computed early,
      it waits for its use).
    gathered_all: every parameter all-gathered over the batch axes
      (data/fsdp), in the compute dtype (the cast precedes the gather). An
      unrolled layer stack lets the compiler keep each layer's gathered
      weights from the forward to the backward pass; XLA:CPU does.
    gathered_layer: the just-in-time FSDP working set: two blocks'
      gathered weights (current and prefetched) plus the gathered embedding.
    optimizer_update: the update of the largest parameter (its clipped
      gradient and new moments) needs about two float32 copies of its shard
      besides the donated buffers, at the end of the step.
  """

  lm_head_backward: int
  lm_head_tied: int
  unembedding_copy: int
  gathered_all: int
  gathered_layer: int
  optimizer_update: int = 0


def weight_temporaries(
  setup: AbstractSetup, model_config, workload, mesh, rules
) -> WeightTemporaries:
  """`WeightTemporaries` from the parameters' shardings."""
  drop = set(partition.batch_axes(mesh, rules))
  compute = np.dtype(jnp.dtype(model_config.dtype)).itemsize
  tied = bool(model_config.tie_embeddings)
  total = embed = unembed = copy = largest = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(setup.params)[0]:
    key = jax.tree_util.keystr(path)
    largest = max(largest, shard_bytes(leaf.shape, jnp.float32, leaf.sharding))
    if "lm_head" in key or (tied and "['embedding']" in key):
      unembed = shard_bytes(leaf.shape, jnp.float32, leaf.sharding)
      copy = shard_bytes(leaf.shape, model_config.dtype, leaf.sharding)
    if not drop:
      continue
    full = _unsharded_over(leaf.shape, leaf.sharding.spec, mesh, drop)
    if full == shard_bytes(leaf.shape, np.int8, leaf.sharding):
      continue  # not split over a batch axis: nothing is gathered
    total += full * compute
    if "embedding" in key or "lm_head" in key:
      embed += full * compute
  lm_backward = lm_tied = lm_copy = 0
  if workload.model_kind == "causal_lm":
    lm_backward = 2 * unembed
    lm_tied = 2 * unembed if tied else 0
    lm_copy = 0 if tied else copy
  per_layer = (total - embed) / max(model_config.n_layers, 1)
  layer = int(min(total, 2 * per_layer + embed))
  return WeightTemporaries(
    int(lm_backward),
    int(lm_tied),
    int(lm_copy),
    int(total),
    layer,
    2 * int(largest),
  )


def prefill_bytes(model_config, workload: Workload, mesh, rules) -> int:
  """Per-device working set of the sampler's prefill (grpo; 0 otherwise).

  One block's activations for the ``B·G x P`` prompt tokens, with float32
  attention scores against the ``L`` cache slots, plus the float32
  ``[B·G, V / t]`` next-token logits.
  """
  if workload.trainer != "grpo":
    return 0
  c = model_config
  a = np.dtype(jnp.dtype(c.dtype)).itemsize
  rows = workload.batch_rows
  r = -(-rows // _logical_degree("batch", rows, mesh, rules))
  t_heads = _logical_degree("heads", c.n_heads, mesh, rules)
  t_kv = _logical_degree("kv_heads", c.n_kv_heads, mesh, rules)
  t_mlp = _logical_degree("mlp", c.d_ff, mesh, rules)
  t_vocab = _logical_degree("vocab", c.vocab_size, mesh, rules)
  d, n, f = c.d_model, c.head_dim, c.d_ff
  per_token = (
    a
    * (
      4 * d
      + 2 * c.n_heads * n / t_heads
      + 2 * c.n_kv_heads * n / t_kv
      + (2 + int(c.gated)) * f / t_mlp
    )
    + 2 * 4 * c.n_heads * workload.seq_len / t_heads
  )
  return int(
    r * workload.prefill_len * per_token + r * c.vocab_size / t_vocab * 4
  )


def kv_cache_bytes(model_config, workload: Workload, mesh, rules) -> int:
  """Per-device bytes of the sampler's KV cache (grpo; 0 otherwise).

  ``2 x n_layers`` buffers ``(B·G) x KV x L x N`` in the compute dtype,
  split along ``batch`` and ``kv_heads`` by the rule table
  (``models.CACHE_AXES``).
  """
  if workload.trainer != "grpo":
    return 0
  c = model_config
  rows = workload.batch_rows
  shape = (rows, c.n_kv_heads, workload.seq_len, c.head_dim)
  spec = rules_lib.logical_to_spec(
    ("batch", "kv_heads", "length", "kv"), rules, mesh
  )
  spec = partition._fit_spec(shape, spec, mesh, "kv_cache")  # noqa: SLF001
  sharding = NamedSharding(mesh, spec)
  per = c.n_layers * shard_bytes(shape, jnp.dtype(c.dtype), sharding)
  positions = shard_bytes(
    (rows, workload.seq_len),
    jnp.int32,
    NamedSharding(mesh, P(*tuple(spec)[:1])),
  )
  return 2 * per + positions


@dataclasses.dataclass
class Plan:
  """Per-device bytes of one (preset, mesh, workload).

  Analytic fields are always set; ``compiled_*`` are None unless the step
  was compiled (`plan` with ``compile=True`` on a mesh of real devices).
  """

  preset: str
  mesh_name: str
  mesh_axes: dict
  workload: Workload
  num_params: int
  params: int
  opt_state: int
  grads: int
  reference: int
  batch: int
  activations_remat: Activations
  activations_no_remat: Activations
  kv_cache: int
  weights: WeightTemporaries
  prefill: int = 0
  hbm_bytes: int | None = None
  remat: bool = True
  gather: str = "layer"
  compiled_arguments: int | None = None
  compiled_outputs: int | None = None
  compiled_aliased: int | None = None
  compiled_temp: int | None = None
  compiled_kv_cache: int | None = None
  note: str = ""

  @property
  def persistent(self) -> int:
    """Resident between steps: params, optimiser state, reference."""
    return self.params + self.opt_state + self.reference

  def gathered(self, gather: str | None = None) -> int:
    """FSDP-gathered weights held at the peak (see `WeightTemporaries`):
    ``"layer"`` (just-in-time) or ``"all"`` (every layer kept)."""
    gather = self.gather if gather is None else gather
    if gather not in ("layer", "all"):
      raise ValueError(f"gather must be 'layer' or 'all', got {gather!r}.")
    if gather == "all":
      return self.weights.gathered_all
    return self.weights.gathered_layer

  def step_peak(
    self, remat: bool | None = None, gather: str | None = None
  ) -> int:
    """Analytic peak of one training step.

    Persistent state and the batch, plus the transient peak, plus the
    FSDP-gathered weights (`gathered`). Without remat the transient peak
    is the larger end of the backward pass: its start (every saved
    activation, the LM-head backward, or the reference forward) or its
    end (every gradient, the tied embedding's extra gradient or the
    optimizer update's temporaries, one block's working set). With remat
    the saved set is small and the peak comes while the first block is
    recomputed: block inputs, that block's saved and working sets, the
    gradients of the blocks above and the end-of-step temporaries.
    """
    remat = self.remat if remat is None else remat
    act = self.activations_remat if remat else self.activations_no_remat
    w = self.weights
    if remat:
      transient = (
        act.saved
        + act.working
        + self.grads
        + max(w.lm_head_tied, w.optimizer_update)
      )
    else:
      copies = w.unembedding_copy * (2 if self.reference else 1)
      start = (
        act.saved
        + copies
        + max(act.working + w.lm_head_backward, act.frozen_forward)
      )
      end = self.grads + max(w.lm_head_tied, w.optimizer_update) + act.working
      transient = max(start, end)
    return self.persistent + self.batch + transient + self.gathered(gather)

  def xla_cpu_estimate(self) -> int:
    """The analytic figure for what XLA:CPU makes of this step.

    XLA:CPU does not honour per-block rematerialisation of an unrolled
    layer stack (measured: ``jax.checkpoint`` per layer leaves the temp
    size unchanged, in a ``lax.scan`` it cuts it 3.7x) and keeps every
    layer's gathered weights from the forward to the backward pass. So
    the comparable figure is the no-remat peak with every layer gathered.
    """
    return self.step_peak(remat=False, gather="all")

  def sampling_peak(self) -> int:
    """Analytic peak while sampling (grpo): persistent state, KV cache and
    the prefill's working set (plus FSDP-gathered weights, layer by
    layer)."""
    if not self.kv_cache:
      return 0
    return (
      self.persistent
      + self.kv_cache
      + self.prefill
      + self.weights.gathered_layer
    )

  def total(self, remat: bool | None = None, gather: str | None = None) -> int:
    """Analytic per-device peak over the phases of a step."""
    return max(self.step_peak(remat, gather), self.sampling_peak())

  @property
  def compiled_total(self) -> int | None:
    """Compiled peak: arguments + outputs - aliased + temporaries."""
    if self.compiled_temp is None:
      return None
    return (
      self.compiled_arguments
      + self.compiled_outputs
      - self.compiled_aliased
      + self.compiled_temp
    )

  def fits(
    self, remat: bool | None = None, gather: str | None = None
  ) -> bool | None:
    """Whether `total` fits the device memory (None: unknown memory)."""
    if self.hbm_bytes is None:
      return None
    return self.total(remat, gather) <= self.hbm_bytes


def resolve_mesh(mesh, num_devices: int | None = None):
  """``(name, axes dict, hbm bytes or None)`` for a mesh argument.

  ``mesh`` is a `MESHES` name, optionally with axis overrides
  (``"v5e-256/fsdp=64,tensor=4"``; sizes must multiply to its device
  count), a ``config.mesh`` list of ``(axis, size)`` (one size may be -1;
  ``num_devices`` then defaults to this process's device count), or a
  ``"data:1,fsdp:-1,tensor:1"`` string.
  """
  if isinstance(mesh, str) and mesh.split("/")[0] in MESHES:
    preset = MESHES[mesh.split("/")[0]]
    if "/" not in mesh:
      return preset.name, dict(preset.axes), preset.hbm_bytes
    try:
      axes = {
        k: int(v)
        for k, v in (x.split("=") for x in mesh.split("/", 1)[1].split(","))
      }
    except ValueError as e:
      raise ValueError(
        f"mesh {mesh!r}: write overrides as NAME/axis=size,axis=size."
      ) from e
    spec = [(k, axes.pop(k, v)) for k, v in preset.axes] + list(axes.items())
    sizes = mesh_lib.resolve_mesh_shape(spec, preset.num_devices)
    return mesh, sizes, preset.hbm_bytes
  if isinstance(mesh, str):
    try:
      spec = [
        (name, int(size))
        for name, size in (part.split(":") for part in mesh.split(","))
      ]
    except ValueError as e:
      raise ValueError(
        f"mesh {mesh!r} is neither a named mesh {sorted(MESHES)} nor "
        "'axis:size,...'."
      ) from e
  else:
    spec = [tuple(x) for x in mesh]
  if num_devices is None:
    fixed = [int(size) for _, size in spec]
    n = jax.device_count() if -1 in fixed else int(np.prod(fixed))
  else:
    n = num_devices
  sizes = mesh_lib.resolve_mesh_shape(spec, n)
  name = ",".join(f"{k}:{v}" for k, v in sizes.items())
  return name, sizes, None


def plan(
  preset: str,
  mesh="cpu-8",
  workload: Workload | None = None,
  *,
  rules=None,
  remat: bool = True,
  compile: bool = False,
  model_overrides: dict | None = None,
  tx=None,
  num_devices: int | None = None,
) -> Plan:
  """Plans the per-device memory of a training step.

  Args:
    preset: a `models.PRESETS` name.
    mesh: a `MESHES` name, ``config.mesh`` list or ``"axis:size,..."``.
    workload: the step (default: `default_workload` for DPO).
    rules: logical-axis rules (default ``config_lib.DEFAULT_RULES``).
    remat: the remat setting the totals assume (both are reported).
    compile: also lower and compile the step on a mesh of this process's
      devices (needs at least as many devices as the mesh has).
    model_overrides: `models.ModelConfig` fields to change.
    tx: optax transformation (default `default_optimizer`).
    num_devices: device count a ``-1`` mesh axis is resolved against.

  Returns:
    A `Plan`.
  """
  from alignment import config_lib, models  # noqa: PLC0415

  rules = config_lib.DEFAULT_RULES if rules is None else rules
  overrides = dict(model_overrides or {})
  overrides["remat"] = remat
  cfg = models.get_preset(preset, **overrides)
  name, sizes, hbm = resolve_mesh(mesh, num_devices)
  abstract_mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
  n_devices = int(np.prod(list(sizes.values())))
  if workload is None:
    workload = default_workload("dpo", sizes, rules)
  setup = abstract_setup(cfg, workload.model_kind, abstract_mesh, rules, tx)
  params = tree_shard_bytes(setup.params)
  opt = tree_shard_bytes(setup.opt_state)
  batch = sum(
    shard_bytes(
      s.shape,
      s.dtype,
      NamedSharding(
        abstract_mesh,
        rules_lib.logical_to_spec(("batch",), rules, abstract_mesh),
      ),
    )
    for s in batch_shapes(workload, cfg.vocab_size).values()
  )
  out = Plan(
    preset=preset,
    mesh_name=name,
    mesh_axes=sizes,
    workload=workload,
    num_params=sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(setup.params)
    ),
    params=params,
    opt_state=opt,
    grads=params,
    reference=params if workload.has_reference else 0,
    batch=batch,
    activations_remat=activation_bytes(
      cfg, workload, abstract_mesh, rules, remat=True
    ),
    activations_no_remat=activation_bytes(
      cfg, workload, abstract_mesh, rules, remat=False
    ),
    kv_cache=kv_cache_bytes(cfg, workload, abstract_mesh, rules),
    prefill=prefill_bytes(cfg, workload, abstract_mesh, rules),
    weights=weight_temporaries(setup, cfg, workload, abstract_mesh, rules),
    hbm_bytes=hbm,
    remat=remat,
  )
  if compile:
    if n_devices > jax.device_count():
      out.note = (
        f"compiled figures need {n_devices} devices ({name}); this "
        f"process has {jax.device_count()}"
      )
    else:
      devices = jax.devices()[:n_devices]
      real_mesh = mesh_lib.make_mesh(list(sizes.items()), devices)
      stats = compile_step(cfg, workload, real_mesh, rules, tx=tx)
      out.compiled_arguments = stats.argument_size_in_bytes
      out.compiled_outputs = stats.output_size_in_bytes
      out.compiled_aliased = stats.alias_size_in_bytes
      out.compiled_temp = stats.temp_size_in_bytes
      if workload.trainer == "grpo":
        out.compiled_kv_cache = compile_kv_cache(
          cfg, workload, real_mesh, rules
        ).output_size_in_bytes
  return out


# ----------------------------------------------------------------------------
# Compiled figures
# ----------------------------------------------------------------------------


def activation_context(mesh, rules):
  """Context that makes the models' logical ``constrain`` calls bind to
  ``mesh`` and ``rules`` while a step is traced (see
  `alignment.sharding.activation_context`)."""
  return rules_lib.activation_context(mesh, rules)


def jit_train_step(
  model_config,
  workload: Workload,
  mesh,
  rules,
  *,
  tx=None,
  setup: AbstractSetup | None = None,
):
  """``(jitted_step, abstract_args, setup)`` for a workload on ``mesh``.

  The step is ``trainers.common.make_train_step`` over `make_loss_fn`,
  jitted with the state's shardings in and out and the state donated.
  ``abstract_args`` are ShapeDtypeStructs with shardings, for ``.lower``.
  """

  from alignment.trainers import common  # noqa: PLC0415

  tx = default_optimizer() if tx is None else tx
  if setup is None:
    setup = abstract_setup(model_config, workload.model_kind, mesh, rules, tx)
  loss_fn = make_loss_fn(
    workload.trainer, setup.graphdef, setup.rest, chunk_size=workload.chunk_size
  )
  step = common.make_train_step(
    loss_fn, tx, num_microbatches=workload.microbatches
  )
  repl = NamedSharding(mesh, P())
  state_shardings = {
    "params": setup.param_shardings,
    "opt_state": setup.opt_shardings,
    "step": repl,
    "rng": repl,
  }
  state = {
    "params": setup.params,
    "opt_state": setup.opt_state,
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl),
  }
  frozen = setup.params if workload.has_reference else None
  frozen_shardings = setup.param_shardings if frozen is not None else None
  batch = {
    k: jax.ShapeDtypeStruct(
      s.shape,
      s.dtype,
      sharding=partition.batch_sharding(mesh, rules, len(s.shape)),
    )
    for k, s in batch_shapes(workload, model_config.vocab_size).items()
  }
  batch_shardings = {k: v.sharding for k, v in batch.items()}
  jitted = jax.jit(
    step,
    in_shardings=(state_shardings, frozen_shardings, batch_shardings),
    out_shardings=(state_shardings, repl),
    donate_argnums=(0,),
  )
  return jitted, (state, frozen, batch), setup


def lower_train_step(model_config, workload: Workload, mesh, rules, *, tx=None):
  """The lowered (not yet compiled) step; trace under the mesh + rules."""
  jitted, args, _ = jit_train_step(model_config, workload, mesh, rules, tx=tx)
  with activation_context(mesh, rules):
    return jitted.lower(*args)


def compile_step(model_config, workload: Workload, mesh, rules, *, tx=None):
  """``memory_analysis()`` of the compiled step (nothing is allocated)."""
  lowered = lower_train_step(model_config, workload, mesh, rules, tx=tx)
  return lowered.compile().memory_analysis()


def compile_kv_cache(model_config, workload: Workload, mesh, rules):
  """``memory_analysis()`` of the sampler's prefill: its output is the
  ``n_layers`` KV buffers ``[B·G, KV, L, N]``, sharded by the rule table."""
  from alignment import models  # noqa: PLC0415

  setup = abstract_setup(model_config, "causal_lm", mesh, rules)
  rows, length = workload.batch_rows, workload.seq_len
  prefill = workload.prefill_len
  spec = lambda axes, shape: NamedSharding(  # noqa: E731
    mesh,
    partition._fit_spec(  # noqa: SLF001
      shape, rules_lib.logical_to_spec(axes, rules, mesh), mesh, "cache"
    ),
  )
  kv_shape = (
    rows,
    model_config.n_kv_heads,
    length,
    model_config.head_dim,
  )
  kv_shardings = (spec(models.CACHE_AXES, kv_shape),) * model_config.n_layers
  cache_shardings = models.KVCache(
    k=kv_shardings,
    v=kv_shardings,
    key_positions=spec(("batch", "length"), (rows, length)),
    index=NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  tok_sharding = partition.batch_sharding(mesh, rules, 2)

  def prefill_fn(params, prompts):
    from flax import nnx  # noqa: PLC0415

    model = nnx.merge(setup.graphdef, params, setup.rest)
    cache = model.init_cache(rows, length)
    _, cache = model.hidden(prompts, cache=cache)
    return cache

  jitted = jax.jit(
    prefill_fn,
    in_shardings=(setup.param_shardings, tok_sharding),
    out_shardings=cache_shardings,
  )
  prompts = jax.ShapeDtypeStruct(
    (rows, prefill), jnp.int32, sharding=tok_sharding
  )
  with activation_context(mesh, rules):
    lowered = jitted.lower(setup.params, prompts)
  return lowered.compile().memory_analysis()


# ----------------------------------------------------------------------------
# HLO inspection
# ----------------------------------------------------------------------------


def hlo_collectives(hlo_text: str, op: str = "all-gather") -> list[tuple]:
  """``[(dtype, shape), ...]`` of every ``op`` result in an HLO module.

  Args:
    hlo_text: ``compiled.as_text()``.
    op: ``all-gather``, ``all-reduce``, ``all-to-all``, ...
  """
  import re  # noqa: PLC0415

  pattern = re.compile(
    r"=\s*\(?([a-z]+[0-9]*)\[([0-9,]*)\][^=]*?\s"
    + re.escape(op)
    + r"(?:-start)?\("
  )
  out = []
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if m:
      dims = tuple(int(x) for x in m.group(2).split(",") if x)
      out.append((m.group(1), dims))
  return out


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


def _gib(x: int | None) -> str:
  if x is None:
    return "-"
  return f"{x / GiB:.2f}"


def _fits(p: Plan) -> str:
  fits = p.fits(True)
  if fits is None:
    return "-"
  if not fits:
    return "no"
  return "yes" if p.fits(False) else "remat only"


def format_table(plans: Sequence[Plan], *, markdown: bool = True) -> str:
  """A table of plans, GiB per device (``-``: not applicable / compiled).

  Analytic columns assume what TPU/GPU compilers do with the step:
  rematerialisation honoured and FSDP weights gathered layer by layer
  (``gather="layer"``). With compiled figures, ``XLA:CPU est.`` is the
  analytic figure for what XLA:CPU does instead (`Plan.xla_cpu_estimate`).
  """
  head = [
    "preset",
    "mesh",
    "trainer",
    "batch",
    "params",
    "opt",
    "grads",
    "ref",
    "act remat",
    "act full",
    "KV cache",
    "peak remat",
    "peak no remat",
    "HBM",
    "fits",
  ]
  compiled = any(p.compiled_temp is not None for p in plans)
  if compiled:
    head += ["XLA:CPU est.", "compiled", "KV compiled"]
  rows = []
  for p in plans:
    w = p.workload
    batch = f"{w.batch}x{w.seq_len}"
    if w.trainer == "grpo":
      batch = f"{w.batch}x{w.num_samples}x{w.seq_len}"
    row = [
      p.preset,
      p.mesh_name,
      w.trainer,
      batch,
      _gib(p.params),
      _gib(p.opt_state),
      _gib(p.grads),
      _gib(p.reference or None),
      _gib(p.activations_remat.peak),
      _gib(p.activations_no_remat.peak),
      _gib(p.kv_cache or None),
      _gib(p.total(True)),
      _gib(p.total(False)),
      _gib(p.hbm_bytes),
      _fits(p),
    ]
    if compiled:
      row += [
        _gib(p.xla_cpu_estimate()),
        _gib(p.compiled_total),
        _gib(p.compiled_kv_cache),
      ]
    rows.append(row)
  if markdown:
    lines = [
      "| " + " | ".join(head) + " |",
      "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
  widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
  fmt = "  ".join(f"{{:>{w}}}" for w in widths)
  return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])


def plan_record(p: Plan) -> dict:
  """A JSON-ready dict of a plan (bytes per device)."""
  out = {
    "preset": p.preset,
    "mesh": p.mesh_name,
    "mesh_axes": p.mesh_axes,
    "workload": dataclasses.asdict(p.workload),
    "num_params": p.num_params,
    "params": p.params,
    "opt_state": p.opt_state,
    "grads": p.grads,
    "reference": p.reference,
    "batch": p.batch,
    "activations_remat": dataclasses.asdict(p.activations_remat),
    "activations_no_remat": dataclasses.asdict(p.activations_no_remat),
    "weights": dataclasses.asdict(p.weights),
    "kv_cache": p.kv_cache,
    "hbm_bytes": p.hbm_bytes,
    "peak_remat": p.total(True),
    "peak_no_remat": p.total(False),
    "xla_cpu_estimate": p.xla_cpu_estimate(),
    "compiled_arguments": p.compiled_arguments,
    "compiled_outputs": p.compiled_outputs,
    "compiled_aliased": p.compiled_aliased,
    "compiled_temp": p.compiled_temp,
    "compiled_total": p.compiled_total,
    "compiled_kv_cache": p.compiled_kv_cache,
    "note": p.note,
  }
  return out


def default_workload(
  trainer: str,
  mesh,
  rules=None,
  *,
  batch=None,
  seq_len: int = 2048,
  num_samples: int = 4,
  **kw,
) -> Workload:
  """A workload with one batch element per batch shard by default.

  Args:
    trainer: one of `TRAINERS`.
    mesh: anything `resolve_mesh` takes, or a ``{axis: size}`` dict.
    rules: logical-axis rules (default ``config_lib.DEFAULT_RULES``).
    batch: global batch (default: the number of batch shards).
    seq_len: L.
    num_samples: G (grpo).
    **kw: other `Workload` fields.
  """
  from alignment import config_lib  # noqa: PLC0415

  rules = config_lib.DEFAULT_RULES if rules is None else rules
  sizes = mesh if isinstance(mesh, dict) else resolve_mesh(mesh)[1]
  abstract = AbstractMesh(tuple(sizes.values()), tuple(sizes))
  if batch is None:
    spec = rules_lib.logical_to_spec(("batch",), rules, abstract)
    entry = tuple(spec)[0] if tuple(spec) else None
    batch = _axis_product(entry, abstract)
  return Workload(
    trainer, batch=batch, seq_len=seq_len, num_samples=num_samples, **kw
  )


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: prints a table (or JSON lines) of plans."""
  import json  # noqa: PLC0415

  parser = argparse.ArgumentParser(
    prog="python -m alignment.sharding.planner",
    description="Per-device memory of a training step (GiB).",
  )
  parser.add_argument("--presets", default=",".join(LARGE_PRESETS))
  parser.add_argument(
    "--meshes",
    default="8xH100,64xH100,v4-128,v5e-256",
    help=f"';'-separated: named meshes {sorted(MESHES)} or "
    "'data:1,fsdp:-1,tensor:1'",
  )
  parser.add_argument("--trainers", default=",".join(TRAINERS))
  parser.add_argument(
    "--batch",
    type=int,
    default=None,
    help="global batch (default: one per batch shard)",
  )
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument(
    "--num_samples", type=int, default=4, help="GRPO completions per prompt"
  )
  parser.add_argument("--microbatches", type=int, default=1)
  parser.add_argument("--param_dtype", default="float32")
  parser.add_argument(
    "--dtype", default="bfloat16", help="compute / activation dtype"
  )
  parser.add_argument(
    "--no_remat", action="store_true", help="plan without rematerialisation"
  )
  parser.add_argument(
    "--compile",
    action="store_true",
    help="also compile on this process's devices",
  )
  parser.add_argument(
    "--json",
    action="store_true",
    help="one JSON object per plan instead of a table",
  )
  parser.add_argument(
    "--plain", action="store_true", help="aligned text instead of markdown"
  )
  args = parser.parse_args(argv)
  meshes = [m for m in args.meshes.split(";") if m]
  if len(meshes) == 1 and ":" not in meshes[0]:
    meshes = [m for m in meshes[0].split(",") if m]
  plans = []
  for preset in [p for p in args.presets.split(",") if p]:
    for mesh in meshes:
      for trainer in [t for t in args.trainers.split(",") if t]:
        workload = default_workload(
          trainer,
          mesh,
          batch=args.batch,
          seq_len=args.seq_len,
          num_samples=args.num_samples,
          microbatches=args.microbatches,
        )
        p = plan(
          preset,
          mesh,
          workload,
          remat=not args.no_remat,
          compile=args.compile,
          model_overrides={
            "param_dtype": args.param_dtype,
            "dtype": args.dtype,
          },
        )
        if args.json:
          print(json.dumps(plan_record(p)), flush=True)
        plans.append(p)
  if args.json:
    return 0
  print(format_table(plans, markdown=not args.plain))
  for note in sorted({p.note for p in plans if p.note}):
    print(f"note: {note}")
  if not args.compile:
    print(
      "note: analytic figures (remat honoured, FSDP gathers layer by "
      "layer); --compile adds compiled figures where this process has "
      "the mesh's devices."
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
