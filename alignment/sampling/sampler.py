"""Jitted autoregressive sampling with a KV cache.

Prefill writes the (left-padded) prompts into the cache in one forward, each
prompt once (its G samples then start from copies of its cache); a
``lax.while_loop`` then decodes one token per step for every row, stopping
early once every row has emitted EOS (or after ``max_new_tokens``). Rows are
``[B·G]``, prompt-major (row ``b·G + g`` is sample ``g`` of prompt ``b``).

Each decode step attends over every slot of the cache, so the cache grows
in segments (room for 128 new tokens, then 256, 512, ...; one loop per
size, see ``Sampler(cache_segment=...)``): the cost of a step follows the
length generated so far instead of ``max_new_tokens``.

On a mesh the KV cache is placed by the logical-axis rules: keys and values
(one ``[N, KV, S, head_dim]`` buffer per layer) by ``models.CACHE_AXES``
(rows over the ``batch`` rule, i.e. data x fsdp; KV heads over
``kv_heads``, i.e. tensor, where it divides them), positions ``[N, S]`` by
``batch``. The mesh and rules are those of the context
(`alignment.sharding.activation_context`, which every trainer enters), or
the ``mesh``/``rules`` given to `Sampler`.

Returned log-probs are those of the distribution actually sampled from
(after temperature, top-k and top-p), i.e. the *sampler* log-probs that
importance-sampling corrections compare with the trainer's. With top-k and
top-p off they equal the trainer's teacher-forced log-probs at the same
temperature (tested to 1e-5).
"""

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment.models import partitioning
from alignment.models.transformer import (
  CACHE_AXES,
  KVCache,
  default_positions,
)
from alignment.sharding import rules as rules_lib

_NEG_INF = -1e30


class SampleOutput(NamedTuple):
  """Sampled completions, all with leading dimension ``N = B·G``.

  Attributes:
    prompt_tokens: ``[N, P]`` left-padded prompts (repeated G times).
    prompt_mask: ``[N, P]`` True on real prompt tokens.
    completion_tokens: ``[N, T]`` sampled ids, ``pad_id`` after EOS.
    completion_mask: ``[N, T]`` True up to and including EOS.
    token_logps: ``[N, T]`` float32 log-prob of each sampled token under the
      sampling distribution; 0 where the mask is False.
  """

  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  completion_tokens: jax.Array
  completion_mask: jax.Array
  token_logps: jax.Array


def process_logits(logits, *, temperature: float, top_k: int, top_p: float):
  """Temperature, then top-k, then top-p (nucleus) filtering, in float32.

  Filtered-out entries are set to a large negative number, so that
  ``log_softmax`` of the result is the log-distribution actually sampled
  from. Tokens tied with the k-th largest logit are all kept (as in
  transformers' ``TopKLogitsWarper``); top-p keeps the smallest prefix of
  the sorted distribution whose mass reaches ``top_p`` (at least one token;
  tokens tied with the last kept one are kept too).

  Args:
    logits: ``[N, V]`` scores, any float dtype.
    temperature: divides the logits (> 0); may be a traced scalar.
    top_k: keep the ``top_k`` largest logits (0 disables it); static.
    top_p: nucleus mass in (0, 1] (1 disables it); may be a traced scalar
      only through `Sampler` (here a Python float decides whether the
      sort runs).

  Returns:
    float32 ``[N, V]`` processed logits.
  """
  return _process_logits(
    logits,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    use_top_p=top_p < 1.0,
  )


def _process_logits(logits, *, temperature, top_k, top_p, use_top_p):
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  if top_k and 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, _NEG_INF, logits)
  if use_top_p:
    # Only the sorted values are needed: the kept set is every logit at or
    # above the smallest one inside the nucleus (no argsort, no scatter).
    sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before
    inside = before < top_p  # always holds for the top token
    cutoff = jnp.min(
      jnp.where(inside, sorted_logits, jnp.inf), axis=-1, keepdims=True
    )
    logits = jnp.where(logits < cutoff, _NEG_INF, logits)
  return logits


def _argmax(x):
  """First index of the maximum along the last axis of ``[N, V]``.

  Same result as ``jnp.argmax`` for finite inputs; two plain reductions
  are several times faster on CPU than XLA's variadic (value, index) one.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)
  return jnp.minimum(first, x.shape[-1] - 1)  # NaN rows: last id, in range


def _segments(t_max, first):
  """Ends of the decode segments: ``first``, doubling, up to ``t_max``."""
  if not first or first >= t_max:
    return [t_max]
  ends = [first]
  while ends[-1] < t_max:
    ends.append(min(2 * ends[-1], t_max))
  return ends


def _grow(cache, grown):
  """Copies ``cache`` into the start of the larger empty cache ``grown``.

  Leaf by leaf, whatever the layout: each leaf of ``cache`` is written at
  offset 0 of the same leaf of ``grown`` (slots beyond it stay empty).
  """

  def put(old, new):
    if old.shape == new.shape:
      return old
    return jax.lax.dynamic_update_slice(new, old, (0,) * old.ndim)

  return jax.tree.map(put, cache, grown)


def constrain_cache(cache: KVCache) -> KVCache:
  """Places a `KVCache` by its logical axes (a no-op without a mesh and
  rules in context): each layer's keys/values by ``CACHE_AXES``
  (``batch, kv_heads, length, kv``), positions by ``(batch, length)``. A
  mesh axis that does not divide a dimension (e.g. tensor=4 with 2 KV
  heads) is left out for it."""
  place = lambda x: partitioning.constrain(x, CACHE_AXES)  # noqa: E731
  return KVCache(
    k=tuple(map(place, cache.k)),
    v=tuple(map(place, cache.v)),
    key_positions=partitioning.constrain(
      cache.key_positions, ("batch", "length")
    ),
    index=cache.index,
  )


def _check(max_new_tokens, temperature, top_k, top_p, num_samples):
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")


def _check_prompts(prompt_tokens, prompt_mask):
  shape, mask_shape = jnp.shape(prompt_tokens), jnp.shape(prompt_mask)
  if len(shape) != 2 or shape[1] < 1:
    raise ValueError(
      f"prompt_tokens must have shape [B, P] with P >= 1, got {shape}."
    )
  if mask_shape != shape:
    raise ValueError(
      f"prompt_mask must have the shape of prompt_tokens "
      f"{shape}, got {mask_shape}."
    )
  # Prefill reads the logits at the last column: prompts must be left-padded
  # (this also rejects rows with no real token). Checked where the mask is
  # readable here (not under an outer jit, not across processes).
  if isinstance(prompt_mask, np.ndarray):
    last = prompt_mask[:, -1]
  elif (
    isinstance(prompt_mask, jax.Array)
    and not isinstance(prompt_mask, jax.core.Tracer)
    and prompt_mask.is_fully_addressable
  ):
    last = np.asarray(prompt_mask[:, -1])
  else:
    return
  last = np.asarray(last, bool)
  if not last.all():
    raise ValueError(
      "prompt_mask must be True in the last column (prompts are "
      f"left-padded, each with >= 1 real token); rows "
      f"{np.flatnonzero(~last).tolist()} are not."
    )


class Sampler:
  """Samples completions from a causal LM given as ``(graphdef, rest)``.

  Args:
    graphdef, rest: the static graph and non-parameter state of an
      ``alignment.models.CausalLM`` (``nnx.split(model, nnx.Param, ...)``).
    max_new_tokens: completion length T (the loop may stop earlier).
    eos_id: end-of-sequence id; sampling it ends the row.
    pad_id: written after EOS.
    cache_dtype: dtype of the KV cache (default: the model's compute dtype).
    cache_segment: the KV cache starts with room for this many new tokens
      and doubles (``cache_segment``, ``2·cache_segment``, ... up to
      ``max_new_tokens``), one ``while_loop`` per size, because each decode
      step attends over every slot of the cache: early steps then read a
      short cache, and segments after every row has stopped are skipped.
      ``None`` or ``>= max_new_tokens``: one cache of the full size (one
      loop, the shortest compile).
    compiler_options: optional XLA compiler options for the jitted
      sampler (``jax.jit(..., compiler_options=...)``), e.g.
      ``{"xla_backend_optimization_level": 0}`` to compile tiny test models
      quickly.
    mesh, rules: optional device mesh and logical-axis rules; given both,
      sampling runs inside their activation context (the KV cache and the
      activations are placed by the rules). Default: whatever context the
      caller is in (a trainer's run is inside its mesh's).
  """

  def __init__(
    self,
    graphdef,
    rest,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    cache_dtype=None,
    cache_segment: int | None = 128,
    compiler_options: dict | None = None,
    mesh=None,
    rules=None,
  ):
    _check(max_new_tokens, 1.0, 0, 1.0, 1)
    self.graphdef = graphdef
    self.rest = rest
    self.max_new_tokens = max_new_tokens
    self.eos_id = int(eos_id)
    self.pad_id = int(pad_id)
    self.cache_dtype = cache_dtype
    if cache_segment is not None and cache_segment < 1:
      raise ValueError(
        f"cache_segment must be >= 1 or None, got {cache_segment}."
      )
    self.cache_segment = cache_segment
    self.compiler_options = dict(compiler_options) if compiler_options else None
    if (mesh is None) != (rules is None):
      raise ValueError("give both mesh and rules, or neither.")
    self.mesh = mesh
    self.rules = None if rules is None else rules_lib.normalize_rules(rules)
    self._jitted = {}

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return rules_lib.activation_context(self.mesh, self.rules)

  def generate(
    self,
    params,
    prompt_tokens,
    prompt_mask,
    rng,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
  ) -> SampleOutput:
    """Samples ``num_samples`` completions per prompt.

    Args:
      params: the model's ``nnx.Param`` state.
      prompt_tokens: int ``[B, P]``, left-padded.
      prompt_mask: bool ``[B, P]``, True on real prompt tokens; every row
        needs at least one.
      rng: a JAX PRNG key.
      num_samples: G, samples per prompt.
      temperature, top_k, top_p: the sampling distribution (top_k=0 and
        top_p=1 disable those filters).
      greedy: take the argmax (log-probs then are those of the
        temperature-scaled distribution at the argmax token).

    Returns:
      :class:`SampleOutput` with ``N = B·G`` rows.
    """
    fn, args = self._prepare(
      params,
      prompt_tokens,
      prompt_mask,
      rng,
      num_samples=num_samples,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      greedy=greedy,
    )
    with self._context():
      return fn(*args)

  def lower(
    self, params, prompt_tokens, prompt_mask, rng, **kwargs
  ) -> jax.stages.Lowered:
    """The jitted sampler lowered for these arguments (as `generate` would
    run it, same keyword arguments), e.g. to read its compiled HLO or
    ``.compile().memory_analysis()``."""
    fn, args = self._prepare(params, prompt_tokens, prompt_mask, rng, **kwargs)
    with self._context():
      return fn.lower(*args)

  def _prepare(
    self,
    params,
    prompt_tokens,
    prompt_mask,
    rng,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
  ):
    _check(self.max_new_tokens, temperature, top_k, top_p, num_samples)
    _check_prompts(prompt_tokens, prompt_mask)
    # Temperature and top-p are traced, so changing them does not recompile;
    # top-k (a static shape) and whether top-p runs at all are static.
    key = (int(num_samples), int(top_k), float(top_p) < 1.0, bool(greedy))
    if key not in self._jitted:
      self._jitted[key] = jax.jit(
        functools.partial(
          self._generate,
          num_samples=key[0],
          top_k=key[1],
          use_top_p=key[2],
          greedy=key[3],
        ),
        compiler_options=self.compiler_options,
      )
    args = (
      params,
      jnp.asarray(prompt_tokens, jnp.int32),
      jnp.asarray(prompt_mask, bool),
      rng,
      jnp.float32(temperature),
      jnp.float32(top_p),
    )
    return self._jitted[key], args

  def _generate(
    self,
    params,
    prompt_tokens,
    prompt_mask,
    rng,
    temperature,
    top_p,
    *,
    num_samples,
    top_k,
    use_top_p,
    greedy,
  ):
    model = nnx.merge(self.graphdef, params, self.rest)
    b, p = prompt_tokens.shape
    n = b * num_samples
    t_max = self.max_new_tokens
    segments = _segments(t_max, self.cache_segment)
    prompt_tokens = partitioning.constrain(prompt_tokens, ("batch", None))
    prompt_mask = partitioning.constrain(prompt_mask, ("batch", None))
    # Prefill each prompt once, then give each of its G rows a copy of its
    # KV cache and last hidden state (the same values G prefills give).
    cache = constrain_cache(
      model.init_cache(b, p + segments[0], self.cache_dtype)
    )
    # Positions of an empty cache start at 0: given explicitly, XLA does not
    # constant-fold the max over the (constant) empty position table.
    hidden, cache = model.hidden(
      prompt_tokens,
      attention_mask=prompt_mask,
      positions=default_positions(prompt_mask),
      cache=cache,
    )
    if num_samples > 1:
      rep = lambda x: jnp.repeat(x, num_samples, axis=0)  # noqa: E731
      hidden = rep(hidden[:, -1:])
      cache = KVCache(
        k=tuple(map(rep, cache.k)),
        v=tuple(map(rep, cache.v)),
        key_positions=rep(cache.key_positions),
        index=cache.index,
      )
    cache = constrain_cache(cache)
    prompts = partitioning.constrain(
      jnp.repeat(prompt_tokens, num_samples, axis=0), ("batch", None)
    )
    mask = partitioning.constrain(
      jnp.repeat(prompt_mask, num_samples, axis=0), ("batch", None)
    )
    w = model.unembedding()
    logits = jnp.einsum(
      "nd,dv->nv", hidden[:, -1], w, preferred_element_type=jnp.float32
    )

    def pick(logits, key):
      processed = _process_logits(
        logits,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_top_p=use_top_p,
      )
      if greedy:
        token = _argmax(processed)
      else:  # the Gumbel-max trick, as jax.random.categorical does
        token = _argmax(processed + jax.random.gumbel(key, processed.shape))
      picked = jnp.take_along_axis(processed, token[:, None], axis=-1)[:, 0]
      logp = picked - jax.nn.logsumexp(processed, axis=-1)
      return token, logp

    def cond(end, carry):
      t, _, _, _, _, _, done, _ = carry
      return (t < end) & ~jnp.all(done)

    def body(carry):
      t, cache, logits, toks, logps, live_mask, done, key = carry
      key, sub = jax.random.split(key)
      token, logp = pick(logits, sub)
      live = ~done
      token = jnp.where(live, token, self.pad_id)
      toks = toks.at[:, t].set(token)
      logps = logps.at[:, t].set(jnp.where(live, logp, 0.0))
      live_mask = live_mask.at[:, t].set(live)
      done = done | (live & (token == self.eos_id))
      hidden, cache = model.hidden(token[:, None], cache=cache, decode=True)
      cache = constrain_cache(cache)
      logits = jnp.einsum(
        "nd,dv->nv", hidden[:, 0], w, preferred_element_type=jnp.float32
      )
      return t + 1, cache, logits, toks, logps, live_mask, done, key

    rows = lambda x: partitioning.constrain(  # noqa: E731
      x, ("batch",) + (None,) * (x.ndim - 1)
    )
    carry = (
      jnp.int32(0),
      cache,
      logits,
      rows(jnp.full((n, t_max), self.pad_id, jnp.int32)),
      rows(jnp.zeros((n, t_max), jnp.float32)),
      rows(jnp.zeros((n, t_max), bool)),
      rows(jnp.zeros((n,), bool)),
      rng,
    )
    for i, end in enumerate(segments):
      if i:  # room for the next segment; stopped rows skip it at once
        grown = model.init_cache(n, p + end, self.cache_dtype)
        grown = constrain_cache(_grow(carry[1], constrain_cache(grown)))
        carry = (carry[0], grown, *carry[2:])
      carry = jax.lax.while_loop(functools.partial(cond, end), body, carry)
    _, _, _, toks, logps, completion_mask, _, _ = carry
    # completion_mask: True for every token sampled while the row was live,
    # i.e. up to and including its first EOS.
    return SampleOutput(
      prompts,
      mask,
      toks,
      completion_mask,
      jnp.where(completion_mask, logps, 0.0),
    )
