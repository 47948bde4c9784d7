"""Tests for alignment/rewards/_shaping.py (reward shaping and filters)."""

import functools
import math

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import PartitionSpec as P

from alignment.rewards import _shaping as sh
from tests import testing

B, M = 6, 4
rng0 = np.random.RandomState(0)
REWARDS = rng0.randn(B).astype(np.float32)
REFS = rng0.randn(B, M).astype(np.float32)
REF_MASK = np.arange(M)[None] < np.array([4, 3, 1, 0, 2, 4])[:, None]


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- oracles --


def _centered_np(r, refs, mask, transform="sigmoid", scale=1.0):
  fn = _sigmoid if transform == "sigmoid" else np.tanh
  out = []
  for b in range(r.shape[0]):
    valid = refs[b][mask[b]].astype(np.float64)
    if valid.size == 0:
      out.append(fn(0.0))
    else:
      out.append(np.mean(fn(scale * (float(r[b]) - valid))))
  return np.array(out)


def _lsc_np(r, refs, mask, z=1.0364333894937898):
  out = []
  for b in range(r.shape[0]):
    valid = refs[b][mask[b]].astype(np.float64)
    centre = valid.mean() + z * valid.std() if valid.size else 0.0
    out.append(np.log(_sigmoid(float(r[b]) - centre)))
  return np.array(out)


def _hapo_np(length, correct, h, w=1.0, floor=-0.7):
  """Transcription of HAPO's compute_len_reward (cosine variant)."""
  if not np.isfinite(h) or h <= 0:
    return 0.0
  c = math.cos(length / h * math.pi / 2) if length < 2 * h else -1.0
  return w * (max(floor, c) if correct else min(0.0, c))


def _kimi_np(correct, lengths):
  out = np.zeros(lengths.shape)
  for b in range(lengths.shape[0]):
    lo, hi = lengths[b].min(), lengths[b].max()
    for g in range(lengths.shape[1]):
      lam = 0.5 - (lengths[b, g] - lo) / (hi - lo) if hi > lo else 0.0
      out[b, g] = lam if correct[b, g] else min(0.0, lam)
  return out


def _coverage_np(pred, gt, alpha=0.5, eps=1e-8):
  """Transcription of GUI-G2's gaussian_plane_reward (matrix form)."""
  out = []
  for p, g in zip(pred.astype(np.float64), gt.astype(np.float64), strict=True):
    pm = np.array([(p[0] + p[2]) / 2, (p[1] + p[3]) / 2])
    gm = np.array([(g[0] + g[2]) / 2, (g[1] + g[3]) / 2])
    pc = np.diag(
      [(alpha * (p[2] - p[0])) ** 2 + eps, (alpha * (p[3] - p[1])) ** 2 + eps]
    )
    gc = np.diag(
      [(alpha * (g[2] - g[0])) ** 2 + eps, (alpha * (g[3] - g[1])) ** 2 + eps]
    )
    avg = (pc + gc) / 2
    d = pm - gm
    term1 = d @ np.linalg.inv(avg) @ d / 8
    term2 = 0.5 * np.log(
      np.linalg.det(avg) / np.sqrt(np.linalg.det(pc) * np.linalg.det(gc))
    )
    out.append(np.exp(-(term1 + term2)))
  return np.array(out)


def _point_np(pred, gt, alpha=0.5):
  pred, gt = pred.astype(np.float64), gt.astype(np.float64)
  px, py = (pred[:, 0] + pred[:, 2]) / 2, (pred[:, 1] + pred[:, 3]) / 2
  gx, gy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
  sx, sy = alpha * (gt[:, 2] - gt[:, 0]), alpha * (gt[:, 3] - gt[:, 1])
  return np.exp(-0.5 * ((px - gx) ** 2 / sx**2 + (py - gy) ** 2 / sy**2))


# ------------------------------------------------------------------ tests --


class PreferenceAsRewardTest(parameterized.TestCase):
  @parameterized.parameters(("sigmoid", 1.0), ("sigmoid", 3.0), ("tanh", 1.0))
  def test_centered_matches_numpy_oracle(self, transform, scale):
    fn = jax.jit(
      lambda *a: sh.centered_sigmoid_rewards(
        *a, transform=transform, scale=scale
      )
    )
    got = fn(REWARDS, REFS, REF_MASK)
    want = _centered_np(REWARDS, REFS, REF_MASK, transform, scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    self.assertEqual(got.dtype, jnp.float32)

  def test_par_and_lsc_match_numpy_oracle(self):
    par = jax.jit(sh.par_rewards)(REWARDS, REFS, REF_MASK)
    np.testing.assert_allclose(
      par, _centered_np(REWARDS, REFS, REF_MASK), rtol=1e-5
    )
    self.assertEqual(float(par[3]), 0.5)  # no reference -> 0.5
    full = jax.jit(sh.par_rewards)(REWARDS, REFS)
    np.testing.assert_allclose(
      full, _centered_np(REWARDS, REFS, np.ones((B, M), bool)), rtol=1e-5
    )
    lsc = jax.jit(sh.log_sigmoid_centered_rewards)(REWARDS, REFS, REF_MASK)
    np.testing.assert_allclose(
      lsc, _lsc_np(REWARDS, REFS, REF_MASK), rtol=1e-5, atol=1e-6
    )
    self.assertTrue(np.all(np.asarray(lsc) <= 0))

  def test_par_properties(self):
    par = jax.jit(sh.par_rewards)
    refs = np.zeros((1, 1), np.float32)
    grid = np.linspace(-30, 30, 201, dtype=np.float32)
    values = np.asarray(jax.vmap(lambda r: par(r[None], refs)[0])(grid))
    # Bounded in [0, 1] (open interval up to float32 saturation), monotone.
    self.assertTrue(np.all((values >= 0) & (values <= 1)))
    self.assertTrue(np.all(np.diff(values) >= 0))
    self.assertTrue(np.all(np.diff(values[80:121]) > 0))
    # 0.5 at the reference; invariant to a per-prompt shift of the RM.
    np.testing.assert_allclose(
      par(REFS[:, 0], REFS),
      _centered_np(REFS[:, 0], REFS, np.ones((B, M), bool)),
      rtol=1e-5,
    )
    self.assertEqual(
      float(par(np.ones(1, np.float32), np.ones((1, 1), np.float32))[0]), 0.5
    )
    shift = np.arange(B, dtype=np.float32)[:, None] * 7.0
    np.testing.assert_allclose(
      par(REWARDS + shift[:, 0], REFS + shift, REF_MASK),
      par(REWARDS, REFS, REF_MASK),
      rtol=1e-5,
      atol=1e-6,
    )
    # Slope is maximal (1/4) at the centre and decays away from it.
    slope = jax.jit(jax.vmap(jax.grad(lambda r: par(r[None], refs)[0])))
    s = np.asarray(slope(np.array([0.0, 1.0, 3.0, -3.0], np.float32)))
    np.testing.assert_allclose(s[0], 0.25, rtol=1e-6)
    self.assertTrue(s[0] > s[1] > s[2] > 0)
    np.testing.assert_allclose(s[2], s[3], rtol=1e-6)

  def test_padding_inert_and_no_gradient_to_references(self):
    dirty = testing.with_nan_padding(REFS, REF_MASK)
    for fn in (sh.par_rewards, sh.log_sigmoid_centered_rewards):
      clean_v = jax.jit(fn)(REWARDS, REFS, REF_MASK)
      dirty_v = jax.jit(fn)(REWARDS, dirty, REF_MASK)
      np.testing.assert_array_equal(clean_v, dirty_v)
      g_r, g_ref = testing.grads(fn, (REWARDS, dirty, REF_MASK), (0, 1))
      self.assertTrue(np.all(np.isfinite(g_r)))
      np.testing.assert_array_equal(g_ref, 0.0)

  def test_bad_hyperparameters(self):
    with self.assertRaisesRegex(ValueError, "transform"):
      sh.centered_sigmoid_rewards(REWARDS, REFS, transform="relu")
    with self.assertRaisesRegex(ValueError, "scale"):
      sh.centered_sigmoid_rewards(REWARDS, REFS, scale=0.0)
    with self.assertRaises(jaxtyping.TypeCheckError):
      sh.par_rewards(REWARDS[:3], REFS)
    with self.assertRaises(jaxtyping.TypeCheckError):
      sh.par_rewards(REFS, REFS)


class NormalisationTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.RandomState(1)
    self.x = rng.randn(8, 5).astype(np.float32)
    self.mask = rng.rand(8, 5) > 0.3

  def test_match_numpy_oracle(self):
    x, mask = self.x, self.mask
    vals = x[mask].astype(np.float64)

    @jax.jit
    def fn(x, m):
      return (
        sh.minmax_rewards(x, m),
        sh.whiten_rewards(x, m),
        sh.std_clip_rewards(x, m, num_std=0.5),
        sh.clip_rewards(x, low=-0.5, high=0.25),
      )

    mm, wh, sc, cl = fn(x, mask)
    np.testing.assert_allclose(
      mm,
      np.where(mask, (x - vals.min()) / (vals.max() - vals.min()), 0),
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_allclose(
      wh,
      np.where(mask, (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8), 0),
      rtol=1e-4,
      atol=1e-5,
    )
    lo, hi = vals.mean() - 0.5 * vals.std(), vals.mean() + 0.5 * vals.std()
    np.testing.assert_allclose(
      sc, np.where(mask, np.clip(x, lo, hi), 0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(cl, np.clip(x, -0.5, 0.25))

  def test_degenerate_batches_and_padding(self):
    same = np.full((3, 2), 2.0, np.float32)
    both = jax.jit(lambda x: (sh.minmax_rewards(x), sh.std_clip_rewards(x)))
    mm, sc = both(same)
    np.testing.assert_array_equal(mm, 0.0)
    np.testing.assert_allclose(sc, 2.0)
    g = testing.grads(sh.std_clip_rewards, (same,), 0)
    self.assertTrue(np.all(np.isfinite(g)))
    dirty = testing.with_nan_padding(self.x, self.mask)
    fns = (sh.minmax_rewards, sh.whiten_rewards, sh.std_clip_rewards)

    def all_fns(x, m):
      outs = tuple(fn(x, m) for fn in fns)
      return sum(jnp.sum(o) for o in outs), outs

    value_and_grad = jax.jit(jax.value_and_grad(all_fns, has_aux=True))
    (_, clean), _ = value_and_grad(self.x, self.mask)
    (_, noisy), g = value_and_grad(dirty, self.mask)
    jax.tree.map(np.testing.assert_array_equal, clean, noisy)
    self.assertTrue(np.all(np.isfinite(g)))

  def test_bad_hyperparameters(self):
    with self.assertRaisesRegex(ValueError, "high"):
      sh.clip_rewards(self.x, low=1.0, high=0.0)
    np.testing.assert_array_equal(
      jax.jit(sh.clip_rewards)(np.array([-20.0, 3.0, 20.0], np.float32)),
      [-10.0, 3.0, 10.0],
    )
    with self.assertRaisesRegex(ValueError, "num_std"):
      sh.std_clip_rewards(self.x, num_std=-1.0)
    with self.assertRaisesRegex(ValueError, "epsilon"):
      sh.whiten_rewards(self.x, epsilon=-1.0)
    with self.assertRaises(jaxtyping.TypeCheckError):
      sh.minmax_rewards(self.x, self.mask[:, :2])

  def test_axis_name_equals_global_under_shard_map(self):
    x, mask = self.x, self.mask
    scores = (2.0 * x + np.random.RandomState(2).randn(8, 5)).astype(np.float32)

    def body(x, s, m, axis_name):
      return (
        sh.minmax_rewards(x, m, axis_name=axis_name),
        sh.whiten_rewards(x, m, axis_name=axis_name),
        sh.std_clip_rewards(x, m, axis_name=axis_name),
        sh.reward_r_squared(x, s, m, axis_name=axis_name),
      )

    want = jax.jit(functools.partial(body, axis_name=None))(x, scores, mask)
    sharded = jax.jit(
      jax.shard_map(
        functools.partial(body, axis_name="data"),
        mesh=testing.data_mesh(8),
        in_specs=(P("data"), P("data"), P("data")),
        out_specs=(P("data"), P("data"), P("data"), P()),
      )
    )
    got = sharded(x, scores, mask)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      got,
      want,
    )


class LengthShapingTest(parameterized.TestCase):
  def test_overlong_penalty_piecewise(self):
    lengths = np.array([0, 100, 16384, 16385, 18432, 20480, 20481, 99999])
    got = jax.jit(sh.overlong_penalty)(lengths)
    want = [0, 0, 0, -1 / 4096, -0.5, -1.0, -1.0, -1.0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    small = sh.overlong_penalty(
      np.arange(12).astype(np.float32), max_length=10, cache_length=4
    )
    np.testing.assert_allclose(
      small, [0] * 7 + [-0.25, -0.5, -0.75, -1.0, -1.0]
    )
    self.assertEqual(got.dtype, jnp.float32)
    with self.assertRaisesRegex(ValueError, "cache_length"):
      sh.overlong_penalty(lengths, max_length=10, cache_length=11)
    with self.assertRaisesRegex(ValueError, "max_length"):
      sh.overlong_penalty(lengths, max_length=0, cache_length=0)

  def test_kimi_and_grpo_lambda(self):
    rng = np.random.RandomState(3)
    correct = rng.rand(5, 4) > 0.4
    correct[4] = True
    lengths = rng.randint(10, 200, size=(5, 4))
    lengths[2] = 50  # constant lengths: no length signal
    kimi = jax.jit(sh.kimi_length_rewards)(correct, lengths)
    np.testing.assert_allclose(kimi, _kimi_np(correct, lengths), atol=1e-6)
    shortest = np.argmin(lengths[4])
    self.assertEqual(float(kimi[4, shortest]), 0.5)

    fn = jax.jit(
      lambda c, l, f: sh.grpo_lambda_rewards(c, l, top_fraction=f),
      static_argnums=2,
    )
    ratio = correct.mean(-1)
    order = np.argsort(-ratio, kind="stable")
    for frac in (0.0, 0.4, 1.0):
      rewards, aux = fn(correct, lengths, frac)
      k = int(round(frac * 5))
      penalized = np.zeros(5, bool)
      penalized[order[:k]] = True
      np.testing.assert_array_equal(aux.penalized, penalized)
      want = correct + np.where(
        penalized[:, None], _kimi_np(correct, lengths), 0
      )
      np.testing.assert_allclose(rewards, want, atol=1e-6)
    # Selection is invariant to permuting samples within a group.
    perm = rng.permutation(4)
    _, aux_perm = fn(correct[:, perm], lengths[:, perm], 0.4)
    _, aux = fn(correct, lengths, 0.4)
    np.testing.assert_array_equal(aux_perm.penalized, aux.penalized)
    with self.assertRaisesRegex(ValueError, "top_fraction"):
      sh.grpo_lambda_rewards(correct, lengths, top_fraction=1.5)
    with self.assertRaisesRegex(ValueError, "length_weight"):
      sh.grpo_lambda_rewards(correct, lengths, length_weight=-1.0)

  def test_hapo_reward_matches_reference(self):
    h = 100.0
    lengths = np.array([0, 1, 50, 99, 100, 150, 199, 200, 500] * 2, np.float32)
    correct = np.repeat([True, False], 9)
    history = np.full(18, h, np.float32)
    history[[0, 9]] = np.inf  # no history yet
    got = jax.jit(sh.hapo_length_rewards)(lengths, correct, history)
    want = [
      _hapo_np(l, c, hh)
      for l, c, hh in zip(lengths, correct, history, strict=True)
    ]
    np.testing.assert_allclose(got, want, atol=1e-6)
    got = np.asarray(got)
    self.assertEqual(got[0], 0.0)
    np.testing.assert_allclose(got[1], math.cos(math.pi / 200), rtol=1e-6)
    np.testing.assert_allclose(got[4], 0.0, atol=1e-6)  # L = h
    np.testing.assert_allclose(got[7:9], -0.7)  # correct, L >= 2h
    np.testing.assert_allclose(got[16:18], -1.0)  # incorrect, L >= 2h
    self.assertTrue(np.all(got[9:] <= 0))  # incorrect never rewarded
    with self.assertRaisesRegex(ValueError, "weight"):
      sh.hapo_length_rewards(lengths, correct, history, weight=-1.0)

  def test_hapo_history_update(self):
    history = jnp.full((4,), jnp.inf)
    steps = [
      ([0, 0, 1, 3], [50, 30, 70, 10], [True, True, False, True]),
      ([0, 1, 1, 2], [40, 60, 20, 5], [True, True, True, False]),
      ([0, 3, 3, 3], [10, 15, 5, 1], [False, True, True, False]),
    ]
    update = jax.jit(sh.hapo_update_history)
    want = np.full(4, np.inf)
    for ids, lengths, correct in steps:
      new = update(history, np.array(ids), np.array(lengths), np.array(correct))
      for i, l, c in zip(ids, lengths, correct, strict=True):
        if c:
          want[i] = min(want[i], l)
      np.testing.assert_array_equal(new, want)
      self.assertTrue(np.all(np.asarray(new) <= np.asarray(history)))
      history = new


class CombiningTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.RandomState(4)
    self.outcome = np.array([1.0, -1.0, 0.5, 0.0], np.float32)
    self.steps = rng.randn(4, 5).astype(np.float32)
    self.mask = np.arange(5)[None] < np.array([5, 3, 0, 2])[:, None]

  def test_gated_reward_accumulation(self):
    fn = jax.jit(
      lambda *a, t: sh.gated_reward_accumulation(*a, threshold=t),
      static_argnames="t",
    )
    step_sum = np.where(self.mask, self.steps, 0).sum(-1)
    for t in (-np.inf, 0.25, np.inf):
      total, aux = fn(self.outcome, self.steps, self.mask, t=t)
      gate = self.outcome >= t
      np.testing.assert_allclose(
        total, self.outcome + gate * step_sum, rtol=1e-6
      )
      np.testing.assert_array_equal(aux.gate, gate)
    plain, _ = fn(self.outcome, self.steps, self.mask, t=-np.inf)
    np.testing.assert_allclose(plain, self.outcome + step_sum, rtol=1e-6)
    only, _ = fn(self.outcome, self.steps, self.mask, t=np.inf)
    np.testing.assert_array_equal(only, self.outcome)
    dirty, _ = fn(
      self.outcome,
      testing.with_nan_padding(self.steps, self.mask),
      self.mask,
      t=0.25,
    )
    np.testing.assert_array_equal(
      dirty, fn(self.outcome, self.steps, self.mask, t=0.25)[0]
    )

  def test_hybrid_normalized_rewards(self):
    proc = np.random.RandomState(5).rand(4, 5).astype(np.float32)
    outcome = np.array([1.0, 0.0, 1.0, 0.3], np.float32)
    got = jax.jit(sh.hybrid_normalized_rewards)(proc, outcome, self.mask)
    np.testing.assert_allclose(
      got, np.where(self.mask, proc + outcome[:, None] - 1, 0), atol=1e-6
    )
    np.testing.assert_allclose(got[0], proc[0], atol=1e-6)  # success
    self.assertTrue(np.all(np.asarray(got[1]) <= 0))  # failure

  @parameterized.parameters(1.0, 0.9)
  def test_potential_shaping_telescopes(self, gamma):
    rng = np.random.RandomState(6)
    phi = rng.randn(4, 5).astype(np.float32)
    final = rng.randn(4).astype(np.float32)
    fn = jax.jit(
      lambda r, p, m, f: sh.potential_based_shaping(r, p, m, f, gamma=gamma)
    )
    shaped, aux = fn(self.steps, phi, self.mask, final)
    n = self.mask.sum(-1)
    disc = gamma ** np.arange(5)
    for b in range(4):
      ret = (disc * np.where(self.mask[b], self.steps[b], 0)).sum()
      want = ret + (gamma ** n[b] * final[b] - phi[b, 0] if n[b] else 0.0)
      np.testing.assert_allclose(
        (disc * shaped[b]).sum(), want, rtol=1e-5, atol=1e-5
      )
    # Oracle for the per-step shaping term (default terminal potential 0).
    _, aux0 = fn(self.steps, phi, self.mask, np.zeros(4, np.float32))
    want_f = np.zeros((4, 5))
    for b in range(4):
      for t in range(n[b]):
        nxt = phi[b, t + 1] if t + 1 < n[b] else 0.0
        want_f[b, t] = gamma * nxt - phi[b, t]
    np.testing.assert_allclose(aux0.shaping, want_f, rtol=1e-5, atol=1e-6)
    default, _ = sh.potential_based_shaping(
      self.steps, phi, self.mask, gamma=gamma
    )
    np.testing.assert_allclose(
      default, self.steps * self.mask + want_f, rtol=1e-5, atol=1e-6
    )
    dirty, _ = fn(
      testing.with_nan_padding(self.steps, self.mask),
      testing.with_nan_padding(phi, self.mask),
      self.mask,
      final,
    )
    np.testing.assert_array_equal(dirty, shaped)
    # Left-padded rows give the same per-step shaping, shifted.
    shift = [5 - k for k in n]
    roll = lambda a: np.stack([np.roll(a[b], shift[b]) for b in range(4)])
    unroll = lambda a: np.stack([np.roll(a[b], -shift[b]) for b in range(4)])
    _, left = fn(roll(self.steps), roll(phi), roll(self.mask), final)
    np.testing.assert_allclose(
      unroll(np.asarray(left.shaping)), aux.shaping, rtol=1e-6, atol=1e-6
    )
    with self.assertRaisesRegex(ValueError, "gamma"):
      sh.potential_based_shaping(self.steps, phi, self.mask, gamma=1.5)

  def test_multi_objective_weights(self):
    rng = np.random.RandomState(7)
    rewards = rng.randn(6, 3).astype(np.float32)
    weights = np.array([0.2, 0.3, 0.5], np.float32)
    got = jax.jit(sh.scalarize_rewards)(rewards, weights)
    np.testing.assert_allclose(got, rewards @ weights, rtol=1e-5)

    grads = rng.randn(3, 11).astype(np.float32)
    grads[2] = 0.0
    scores = jax.jit(sh.gradient_alignment_scores)(grads)
    unit = grads / np.maximum(
      np.linalg.norm(grads, axis=1, keepdims=True), 1e-30
    )
    unit[2] = 0.0
    np.testing.assert_allclose(
      scores, (unit @ unit.T).sum(-1), rtol=1e-5, atol=1e-6
    )

    update = jax.jit(
      lambda w, s, lr, mw: sh.update_reward_weights(
        w, s, learning_rate=lr, min_weight=mw
      ),
      static_argnums=(2, 3),
    )
    s = np.array([1.0, -0.5, 0.2], np.float32)
    np.testing.assert_allclose(update(weights, s, 0.0, 0.0), weights, rtol=1e-6)
    np.testing.assert_allclose(
      update(weights, np.full(3, 4.0, np.float32), 0.7, 0.0),
      weights,
      rtol=1e-5,
    )
    new = np.asarray(update(weights, s, 0.5, 0.0))
    want = weights * np.exp(0.5 * s)
    np.testing.assert_allclose(new, want / want.sum(), rtol=1e-5)
    floored = np.asarray(update(weights, 100 * s, 1.0, 0.1))
    np.testing.assert_allclose(floored.sum(), 1.0, rtol=1e-6)
    self.assertTrue(np.all(floored >= 0.1 - 1e-6))
    with self.assertRaisesRegex(ValueError, "min_weight"):
      sh.update_reward_weights(weights, s, min_weight=0.5)
    with self.assertRaisesRegex(ValueError, "learning_rate"):
      sh.update_reward_weights(weights, s, learning_rate=-1.0)
    with self.assertRaises(jaxtyping.TypeCheckError):
      sh.scalarize_rewards(rewards, weights[:2])


class GaussianGroundingTest(parameterized.TestCase):
  def test_match_reference_transcription(self):
    rng = np.random.RandomState(8)
    gt_lo = rng.rand(6, 2) * 100
    gt = np.concatenate([gt_lo, gt_lo + 5 + rng.rand(6, 2) * 40], 1)
    pred_lo = gt_lo + rng.randn(6, 2) * 10
    pred = np.concatenate([pred_lo, pred_lo + 5 + rng.rand(6, 2) * 40], 1)
    pred, gt = pred.astype(np.float32), gt.astype(np.float32)
    point = jax.jit(sh.gaussian_point_rewards)(pred, gt)
    cover = jax.jit(sh.gaussian_coverage_rewards)(pred, gt)
    np.testing.assert_allclose(point, _point_np(pred, gt), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
      cover, _coverage_np(pred, gt), rtol=1e-4, atol=1e-6
    )
    self.assertTrue(np.all((np.asarray(cover) > 0) & (np.asarray(cover) <= 1)))

  def test_properties(self):
    gt = np.array([[10.0, 20.0, 30.0, 60.0]] * 5, np.float32)
    offsets = np.array([0, 2, -2, 5, 10], np.float32)
    pred = gt + np.stack([offsets, 0 * offsets] * 2, 1)
    both = jax.jit(
      lambda p, g: (
        sh.gaussian_point_rewards(p, g),
        sh.gaussian_coverage_rewards(p, g),
      )
    )
    point, cover = map(np.asarray, both(pred, gt))
    np.testing.assert_allclose([point[0], cover[0]], [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(point[1], point[2], rtol=1e-6)  # symmetric
    self.assertTrue(point[0] > point[1] > point[3] > point[4])
    self.assertTrue(cover[0] > cover[1] > cover[3] > cover[4])
    # Larger boxes with the same centre: coverage drops, point reward stays.
    bigger = gt + np.array([-10, -10, 10, 10], np.float32)
    big_point, big_cover = both(bigger, gt)
    self.assertLess(float(big_cover[0]), 1.0)
    np.testing.assert_allclose(big_point, 1.0)
    # Scale invariance: rescaling the screen leaves both rewards unchanged.
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4),
      both(3.0 * pred, 3.0 * gt),
      (point, cover),
    )
    g = testing.grads(sh.gaussian_coverage_rewards, (pred, gt), 0)
    self.assertTrue(np.all(np.isfinite(g)))
    with self.assertRaisesRegex(ValueError, "alpha"):
      sh.gaussian_point_rewards(pred, gt, alpha=0.0)
    with self.assertRaises(jaxtyping.TypeCheckError):
      sh.gaussian_point_rewards(pred[:, :2], gt)


class FilterTest(parameterized.TestCase):
  def test_dynamic_sampling_and_low_variance(self):
    rewards = np.array(
      [
        [1, 1, 1, 1],
        [0, 0, 0, 0],
        [0, 1, 0, 0],
        [0.5, 0.52, 0.5, 0.5],
        [1, 1, 9, 9],
      ],
      np.float32,
    )
    mask = np.ones_like(rewards, bool)
    mask[4, 2:] = False  # the differing samples are padding
    fn = jax.jit(sh.dynamic_sampling_mask)
    np.testing.assert_array_equal(fn(rewards), [False, False, True, True, True])
    np.testing.assert_array_equal(
      fn(rewards, mask), [False, False, True, True, False]
    )
    low = jax.jit(
      lambda r, m, t, d: sh.low_variance_group_mask(r, m, min_std=t, ddof=d),
      static_argnums=(2, 3),
    )
    for t, d in ((0.05, 0), (0.01, 1), (0.0, 0)):
      std = np.array(
        [rewards[b][mask[b]].std(ddof=d) for b in range(5)], np.float64
      )
      np.testing.assert_array_equal(low(rewards, mask, t, d), std >= t)
    with self.assertRaisesRegex(ValueError, "min_std"):
      sh.low_variance_group_mask(rewards, min_std=-1.0)

  def test_policy_filtration_strategies(self):
    rng = np.random.RandomState(9)
    rewards = rng.randn(6, 5).astype(np.float32)
    mask = np.ones((6, 5), bool)
    mask[5, 3:] = False
    best = np.argmax(np.where(mask, rewards, -np.inf), -1)
    worst = np.argmin(np.where(mask, rewards, np.inf), -1)
    bon, bw = jax.jit(
      lambda r, m: (
        sh.policy_filtration_mask(r, m, strategy="best_of_n"),
        sh.policy_filtration_mask(r, m, strategy="best_worst"),
      )
    )(rewards, mask)
    np.testing.assert_array_equal(bon, np.eye(5, dtype=bool)[best])
    np.testing.assert_array_equal(
      bw, np.eye(5, dtype=bool)[best] | np.eye(5, dtype=bool)[worst]
    )
    fn = jax.jit(
      lambda r, m, k: sh.policy_filtration_mask(r, m, k, strategy="best_random")
    )
    seen = set()
    for seed in range(6):
      br = np.asarray(fn(rewards, mask, jax.random.key(seed)))
      np.testing.assert_array_equal(br.sum(-1), 2)
      self.assertTrue(np.all(br[np.arange(6), best]))
      self.assertFalse(np.any(br & ~mask))
      seen.add(int(np.argmax(br[0] & ~np.eye(5, dtype=bool)[best[0]])))
    self.assertGreater(len(seen), 1)  # the partner is random
    with self.assertRaisesRegex(ValueError, "key"):
      sh.policy_filtration_mask(rewards)
    with self.assertRaisesRegex(ValueError, "strategy"):
      sh.policy_filtration_mask(rewards, strategy="top_k")

  def test_r_squared(self):
    rng = np.random.RandomState(10)
    r = rng.randn(20).astype(np.float32)
    s = (0.5 * r + rng.randn(20)).astype(np.float32)
    fn = jax.jit(sh.reward_r_squared)
    np.testing.assert_allclose(fn(r, -3.0 * r + 2.0), 1.0, rtol=1e-5)
    slope, intercept = np.polyfit(r, s, 1)
    resid = s - (slope * r + intercept)
    want = 1 - (resid**2).sum() / ((s - s.mean()) ** 2).sum()
    np.testing.assert_allclose(fn(r, s), want, rtol=1e-4)
    keep = rng.rand(20) > 0.4
    corr = np.corrcoef(r[keep], s[keep])[0, 1]
    np.testing.assert_allclose(fn(r, s, keep), corr**2, rtol=1e-4)
    self.assertEqual(float(fn(r, np.ones(20, np.float32))), 0.0)


class CommonTest(parameterized.TestCase):
  def test_bf16_in_float32_out(self):
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    rng = np.random.RandomState(11)
    x2 = rng.randn(4, 5).astype(np.float32)
    mask = np.ones((4, 5), bool)
    boxes = np.abs(rng.randn(4, 4)).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2] + 1
    outs = jax.eval_shape(
      lambda: [
        sh.par_rewards(bf(REWARDS), bf(REFS)),
        sh.log_sigmoid_centered_rewards(bf(REWARDS), bf(REFS)),
        sh.minmax_rewards(bf(x2)),
        sh.whiten_rewards(bf(x2)),
        sh.std_clip_rewards(bf(x2)),
        sh.clip_rewards(bf(x2), low=-1.0, high=1.0),
        sh.overlong_penalty(bf(np.array([1.0, 2.0]))),
        sh.hapo_length_rewards(bf(x2[0]), mask[0], bf(x2[1])),
        sh.gated_reward_accumulation(bf(x2[:, 0]), bf(x2), mask)[0],
        sh.hybrid_normalized_rewards(bf(x2), bf(x2[:, 0]), mask),
        sh.potential_based_shaping(bf(x2), bf(x2), mask)[0],
        sh.scalarize_rewards(bf(x2), bf(x2[0])),
        sh.gaussian_point_rewards(bf(boxes), bf(boxes)),
        sh.gaussian_coverage_rewards(bf(boxes), bf(boxes)),
        sh.reward_r_squared(bf(x2), bf(x2)),
      ]
    )
    for i, out in enumerate(outs):
      self.assertEqual(out.dtype, jnp.float32, msg=str(i))

  def test_sharded_equals_unsharded_and_vmap(self):
    rng = np.random.RandomState(12)
    n = 8
    rewards = rng.randn(n).astype(np.float32)
    refs = rng.randn(n, 3).astype(np.float32)
    group = rng.randn(n, 4).astype(np.float32)
    mask = np.arange(5)[None] < rng.randint(0, 6, size=n)[:, None]
    steps = rng.randn(n, 5).astype(np.float32)
    lengths = rng.randint(1, 50, size=(n, 4))
    correct = rng.rand(n, 4) > 0.5

    def fn(r, refs, group, m, steps, lengths, correct):
      return (
        sh.par_rewards(r, refs),
        sh.grpo_lambda_rewards(correct, lengths, top_fraction=0.5),
        sh.potential_based_shaping(steps, steps, m, gamma=0.9),
      )

    testing.assert_sharded_equals_unsharded(
      fn, (rewards, refs, group, mask, steps, lengths, correct)
    )
    stacked = np.stack([group, group + 5.0])
    got = jax.jit(jax.vmap(sh.dynamic_sampling_mask))(stacked)
    np.testing.assert_array_equal(got[0], got[1])

  def test_registry_names_public_functions(self):
    for name, fn in sh.REGISTRY.items():
      self.assertIn(fn.__name__, sh.__all__, msg=name)


if __name__ == "__main__":
  absltest.main()
