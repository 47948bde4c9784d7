"""Tests for alignment/losses/_regularized.py (RPO, CREAM, DNO, CoPG pairs)."""

import itertools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment.losses import _regularized as rg
from tests import testing

B, G = 8, 4


# ---------------------------------------------------------------- oracles --
def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_dpo(pc, pr, rc, rr, beta):
  """DPO Eq. 7 of Rafailov et al. (2023)."""
  return -_logsig(beta * ((pc - rc) - (pr - rr)))


def np_rpo(pc, pr, rc, rr, lc, beta, eta, norm):
  """RPO: DPO + η·β·(-log π(y_w)) (sum) or η·(-log π(y_w)/|y_w|) (mean)."""
  nll = -pc if norm == "sum" else -pc / lc
  coef = eta * beta if norm == "sum" else eta
  return np_dpo(pc, pr, rc, rr, beta) + coef * nll


def np_cream(pc, pr, rc, rr, c, beta):
  """CREAM: C·DPO(y_w ≻ y_l) + (1 - C)·DPO(y_l ≻ y_w)."""
  h = beta * ((pc - rc) - (pr - rr))
  return -c * _logsig(h) - (1 - c) * _logsig(-h)


def np_kendall_consistency(a, b):
  """(τ + 1)/2 with ordinal ranks (ties broken by position), by loops."""

  def ordinal_ranks(x):
    return np.argsort(np.argsort(x, kind="stable"), kind="stable")

  out = []
  for row_a, row_b in zip(a, b, strict=True):
    ra, rb = ordinal_ranks(row_a), ordinal_ranks(row_b)
    pairs = list(itertools.combinations(range(len(ra)), 2))
    s = sum(np.sign(ra[i] - ra[j]) * np.sign(rb[i] - rb[j]) for i, j in pairs)
    out.append((s / len(pairs) + 1) / 2)
  return np.array(out)


def np_dno(pc, pr, rc, rr, cw, cl, eta, margin):
  kept = (cw - cl) > margin
  return np.where(kept, np_dpo(pc, pr, rc, rr, eta), 0.0), kept


def np_copg(pc, pr, rc, rr, rw, rl, beta):
  """(1/2β)((R_w - R_l) - β h)², whose gradient is minus CoPG's."""
  h = (pc - rc) - (pr - rr)
  return ((rw - rl) - beta * h) ** 2 / (2 * beta)


def np_ipo(pc, pr, rc, rr, beta):
  return (((pc - rc) - (pr - rr)) - 1 / (2 * beta)) ** 2


# ------------------------------------------------------------------ data --
def _data(seed=0):
  rng = np.random.default_rng(seed)
  lc = np.array([7, 1, 4, 6, 3, 5, 7, 2], np.int32)
  pc = -rng.gamma(2.0, 0.6, B) * lc
  pr = -rng.gamma(2.0, 0.7, B) * 4
  rc = pc + rng.normal(0, 1, B)
  rr = pr + rng.normal(0, 1, B)
  f = np.float32
  return f(pc), f(pr), f(rc), f(rr), lc


PC, PR, RC, RR, LC = _data()
REWARD_W = np.float32(np.linspace(0.2, 0.9, B))
REWARD_L = np.float32(np.linspace(0.5, 0.1, B))
CONSISTENCY = np.float32(np.linspace(0.0, 1.0, B))
F64 = [np.float64(x) for x in (PC, PR, RC, RR)]

# Registry name -> (positional args, argnums that must get no gradient).
CASES = {
  "rpo": ((PC, PR, RC, RR, LC), (2, 3)),
  "cream": ((PC, PR, RC, RR, CONSISTENCY), (2, 3, 4)),
  "dno": ((PC, PR, RC, RR, REWARD_W, REWARD_L), (2, 3, 4, 5)),
  "copg_preference": ((PC, PR, RC, RR, REWARD_W, REWARD_L), (2, 3, 4, 5)),
}


def _jit(fn, **kw):
  return jax.jit(lambda *a: fn(*a, **kw))


class OracleTest(parameterized.TestCase):
  @parameterized.parameters((0.1, 0.005, "sum"), (0.5, 0.2, "mean"))
  def test_rpo(self, beta, eta, norm):
    got, aux = _jit(rg.rpo_loss, beta=beta, eta=eta, sft_normalization=norm)(
      PC, PR, RC, RR, LC
    )
    want = np_rpo(*F64, LC, beta, eta, norm)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      aux.dpo_loss, np_dpo(*F64, beta), rtol=1e-5, atol=1e-6
    )

  def test_cream(self):
    got, _ = _jit(rg.cream_loss, beta=0.3)(PC, PR, RC, RR, CONSISTENCY)
    want = np_cream(*F64, np.float64(CONSISTENCY), 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_cream_consistency_matches_scipy_style_kendall(self):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(B, G)).astype(np.float32)
    b = (a + rng.normal(0, 0.8, (B, G))).astype(np.float32)
    # Ties: rows with repeated values exercise the ordinal tie-break.
    a[0] = [1.0, 1.0, 2.0, 0.5]
    b[0] = [3.0, 3.0, 3.0, 3.0]
    a[1] = b[1] = [0.0, 0.0, 0.0, 0.0]
    got = jax.jit(rg.cream_consistency)(a, b)
    np.testing.assert_allclose(got, np_kendall_consistency(a, b), atol=1e-6)
    self.assertEqual(float(got[1]), 1.0)

  def test_cream_consistency_limits(self):
    r = np.float32([[0.1, 0.5, 0.3, 0.9]] * 2)
    got = rg.cream_consistency(r, np.stack([r[0], -r[0]]))
    np.testing.assert_allclose(got, [1.0, 0.0], atol=1e-7)

  @parameterized.parameters((0.1, 0.0), (0.4, 0.25))
  def test_dno(self, eta, margin):
    got, aux = _jit(rg.dno_loss, eta=eta, margin=margin)(
      PC, PR, RC, RR, REWARD_W, REWARD_L
    )
    want, kept = np_dno(
      *F64, np.float64(REWARD_W), np.float64(REWARD_L), eta, margin
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aux.kept, kept)
    self.assertTrue(0 < kept.sum() < B)

  def test_copg_preference(self):
    got, _ = _jit(rg.copg_preference_loss, beta=0.2)(
      PC, PR, RC, RR, REWARD_W, REWARD_L
    )
    want = np_copg(*F64, np.float64(REWARD_W), np.float64(REWARD_L), 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class LimitsTest(parameterized.TestCase):
  def test_rpo_eta0_is_dpo_and_sft_gradient_ignores_reference(self):
    loss, _ = rg.rpo_loss(PC, PR, RC, RR, beta=0.2, eta=0.0)
    np.testing.assert_allclose(loss, np_dpo(*F64, 0.2), rtol=1e-5)

    # Gradient of the SFT part: RPO minus DPO, for two different references.
    def sft_grad(rc):
      g_rpo = testing.grads(
        lambda p: rg.rpo_loss(p, PR, rc, RR, LC, eta=0.3)[0], (PC,), 0
      )
      g_dpo = testing.grads(
        lambda p: rg.rpo_loss(p, PR, rc, RR, LC, eta=0.0)[0], (PC,), 0
      )
      return np.asarray(g_rpo) - np.asarray(g_dpo)

    np.testing.assert_allclose(sft_grad(RC), sft_grad(RC + 3.0), atol=1e-6)
    np.testing.assert_allclose(sft_grad(RC), -0.3 * 0.1, rtol=1e-4)

  def test_cream_limits(self):
    ones, zeros = np.ones(B, np.float32), np.zeros(B, np.float32)
    dpo = np_dpo(*F64, 0.1)
    np.testing.assert_allclose(
      rg.cream_loss(PC, PR, RC, RR, ones)[0], dpo, rtol=1e-5
    )
    swapped = rg.cream_loss(PR, PC, RR, RC, ones)[0]
    np.testing.assert_allclose(
      rg.cream_loss(PC, PR, RC, RR, zeros)[0], swapped, rtol=1e-5
    )
    # C = 1/2 at h = 0: zero gradient (the minimum of a symmetric loss).
    half = np.full(B, 0.5, np.float32)
    g = testing.grads(lambda p: rg.cream_loss(p, PR, p, PR, half)[0], (PC,), 0)
    np.testing.assert_allclose(g, 0.0, atol=1e-7)

  def test_dno_without_rewards_is_dpo_and_dropped_pairs_have_no_gradient(self):
    loss, aux = rg.dno_loss(PC, PR, RC, RR, eta=0.3)
    np.testing.assert_allclose(loss, np_dpo(*F64, 0.3), rtol=1e-5)
    self.assertTrue(bool(np.all(aux.kept)))
    g = testing.grads(
      lambda p: rg.dno_loss(p, PR, RC, RR, REWARD_W, REWARD_L)[0], (PC,), 0
    )
    dropped = (REWARD_W - REWARD_L) <= 0
    self.assertTrue(dropped.any())
    np.testing.assert_array_equal(np.asarray(g)[dropped], 0.0)
    self.assertTrue(np.all(np.asarray(g)[~dropped] != 0))

  def test_copg_preference_case_is_scaled_ipo(self):
    beta = 0.25
    loss, _ = rg.copg_preference_loss(PC, PR, RC, RR, beta=beta)
    np.testing.assert_allclose(
      loss, beta / 2 * np_ipo(*F64, beta), rtol=1e-4, atol=1e-5
    )

  def test_copg_gradient_is_minus_contrastive_policy_gradient(self):
    beta = 0.3
    gc, gr = testing.grads(
      lambda a, b: rg.copg_preference_loss(
        a, b, RC, RR, REWARD_W, REWARD_L, beta=beta
      )[0],
      (PC, PR),
      (0, 1),
    )
    # CoPG ascent direction: (R_β(y_w) - R_β(y_l)) ∇(log π(y_w) - log π(y_l))
    r_w = np.float64(REWARD_W) - beta * (np.float64(PC) - RC)
    r_l = np.float64(REWARD_L) - beta * (np.float64(PR) - RR)
    np.testing.assert_allclose(gc, -(r_w - r_l), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gr, r_w - r_l, rtol=1e-4, atol=1e-5)

  def test_copg_zero_at_tilted_optimum(self):
    beta = 0.5
    # π ∝ π_ref exp(R/β): log π - log π_ref = R/β + const.
    pc = RC + REWARD_W / beta + 1.7
    pr = RR + REWARD_L / beta + 1.7
    loss, _ = rg.copg_preference_loss(
      pc, pr, RC, RR, REWARD_W, REWARD_L, beta=beta
    )
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)

  @parameterized.parameters(*sorted(CASES))
  def test_no_gradient_into_reference_and_labels(self, name):
    args, no_grad = CASES[name]
    floats = tuple(
      i for i, a in enumerate(args) if np.asarray(a).dtype == np.float32
    )
    g = testing.grads(rg.REGISTRY[name], args, floats)
    for i, gi in zip(floats, g, strict=True):
      if i in no_grad:
        np.testing.assert_array_equal(gi, 0.0)
    self.assertTrue(np.any(np.asarray(g[0]) != 0))


class ContractTest(parameterized.TestCase):
  @parameterized.parameters(*sorted(CASES))
  def test_bf16_in_float32_out(self, name):
    args, _ = CASES[name]
    args16 = [
      jnp.asarray(a, jnp.bfloat16) if np.asarray(a).dtype == np.float32 else a
      for a in args
    ]
    loss, aux = rg.REGISTRY[name](*args16)
    self.assertEqual(loss.dtype, jnp.float32)
    self.assertEqual(loss.shape, (B,))
    for leaf in jax.tree.leaves(aux):
      self.assertIn(leaf.dtype, (jnp.float32, jnp.bool_))

  @parameterized.parameters(*sorted(CASES))
  def test_shape_contract(self, name):
    args, _ = CASES[name]
    fn = rg.REGISTRY[name]
    with self.assertRaises(jaxtyping.TypeCheckError):
      fn(args[0][:, None], *args[1:])
    with self.assertRaises(jaxtyping.TypeCheckError):
      fn(args[0], args[1][:-1], *args[2:])
    with self.assertRaises(jaxtyping.TypeCheckError):
      rg.cream_consistency(np.ones((B, G), np.float32), np.ones((B, G + 1)))

  @parameterized.parameters(
    ("rpo", "beta", 0.0),
    ("rpo", "eta", -1.0),
    ("rpo", "sft_normalization", "token"),
    ("cream", "beta", -0.1),
    ("dno", "eta", 0.0),
    ("dno", "margin", -0.5),
    ("copg_preference", "beta", 0.0),
  )
  def test_bad_hyperparameters_raise(self, name, key, value):
    args, _ = CASES[name]
    with self.assertRaisesRegex(ValueError, key):
      rg.REGISTRY[name](*args, **{key: value})

  def test_bad_argument_combinations_raise(self):
    with self.assertRaisesRegex(ValueError, "chosen_lengths"):
      rg.rpo_loss(PC, PR, RC, RR, sft_normalization="mean")
    with self.assertRaisesRegex(ValueError, "rejected_rewards"):
      rg.dno_loss(PC, PR, RC, RR, REWARD_W)
    with self.assertRaisesRegex(ValueError, "rejected_rewards"):
      rg.copg_preference_loss(PC, PR, RC, RR, REWARD_W)
    with self.assertRaisesRegex(ValueError, "G >= 2"):
      rg.cream_consistency(np.ones((B, 1), np.float32), np.ones((B, 1)))

  def test_sharded_equals_unsharded_and_vmap(self):
    def all_losses(pc, pr, rc, rr, lc, c, rw, rl):
      return (
        rg.rpo_loss(pc, pr, rc, rr, lc, sft_normalization="mean")[0],
        rg.cream_loss(pc, pr, rc, rr, c)[0],
        rg.dno_loss(pc, pr, rc, rr, rw, rl)[0],
        rg.copg_preference_loss(pc, pr, rc, rr, rw, rl)[0],
      )

    args = (PC, PR, RC, RR, LC, CONSISTENCY, REWARD_W, REWARD_L)
    testing.assert_sharded_equals_unsharded(
      all_losses, args, rtol=1e-5, atol=1e-5
    )
    rewards = np.random.default_rng(0).normal(size=(B, G)).astype(np.float32)
    testing.assert_sharded_equals_unsharded(
      rg.cream_consistency, (rewards, rewards[:, ::-1])
    )
    stacked = [np.stack([a, a[::-1]]) for a in args]
    batched = jax.jit(jax.vmap(all_losses))(*stacked)
    flipped = jax.jit(all_losses)(*[a[::-1] for a in args])
    for got, want in zip(batched, flipped, strict=True):
      np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
