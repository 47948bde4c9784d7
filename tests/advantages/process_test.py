"""Tests for alignment/advantages/_process.py (process/step-level credit).

Oracles are float64 NumPy loops transcribing the papers and the authors'
code (PRIME verl recipe, CJReinforce/PURE, IGPO), not our implementation.
"""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import PartitionSpec as P

from alignment import advantages
from alignment.advantages import _process
from tests import testing

B, G, S, T = 4, 3, 5, 6


def _prefix_mask(rng, shape, low=1):
  lengths = rng.integers(low, shape[-1] + 1, size=shape[:-1] + (1,))
  return np.arange(shape[-1]) < lengths


def _data(seed=0):
  rng = np.random.default_rng(seed)
  token_mask = _prefix_mask(rng, (B, G, T))
  token_mask[0, 0] = False  # an empty completion
  step_mask = _prefix_mask(rng, (B, G, S))
  return dict(
    process=rng.normal(size=(B, G, T)).astype(np.float32) * 0.1,
    outcome=rng.integers(0, 2, size=(B, G)).astype(np.float32),
    token_mask=token_mask,
    steps=rng.uniform(-1, 1, size=(B, G, S)).astype(np.float32),
    step_mask=step_mask,
    step_lengths=rng.integers(1, 4, size=(B, G, S)).astype(np.int32),
    verifiable=rng.integers(-1, 1, size=(B, G)).astype(np.float32),
    gains=rng.normal(size=(B, G, S)).astype(np.float32) * 0.2,
    preferences=rng.uniform(size=(B, G, G)).astype(np.float32),
  )


# ----------------------------------------------------------------------------
# float64 oracles.


def _np_whiten(x, mask, eps):
  vals = x[mask]
  return np.where(
    mask, (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + eps), 0.0
  )


def _np_prime(d, process_coef=5.0, outcome_coef=5.0, eps=1e-8):
  """verl recipe/prime compute_rloo_advantage_return, group by group."""
  mask = d["token_mask"]
  n = mask.shape[1]

  def masked_rloo(rewards, m):
    out = np.where(m, rewards, 0.0)
    for b in range(out.shape[0]):
      means = [
        out[b, i][m[b, i]].mean() if m[b, i].any() else 0.0 for i in range(n)
      ]
      baseline = sum(means) / (n - 1)
      for i in range(n):
        out[b, i][m[b, i]] = out[b, i][m[b, i]] * n / (n - 1) - baseline
    return out

  outcome = np.zeros(mask.shape)
  outcome_mask = np.zeros(mask.shape, bool)
  for b in range(B):
    for i in range(n):
      # verl indexes valid_length - 1, i.e. -1 (the last position) for an
      # empty completion: its outcome enters the baseline, not the returns.
      last = mask[b, i].sum() - 1
      outcome[b, i, last] = d["outcome"][b, i]
      outcome_mask[b, i, last] = True
  total = process_coef * masked_rloo(
    d["process"].astype(np.float64), mask
  ) + outcome_coef * masked_rloo(outcome, outcome_mask)
  returns = np.flip(np.cumsum(np.flip(total * mask, -1), -1), -1)
  return _np_whiten(returns, mask, eps)


def _np_min_form(r, m, temperature):
  out = np.zeros_like(r, dtype=np.float64)
  for idx in np.ndindex(r.shape[:-1]):
    keep = m[idx]
    if keep.any():
      x = r[idx][keep].astype(np.float64)
      w = np.exp(-x / temperature - np.max(-x / temperature))
      out[idx][keep] = w / w.sum() * x
  return out


def _np_pure(
  d, baseline="token", temperature=0.1, min_form=True, verifiable=True, coef=1.0
):
  """CJReinforce/PURE process_experiences, at step level."""
  m = d["step_mask"]
  lengths = np.where(m, d["step_lengths"], 0).astype(np.float64)
  credit = (
    _np_min_form(d["steps"], m, temperature)
    if min_form
    else np.where(m, d["steps"], 0.0).astype(np.float64)
  )
  total = credit.sum(-1)
  out = credit.copy()
  for b in range(B):
    for i in range(G):
      others = [j for j in range(G) if j != i]
      if baseline == "token":
        per_token = total[b, others].sum() / lengths[b, others].sum()
        out[b, i] -= per_token * lengths[b, i]
      else:
        per_step = [total[b, j] / m[b, j].sum() for j in others]
        out[b, i] -= np.mean(per_step)
  out = np.where(m, out, 0.0)
  if verifiable:
    v = d["verifiable"].astype(np.float64)
    for b in range(B):
      for i in range(G):
        v_i = v[b, i] - np.mean(np.delete(v[b], i))
        out[b, i, m[b, i].sum() - 1] += coef * v_i
  return np.where(m, np.flip(np.cumsum(np.flip(out, -1), -1), -1), 0.0)


def _np_igpo(d, gamma=1.0, normalization="joint", eps=1e-6):
  m = d["step_mask"]
  last = np.zeros_like(m)
  for idx in np.ndindex(m.shape[:-1]):
    last[idx + (m[idx].sum() - 1,)] = True
  rewards = np.where(last, d["outcome"][..., None], d["gains"]).astype(
    np.float64
  )

  def norm(keep):
    """GuoqingWang1/IGPO compute_group_stats: sqrt(population var + 1e-8)."""
    out = np.zeros_like(rewards)
    for b in range(B):
      x = rewards[b][keep[b]]
      if len(x) > 1 and not np.all(x == x[0]):
        out[b][keep[b]] = (x - x.mean()) / (np.sqrt(x.var() + 1e-8) + eps)
    return out

  normed = norm(m) if normalization == "joint" else norm(m & ~last) + norm(last)
  adv = np.zeros_like(normed)
  for idx in np.ndindex(m.shape[:-1]):
    run = 0.0
    for s in reversed(range(S)):
      if m[idx + (s,)]:
        run = normed[idx + (s,)] + gamma * run
        adv[idx + (s,)] = run
  return adv


def _np_arena(prefs, eps=1e-6):
  out = np.zeros((B, G))
  for b in range(B):
    win = np.array(
      [np.mean([prefs[b, i, j] for j in range(G) if j != i]) for i in range(G)],
      np.float64,
    )
    out[b] = (win - win.mean()) / (win.std(ddof=1) + eps)
  return out


CASES = {
  "prime": (
    _np_prime,
    lambda f, d: f(d["process"], d["outcome"], d["token_mask"]),
  ),
  "pure_min": (
    _np_pure,
    lambda f, d: f(
      d["steps"], d["step_mask"], d["step_lengths"], d["verifiable"]
    ),
  ),
  "igpo": (_np_igpo, lambda f, d: f(d["gains"], d["outcome"], d["step_mask"])),
  "arena_rank": (
    lambda d: _np_arena(d["preferences"]),
    lambda f, d: f(d["preferences"]),
  ),
}
_PADDED = {"process": "token_mask", "steps": "step_mask", "gains": "step_mask"}


class EstimatorTest(parameterized.TestCase):
  def test_registry(self):
    self.assertEqual(set(CASES), set(_process.REGISTRY))
    for name, fn in _process.REGISTRY.items():
      self.assertIs(advantages.REGISTRY[name], fn)
    self.assertIs(
      advantages.STEP_REWARD_TRANSFORMS["delta"], _process.delta_step_rewards
    )

  @parameterized.named_parameters((n, n) for n in sorted(CASES))
  def test_matches_oracle_nan_padding_and_no_gradient(self, name):
    oracle, call = CASES[name]
    fn = _process.REGISTRY[name]
    d = _data()
    jitted = jax.jit(lambda d: call(fn, d))
    got = jitted(d)
    np.testing.assert_allclose(got, oracle(d), rtol=2e-5, atol=2e-5)
    nan = dict(d)
    for key, mask_key in _PADDED.items():
      nan[key] = testing.with_nan_padding(d[key], d[mask_key])
    np.testing.assert_array_equal(jitted(nan), got)
    floats = {k: v for k, v in nan.items() if v.dtype == np.float32}
    grads = jax.jit(jax.grad(lambda fl: jnp.sum(call(fn, {**nan, **fl}))))(
      floats
    )
    for g in jax.tree.leaves(grads):
      np.testing.assert_array_equal(g, np.zeros_like(g))
    bf16 = {
      k: (v.astype(jnp.bfloat16) if v.dtype == np.float32 else v)
      for k, v in d.items()
    }
    self.assertEqual(
      jax.eval_shape(lambda d: call(fn, d), bf16).dtype, jnp.float32
    )

  def test_prime_variants_and_implicit_reward(self):
    d = _data(1)
    got = _process.prime_advantages(
      d["process"],
      d["outcome"],
      d["token_mask"],
      process_coef=0.0,
      outcome_coef=2.0,
    )
    np.testing.assert_allclose(
      got, _np_prime(d, 0.0, 2.0), rtol=2e-5, atol=2e-5
    )
    rng = np.random.default_rng(1)
    logp = rng.normal(size=(B, T)).astype(np.float32)
    ref = rng.normal(size=(B, T)).astype(np.float32)
    mask = _prefix_mask(rng, (B, T))
    r = _process.prime_token_rewards(logp, ref, mask, beta=0.05)
    np.testing.assert_allclose(
      r, np.where(mask, 0.05 * (logp - ref), 0.0), rtol=1e-6
    )
    g_logp, g_ref = testing.grads(
      lambda a, b: _process.prime_token_rewards(a, b, mask),
      (
        testing.with_nan_padding(logp, mask),
        testing.with_nan_padding(ref, mask),
      ),
      (0, 1),
    )
    np.testing.assert_allclose(g_logp, 0.05 * mask)
    np.testing.assert_array_equal(g_ref, 0.0)
    with self.assertRaisesRegex(ValueError, "beta"):
      _process.prime_token_rewards(logp, ref, mask, beta=0.0)

  def test_pure_variants_and_min_form(self):
    d = _data(2)
    for kwargs in (
      {"baseline": "step"},
      {"min_form": False},
      {"temperature": 0.5, "verifiable_coef": 0.3},
    ):
      got = _process.pure_advantages(
        d["steps"], d["step_mask"], d["step_lengths"], d["verifiable"], **kwargs
      )
      want = _np_pure(
        d,
        baseline=kwargs.get("baseline", "token"),
        temperature=kwargs.get("temperature", 0.1),
        min_form=kwargs.get("min_form", True),
        coef=kwargs.get("verifiable_coef", 1.0),
      )
      np.testing.assert_allclose(
        got, want, rtol=2e-5, atol=2e-5, err_msg=str(kwargs)
      )
    no_v = _process.pure_advantages(
      d["steps"], d["step_mask"], d["step_lengths"]
    )
    np.testing.assert_allclose(
      no_v, _np_pure(d, verifiable=False), rtol=2e-5, atol=2e-5
    )
    # The paper's worked example: the min-form return of every step up to
    # the worst one is the minimum, and 0 after it.
    r = np.array([[0.9, 0.8, 0.95, -0.6, 0.7, 0.0]], np.float32)
    m = np.array([[True] * 5 + [False]])
    credit = _process.min_form_credit(r, m, temperature=1e-3)
    np.testing.assert_allclose(
      np.cumsum(np.asarray(credit)[0, ::-1])[::-1],
      [-0.6, -0.6, -0.6, -0.6, 0.0, 0.0],
      atol=1e-6,
    )
    np.testing.assert_allclose(
      _process.min_form_credit(d["steps"][0], d["step_mask"][0]),
      _np_min_form(d["steps"][0], d["step_mask"][0], 0.1),
      rtol=1e-5,
      atol=1e-6,
    )
    with self.assertRaisesRegex(ValueError, "temperature"):
      _process.min_form_credit(r, m, temperature=0.0)
    with self.assertRaisesRegex(ValueError, "baseline"):
      _process.pure_advantages(
        d["steps"], d["step_mask"], d["step_lengths"], baseline="sequence"
      )

  def test_igpo_and_information_gain(self):
    d = _data(3)
    m = d["step_mask"]
    for kwargs in ({"normalization": "separate"}, {"gamma": 0.5}):
      np.testing.assert_allclose(
        _process.igpo_advantages(d["gains"], d["outcome"], m, **kwargs),
        _np_igpo(d, **kwargs),
        rtol=2e-5,
        atol=2e-5,
      )
    # IG = 0 and separate normalisation: every turn gets the group-normalised
    # outcome (gamma = 1; the authors' population std).
    flat = _process.igpo_advantages(
      np.zeros_like(d["gains"]), d["outcome"], m, normalization="separate"
    )
    o = d["outcome"].astype(np.float64)
    mean = o.mean(1, keepdims=True)
    std = np.sqrt(o.var(1, keepdims=True) + 1e-8)
    grpo = np.where(
      o.max(1, keepdims=True) > o.min(1, keepdims=True),
      (o - mean) / (std + 1e-6),
      0.0,
    )
    np.testing.assert_allclose(
      flat, np.where(m, grpo[..., None], 0.0), rtol=1e-5, atol=1e-6
    )
    # Information gains telescope to p_S - p_0.
    rng = np.random.default_rng(3)
    logps = -rng.uniform(0.1, 3.0, size=(B, S)).astype(np.float32)
    init = -rng.uniform(0.1, 3.0, size=(B,)).astype(np.float32)
    tm = _prefix_mask(rng, (B, S))
    gains = _process.information_gain_rewards(
      testing.with_nan_padding(logps, tm), init, tm
    )
    last = np.exp(logps)[np.arange(B), tm.sum(1) - 1]
    np.testing.assert_allclose(
      np.sum(gains, 1), last - np.exp(init), rtol=1e-5, atol=1e-6
    )
    with self.assertRaisesRegex(ValueError, "normalization"):
      _process.igpo_advantages(
        d["gains"], d["outcome"], m, normalization="batch"
      )
    with self.assertRaisesRegex(ValueError, "gamma"):
      _process.igpo_advantages(d["gains"], d["outcome"], m, gamma=2.0)

  def test_arena_rank(self):
    # A transitive judge: the win rate is linear in the rank, so the
    # advantages are GRPO on (G - 1 - rank).
    quality = np.array([[0.3, 2.0, -1.0], [5.0, 4.0, 3.0]], np.float32)
    verdict = (quality[:, :, None] > quality[:, None, :]).astype(np.float32)
    got = _process.arena_rank_advantages(verdict)
    rank = np.argsort(np.argsort(-quality, 1), 1).astype(np.float32)
    np.testing.assert_allclose(
      got, advantages.grpo_advantages(G - 1 - rank), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.sum(got, 1), 0.0, atol=1e-5)
    # A masked sample is ignored by the others' win rates.
    mask = np.array([[True, True, False], [True, True, True]])
    masked = _process.arena_rank_advantages(
      np.where(mask[:, None] & mask[:, :, None], verdict, np.nan), mask
    )
    np.testing.assert_allclose(
      masked[0], [-0.70710677, 0.70710677, 0.0], rtol=1e-5
    )
    with self.assertRaisesRegex(ValueError, "scale"):
      _process.arena_rank_advantages(verdict, scale="pairs")


class StepTransformTest(absltest.TestCase):
  def test_clip_delta_spa_and_broadcast(self):
    d = _data(4)
    r, m = d["steps"][:, 0], d["step_mask"][:, 0]
    clipped = _process.clip_step_rewards(r, m, eta=0.2)
    np.testing.assert_allclose(
      clipped, np.where(m, np.minimum(r - 0.2, 0), 0.0)
    )
    self.assertTrue(np.all(np.asarray(clipped) <= 0.0))
    last = m.sum(1) - 1
    rows = np.arange(len(r))
    for mode, final in (("zero", r[rows, last]), ("keep", 0.0)):
      delta = _process.delta_step_rewards(
        testing.with_nan_padding(r, m), m, last_step=mode
      )
      to_go = np.cumsum(np.asarray(delta)[:, ::-1], 1)[:, ::-1]
      want = np.where(
        m, r - np.asarray(final)[..., None] * (mode == "zero"), 0.0
      )
      np.testing.assert_allclose(to_go, want, rtol=1e-5, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "last_step"):
      _process.delta_step_rewards(r, m, last_step="drop")
    # SPA-RL: rewards and the progress loss.
    grounded = d["step_lengths"][:, 0] > 1
    np.testing.assert_allclose(
      _process.spa_step_rewards(r, grounded, m, progress_weight=2.0),
      np.where(m, 2.0 * r + 0.5 * grounded, 0.0),
      rtol=1e-6,
    )
    outcome = np.where(m, r, 0).sum(1)
    np.testing.assert_allclose(
      _process.spa_progress_loss(testing.with_nan_padding(r, m), outcome, m),
      0.0,
      atol=1e-10,
    )
    grad_r, grad_out = testing.grads(
      _process.spa_progress_loss,
      (testing.with_nan_padding(r, m), outcome + 1.0, m),
      (0, 1),
    )
    np.testing.assert_allclose(grad_r, np.where(m, -2.0, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(grad_out, 0.0)
    # broadcast_step_values: tokens take their step's value; -1 gets 0.
    values = np.array([[1.0, 2.0, 3.0]], np.float32)
    index = np.array([[0, 0, -1, 1, 2, 2, 5]])
    tmask = np.array([[True] * 6 + [False]])
    np.testing.assert_array_equal(
      _process.broadcast_step_values(values, index, tmask),
      [[1, 1, 0, 2, 3, 3, 0]],
    )

  def test_type_errors_and_group_size(self):
    d = _data(5)
    with self.assertRaises(jaxtyping.TypeCheckError):
      _process.min_form_credit(d["steps"][0, 0], d["step_mask"][0, 0])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _process.prime_advantages(
        d["process"], d["outcome"][:-1], d["token_mask"]
      )
    with self.assertRaises(jaxtyping.TypeCheckError):
      _process.clip_step_rewards(
        d["steps"][:, 0], d["step_mask"][:-1, 0], eta=0.0
      )
    for fn, args, name in (
      (
        _process.prime_advantages,
        (d["process"][:, :1], d["outcome"][:, :1], d["token_mask"][:, :1]),
        "process_rewards",
      ),
      (
        _process.igpo_advantages,
        (d["gains"][:, :1], d["outcome"][:, :1], d["step_mask"][:, :1]),
        "information_gain",
      ),
      (
        _process.pure_advantages,
        (d["steps"][:, :1], d["step_mask"][:, :1], d["step_lengths"][:, :1]),
        "step_rewards",
      ),
      (
        _process.arena_rank_advantages,
        (d["preferences"][:, :1, :1],),
        "preferences",
      ),
    ):
      with self.assertRaisesRegex(ValueError, f"{name} has group size G=1"):
        fn(*args)


class ShardingTest(absltest.TestCase):
  def test_prime_global_whitening_under_shard_map(self):
    d = _data(6)
    d = {k: np.concatenate([v] * 4) for k, v in d.items()}  # B = 16
    fn = lambda p, o, m, axis_name=None: _process.prime_advantages(
      p, o, m, axis_name=axis_name
    )
    args = (d["process"], d["outcome"], d["token_mask"])
    want = jax.jit(fn)(*args)
    sharded = jax.jit(
      jax.shard_map(
        functools.partial(fn, axis_name="data"),
        mesh=testing.data_mesh(8),
        in_specs=P("data"),
        out_specs=P("data"),
      )
    )
    np.testing.assert_allclose(sharded(*args), want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
