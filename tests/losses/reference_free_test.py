"""Tests for alignment/losses/_reference_free.py (SimPO, CPO, ORPO, KTO, BCO).

Parity with TRL 0.28 uses tests/testdata/goldens/trl_unpaired_0_28.json,
written by tests/oracles/trl_unpaired_goldens.py.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment.losses import _reference_free as rf
from tests import testing

GOLDEN = json.loads(
  (
    pathlib.Path(__file__).resolve().parents[1]
    / "testdata"
    / "goldens"
    / "trl_unpaired_0_28.json"
  ).read_text()
)
INP = {k: np.asarray(v) for k, v in GOLDEN["inputs"].items()}
B = 8


# ---------------------------------------------------------------- oracles --
def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def _smoothed(h, eps):
  return -(1 - eps) * _logsig(h) - eps * _logsig(-h)


def np_simpo(pc, pr, lc, lr, beta, gamma, eps):
  """Eq. of Meng et al. (2024): -log σ(β/|y_w| lp_w - β/|y_l| lp_l - γ)."""
  return _smoothed(beta * pc / lc - beta * pr / lr - gamma, eps)


def np_cpo(pc, pr, lc, beta, alpha, eps):
  """CPO Eq. 3 + α · (-log π(y_w) / |y_w|)."""
  return _smoothed(beta * (pc - pr), eps) + alpha * (-pc / lc)


def np_orpo(pc, pr, lc, lr, lam):
  """ORPO: L_SFT + λ L_OR, odds on per-token mean log-probs."""
  ac, ar = pc / lc, pr / lr
  log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
  return -ac + lam * -_logsig(log_odds)


def np_kto(p, r, labels, z0, beta, wd, wu):
  """KTO Eq. 7: λ_y - v(x, y)."""
  lr = p - r
  return np.where(
    labels,
    wd - wd * _sig(beta * (lr - z0)),
    wu - wu * _sig(beta * (z0 - lr)),
  )


def np_kto_z0(pkl, rkl, mask=None):
  d = pkl - rkl
  if mask is not None:
    d = d[mask]
  return max(0.0, float(np.mean(d)))


def np_bco(p, r, labels, delta, beta, w=None):
  rew = beta * (p - r)
  w = np.ones_like(rew) if w is None else w
  return np.where(labels, -_logsig(rew - delta), -w * _logsig(-(rew - delta)))


# ------------------------------------------------------------------ data --
def _f32(*xs):
  return [np.asarray(x, np.float32) for x in xs]


PC, PR, RC, RR = _f32(
  INP["policy_chosen_logps"],
  INP["policy_rejected_logps"],
  INP["ref_chosen_logps"],
  INP["ref_rejected_logps"],
)
LC = INP["chosen_lengths"].astype(np.int32)
LR = INP["rejected_lengths"].astype(np.int32)
POL, REF = _f32(INP["policy_logps"], INP["ref_logps"])
LAB = INP["labels"].astype(bool)

# Registry name -> (positional args, argnums that must get no gradient).
CASES = {
  "simpo": ((PC, PR, LC, LR), ()),
  "cpo": ((PC, PR, LC), ()),
  "orpo": ((PC, PR, LC, LR), ()),
  "kto": ((POL, REF, LAB, np.float32(0.3)), (1, 3)),
  "bco": ((POL, REF, LAB, np.float32(0.2)), (1, 3)),
}


def _jit_loss(fn, **kw):
  return jax.jit(lambda *a: fn(*a, **kw))


class GoldenParityTest(parameterized.TestCase):
  """Matches TRL 0.28 to 1e-5 on the stored float64 goldens."""

  def _cases(self, fn):
    return [c for c in GOLDEN["cases"] if c["fn"] == fn]

  def test_cpo_preference_term_matches_trl(self):
    for case in self._cases("cpo"):
      loss, aux = _jit_loss(rf.cpo_loss, alpha=0.0, **case["params"])(
        PC, PR, LC
      )
      np.testing.assert_allclose(loss, case["losses"], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(
        aux.chosen_rewards, case["chosen_rewards"], rtol=1e-5
      )
      np.testing.assert_allclose(
        aux.rejected_rewards, case["rejected_rewards"], rtol=1e-5
      )

  def test_simpo_matches_trl_cpo_simpo(self):
    # TRL's forward pass averages the log-probs; we take sums and lengths.
    for case in self._cases("simpo"):
      loss, aux = _jit_loss(rf.simpo_loss, **case["params"])(PC, PR, LC, LR)
      np.testing.assert_allclose(loss, case["losses"], rtol=1e-5, atol=1e-6)
      # TRL logs β·mean log-prob, the same SimPO reward.
      np.testing.assert_allclose(
        aux.chosen_rewards, case["chosen_rewards"], rtol=1e-5
      )

  def test_orpo_matches_trl_with_sign_flip(self):
    # TRL returns λ·log σ(log odds) (ORPO's weighted term with the opposite
    # sign, subtracted from the NLL by its trainer) and computes in float32.
    for case in self._cases("orpo"):
      lam = case["params"]["lam"]
      loss, aux = _jit_loss(rf.orpo_loss, lam=lam)(PC, PR, LC, LR)
      np.testing.assert_allclose(
        -lam * aux.odds_ratio_loss, case["losses"], rtol=1e-5, atol=1e-6
      )
      np.testing.assert_allclose(
        np.mean(aux.log_odds_ratio), case["mean_log_odds"], rtol=1e-5
      )
      np.testing.assert_allclose(
        loss, aux.nll_loss + lam * aux.odds_ratio_loss, rtol=1e-6
      )

  def test_kto_and_reference_point_match_trl(self):
    pkl, rkl = _f32(INP["policy_mismatched_logps"], INP["ref_mismatched_logps"])
    for case in self._cases("kto"):
      labels = np.asarray(case["labels"], bool)
      if case["calculate_kl"]:
        z0 = jax.jit(rf.kto_reference_point)(
          pkl + np.float32(case["mismatched_shift"]), rkl
        )
      else:
        z0 = np.float32(0.0)
      np.testing.assert_allclose(z0, case["kl"], rtol=1e-5, atol=1e-6)
      loss, aux = _jit_loss(rf.kto_loss, **case["params"])(POL, REF, labels, z0)
      order = np.asarray(case["row_order"])
      np.testing.assert_allclose(
        np.asarray(loss)[order], case["losses"], rtol=1e-5, atol=1e-6
      )
      want_rewards = np.concatenate(
        [case["chosen_rewards"], case["rejected_rewards"]]
      )
      np.testing.assert_allclose(
        np.asarray(aux.rewards)[order], want_rewards, rtol=1e-5, atol=1e-6
      )

  def test_bco_running_shift_and_udm_match_trl(self):
    batches = [
      (POL, REF, LAB),
      (*_f32(INP["policy_logps_2"], INP["ref_logps_2"]), INP["labels_2"]),
    ]
    probs = np.float32(INP["desirable_probs"])
    for case in self._cases("bco"):
      beta = case["params"]["beta"]
      weights = None
      if case["udm"]:
        weights = rf.bco_udm_weights(
          probs,
          min_density_ratio=case["min_density_ratio"],
          max_density_ratio=case["max_density_ratio"],
        )
      shift, count = 0.0, 0.0
      update = jax.jit(rf.bco_reward_shift_update)
      for (pol, ref, lab), want in zip(batches, case["batches"], strict=True):
        lab = np.asarray(lab, bool)
        rewards = np.float32(beta) * (pol - ref)
        shift, count = update(shift, count, rewards)
        np.testing.assert_allclose(shift, want["delta"], rtol=1e-5, atol=1e-6)
        loss, _ = _jit_loss(rf.bco_loss, beta=beta)(
          pol, ref, lab, shift, weights
        )
        order = np.asarray(want["row_order"])
        np.testing.assert_allclose(
          np.asarray(loss)[order], want["losses"], rtol=1e-5, atol=1e-6
        )


class OracleTest(parameterized.TestCase):
  """float64 NumPy transcriptions of the papers, through jax.jit."""

  @parameterized.parameters((2.0, 0.5, 0.0), (2.5, 0.0, 0.1))
  def test_simpo(self, beta, gamma, eps):
    got, _ = _jit_loss(
      rf.simpo_loss, beta=beta, gamma=gamma, label_smoothing=eps
    )(PC, PR, LC, LR)
    want = np_simpo(*map(np.float64, (PC, PR, LC, LR)), beta, gamma, eps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters((0.1, 1.0, 0.0), (0.5, 0.3, 0.2))
  def test_cpo(self, beta, alpha, eps):
    got, aux = _jit_loss(
      rf.cpo_loss, beta=beta, alpha=alpha, label_smoothing=eps
    )(PC, PR, LC)
    want = np_cpo(*map(np.float64, (PC, PR, LC)), beta, alpha, eps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.nll_loss, -PC / LC, rtol=1e-5)

  def test_orpo(self):
    got, _ = _jit_loss(rf.orpo_loss, lam=0.2)(PC, PR, LC, LR)
    want = np_orpo(*map(np.float64, (PC, PR, LC, LR)), 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_kto(self):
    got, aux = _jit_loss(
      rf.kto_loss, beta=0.3, desirable_weight=1.2, undesirable_weight=0.7
    )(POL, REF, LAB, np.float32(0.4))
    want = np_kto(np.float64(POL), np.float64(REF), LAB, 0.4, 0.3, 1.2, 0.7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.reference_point, 0.4, rtol=1e-6)

  def test_kto_reference_point_mask_and_clamp(self):
    pkl, rkl = _f32(INP["policy_mismatched_logps"], INP["ref_mismatched_logps"])
    mask = np.arange(B) < 5
    got = jax.jit(rf.kto_reference_point)(
      testing.with_nan_padding(pkl, mask), rkl, mask
    )
    np.testing.assert_allclose(
      got, np_kto_z0(pkl, rkl, mask), rtol=1e-5, atol=1e-6
    )
    self.assertEqual(float(rf.kto_reference_point(rkl - 3.0, rkl)), 0.0)
    self.assertEqual(
      float(rf.kto_reference_point(pkl, rkl, np.zeros(B, bool))), 0.0
    )

  def test_bco_with_weights(self):
    w = np.float32(np.linspace(0.5, 3.0, B))
    got, _ = _jit_loss(rf.bco_loss, beta=0.25)(POL, REF, LAB, 0.1, w)
    want = np_bco(np.float64(POL), np.float64(REF), LAB, 0.1, 0.25, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_bco_reward_shift_is_exact_running_mean(self):
    rng = np.random.default_rng(1)
    chunks = [np.float32(rng.normal(size=B)) for _ in range(3)]
    mask = np.arange(B) != 2
    shift, count = 0.0, 0.0
    seen = []
    for c in chunks:
      shift, count = jax.jit(rf.bco_reward_shift_update)(
        shift, count, testing.with_nan_padding(c, mask), mask
      )
      seen.append(c[mask])
    np.testing.assert_allclose(shift, np.mean(np.concatenate(seen)), rtol=1e-5)
    self.assertEqual(float(count), 3 * (B - 1))

  def test_bco_udm_weights(self):
    p = np.float32([0.0, 0.2, 0.5, 0.9, 0.999, 1.0, 0.33, 0.6])
    got = rf.bco_udm_weights(p, min_density_ratio=0.5, max_density_ratio=10.0)
    want = np.clip(np.float64(p) / (1 - np.float64(p) + 1e-8), 0.5, 10.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


class LimitsAndGradientsTest(parameterized.TestCase):
  def test_simpo_gamma0_unit_lengths_is_cpo_preference(self):
    ones = np.ones(B, np.int32)
    simpo, _ = rf.simpo_loss(PC, PR, ones, ones, beta=0.7, gamma=0.0)
    cpo, _ = rf.cpo_loss(PC, PR, ones, beta=0.7, alpha=0.0)
    np.testing.assert_allclose(simpo, cpo, rtol=1e-6)

  def test_simpo_margin_shifts_the_logit(self):
    # γ is a margin on the normalised reward gap: adding γ to the chosen
    # mean log-prob times 1/β undoes it.
    lc = np.float32(LC)
    base, _ = rf.simpo_loss(PC, PR, LC, LR, beta=2.0, gamma=0.0)
    shifted, _ = rf.simpo_loss(
      PC + lc * np.float32(0.8 / 2.0), PR, LC, LR, beta=2.0, gamma=0.8
    )
    np.testing.assert_allclose(base, shifted, rtol=1e-5, atol=1e-6)

  def test_orpo_lam0_is_mean_nll(self):
    loss, _ = rf.orpo_loss(PC, PR, LC, LR, lam=0.0)
    np.testing.assert_allclose(loss, -PC / LC, rtol=1e-6)

  def test_orpo_empty_completion_is_finite(self):
    lc = LC.copy()
    lc[0] = 0
    pc = PC.copy()
    pc[0] = 0.0
    loss, grads = jax.jit(
      jax.value_and_grad(
        lambda a, b: jnp.sum(rf.orpo_loss(a, b, lc, LR)[0]), argnums=(0, 1)
      )
    )(pc, PR)
    self.assertTrue(np.isfinite(loss))
    self.assertTrue(all(np.all(np.isfinite(g)) for g in grads))

  def test_kto_all_desirable_and_at_reference(self):
    ones = np.ones(B, bool)
    loss, _ = rf.kto_loss(POL, REF, ones, 0.2, beta=0.5, desirable_weight=2.0)
    want = 2.0 * (1 - _sig(0.5 * (np.float64(POL) - REF - 0.2)))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    # π = π_ref and z0 = 0: every row sits at λ_y / 2.
    loss, _ = rf.kto_loss(POL, POL, LAB, 0.0, undesirable_weight=3.0)
    np.testing.assert_allclose(loss, np.where(LAB, 0.5, 1.5), rtol=1e-6)

  def test_kto_gradient_closed_form(self):
    beta, z0 = 0.4, 0.3
    g = testing.grads(
      lambda p: rf.kto_loss(p, REF, LAB, z0, beta=beta)[0], (POL,), 0
    )
    s = _sig(beta * (np.float64(POL) - REF - z0))
    # d/dr [1 - σ(β(r - z0))] = -β σ(1-σ); d/dr [1 - σ(β(z0 - r))] = +β σ(1-σ)
    want = np.where(LAB, -beta * s * (1 - s), beta * s * (1 - s))
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)

  def test_cpo_gradient_closed_form(self):
    beta, alpha = 0.3, 0.5
    gc, gr = testing.grads(
      lambda a, b: rf.cpo_loss(a, b, LC, beta=beta, alpha=alpha)[0],
      (PC, PR),
      (0, 1),
    )
    s = _sig(-beta * (np.float64(PC) - PR))
    np.testing.assert_allclose(gc, -beta * s - alpha / LC, rtol=1e-4)
    np.testing.assert_allclose(gr, beta * s, rtol=1e-4)

  def test_bco_zero_shift_is_logistic(self):
    loss, _ = rf.bco_loss(POL, REF, LAB, 0.0, beta=0.1)
    r = 0.1 * (np.float64(POL) - REF)
    np.testing.assert_allclose(
      loss, np.where(LAB, -_logsig(r), -_logsig(-r)), rtol=1e-5
    )

  @parameterized.parameters(*sorted(CASES))
  def test_no_gradient_into_reference_inputs(self, name):
    args, no_grad = CASES[name]
    fn = rf.REGISTRY[name]
    floats = [
      i for i, a in enumerate(args) if np.asarray(a).dtype == np.float32
    ]
    g = testing.grads(fn, args, tuple(floats))
    for i, gi in zip(floats, g, strict=True):
      if i in no_grad:
        np.testing.assert_array_equal(gi, 0.0)
      elif i == 0:
        self.assertTrue(np.any(np.asarray(gi) != 0))

  def test_no_gradient_into_weights_lengths_and_shift_state(self):
    gw = testing.grads(
      lambda w: rf.bco_loss(POL, REF, LAB, 0.1, w)[0],
      (np.ones(B, np.float32),),
      0,
    )
    np.testing.assert_array_equal(gw, 0.0)
    gl = testing.grads(
      lambda lc: rf.simpo_loss(PC, PR, lc, np.float32(LR))[0],
      (np.float32(LC),),
      0,
    )
    np.testing.assert_array_equal(gl, 0.0)
    gs = jax.grad(
      lambda r: (
        rf.bco_reward_shift_update(0.0, 0.0, r)[0]
        + rf.kto_reference_point(r, REF)
      )
    )(POL)
    np.testing.assert_array_equal(gs, 0.0)


class ContractTest(parameterized.TestCase):
  @parameterized.parameters(*sorted(CASES))
  def test_bf16_in_float32_out(self, name):
    args, _ = CASES[name]
    args16 = [
      jnp.asarray(a, jnp.bfloat16) if np.asarray(a).dtype == np.float32 else a
      for a in args
    ]
    loss, aux = rf.REGISTRY[name](*args16)
    self.assertEqual(loss.dtype, jnp.float32)
    self.assertEqual(loss.shape, (B,))
    for leaf in jax.tree.leaves(aux):
      self.assertIn(leaf.dtype, (jnp.float32, jnp.bool_))

  @parameterized.parameters(*sorted(CASES))
  def test_shape_contract(self, name):
    args, _ = CASES[name]
    fn = rf.REGISTRY[name]
    bad_rank = [np.asarray(args[0])[:, None], *args[1:]]
    with self.assertRaises(jaxtyping.TypeCheckError):
      fn(*bad_rank)
    bad_b = [args[0], np.asarray(args[1])[:-1], *args[2:]]
    with self.assertRaises(jaxtyping.TypeCheckError):
      fn(*bad_b)

  @parameterized.parameters(
    ("simpo", "beta", 0.0),
    ("simpo", "gamma", -1.0),
    ("simpo", "label_smoothing", 0.7),
    ("cpo", "alpha", -0.1),
    ("cpo", "beta", -1.0),
    ("orpo", "lam", -0.1),
    ("kto", "desirable_weight", -1.0),
    ("kto", "beta", 0.0),
    ("bco", "beta", 0.0),
  )
  def test_bad_hyperparameters_raise(self, name, key, value):
    args, _ = CASES[name]
    with self.assertRaisesRegex(ValueError, key):
      rf.REGISTRY[name](*args, **{key: value})
    with self.assertRaisesRegex(ValueError, "max_density_ratio"):
      rf.bco_udm_weights(np.ones(B, np.float32), max_density_ratio=0.1)

  def test_sharded_equals_unsharded_and_vmap(self):
    def all_losses(pc, pr, lc, lr, pol, ref, lab, pkl, rkl):
      z0 = rf.kto_reference_point(pkl, rkl)
      shift, _ = rf.bco_reward_shift_update(0.0, 0.0, 0.1 * (pol - ref))
      return (
        rf.simpo_loss(pc, pr, lc, lr)[0],
        rf.cpo_loss(pc, pr, lc)[0],
        rf.orpo_loss(pc, pr, lc, lr)[0],
        rf.kto_loss(pol, ref, lab, z0)[0],
        rf.bco_loss(pol, ref, lab, shift)[0],
        z0,
        shift,
      )

    pkl, rkl = _f32(INP["policy_mismatched_logps"], INP["ref_mismatched_logps"])
    args = (PC, PR, LC, LR, POL, REF, LAB, pkl, rkl)
    testing.assert_sharded_equals_unsharded(
      all_losses, args, rtol=1e-5, atol=1e-6
    )
    # Inside shard_map the batch statistics psum over axis_name.
    mesh = testing.data_mesh(8)
    spec = jax.sharding.PartitionSpec("data")

    def local_stats(pkl, rkl, rewards, mask):
      z0 = rf.kto_reference_point(pkl, rkl, mask, axis_name="data")
      shift, count = rf.bco_reward_shift_update(
        0.5, 3.0, rewards, mask, axis_name="data"
      )
      return z0, shift, count

    mask = np.arange(B) != 3
    rewards = np.float32(0.1) * (POL - REF)
    got = jax.jit(
      jax.shard_map(
        local_stats,
        mesh=mesh,
        in_specs=(spec,) * 4,
        out_specs=jax.sharding.PartitionSpec(),
      )
    )(pkl, rkl, rewards, mask)
    want = jax.jit(
      lambda *a: (
        rf.kto_reference_point(*a[:2], a[3]),
        *rf.bco_reward_shift_update(0.5, 3.0, a[2], a[3]),
      )
    )(pkl, rkl, rewards, mask)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    stacked = [np.stack([a, a[::-1]]) for a in args]
    batched = jax.jit(jax.vmap(all_losses))(*stacked)
    flipped = jax.jit(all_losses)(*[a[::-1] for a in args])
    for got, want in zip(batched, flipped, strict=True):
      np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
