"""Tests for alignment/losses/_token_level.py (TGDPO, T-REG, SparsePO)."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment.losses import _token_level as tl
from tests import testing

B, T, V = 4, 6, 5


# ---------------------------------------------------------------- oracles --
def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def _rho(p, r, m):
  return np.where(m, p - r, 0.0)


def np_dpo(pw, pl, rw, rl, mw, ml, beta):
  """Sequence DPO on masked token sums."""
  return -_logsig(beta * (_rho(pw, rw, mw).sum(-1) - _rho(pl, rl, ml).sum(-1)))


def np_tgdpo(pw, pl, rw, rl, gw, gl, mw, ml, beta, alpha):
  """TGDPO: β Σ (1 + α r̂_w) ρ_w - β Σ (1 - α r̂_l) ρ_l inside -log σ."""
  u = beta * ((1 + alpha * gw) * _rho(pw, rw, mw)).sum(-1)
  v = beta * ((1 - alpha * gl) * _rho(pl, rl, ml)).sum(-1)
  return -_logsig(u - v)


def np_t_reg(pw, pl, rw, rl, tw, tl_, mw, ml, beta, alpha):
  """DPO + α[-log σ(β Σ r^w ρ^w) - log σ(β Σ r^l ρ^l)]."""
  reg = -_logsig(beta * (np.where(mw, tw, 0) * _rho(pw, rw, mw)).sum(-1))
  reg -= _logsig(beta * (np.where(ml, tl_, 0) * _rho(pl, rl, ml)).sum(-1))
  return np_dpo(pw, pl, rw, rl, mw, ml, beta) + alpha * reg


def np_sparse_po(
  pw, pl, rw, rl, uw, ul, mw, ml, kw, kl, dw, dl, beta, l1u, l1d
):
  """SparsePO (authors' SparseTrainer) with KL(π_ref‖π) per token."""
  uw, ul = np.where(mw, uw, 0), np.where(ml, ul, 0)
  u = (uw * _rho(pw, rw, mw)).sum(-1) - (ul * _rho(pl, rl, ml)).sum(-1)
  dw, dl = np.where(mw, dw, 0), np.where(ml, dl, 0)
  delta = (dl * np.where(ml, kl, 0)).sum(-1) - (dw * np.where(mw, kw, 0)).sum(
    -1
  )
  l1 = l1u * (np.abs(uw).sum(-1) + np.abs(ul).sum(-1))
  l1 += l1d * (np.abs(dw).sum(-1) + np.abs(dl).sum(-1))
  return -_logsig(beta * (u - delta)) + l1


def np_ref_kl(policy_logits, ref_logits):
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  lp, lq = log_softmax(policy_logits), log_softmax(ref_logits)
  return (np.exp(lq) * (lq - lp)).sum(-1)


# ------------------------------------------------------------------ data --
def _data(seed=0):
  rng = np.random.default_rng(seed)
  mw = np.arange(T)[None] < np.array([6, 3, 1, 4])[:, None]
  ml = np.arange(T)[None] < np.array([2, 6, 5, 3])[:, None]
  f = np.float32
  pw = f(-rng.gamma(2.0, 0.6, (B, T)))
  pl = f(-rng.gamma(2.0, 0.6, (B, T)))
  rw = f(pw + rng.normal(0, 0.5, (B, T)))
  rl = f(pl + rng.normal(0, 0.5, (B, T)))
  gw = f(rng.normal(0, 0.8, (B, T)))
  gl = f(rng.normal(0, 0.8, (B, T)))
  uw = f(np.maximum(rng.normal(0.5, 0.7, (B, T)), 0))  # ReLU-like masks
  ul = f(np.maximum(rng.normal(0.5, 0.7, (B, T)), 0))
  kw = f(rng.gamma(1.0, 0.3, (B, T)))
  kl = f(rng.gamma(1.0, 0.3, (B, T)))
  dw = f(rng.uniform(0, 1, (B, T)))
  dl = f(rng.uniform(0, 1, (B, T)))
  return dict(
    pw=pw, pl=pl, rw=rw, rl=rl, gw=gw, gl=gl, mw=mw, ml=ml,
    uw=uw, ul=ul, kw=kw, kl=kl, dw=dw, dl=dl,
  )  # fmt: skip


D = _data()
LOGPS = (D["pw"], D["pl"], D["rw"], D["rl"])
MASKS = (D["mw"], D["ml"])
F64 = {k: (np.float64(v) if v.dtype == np.float32 else v) for k, v in D.items()}
L64 = (F64["pw"], F64["pl"], F64["rw"], F64["rl"])

# Registry name -> (positional args, argnums that must get no gradient).
CASES = {
  "tgdpo": ((*LOGPS, D["gw"], D["gl"], *MASKS), (2, 3, 4, 5)),
  "t_reg": ((*LOGPS, D["gw"], D["gl"], *MASKS), (2, 3, 4, 5)),
  "sparse_po": (
    (*LOGPS, D["uw"], D["ul"], *MASKS, D["kw"], D["kl"], D["dw"], D["dl"]),
    (2, 3),
  ),
}
# Which float args are per-token arrays aligned with the chosen/rejected mask.
_SIDE = {0: "mw", 1: "ml", 2: "mw", 3: "ml", 4: "mw", 5: "ml", 8: "mw",
         9: "ml", 10: "mw", 11: "ml"}  # fmt: skip


def _jit(fn, **kw):
  return jax.jit(lambda *a: fn(*a, **kw))


def _float_argnums(args):
  return tuple(
    i
    for i, a in enumerate(args)
    if a is not None and np.asarray(a).dtype == np.float32
  )


class OracleTest(parameterized.TestCase):
  @parameterized.parameters((0.1, 0.5), (0.3, 1.5))
  def test_tgdpo(self, beta, alpha):
    got, aux = _jit(tl.tgdpo_loss, beta=beta, alpha=alpha)(*CASES["tgdpo"][0])
    want = np_tgdpo(*L64, F64["gw"], F64["gl"], *MASKS, beta, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    self.assertEqual(aux.chosen_rewards.shape, (B,))

  def test_tgdpo_token_rewards(self):
    got = tl.tgdpo_token_rewards(D["gw"], D["rw"], D["mw"], beta=0.2)
    want = np.where(D["mw"], 0.2 * (F64["gw"] - F64["rw"]), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters((0.1, 1.0), (0.5, 0.3))
  def test_t_reg(self, beta, alpha):
    got, aux = _jit(tl.t_reg_loss, beta=beta, alpha=alpha)(*CASES["t_reg"][0])
    want = np_t_reg(*L64, F64["gw"], F64["gl"], *MASKS, beta, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      aux.dpo_loss, np_dpo(*L64, *MASKS, beta), rtol=1e-5, atol=1e-6
    )

  @parameterized.parameters((0.1, 0.0, 0.0), (0.4, 0.01, 0.02))
  def test_sparse_po(self, beta, l1u, l1d):
    fn = _jit(tl.sparse_po_loss, beta=beta, reward_l1=l1u, kl_l1=l1d)
    got, aux = fn(*CASES["sparse_po"][0])
    f = F64
    want = np_sparse_po(
      *L64, f["uw"], f["ul"], *MASKS, f["kw"], f["kl"], f["dw"], f["dl"],
      beta, l1u, l1d,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # KL weights default to 1 (the "mask on reward only" variant).
    got1, _ = tl.sparse_po_loss(
      *LOGPS, D["uw"], D["ul"], *MASKS, D["kw"], D["kl"], beta=beta
    )
    ones = np.ones((B, T))
    want1 = np_sparse_po(
      *L64, f["uw"], f["ul"], *MASKS, f["kw"], f["kl"], ones, ones,
      beta, 0.0, 0.0,
    )  # fmt: skip
    np.testing.assert_allclose(got1, want1, rtol=1e-5, atol=1e-6)

  def test_reference_token_kl(self):
    rng = np.random.default_rng(5)
    p = rng.normal(size=(B, T, V)).astype(np.float32)
    q = rng.normal(size=(B, T, V)).astype(np.float32)
    got = jax.jit(tl.reference_token_kl)(p, q)
    np.testing.assert_allclose(got, np_ref_kl(p, q), rtol=1e-5, atol=1e-6)
    self.assertTrue(np.all(np.asarray(got) >= -1e-6))
    # Masked: NaN logits in padding give 0 and no NaN gradient.
    mask = D["mw"]
    pn = np.where(mask[..., None], p, np.nan).astype(np.float32)
    val, g = jax.jit(
      jax.value_and_grad(lambda x: jnp.sum(tl.reference_token_kl(x, q, mask)))
    )(pn)
    np.testing.assert_allclose(
      val, np.sum(np.where(mask, np_ref_kl(p, q), 0)), rtol=1e-5
    )
    self.assertTrue(np.all(np.isfinite(g)))
    gq = jax.jit(jax.grad(lambda y: jnp.sum(tl.reference_token_kl(p, y))))(q)
    np.testing.assert_array_equal(gq, 0.0)


class LimitsTest(parameterized.TestCase):
  def test_zero_guidance_and_unit_masks_reduce_to_dpo(self):
    zeros = np.zeros((B, T), np.float32)
    ones = np.ones((B, T), np.float32)
    dpo = np_dpo(*L64, *MASKS, 0.2)
    tg0, _ = tl.tgdpo_loss(*LOGPS, zeros, zeros, *MASKS, beta=0.2)
    np.testing.assert_allclose(tg0, dpo, rtol=1e-5)
    tga, _ = tl.tgdpo_loss(*LOGPS, D["gw"], D["gl"], *MASKS, beta=0.2,
                           alpha=0.0)  # fmt: skip
    np.testing.assert_allclose(tga, dpo, rtol=1e-5)
    treg, _ = tl.t_reg_loss(*LOGPS, D["gw"], D["gl"], *MASKS, beta=0.2,
                            alpha=0.0)  # fmt: skip
    np.testing.assert_allclose(treg, dpo, rtol=1e-5)
    sp, _ = tl.sparse_po_loss(*LOGPS, ones, ones, *MASKS, beta=0.2)
    np.testing.assert_allclose(sp, dpo, rtol=1e-5)

  def test_t_reg_zero_token_rewards_is_dpo_plus_constant(self):
    zeros = np.zeros((B, T), np.float32)
    loss, _ = tl.t_reg_loss(*LOGPS, zeros, zeros, *MASKS, beta=0.2, alpha=0.7)
    dpo = np_dpo(*L64, *MASKS, 0.2)
    np.testing.assert_allclose(loss, dpo + 1.4 * np.log(2), rtol=1e-5)
    g_treg = testing.grads(
      lambda pw, pl: tl.t_reg_loss(pw, pl, D["rw"], D["rl"], zeros, zeros,
                                   *MASKS, beta=0.2, alpha=0.7)[0],
      (D["pw"], D["pl"]), (0, 1),
    )  # fmt: skip
    g_tg = testing.grads(
      lambda pw, pl: tl.tgdpo_loss(pw, pl, D["rw"], D["rl"], zeros, zeros,
                                   *MASKS, beta=0.2)[0],
      (D["pw"], D["pl"]), (0, 1),
    )  # fmt: skip
    for a, b in zip(g_treg, g_tg, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  def test_sparse_po_zero_reward_masks_ignore_rewards(self):
    zeros = np.zeros((B, T), np.float32)
    loss, _ = tl.sparse_po_loss(*LOGPS, zeros, zeros, *MASKS)
    np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
    g = testing.grads(
      lambda pw: tl.sparse_po_loss(pw, D["pl"], D["rw"], D["rl"], zeros,
                                   zeros, *MASKS)[0],
      (D["pw"],), 0,
    )  # fmt: skip
    np.testing.assert_array_equal(g, 0.0)

  def test_tgdpo_gradient_closed_form(self):
    beta, alpha = 0.3, 0.5
    args = CASES["tgdpo"][0]
    gw, gl = testing.grads(
      lambda pw, pl: tl.tgdpo_loss(pw, pl, *args[2:], beta=beta,
                                   alpha=alpha)[0],
      (D["pw"], D["pl"]), (0, 1),
    )  # fmt: skip
    u = beta * ((1 + alpha * F64["gw"]) * _rho(F64["pw"], F64["rw"], D["mw"]))
    v = beta * ((1 - alpha * F64["gl"]) * _rho(F64["pl"], F64["rl"], D["ml"]))
    s = _sig(-(u.sum(-1) - v.sum(-1)))[:, None]
    want_w = np.where(D["mw"], -s * beta * (1 + alpha * F64["gw"]), 0.0)
    want_l = np.where(D["ml"], s * beta * (1 - alpha * F64["gl"]), 0.0)
    np.testing.assert_allclose(gw, want_w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gl, want_l, rtol=1e-4, atol=1e-7)

  def test_sparse_po_learned_mask_gradient(self):
    # d loss / d m_u(y^w_t) = -σ(-β(u - δ)) β ρ^w_t + λ_u sign(m) on tokens.
    beta, l1u = 0.4, 0.05
    args = CASES["sparse_po"][0]
    g = testing.grads(
      lambda uw: tl.sparse_po_loss(*args[:4], uw, *args[5:], beta=beta,
                                   reward_l1=l1u)[0],
      (D["uw"],), 0,
    )  # fmt: skip
    f = F64
    logit = np_sparse_po(
      *L64, f["uw"], f["ul"], *MASKS, f["kw"], f["kl"], f["dw"], f["dl"],
      beta, 0.0, 0.0,
    )  # fmt: skip
    s = 1.0 - np.exp(-logit)  # σ(-z) = 1 - exp(log σ(z))
    rho = _rho(f["pw"], f["rw"], D["mw"])
    want = np.where(
      D["mw"], -s[:, None] * beta * rho + l1u * np.sign(f["uw"]), 0.0
    )
    # |m| has a kink at 0 (exact zeros of a ReLU mask): compare elsewhere.
    nonzero = f["uw"] != 0
    np.testing.assert_allclose(
      np.asarray(g)[nonzero], want[nonzero], rtol=1e-4, atol=1e-6
    )


class MaskingAndGradientTest(parameterized.TestCase):
  @parameterized.parameters(*sorted(CASES))
  def test_padding_garbage_is_inert(self, name):
    args, _ = CASES[name]
    fn = tl.REGISTRY[name]
    argnums = _float_argnums(args)
    nan_args = list(args)
    for i in argnums:
      nan_args[i] = testing.with_nan_padding(args[i], D[_SIDE[i]])
    want = jax.jit(fn)(*args)[0]
    got = jax.jit(fn)(*nan_args)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    g_clean = testing.grads(fn, args, argnums)
    g_nan = testing.grads(fn, nan_args, argnums)
    for i, a, b in zip(argnums, g_clean, g_nan, strict=True):
      self.assertTrue(np.all(np.isfinite(b)), msg=f"arg {i}")
      np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
      pad = ~D[_SIDE[i]]
      np.testing.assert_array_equal(np.asarray(b)[pad], 0.0)

  @parameterized.parameters(*sorted(CASES))
  def test_no_gradient_into_reference_and_guidance(self, name):
    args, no_grad = CASES[name]
    argnums = _float_argnums(args)
    g = testing.grads(tl.REGISTRY[name], args, argnums)
    for i, gi in zip(argnums, g, strict=True):
      if i in no_grad:
        np.testing.assert_array_equal(gi, 0.0)
      else:
        self.assertTrue(np.any(np.asarray(gi) != 0), msg=f"arg {i}")


class ContractTest(parameterized.TestCase):
  @parameterized.parameters(*sorted(CASES))
  def test_bf16_in_float32_out(self, name):
    args, _ = CASES[name]
    args16 = [
      jnp.asarray(a, jnp.bfloat16) if a.dtype == np.float32 else a for a in args
    ]
    loss, aux = tl.REGISTRY[name](*args16)
    self.assertEqual(loss.dtype, jnp.float32)
    self.assertEqual(loss.shape, (B,))
    for leaf in jax.tree.leaves(aux):
      self.assertEqual(leaf.dtype, jnp.float32)

  @parameterized.parameters(*sorted(CASES))
  def test_shape_contract(self, name):
    args, _ = CASES[name]
    fn = tl.REGISTRY[name]
    with self.assertRaises(jaxtyping.TypeCheckError):
      fn(args[0][0], *args[1:])
    with self.assertRaises(jaxtyping.TypeCheckError):
      fn(args[0], args[1][:, :-1], *args[2:])
    with self.assertRaises(jaxtyping.TypeCheckError):
      fn(args[0], args[1][:-1], *args[2:])

  @parameterized.parameters(
    ("tgdpo", "beta", 0.0),
    ("tgdpo", "alpha", -0.5),
    ("t_reg", "alpha", -1.0),
    ("t_reg", "beta", -0.1),
    ("sparse_po", "beta", 0.0),
    ("sparse_po", "reward_l1", -0.1),
    ("sparse_po", "kl_l1", -0.1),
  )
  def test_bad_hyperparameters_raise(self, name, key, value):
    args, _ = CASES[name]
    with self.assertRaisesRegex(ValueError, key):
      tl.REGISTRY[name](*args, **{key: value})

  def test_sparse_po_argument_combinations(self):
    base = (*LOGPS, D["uw"], D["ul"], *MASKS)
    with self.assertRaisesRegex(ValueError, "rejected_token_kl"):
      tl.sparse_po_loss(*base, D["kw"])
    with self.assertRaisesRegex(ValueError, "need"):
      tl.sparse_po_loss(*base, None, None, D["dw"], D["dl"])

  def test_sharded_equals_unsharded_and_vmap(self):
    def all_losses(pw, pl, rw, rl, gw, gl, mw, ml, uw, ul, kw, kl):
      return (
        tl.tgdpo_loss(pw, pl, rw, rl, gw, gl, mw, ml)[0],
        tl.t_reg_loss(pw, pl, rw, rl, gw, gl, mw, ml)[0],
        tl.sparse_po_loss(pw, pl, rw, rl, uw, ul, mw, ml, kw, kl)[0],
      )

    keys = ("pw", "pl", "rw", "rl", "gw", "gl", "mw", "ml", "uw", "ul", "kw",
            "kl")  # fmt: skip
    args = [np.concatenate([D[k], D[k][::-1]]) for k in keys]  # B = 8
    testing.assert_sharded_equals_unsharded(
      all_losses, args, rtol=1e-5, atol=1e-6
    )
    stacked = [np.stack([D[k], D[k][::-1]]) for k in keys]
    batched = jax.jit(jax.vmap(all_losses))(*stacked)
    flipped = jax.jit(all_losses)(*[D[k][::-1] for k in keys])
    for got, want in zip(batched, flipped, strict=True):
      np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
