"""Tests for alignment/sampling/sampler.py (the jitted KV-cache sampler).

Oracles:

* **No cache, no padding:** greedy tokens are recomputed step by step with
  full forwards over *unpadded*, right-aligned sequences (a causal model's
  prefix logits ignore what follows, so each row is computed as if alone,
  with no attention mask and no cache);
* **teacher forcing:** the returned log-probs are compared with
  ``ops.token_logps`` of one full forward over prompt + completion, with the
  logits divided by the temperature;
* **a model whose greedy output is known in closed form** (attention
  switched off, the MLP maps token ``s`` to ``succ(s)``), to pin EOS
  handling and early stopping exactly;
* a float64 NumPy transcription of temperature / top-k / top-p.

Sampler compiles are the cost here (seconds each), so one `Sampler` per
configuration is built once per class and every check of that
configuration runs on it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment import config_lib, ops, sharding
from alignment.models import CausalLM, get_preset, init_cache
from alignment.sampling import sampler as sampler_lib

_CONFIG = get_preset("tiny")
_PAD, _EOS = _CONFIG.pad_id, _CONFIG.eos_id
_T = 8  # max_new_tokens
# Tiny graphs: XLA's backend optimisations cost more than they save here.
_FAST = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
  "xla_cpu_use_fusion_emitters": False,
}
# Eight prompts of eight different lengths (left-padded to P = 8 below).
_PROMPTS = [
  [5, 17, 33],
  [9],
  [200, 11, 3, 44, 90, 12, 7, 1],
  [61, 61],
  [3, 1, 4, 1, 5],
  [250, 2, 120, 9, 17, 8],
  [42, 43, 44, 45],
  [7, 200, 13, 100, 101, 102, 103],
]

_DECODE_STEPS = []  # one entry per decode forward, appended on the host


class _CountingLM(CausalLM):
  """`CausalLM` that records every decode step through a host callback."""

  def hidden(self, tokens, **kwargs):
    if kwargs.get("decode"):
      jax.debug.callback(lambda t: _DECODE_STEPS.append(1), tokens[0, 0])
    return super().hidden(tokens, **kwargs)


def _split():
  model = nnx.eval_shape(lambda: _CountingLM(_CONFIG, rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param, ...)


_GRAPHDEF, _ABSTRACT, _REST = _split()


def _random_params(seed=0, std=0.2):
  """Kernels ~ N(0, std²) (0.2: greedy paths depend on the whole context,
  unlike at the init scale 0.02 where the model copies its last token);
  norm scales 1."""
  rng = np.random.default_rng(seed)

  def draw(x):
    if x.ndim == 1:
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

  return jax.tree.map(draw, _ABSTRACT)


def _chain_params(succ):
  """Params whose greedy next token after ``s`` is ``succ[s]``, for s < 63.

  Token ``s < 63`` embeds as the one-hot ``e_s``, EOS as ``e_63``, all other
  tokens as 0. Attention outputs are zeroed; the first MLP maps the normed
  ``8·e_s`` to ``≈64·e_succ(s)``, so the final hidden state is
  ``≈0.125·e_s + 8·e_succ(s)`` and, with tied embeddings, the logits are
  ≈8 at ``succ(s)``, ≈0.125 at ``s`` and 0 elsewhere.
  """
  d = _CONFIG.d_model
  slot = {v: v for v in range(d - 1)} | {_EOS: d - 1}
  emb = np.zeros((_CONFIG.vocab_size, d), np.float32)
  for token, s in slot.items():
    emb[token, s] = 1.0
  eye = np.zeros((d, _CONFIG.d_ff), np.float32)
  eye[np.arange(d), np.arange(d)] = 1.0
  down = np.zeros((_CONFIG.d_ff, d), np.float32)
  for s, nxt in succ.items():
    down[slot[s], slot[nxt]] = 1.0

  def value(path, x):
    name = jax.tree_util.keystr(path)
    if x.ndim == 1:
      return jnp.ones(x.shape, x.dtype)
    if "embedding" in name:
      return jnp.asarray(emb)
    if "[0]['mlp']" in name:
      return jnp.asarray(
        {"gate": eye, "up": eye, "down": down}[
          name.split("['mlp']['")[1].split("_")[0]
        ]
      )
    return jnp.zeros(x.shape, x.dtype)

  return jax.tree_util.tree_map_with_path(value, _ABSTRACT)


def _left_pad(prompts, width=None):
  width = width or max(map(len, prompts))
  tokens = np.full((len(prompts), width), _PAD, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p) :] = p
  return tokens, tokens != _PAD


_full_logits = jax.jit(
  lambda params, tokens: nnx.merge(_GRAPHDEF, params, _REST)(tokens),
  compiler_options=_FAST,
)


def _right_aligned(prompts, completions):
  """``[N, P + T]`` rows ``prompt + completion`` (then pad), unpadded."""
  width = max(map(len, prompts)) + _T
  rows = np.full((len(prompts), width), _PAD, np.int32)
  for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
    rows[i, : len(p)] = p
    rows[i, len(p) : len(p) + len(c)] = c
  return rows


def _greedy_without_cache(params, prompts):
  """Step-by-step argmax, one full forward per step, no padding/mask/cache."""
  completions = [[] for _ in prompts]
  for t in range(_T):
    logits = np.asarray(
      _full_logits(params, _right_aligned(prompts, completions))
    )
    for i, p in enumerate(prompts):
      completions[i].append(int(np.argmax(logits[i, len(p) + t - 1])))
  out = np.full((len(prompts), _T), _PAD, np.int32)
  for i, c in enumerate(completions):  # pad after the first EOS
    stop = c.index(_EOS) + 1 if _EOS in c else _T
    out[i, :stop] = c[:stop]
  return out


def _teacher_forced_logps(params, prompts, completions, temperature):
  """``[N, T]`` log-probs of ``completions`` under one full forward."""
  rows = _right_aligned(prompts, completions)
  logits = _full_logits(params, rows) / temperature
  logps = np.asarray(ops.token_logps(logits[:, :-1], rows[:, 1:]))
  return np.stack(
    [logps[i, len(p) - 1 : len(p) - 1 + _T] for i, p in enumerate(prompts)]
  )


def _constraints(stablehlo: str) -> set[str]:
  """``"[{...}, ...]> : tensor<...>"`` of each sharding constraint."""
  return set(
    re.findall(r"sdy\.sharding_constraint %\S+ <@\w+, (.*)", stablehlo)
  )


def _sampler(**kwargs):
  kwargs = dict(max_new_tokens=_T, eos_id=_EOS, pad_id=_PAD) | kwargs
  return sampler_lib.Sampler(_GRAPHDEF, _REST, compiler_options=_FAST, **kwargs)


def _np_process(logits, temperature, top_k, top_p):
  """float64 (keep mask, log-probs of the filtered distribution)."""
  x = np.asarray(logits, np.float64) / temperature
  keep = np.ones(x.shape, bool)
  if 0 < top_k < x.shape[-1]:
    kth = -np.sort(-x, axis=-1)[:, top_k - 1 : top_k]
    keep &= x >= kth
  if top_p < 1.0:
    for i in range(x.shape[0]):
      idx = np.flatnonzero(keep[i])
      z = x[i, idx]
      order = np.argsort(-z, kind="stable")
      p = np.exp(z[order] - z.max())
      p /= p.sum()
      mass_before = np.cumsum(p) - p
      keep[i, idx[order[mass_before >= top_p]]] = False
  z = np.where(keep, x, -np.inf)
  z = z - z.max(-1, keepdims=True)
  return keep, z - np.log(np.exp(z).sum(-1, keepdims=True))


class ProcessLogitsTest(parameterized.TestCase):
  @parameterized.parameters(
    (0.7, 0, 1.0),
    (1.0, 5, 1.0),
    (2.0, 0, 0.9),
    (0.6, 8, 0.5),
  )
  def test_matches_numpy_oracle(self, temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(size=(6, 40)).astype(np.float32)
    fn = jax.jit(
      lambda x: jax.nn.log_softmax(
        sampler_lib.process_logits(
          x, temperature=temperature, top_k=top_k, top_p=top_p
        )
      ),
      compiler_options=_FAST,
    )
    keep, want = _np_process(logits, temperature, top_k, top_p)
    got = np.asarray(fn(logits))
    np.testing.assert_array_equal(got > -1e20, keep)
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    if top_k:
      self.assertLessEqual(keep.sum(-1).max(), top_k)

  def test_filters_reduce_to_argmax(self):
    logits = np.random.default_rng(2).normal(size=(5, 30)).astype(np.float32)

    @jax.jit
    def kept(x):
      return [
        sampler_lib.process_logits(x, temperature=0.8, **kwargs) > -1e20
        for kwargs in (dict(top_k=1, top_p=1.0), dict(top_k=0, top_p=1e-6))
      ]

    for keep in kept(logits):
      np.testing.assert_array_equal(
        np.flatnonzero(keep), np.argmax(logits, -1) + 30 * np.arange(5)
      )


class GreedyTest(absltest.TestCase):
  """Greedy decoding, one compiled configuration for all checks."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Cache segments of 2, 4 and 8 new tokens: the cache grows twice.
    cls.sampler = _sampler(cache_segment=2)
    cls.params = _random_params()
    cls.tokens, cls.mask = _left_pad(_PROMPTS)
    del _DECODE_STEPS[:]
    cls.out = cls.sampler.generate(
      cls.params, cls.tokens, cls.mask, jax.random.key(0), greedy=True
    )
    cls.steps = len(_DECODE_STEPS)

  def test_equals_argmax_recomputation_without_cache(self):
    want = _greedy_without_cache(self.params, _PROMPTS)
    # The random model does not emit EOS here, so all T tokens are live,
    # and the completions differ between prompts (no trivial copying).
    self.assertNotIn(_EOS, want)
    self.assertGreater(len({tuple(r) for r in want}), 6)
    np.testing.assert_array_equal(self.out.completion_tokens, want)
    self.assertTrue(np.all(self.out.completion_mask))
    self.assertEqual(self.steps, _T)
    np.testing.assert_array_equal(self.out.prompt_tokens, self.tokens)
    np.testing.assert_array_equal(self.out.prompt_mask, self.mask)
    self.assertEqual(self.out.completion_tokens.dtype, jnp.int32)
    self.assertEqual(self.out.token_logps.dtype, jnp.float32)

  def test_logps_equal_teacher_forced_at_two_temperatures(self):
    toks = np.asarray(self.out.completion_tokens)
    np.testing.assert_allclose(
      self.out.token_logps,
      _teacher_forced_logps(self.params, _PROMPTS, toks, 1.0),
      atol=1e-5,
    )
    # Temperature is traced: no recompile, and greedy log-probs are those
    # of the temperature-scaled distribution at the argmax.
    out = self.sampler.generate(
      self.params,
      self.tokens,
      self.mask,
      jax.random.key(0),
      greedy=True,
      temperature=0.6,
    )
    np.testing.assert_array_equal(out.completion_tokens, toks)
    np.testing.assert_allclose(
      out.token_logps,
      _teacher_forced_logps(self.params, _PROMPTS, toks, 0.6),
      atol=1e-5,
    )
    self.assertLen(self.sampler._jitted, 1)

  def test_prompt_alone_gives_batch_completion(self):
    # The shortest prompt (7 pads in the batch) alone, unpadded, B = 1.
    alone = self.sampler.generate(
      self.params,
      np.array([_PROMPTS[1]], np.int32),
      np.ones((1, 1), bool),
      jax.random.key(0),
      greedy=True,
    )
    np.testing.assert_array_equal(
      alone.completion_tokens[0], self.out.completion_tokens[1]
    )
    np.testing.assert_allclose(
      alone.token_logps[0], self.out.token_logps[1], atol=1e-5
    )
    # Every other prompt alone is covered by the padding-free recomputation
    # (each row there is its own unpadded sequence).

  def test_eos_masks_pads_and_stops_early(self):
    # succ: 10→11→12→EOS; 20→…→25→EOS; 40→EOS; 36→…→40→EOS; 50→51→EOS.
    succ = {s: s + 1 for s in range(62)}
    for stop in (12, 25, 40, 51):
      succ[stop] = _EOS
    params = _chain_params(succ)
    # Longest chains of 6 and 3 tokens: the loop stops after 6 steps (in
    # the last cache segment, 4..8) and after 3 (segment 2..4; the third
    # segment is skipped).
    for last, want_steps in (
      ([10, 20, 40, 36, 50, 11, 24, 39], 6),
      ([10, 12, 40, 39, 50, 51, 24, 25], 3),
    ):
      prompts = [p[:-1] + [x] for p, x in zip(_PROMPTS, last, strict=True)]
      tokens, mask = _left_pad(prompts)
      del _DECODE_STEPS[:]
      out = self.sampler.generate(
        params, tokens, mask, jax.random.key(0), greedy=True
      )
      steps = len(_DECODE_STEPS)
      want = np.full((8, _T), _PAD, np.int32)
      want_mask = np.zeros((8, _T), bool)
      for i, x in enumerate(last):
        chain = [succ[x]]
        while chain[-1] != _EOS:
          chain.append(succ[chain[-1]])
        want[i, : len(chain)] = chain
        want_mask[i, : len(chain)] = True
      np.testing.assert_array_equal(out.completion_tokens, want)
      np.testing.assert_array_equal(out.completion_mask, want_mask)
      logps = np.asarray(out.token_logps)
      self.assertTrue(np.all(logps[~want_mask] == 0.0))
      self.assertTrue(np.all(logps[want_mask] < 0.0))
      self.assertEqual(want_mask.sum(1).max(), want_steps)
      self.assertEqual(steps, want_steps)
    # Same configuration: the params are an argument, nothing recompiled.
    self.assertLen(self.sampler._jitted, 1)

  def test_sharded_cache_and_batch_equal_unsharded(self):
    # data=2, fsdp=2, tensor=2 with the default rules: rows over data x
    # fsdp, the 2 KV heads over tensor; parameters born sharded.
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    rules = config_lib.DEFAULT_RULES
    params = jax.device_put(
      self.params, sharding.state_shardings(_ABSTRACT, mesh, rules)
    )
    rows = sharding.batch_sharding(mesh, rules, 2)
    tokens = jax.device_put(self.tokens, rows)
    mask = jax.device_put(self.mask, rows)
    sampler = _sampler(cache_segment=2, mesh=mesh, rules=rules)
    args = (params, tokens, mask, jax.random.key(0))
    out = sampler.generate(*args, greedy=True)
    np.testing.assert_array_equal(
      out.completion_tokens, self.out.completion_tokens
    )
    np.testing.assert_allclose(out.token_logps, self.out.token_logps, atol=1e-5)
    self.assertEqual(out.completion_tokens.sharding.spec[0], ("data", "fsdp"))
    # The cache of every segment (P + 2, P + 4, P + 8 slots) is held as
    # [N/4, KV/2, S, head_dim] tiles per layer; no device holds all rows.
    lowered = sampler.lower(*args, greedy=True)
    hlo = lowered.compile().as_text()
    c, n, p = _CONFIG, len(_PROMPTS), self.tokens.shape[1]
    constraints = _constraints(lowered.as_text())
    for slots in (p + 2, p + 4, p + _T):
      shape = f"{n}x{c.n_kv_heads}x{slots}x{c.head_dim}xf32"
      want = (
        f'[{{"data", "fsdp"}}, {{"tensor"}}, {{}}, {{}}]> : tensor<{shape}>'
      )
      self.assertIn(want, constraints)
      tile = f"[{n // 4},{c.n_kv_heads // 2},{slots},{c.head_dim}]"
      whole = f"[{n},{c.n_kv_heads},{slots},"
      self.assertIn(f"f32{tile}", hlo)
      self.assertNotIn(f"f32{whole}", hlo)

  def test_cache_rule_skips_axes_that_do_not_divide(self):
    # tensor=4 does not divide the 2 KV heads: they stay whole, rows still
    # split over fsdp.
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 2), ("tensor", 4)])
    cache = jax.eval_shape(lambda: init_cache(_CONFIG, 4, 6))
    with sharding.activation_context(mesh, config_lib.DEFAULT_RULES):
      text = jax.jit(sampler_lib.constrain_cache).lower(cache).as_text()
    constraints = _constraints(text)
    kv = f"tensor<4x{_CONFIG.n_kv_heads}x6x"
    self.assertTrue(
      any(
        x.startswith('[{"fsdp"}, {}, {}, {}]') and kv in x for x in constraints
      ),
      constraints,
    )
    self.assertTrue(
      any(
        x.startswith('[{"fsdp"}, {}]> : tensor<4x6xi32>') for x in constraints
      ),
      constraints,
    )


class SamplingTest(absltest.TestCase):
  """Categorical sampling with G = 2 samples per prompt."""

  G = 2

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.sampler = _sampler()
    cls.params = _random_params()
    cls.prompts = _PROMPTS[:4]
    cls.tokens, cls.mask = _left_pad(cls.prompts)
    cls.rows = [p for p in cls.prompts for _ in range(cls.G)]  # b·G + g

  def generate(self, seed, **kwargs):
    return self.sampler.generate(
      self.params,
      self.tokens,
      self.mask,
      jax.random.key(seed),
      num_samples=self.G,
      **kwargs,
    )

  def test_logps_equal_teacher_forced_and_rows_are_prompt_major(self):
    for temperature in (1.0, 0.7):
      out = self.generate(3, temperature=temperature)
      np.testing.assert_array_equal(
        out.prompt_tokens, np.repeat(self.tokens, self.G, axis=0)
      )
      toks = np.asarray(out.completion_tokens)
      want = _teacher_forced_logps(self.params, self.rows, toks, temperature)
      mask = np.asarray(out.completion_mask)
      # Row b·G + g is scored after prompt b: the layout is prompt-major.
      np.testing.assert_allclose(
        out.token_logps, np.where(mask, want, 0.0), atol=1e-5
      )
      # The G samples of a prompt differ (independent draws).
      self.assertFalse(np.array_equal(toks[0::2], toks[1::2]))
    self.assertLen(self.sampler._jitted, 1)

  def test_seeded_runs_are_reproducible(self):
    a, b, c = (self.generate(s) for s in (5, 5, 6))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    self.assertFalse(np.array_equal(a.completion_tokens, c.completion_tokens))

  def test_top_k_one_and_tiny_top_p_equal_greedy(self):
    greedy = _greedy_without_cache(self.params, self.rows)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
      out = self.generate(7, temperature=1.5, **kwargs)
      np.testing.assert_array_equal(out.completion_tokens, greedy)
      # The filtered distribution is a point mass: log-prob 0.
      np.testing.assert_array_equal(out.token_logps, 0.0)


class ArgumentsTest(parameterized.TestCase):
  @parameterized.parameters(
    ("temperature", dict(temperature=0.0)),
    ("top_k", dict(top_k=-1)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("num_samples", dict(num_samples=0)),
  )
  def test_bad_sampling_arguments(self, name, kwargs):
    tokens, mask = _left_pad(_PROMPTS[:2])
    with self.assertRaisesRegex(ValueError, name):
      _sampler().generate(None, tokens, mask, jax.random.key(0), **kwargs)

  def test_bad_constructor_and_prompts(self):
    with self.assertRaisesRegex(ValueError, "max_new_tokens"):
      _sampler(max_new_tokens=0)
    with self.assertRaisesRegex(ValueError, "cache_segment"):
      _sampler(cache_segment=0)
    tokens, mask = _left_pad(_PROMPTS[:2])
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, "prompt_mask"):
      _sampler().generate(None, tokens, mask[:, 1:], key)
    with self.assertRaisesRegex(ValueError, "prompt_tokens"):
      _sampler().generate(None, tokens[0], mask[0], key)
    with self.assertRaisesRegex(ValueError, r"prompt_mask.*rows \[1\]"):
      _sampler().generate(None, tokens, mask[:, ::-1], key)


if __name__ == "__main__":
  absltest.main()
