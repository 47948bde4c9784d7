"""Tests for alignment/losses/_reward_model.py.

Every registry entry is checked against a float64 NumPy transcription of its
paper's equation (value and finite-difference gradient), for zero gradient
into label arrays, inertness of NaN padding, bf16 -> float32, and shape /
hyperparameter errors. Closed forms and limits follow per family; the
Bradley–Terry loss is also compared with goldens produced by TRL's
``RewardTrainer.compute_loss`` (tests/oracles/trl_reward_goldens.py).
"""

import functools
import json
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from alignment import losses, ops
from alignment.losses import _reward_model as rm
from tests import testing

B, K, M, N, S, D = 8, 4, 3, 2, 5, 6
GOLDENS = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "goldens"
  / "trl_reward_model.json"
)


# ---------------------------------------------------------------------------
# float64 NumPy oracles, transcribed from the papers.
# ---------------------------------------------------------------------------


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _bt_oracle(
  c, r, margin, flip, *, label_smoothing, center_rewards_coefficient
):
  delta = np.where(flip, -1.0, 1.0) * (c - r)
  h = delta - margin
  return (
    -(1 - label_smoothing) * _log_sigmoid(h)
    - label_smoothing * _log_sigmoid(-h)
    + center_rewards_coefficient * (c + r) ** 2
  )


def _adaptive_oracle(
  c, r, ens_c, ens_r, *, margin_scale, max_margin, label_smoothing
):
  strength = np.mean(ens_c - ens_r, axis=0)
  margin = np.clip(margin_scale * strength, 0.0, max_margin)
  h = c - r - margin
  return -(1 - label_smoothing) * _log_sigmoid(
    h
  ) - label_smoothing * _log_sigmoid(-h)


def _pl_oracle(rewards, ranking, mask, *, top_k):
  out = []
  for b in range(rewards.shape[0]):
    order = [j for j in ranking[b] if mask[b, j]]
    vals = rewards[b, order]
    k = len(vals) if top_k is None else min(top_k, len(vals))
    out.append(
      sum(np.log(np.sum(np.exp(vals[i:]))) - vals[i] for i in range(k))
    )
  return np.asarray(out, np.float64)


def _rao_kupper_oracle(c, r, ties, *, theta):
  pc, pr = np.exp(c), np.exp(r)
  win = pc / (pc + theta * pr)
  tie = (theta**2 - 1) * pc * pr / ((pc + theta * pr) * (theta * pc + pr))
  return -np.log(np.where(ties, tie, win))


def _davidson_oracle(c, r, ties, *, nu):
  pc, pr = np.exp(c), np.exp(r)
  denom = pc + pr + nu * np.sqrt(pc * pr)
  return -np.log(np.where(ties, nu * np.sqrt(pc * pr), pc) / denom)


def _scaled_oracle(c, r, m):
  return -m * _log_sigmoid(c - r)


def _bt_regression_oracle(c, r, tc, tr, m, *, bt_weight, regression_weight):
  return bt_weight * -m * _log_sigmoid(c - r) + regression_weight * 0.5 * (
    (c - tc) ** 2 + (r - tr) ** 2
  )


def _phi(z):
  return 0.5 * np.vectorize(math.erfc)(-z / math.sqrt(2.0))


def _kl_std_normal(mu, log_var):
  return 0.5 * (np.exp(log_var) + mu**2 - 1 - log_var)


def _gaussian_oracle(c, r, lvc, lvr, *, kl_coefficient, variance_floor=1e-6):
  z = (c - r) / np.sqrt(np.exp(lvc) + np.exp(lvr) + variance_floor)
  return -np.log(_phi(z)) + kl_coefficient * (
    _kl_std_normal(c, lvc) + _kl_std_normal(r, lvr)
  )


def _sampled_oracle(c, r, lvc, lvr, ec, er, *, kl_coefficient):
  sc = c + np.exp(0.5 * lvc) * ec
  sr = r + np.exp(0.5 * lvr) * er
  return np.mean(np.logaddexp(0.0, -(sc - sr)), axis=0) + kl_coefficient * (
    _kl_std_normal(c, lvc) + _kl_std_normal(r, lvr)
  )


def _brme_oracle(c, r, lvc, lvr, *, kl_coefficient):
  return np.mean(
    _gaussian_oracle(c, r, lvc, lvr, kl_coefficient=kl_coefficient), axis=0
  )


def _gpm_score_oracle(va, vb, eig):
  j = np.array([[0.0, -1.0], [1.0, 0.0]])
  out = []
  for b in range(va.shape[0]):
    ua = va[b] / np.linalg.norm(va[b])
    ub = vb[b] / np.linalg.norm(vb[b])
    rot = np.kron(np.diag(eig[b]), j)  # blockdiag(λ_1 J, ..., λ_k J)
    out.append((rot @ ua) @ ub)
  return np.asarray(out)


def _gpm_oracle(vc, vr, eig, margin, *, tau):
  return -_log_sigmoid((_gpm_score_oracle(vc, vr, eig) - margin) / tau)


def _mo_oracle(c, r, direction, *, label_smoothing):
  v = direction / np.linalg.norm(direction, axis=-1, keepdims=True)
  delta = np.sum(v * (c - r), axis=-1)
  return -(1 - label_smoothing) * _log_sigmoid(
    delta
  ) - label_smoothing * _log_sigmoid(-delta)


def _mo_regression_oracle(rewards, targets, mask):
  out = []
  for b in range(rewards.shape[0]):
    rated = mask[b]
    out.append(
      np.mean((rewards[b, rated] - targets[b, rated]) ** 2)
      if rated.any()
      else 0.0
    )
  return np.asarray(out)


def _bce(x, y):
  return -(y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x))


def _prm_oracle(logits, targets, mask):
  out = np.zeros(logits.shape)
  out[mask] = _bce(logits[mask], np.asarray(targets, np.float64)[mask])
  return out


def _scan_targets_oracle(
  mc, sc, correct, mask, *, tolerance, min_self_confidence
):
  """The authors' dataset/SCAN-*/process.py, per solution (prefix masks)."""
  targets = np.zeros(mc.shape)
  used = np.zeros(mc.shape, bool)
  for b in range(mc.shape[0]):
    if sc[b] < min_self_confidence:
      continue
    n = int(mask[b].sum())
    scores = list(mc[b, :n])
    if correct[b]:
      labels = [1.0] * n
    else:
      if 0.0 not in scores:
        continue
      t = scores.index(0.0)
      labels = [1.0] * t + [0.0]
      for k in range(1, tolerance + 1):
        if t - k >= 0:
          labels[t - k] = min(1.0, scores[t - k] / sc[b])
    targets[b, : len(labels)] = labels
    used[b, : len(labels)] = True
  return targets, used


def _scan_oracle(
  logits, mc, sc, correct, mask, *, tolerance, min_self_confidence
):
  targets, used = _scan_targets_oracle(
    mc,
    sc,
    correct,
    mask,
    tolerance=tolerance,
    min_self_confidence=min_self_confidence,
  )
  return _prm_oracle(logits, targets, used)


# ---------------------------------------------------------------------------
# One case per registry entry.
# ---------------------------------------------------------------------------


class Case(NamedTuple):
  args: tuple  # positional arrays (float32 / bool / int32)
  kwargs: dict
  oracle: object
  diff: tuple  # indices of float args that are model outputs (gradient)
  labels: tuple  # indices of float args that must get zero gradient
  batch_axes: tuple  # batch axis of each arg
  pad: dict  # arg index -> bool array, True where the entry is padding


def _f(x):
  return np.asarray(x, np.float32)


def _make_cases():
  rng = np.random.default_rng(0)
  normal = lambda *shape: _f(rng.normal(size=shape))
  c, r = normal(B), normal(B)
  flip = np.array([0, 1, 0, 0, 1, 0, 0, 0], bool)
  ties = np.array([0, 1, 0, 1, 0, 0, 1, 0], bool)
  lvc, lvr = _f(rng.uniform(-1.5, 1.0, B)), _f(rng.uniform(-1.5, 1.0, B))
  pl_mask = np.ones((B, K), bool)
  pl_mask[1, 2:] = False
  pl_mask[2, [0, 3]] = False
  pl_mask[3, 1:] = False  # a single valid item
  pl_mask[4] = False  # an empty list
  ranking = np.argsort(rng.random((B, K)), axis=1).astype(np.int32)
  step_mask = (
    np.arange(S)[None, :] < np.array([5, 3, 4, 1, 5, 2, 5, 4])[:, None]
  )
  mc = _f(rng.choice([0.0, 0.125, 0.5, 0.75, 1.0], size=(B, S)))
  mc[0] = [1.0, 0.5, 0.25, 0.0, 0.0]
  mc[4] = [0.875, 0.75, 0.5, 0.25, 0.125]  # incorrect, no zero: dropped
  mc[6] = [0.0, 0.5, 0.5, 0.0, 0.0]  # error at the first step
  self_conf = _f([0.8, 0.9, 0.75, 1.0, 0.9, 0.5, 0.875, 1.0])
  correct = np.array([0, 0, 1, 0, 0, 1, 0, 1], bool)
  target_mask = rng.random((B, K)) < 0.7
  target_mask[5] = False
  cases = {
    "bradley_terry": Case(
      (c, r, _f(rng.uniform(0, 1.5, B)), flip),
      dict(label_smoothing=0.1, center_rewards_coefficient=0.01),
      _bt_oracle,
      (0, 1),
      (2,),
      (0, 0, 0, 0),
      {},
    ),
    "bt_adaptive_margin": Case(
      (c, r, normal(M, B) + 0.5, normal(M, B)),
      dict(margin_scale=0.7, max_margin=1.0, label_smoothing=0.05),
      _adaptive_oracle,
      (0, 1),
      (2, 3),
      (0, 0, 1, 1),
      {},
    ),
    "plackett_luce": Case(
      (normal(B, K), ranking, pl_mask),
      dict(top_k=3),
      _pl_oracle,
      (0,),
      (),
      (0, 0, 0),
      {0: ~pl_mask},
    ),
    "bt_ties_rao_kupper": Case(
      (c, r, ties),
      dict(theta=1.5),
      _rao_kupper_oracle,
      (0, 1),
      (),
      (0, 0, 0),
      {},
    ),
    "bt_ties_davidson": Case(
      (c, r, ties), dict(nu=0.8), _davidson_oracle, (0, 1), (), (0, 0, 0), {}
    ),
    "scaled_bt": Case(
      (c, r, _f(rng.integers(1, 4, B))),
      {},
      _scaled_oracle,
      (0, 1),
      (2,),
      (0, 0, 0),
      {},
    ),
    "bt_regression": Case(
      (
        c,
        r,
        _f(rng.integers(0, 5, B)),
        _f(rng.integers(0, 5, B)),
        _f(rng.integers(1, 4, B)),
      ),
      dict(bt_weight=0.5, regression_weight=0.3),
      _bt_regression_oracle,
      (0, 1),
      (2, 3, 4),
      (0,) * 5,
      {},
    ),
    "gaussian_bt": Case(
      (c, r, lvc, lvr),
      dict(kl_coefficient=0.1),
      _gaussian_oracle,
      (0, 1, 2, 3),
      (),
      (0,) * 4,
      {},
    ),
    "gaussian_bt_sampled": Case(
      (c, r, lvc, lvr, normal(N, B), normal(N, B)),
      dict(kl_coefficient=0.1),
      _sampled_oracle,
      (0, 1, 2, 3),
      (4, 5),
      (0, 0, 0, 0, 1, 1),
      {},
    ),
    "brme": Case(
      (
        normal(M, B),
        normal(M, B),
        _f(rng.uniform(-1.5, 1.0, (M, B))),
        _f(rng.uniform(-1.5, 1.0, (M, B))),
      ),
      dict(kl_coefficient=0.05),
      _brme_oracle,
      (0, 1, 2, 3),
      (),
      (1,) * 4,
      {},
    ),
    "gpm": Case(
      (
        normal(B, D),
        normal(B, D),
        _f(rng.uniform(0.2, 2.0, (B, D // 2))),
        _f(rng.uniform(0, 0.5, B)),
      ),
      dict(tau=0.5),
      _gpm_oracle,
      (0, 1, 2),
      (3,),
      (0,) * 4,
      {},
    ),
    "multi_objective": Case(
      (normal(B, K), normal(B, K), _f(rng.uniform(0.1, 2.0, (B, K)))),
      dict(label_smoothing=0.1),
      _mo_oracle,
      (0, 1),
      (2,),
      (0,) * 3,
      {},
    ),
    "multi_objective_regression": Case(
      (normal(B, K), _f(rng.integers(0, 5, (B, K))), target_mask),
      {},
      _mo_regression_oracle,
      (0,),
      (1,),
      (0,) * 3,
      {0: ~target_mask, 1: ~target_mask},
    ),
    "prm_hard": Case(
      (normal(B, S), rng.random((B, S)) < 0.6, step_mask),
      {},
      lambda x, y, m: _prm_oracle(x, y, m),
      (0,),
      (),
      (0,) * 3,
      {0: ~step_mask},
    ),
    "prm_soft": Case(
      (normal(B, S), _f(rng.random((B, S))), step_mask),
      {},
      _prm_oracle,
      (0,),
      (1,),
      (0,) * 3,
      {0: ~step_mask, 1: ~step_mask},
    ),
    "prm_scan": Case(
      (normal(B, S), mc, self_conf, correct, step_mask),
      dict(tolerance=2, min_self_confidence=0.75),
      _scan_oracle,
      (0,),
      (1, 2),
      (0,) * 5,
      {0: ~step_mask, 1: ~step_mask},
    ),
  }
  return cases


CASES = _make_cases()
NAMES = sorted(CASES)


def _float_indices(case):
  return tuple(case.diff) + tuple(case.labels)


@functools.cache
def _compiled(name):
  """jit(row_valid, *args) -> (loss, aux, grads of the float args)."""
  case = CASES[name]
  fn = functools.partial(rm.REGISTRY[name], **case.kwargs)
  idx = _float_indices(case)

  def run(row_valid, *args):
    def total(*float_args):
      full = list(args)
      for i, a in zip(idx, float_args, strict=True):
        full[i] = a
      loss, aux = fn(*full)
      valid = row_valid.reshape(row_valid.shape + (1,) * (loss.ndim - 1))
      return jnp.sum(jnp.where(valid, loss, 0.0)), (loss, aux)

    grads, (loss, aux) = jax.grad(
      total, argnums=tuple(range(len(idx))), has_aux=True
    )(*(args[i] for i in idx))
    return loss, aux, grads

  return jax.jit(run)


def _run(name, args, row_valid=None):
  if row_valid is None:
    row_valid = np.ones(B, bool)
  return _compiled(name)(row_valid, *args)


def _f64(args):
  return [
    np.asarray(a, np.float64)
    if np.issubdtype(np.asarray(a).dtype, np.floating)
    else a
    for a in args
  ]


def _numerical_grad(oracle, args, kwargs, index, eps=1e-6):
  args = _f64(args)
  base = args[index]
  grad = np.zeros_like(base)
  for pos in np.ndindex(base.shape):
    up, down = base.copy(), base.copy()
    up[pos] += eps
    down[pos] -= eps
    f_up = np.sum(oracle(*args[:index], up, *args[index + 1 :], **kwargs))
    f_down = np.sum(oracle(*args[:index], down, *args[index + 1 :], **kwargs))
    grad[pos] = (f_up - f_down) / (2 * eps)
  return grad


def _take_row(x, axis, rows):
  return np.take(np.asarray(x), rows, axis=axis)


class RegistryTest(parameterized.TestCase):
  """One parameterised suite over every reward-model loss."""

  def test_every_registry_entry_is_tested(self):
    self.assertEqual(set(rm.REGISTRY), set(CASES))
    for name, fn in rm.REGISTRY.items():
      self.assertIs(losses.REGISTRY[name], fn)
      self.assertIs(losses.REWARD_MODEL_LOSSES[name], fn)
      self.assertIs(getattr(losses, fn.__name__), fn)

  @parameterized.parameters(*NAMES)
  def test_matches_float64_oracle_value_and_gradient(self, name):
    case = CASES[name]
    loss, _, grads = _run(name, case.args)
    want = case.oracle(*_f64(case.args), **case.kwargs)
    self.assertEqual(loss.dtype, jnp.float32)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-6)
    for i, grad in zip(_float_indices(case), grads, strict=True):
      if i in case.labels:
        np.testing.assert_array_equal(grad, 0.0, err_msg=f"label arg {i}")
      else:
        num = _numerical_grad(case.oracle, case.args, case.kwargs, i)
        np.testing.assert_allclose(
          grad, num, rtol=2e-3, atol=2e-4, err_msg=f"gradient of arg {i}"
        )
        self.assertTrue(np.any(np.asarray(grad) != 0))

  @parameterized.parameters(*NAMES)
  def test_nan_padding_is_inert(self, name):
    case = CASES[name]
    loss, _, grads = _run(name, case.args)
    # Padding inside a row (masked items / steps / attributes).
    if case.pad:
      padded = list(case.args)
      for i, where in case.pad.items():
        padded[i] = np.where(where, np.nan, padded[i]).astype(np.float32)
      loss_p, _, grads_p = _run(name, padded)
      np.testing.assert_array_equal(loss_p, loss)
      for g_p, g in zip(grads_p, grads, strict=True):
        np.testing.assert_array_equal(g_p, g)
    # A NaN padding row (row 0) changes no other row's value or gradient.
    nan_row = [
      np.where(
        np.isin(np.arange(np.shape(a)[ax]), [0]).reshape(
          [-1 if d == ax else 1 for d in range(np.ndim(a))]
        ),
        np.nan,
        a,
      ).astype(np.float32)
      if np.issubdtype(np.asarray(a).dtype, np.floating)
      else a
      for a, ax in zip(case.args, case.batch_axes, strict=True)
    ]
    row_valid = np.arange(B) > 0
    loss_n, _, grads_n = _run(name, nan_row, row_valid)
    np.testing.assert_array_equal(np.asarray(loss_n)[1:], np.asarray(loss)[1:])
    for i, g_n, g in zip(_float_indices(case), grads_n, grads, strict=True):
      ax = case.batch_axes[i]
      rest = np.arange(1, B)
      np.testing.assert_array_equal(
        _take_row(g_n, ax, rest), _take_row(g, ax, rest)
      )

  @parameterized.parameters(*NAMES)
  def test_bfloat16_in_float32_out(self, name):
    case = CASES[name]
    args = [
      jax.ShapeDtypeStruct(np.shape(a), jnp.bfloat16)
      if i in _float_indices(case)
      else a
      for i, a in enumerate(case.args)
    ]
    fn = functools.partial(rm.REGISTRY[name], **case.kwargs)
    loss, aux = jax.eval_shape(fn, *args)
    self.assertEqual(loss.dtype, jnp.float32)
    for leaf in jax.tree.leaves(aux):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        self.assertEqual(leaf.dtype, jnp.float32)

  @parameterized.parameters(*NAMES)
  def test_shape_errors(self, name):
    case = CASES[name]
    fn = rm.REGISTRY[name]
    # Mismatched batch size in the second argument.
    short = list(case.args)
    short[1] = _take_row(short[1], case.batch_axes[1], np.arange(B - 1))
    with self.assertRaises(TypeError):
      fn(*short, **case.kwargs)
    # Wrong rank of the first argument.
    wrong = list(case.args)
    wrong[0] = np.asarray(wrong[0])[..., None]
    with self.assertRaises(TypeError):
      fn(*wrong, **case.kwargs)

  @parameterized.parameters(
    ("bradley_terry", dict(label_smoothing=1.5), "label_smoothing"),
    (
      "bradley_terry",
      dict(center_rewards_coefficient=-1.0),
      "center_rewards_coefficient",
    ),
    ("bt_adaptive_margin", dict(margin_scale=-1.0), "margin_scale"),
    ("bt_adaptive_margin", dict(max_margin=0.0), "max_margin"),
    ("plackett_luce", dict(top_k=0), "top_k"),
    ("bt_ties_rao_kupper", dict(theta=1.0), "theta"),
    ("bt_ties_davidson", dict(nu=0.0), "nu"),
    ("bt_regression", dict(bt_weight=-1.0), "bt_weight"),
    ("bt_regression", dict(regression_weight=-1.0), "regression_weight"),
    ("gaussian_bt", dict(kl_coefficient=-1.0), "kl_coefficient"),
    ("gaussian_bt", dict(variance_floor=0.0), "variance_floor"),
    ("gaussian_bt_sampled", dict(kl_coefficient=-0.1), "kl_coefficient"),
    ("brme", dict(variance_floor=-1.0), "variance_floor"),
    ("gpm", dict(tau=0.0), "tau"),
    ("multi_objective", dict(label_smoothing=-0.1), "label_smoothing"),
    ("prm_scan", dict(tolerance=-1), "tolerance"),
    ("prm_scan", dict(min_self_confidence=1.5), "min_self_confidence"),
  )
  def test_bad_hyperparameters(self, name, kwargs, word):
    case = CASES[name]
    with self.assertRaisesRegex(ValueError, word):
      rm.REGISTRY[name](*case.args, **{**case.kwargs, **kwargs})

  def test_sharded_equals_unsharded_and_vmap(self):
    bt, scan = CASES["bradley_terry"], CASES["prm_scan"]

    def several(*args):
      return (
        rm.bradley_terry_loss(*args[:4], **bt.kwargs),
        rm.prm_scan_loss(*args[4:], **scan.kwargs),
      )

    testing.assert_sharded_equals_unsharded(several, bt.args + scan.args)

    # vmap over an extra leading axis equals a loop.
    stacked = [np.stack([a, a[::-1]]) for a in bt.args]
    fn = functools.partial(rm.bradley_terry_loss, **bt.kwargs)
    got, _ = jax.jit(jax.vmap(fn))(*stacked)
    want = CASES["bradley_terry"].oracle
    for v in range(2):
      np.testing.assert_allclose(
        got[v], want(*_f64([s[v] for s in stacked]), **bt.kwargs), rtol=2e-5
      )


def _sigmoid64(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _blocks(x, n):
  """Splits the leading axis of ``x`` into ``n`` equal blocks."""
  return np.split(np.asarray(x), n)


# The identity tests below stack several variants of an input along the batch
# axis so that each loss is traced and compiled once per test.


class BradleyTerryTest(absltest.TestCase):
  def test_closed_forms_flip_smoothing_margin(self):
    c, r, _, flip = CASES["bradley_terry"].args
    no, zero = np.zeros(B, bool), np.zeros(B, np.float32)
    m = np.linspace(0.0, 2.0, B).astype(np.float32)
    chosen = np.concatenate(
      [c, c, c + 3.0, c, np.where(flip, r, c), m]
    )  # tie, base, shifted, flipped, swapped, margin
    rejected = np.concatenate([c, r, r + 3.0, r, np.where(flip, c, r), zero])
    margins = np.concatenate([zero] * 5 + [m])
    flips = np.concatenate([no, no, no, flip, no, no])

    @jax.jit
    def bundle(chosen, rejected, margins, flips, c, r):
      def total(x, **kw):
        return jnp.sum(rm.bradley_terry_loss(x, rejected, margins, flips)[0])

      smooth = functools.partial(rm.bradley_terry_loss, label_smoothing=0.5)
      pair = jnp.concatenate([c, r, jnp.zeros(B)])
      swap = jnp.concatenate([r, c, jnp.zeros(B)])
      return (
        rm.bradley_terry_loss(chosen, rejected, margins, flips),
        jax.grad(total)(chosen),
        smooth(pair, swap)[0],
        jax.grad(lambda x: jnp.sum(smooth(x, swap)[0]))(pair),
      )

    (loss, aux), grad, half, half_grad = bundle(
      chosen, rejected, margins, flips, c, r
    )
    tie, base, shifted, flipped, swapped, _ = _blocks(loss, 6)
    np.testing.assert_allclose(tie, np.log(2.0), rtol=1e-6)
    np.testing.assert_array_equal(_blocks(aux.accuracy, 6)[0], 0.5)
    np.testing.assert_allclose(shifted, base, rtol=1e-5)
    np.testing.assert_allclose(_blocks(aux.reward_margin, 6)[1], c - r)
    np.testing.assert_array_equal(
      _blocks(aux.accuracy, 6)[1], (c > r).astype(np.float32)
    )
    # dL/dr_c = -sigma(r_r - r_c).
    sig = _sigmoid64(r.astype(np.float64) - c)
    np.testing.assert_allclose(_blocks(grad, 6)[1], -sig, rtol=1e-5)
    # Flipping a label equals swapping the pair.
    np.testing.assert_allclose(flipped, swapped, rtol=1e-6)
    # The margin moves BT's gradient: at Delta = m it equals BT's at 0.
    np.testing.assert_allclose(_blocks(grad, 6)[5], -0.5, rtol=1e-6)
    # epsilon = 0.5: symmetric, zero gradient at Delta = 0.
    forward, backward, _ = _blocks(half, 3)
    np.testing.assert_allclose(forward, backward, rtol=1e-6)
    np.testing.assert_allclose(_blocks(half_grad, 3)[2], 0.0, atol=1e-7)

  def test_matches_trl_reward_trainer_goldens(self):
    gold = json.loads(GOLDENS.read_text())
    c = np.asarray(gold["chosen_rewards"], np.float32)
    r = np.asarray(gold["rejected_rewards"], np.float32)
    margin = np.asarray(gold["margin"], np.float32)
    settings = [
      (case["use_margin"], case["center_rewards_coefficient"])
      for case in gold["cases"]
    ]

    @jax.jit
    def all_cases(c, r, margin):
      out = []
      for use_margin, coef in settings:

        def batch_loss(c, r, use_margin=use_margin, coef=coef):
          loss, _ = rm.bradley_terry_loss(
            c,
            r,
            margin if use_margin else None,
            center_rewards_coefficient=coef,
          )
          return ops.aggregate_sequence_loss(loss).value()

        out.append(jax.value_and_grad(batch_loss, (0, 1))(c, r))
      return out

    for case, (value, (g_c, g_r)) in zip(
      gold["cases"], all_cases(c, r, margin), strict=True
    ):
      np.testing.assert_allclose(
        value, case["loss"], rtol=1e-6, err_msg=case["name"]
      )
      np.testing.assert_allclose(g_c, case["grad_chosen"], rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(
        g_r, case["grad_rejected"], rtol=1e-5, atol=1e-7
      )

  def test_adaptive_margin_scaled_and_regression(self):
    c, r, ens_c, ens_r = CASES["bt_adaptive_margin"].args
    _, _, tc, tr, m = CASES["bt_regression"].args
    ens_chosen = np.concatenate([ens_r - 1.0, ens_c + 10.0], axis=1)
    ens_rejected = np.concatenate([ens_c, ens_r], axis=1)
    margins = np.concatenate([np.zeros(B), np.full(B, 0.5)]).astype(np.float32)
    mags = np.concatenate([np.ones(B, np.float32), m])

    @jax.jit
    def bundle(c, r, ens_c, ens_r, tc, tr, m):
      cc, rr = jnp.tile(c, 2), jnp.tile(r, 2)
      scaled = lambda x: rm.scaled_bt_loss(x, rr, mags)[0]
      bt = lambda x: rm.bradley_terry_loss(x, rr, margins)[0]
      return dict(
        strength=rm.preference_strength(ens_c, ens_r),
        adaptive=rm.bt_adaptive_margin_loss(
          cc, rr, ens_chosen, ens_rejected, max_margin=0.5
        )[0],
        bt=bt(cc),
        scaled=scaled(cc),
        g_scaled=jax.grad(lambda x: jnp.sum(scaled(x)))(cc),
        g_bt=jax.grad(lambda x: jnp.sum(bt(x)))(cc),
        bt_only=rm.bt_regression_loss(c, r, tc, tr, m, regression_weight=0.0),
        reg_only=rm.bt_regression_loss(c, r, tc, tr, bt_weight=0.0)[0],
      )

    out = bundle(c, r, ens_c, ens_r, tc, tr, m)
    mean, std = out["strength"]
    np.testing.assert_allclose(mean, np.mean(ens_c - ens_r, 0), rtol=1e-5)
    np.testing.assert_allclose(std, np.std(ens_c - ens_r, 0), rtol=1e-5)
    # Negative strength gives margin 0 (plain BT); the margin is capped.
    np.testing.assert_allclose(out["adaptive"], out["bt"], rtol=1e-6)
    # Scaled BT: m = 1 is BT, the gradient is linear in m.
    plain, _ = _blocks(out["bt"], 2)
    ones, scaled = _blocks(out["scaled"], 2)
    np.testing.assert_allclose(ones, plain, rtol=1e-6)
    np.testing.assert_allclose(
      _blocks(out["g_scaled"], 2)[1], m * _blocks(out["g_bt"], 2)[0], rtol=1e-6
    )
    bt_only, aux = out["bt_only"]
    np.testing.assert_allclose(bt_only, scaled, rtol=1e-6)
    np.testing.assert_allclose(aux.bt_loss, scaled, rtol=1e-6)
    np.testing.assert_allclose(
      out["reg_only"], 0.5 * ((c - tc) ** 2 + (r - tr) ** 2), rtol=1e-6
    )


class ListwiseAndTiesTest(absltest.TestCase):
  def test_plackett_luce_identities(self):
    rewards, ranking, mask = CASES["plackett_luce"].args
    ordered = np.array(
      [[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]] * (B // 2), np.float32
    )
    identity = np.tile(np.arange(K, dtype=np.int32), (B, 1))
    everything = np.ones((B, K), bool)
    values = np.concatenate(
      [rewards, np.take_along_axis(rewards, ranking, 1), rewards + 5.0, ordered]
    )
    rankings = np.concatenate([ranking, identity, ranking, identity])
    masks = np.concatenate(
      [mask, np.take_along_axis(mask, ranking, 1), mask, everything]
    )

    @jax.jit
    def bundle(values, rankings, masks, rewards):
      pl = rm.plackett_luce_loss
      return (
        pl(values, rankings, masks),
        pl(rewards[:, :2])[0],
        rm.bradley_terry_loss(rewards[:, 0], rewards[:, 1])[0],
        pl(rewards, top_k=1),
      )

    (loss, aux), two, bt, (top1, aux1) = bundle(
      values, rankings, masks, rewards
    )
    ranked, presorted, shifted, _ = _blocks(loss, 4)
    np.testing.assert_allclose(two, bt, rtol=1e-5)
    np.testing.assert_allclose(presorted, ranked, rtol=1e-6)
    np.testing.assert_allclose(shifted, ranked, rtol=1e-5, atol=1e-6)
    self.assertEqual(float(ranked[4]), 0.0)  # empty list
    self.assertEqual(float(ranked[3]), 0.0)  # single item
    log_softmax = rewards[:, 0] - np.log(
      np.sum(np.exp(rewards.astype(np.float64)), axis=1)
    )
    np.testing.assert_allclose(top1, -log_softmax, rtol=1e-5)
    np.testing.assert_allclose(
      aux1.top1_probability, np.exp(log_softmax), rtol=1e-5
    )
    np.testing.assert_allclose(
      _blocks(aux.pair_accuracy, 4)[3], [1.0, 0.0] * (B // 2)
    )

  def test_ties_probabilities(self):
    c, r, ties = CASES["bt_ties_rao_kupper"].args
    strict = np.zeros(B, bool)
    first = np.concatenate([c, r, c])  # pair, swapped pair, equal rewards
    second = np.concatenate([r, c, c])
    all_ties = np.concatenate([ties, ties, ties])

    @jax.jit
    def bundle(first, second, all_ties, c, r):
      return dict(
        rk=rm.rao_kupper_loss(first, second, all_ties, theta=1.5),
        dv=rm.davidson_loss(first, second, all_ties, nu=0.8),
        bt=rm.bradley_terry_loss(c, r)[0],
        rk_near=rm.rao_kupper_loss(c, r, strict, theta=1.0 + 1e-5)[0],
        dv_near=rm.davidson_loss(c, r, strict, nu=1e-6)[0],
      )

    out = bundle(first, second, all_ties, c, r)
    for name in ("rk", "dv"):
      loss, aux = out[name]
      total = aux.win_probability + aux.tie_probability + aux.loss_probability
      np.testing.assert_allclose(total, 1.0, rtol=1e-5)
      forward, backward, _ = _blocks(loss, 3)
      np.testing.assert_allclose(
        np.where(ties, backward, 0), np.where(ties, forward, 0), rtol=1e-5
      )
      np.testing.assert_allclose(
        _blocks(aux.win_probability, 3)[1],
        _blocks(aux.loss_probability, 3)[0],
        rtol=1e-5,
      )
    np.testing.assert_allclose(out["rk_near"], out["bt"], atol=1e-4)
    np.testing.assert_allclose(out["dv_near"], out["bt"], atol=1e-4)
    np.testing.assert_allclose(
      _blocks(out["dv"][1].tie_probability, 3)[2], 0.8 / 2.8, rtol=1e-6
    )


class UncertaintyTest(absltest.TestCase):
  def test_gaussian_forms(self):
    c, r, lvc, lvr = CASES["gaussian_bt"].args
    means, _, log_vars, _ = CASES["brme"].args
    zeros = np.zeros((N, B), np.float32)
    # pair, reversed pair, a wrong order with small and with large variance
    mu_a = np.concatenate([c, r, r - 2, r - 2])
    mu_b = np.concatenate([r, c, r, r])
    lv_a = np.concatenate([lvc, lvr, lvr, lvr + 2])
    lv_b = np.concatenate([lvr, lvc, lvr, lvr + 2])

    @jax.jit
    def bundle(mu_a, mu_b, lv_a, lv_b, c, r, lvc, lvr, means, log_vars):
      return dict(
        gauss=rm.gaussian_bt_loss(mu_a, mu_b, lv_a, lv_b),
        sampled=rm.gaussian_bt_sampled_loss(c, r, lvc, lvr, zeros, zeros)[0],
        bt=rm.bradley_terry_loss(c, r)[0],
        nominal=rm.brme_nominal_reward(means, log_vars),
      )

    out = bundle(mu_a, mu_b, lv_a, lv_b, c, r, lvc, lvr, means, log_vars)
    loss, aux = out["gauss"]
    p_fwd, p_rev, _, _ = _blocks(aux.preference_probability, 4)
    np.testing.assert_allclose(p_fwd + p_rev, 1.0, rtol=1e-6)
    np.testing.assert_allclose(
      _blocks(aux.chosen_std, 4)[0], np.exp(0.5 * lvc), rtol=1e-6
    )
    # Larger predicted variance makes a wrongly ordered pair cheaper.
    _, _, small_var, large_var = _blocks(loss, 4)
    self.assertTrue(np.all(large_var < small_var))
    # Zero noise: BT on the means.
    np.testing.assert_allclose(out["sampled"], out["bt"], rtol=1e-6)
    # The BRME nominal reward is the mean of the most confident head.
    np.testing.assert_array_equal(
      out["nominal"], means[np.argmin(log_vars, 0), np.arange(B)]
    )


class GPMTest(absltest.TestCase):
  def test_skew_symmetry_and_cycles(self):
    a, b, eig, _ = CASES["gpm"].args
    angles = np.deg2rad([0.0, 120.0, 240.0])
    v = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    first = np.concatenate([a, b, a, a])  # ab, ba, aa, gated
    second = np.concatenate([b, a, a, b])
    gates = np.concatenate([eig, eig, eig, np.zeros_like(eig)])
    # Unnormalised 2-D embeddings, then rock-paper-scissors (A≻B≻C≻A).
    flat_a = np.concatenate([a[:, :2], v])
    flat_b = np.concatenate([b[:, :2], np.roll(v, -1, axis=0)])

    @jax.jit
    def bundle(first, second, gates, flat_a, flat_b):
      s = rm.gpm_preference_score
      return (
        s(first, second, gates),
        rm.gpm_loss(first[: 2 * B], second[: 2 * B])[1],
        s(flat_a[:B], flat_b[:B], normalize=False),
        s(flat_a[B:], flat_b[B:]),
      )

    score, aux, raw, cycle = bundle(first, second, gates, flat_a, flat_b)
    ab, ba, aa, gated = _blocks(score, 4)
    np.testing.assert_allclose(ab, -ba, rtol=1e-6)
    np.testing.assert_allclose(aa, 0.0, atol=1e-6)
    np.testing.assert_allclose(gated, 0.0)
    p_ab, p_ba = _blocks(aux.preference_probability, 2)
    np.testing.assert_allclose(p_ab + p_ba, 1.0, rtol=1e-6)
    np.testing.assert_allclose(
      raw, a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0], rtol=1e-5, atol=1e-6
    )
    # A cycle no scalar reward can represent: every edge scores +sin 120.
    np.testing.assert_allclose(cycle, np.sin(np.deg2rad(120.0)), rtol=1e-5)

  def test_width_errors(self):
    a = np.ones((2, 5), np.float32)
    with self.assertRaisesRegex(ValueError, "even"):
      rm.gpm_loss(a, a)
    a = np.ones((2, 4), np.float32)
    with self.assertRaisesRegex(ValueError, "eigenvalues"):
      rm.gpm_loss(a, a, np.ones((2, 3), np.float32))


class MultiObjectiveTest(absltest.TestCase):
  def test_direction_reductions(self):
    c, r, direction = CASES["multi_objective"].args
    axes = np.repeat(3.0 * np.eye(K, dtype=np.float32), B, axis=0)
    directions = np.concatenate([axes, direction, 7.0 * direction])
    reps = K + 2

    @jax.jit
    def bundle(c, r, directions):
      return dict(
        mo=rm.multi_objective_loss(
          jnp.tile(c, (reps, 1)), jnp.tile(r, (reps, 1)), directions
        )[0],
        bt=rm.bradley_terry_loss(c.T.reshape(-1), r.T.reshape(-1))[0],
        shared=rm.directional_scalarize(c, directions[K * B]),
        per_row=rm.directional_scalarize(
          c, jnp.tile(directions[K * B], (B, 1))
        ),
        zero=rm.directional_scalarize(c, jnp.zeros(K)),
      )

    out = bundle(c, r, directions)
    mo = out["mo"]
    # Direction e_i trains objective i alone.
    np.testing.assert_allclose(mo[: K * B], out["bt"], rtol=1e-6)
    # The direction's length does not matter.
    np.testing.assert_allclose(
      mo[K * B : (K + 1) * B], mo[(K + 1) * B :], rtol=1e-5
    )
    np.testing.assert_allclose(out["shared"], out["per_row"], rtol=1e-6)
    np.testing.assert_allclose(out["zero"], 0.0)
    with self.assertRaisesRegex(ValueError, "direction"):
      rm.directional_scalarize(c, np.ones((1, 1, K), np.float32))


class ProcessRewardTest(absltest.TestCase):
  def test_soft_binary_targets_and_scan_hand_example(self):
    logits, labels, mask = CASES["prm_hard"].args
    mc = np.array(
      [
        [1.0, 0.5, 0.25, 0.0, 0.0],  # error at step 3
        [0.0, 0.5, 0.0, 0.0, 0.0],  # error at step 0
        [0.5, 0.5, 0.5, 0.5, 0.0],  # correct answer
        [0.5, 0.0, 0.0, 0.0, 0.0],  # low self-confidence
        [0.5, 0.5, 0.25, 0.0, 0.0],  # zero only in padding
      ],
      np.float32,
    )
    sc = np.array([0.8, 0.8, 0.8, 0.5, 0.8], np.float32)
    correct = np.array([0, 0, 1, 0, 0], bool)
    step_mask = np.ones((5, 5), bool)
    step_mask[2, 4:] = False
    step_mask[4, 3:] = False

    @jax.jit
    def bundle(logits, labels, mask, mc, sc, correct, step_mask):
      hard, aux = rm.prm_hard_loss(logits, labels, mask)
      soft, _ = rm.prm_soft_loss(logits, labels.astype(jnp.float32), mask)
      mean = ops.aggregate_token_loss(hard, aux.step_mask).value()
      scan = rm.scan_step_targets(mc, sc, correct, step_mask)
      no_window = rm.scan_step_targets(mc, sc, correct, step_mask, tolerance=0)[
        0
      ]
      return hard, soft, aux.step_mask, mean, scan, no_window

    hard, soft, used, mean, (targets, kept), no_window = bundle(
      logits, labels, mask, mc, sc, correct, step_mask
    )
    np.testing.assert_allclose(soft, hard, rtol=1e-6)
    np.testing.assert_array_equal(used, mask)
    want = np.mean(_prm_oracle(*_f64((logits, labels, mask)))[mask])
    np.testing.assert_allclose(mean, want, rtol=1e-5)
    np.testing.assert_allclose(
      targets,
      [
        [1.0, 0.625, 0.3125, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0] * 5,
        [0.0] * 5,
      ],
    )
    np.testing.assert_array_equal(
      kept,
      [
        [1, 1, 1, 1, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [0] * 5,
        [0] * 5,
      ],
    )
    np.testing.assert_allclose(no_window[0], [1.0, 1.0, 1.0, 0.0, 0.0])


if __name__ == "__main__":
  absltest.main()
