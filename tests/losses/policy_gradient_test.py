"""Tests for alignment/losses/_policy_gradient.py.

The registry-wide class checks every registered objective against a float64
NumPy transcription of its paper equation, padding inertness, stop-gradient,
dtype and shape contracts; the classes after it check closed forms and
limits per method; ``TrlGoldensTest`` compares with TRL 1.16's GRPOTrainer /
GMPOTrainer on stored goldens (tests/oracles/trl_grpo_goldens.py).
"""

import inspect
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized

from alignment.losses import _policy_gradient as pg
from alignment.ops import _kl, _masked
from tests import testing

B, T = 8, 10
LENGTHS = np.array([10, 7, 3, 0, 1, 10, 5, 8])
LOG_1000 = math.log(1e3)
G, TG = 3, 5  # group size and length for the [B, G, T] objectives
GOLDENS = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "goldens"
  / "trl_grpo.json"
)


def _token_inputs(seed=0):
  rng = np.random.RandomState(seed)
  mask = np.arange(T)[None, :] < LENGTHS[:, None]
  logps = rng.uniform(-3.0, -0.05, (B, T)).astype(np.float32)
  return dict(
    token_logps=logps,
    old_token_logps=(logps + rng.uniform(-0.5, 0.5, (B, T))).astype(np.float32),
    ref_token_logps=(logps + rng.uniform(-0.5, 0.5, (B, T))).astype(np.float32),
    advantages=rng.randn(B).astype(np.float32),
    token_entropies=rng.uniform(0.0, 3.0, (B, T)).astype(np.float32),
    completion_mask=mask,
    step_ids=np.tile(np.minimum(np.arange(T) // 4, 2), (B, 1)).astype(np.int32),
  )


def _group_token_inputs(seed=1):
  rng = np.random.RandomState(seed)
  lengths = rng.randint(1, TG + 1, (B, G))
  mask = np.arange(TG)[None, None, :] < lengths[..., None]
  logps = rng.uniform(-2.0, -0.05, (B, G, TG)).astype(np.float32)
  return dict(
    token_logps=logps,
    old_token_logps=(logps + rng.uniform(-0.4, 0.4, logps.shape)).astype(
      np.float32
    ),
    ref_token_logps=(logps + rng.uniform(-0.4, 0.4, logps.shape)).astype(
      np.float32
    ),
    rewards=rng.randn(B, G).astype(np.float32),
    completion_mask=mask,
  )


def _group_sequence_inputs(seed=2):
  rng = np.random.RandomState(seed)
  return dict(
    policy_logps=rng.uniform(-20.0, -2.0, (B, 4)).astype(np.float32),
    ref_logps=rng.uniform(-20.0, -2.0, (B, 4)).astype(np.float32),
    rewards=rng.randn(B, 4).astype(np.float32),
  )


def _call(fn, inputs, **kwargs):
  """Calls ``fn`` passing every array parameter by name from ``inputs``."""
  names = [
    p.name
    for p in inspect.signature(fn).parameters.values()
    if p.kind is p.POSITIONAL_OR_KEYWORD and p.name in inputs
  ]
  return fn(**{n: inputs[n] for n in names}, **kwargs)


def _params(fn):
  return [
    p.name
    for p in inspect.signature(fn).parameters.values()
    if p.kind is p.POSITIONAL_OR_KEYWORD
  ]


# ------------------------------------------------------------------ oracles


def _f64(*xs):
  return [np.asarray(x, np.float64) for x in xs]


def _adv_np(advantages, shape):
  a = np.asarray(advantages, np.float64)
  return np.broadcast_to(a[:, None], shape) if a.ndim == 1 else a


def _clip_np(ratio, adv, low, high, delta=None, dual=None):
  unclipped = ratio if delta is None else np.minimum(ratio, delta)
  obj = np.minimum(unclipped * adv, np.clip(ratio, low, high) * adv)
  if dual is not None:
    obj = np.where(adv < 0, np.maximum(obj, dual * adv), obj)
  return -obj


def _reinforce_np(token_logps, advantages, completion_mask):
  (lp,) = _f64(token_logps)
  adv = _adv_np(advantages, lp.shape)
  return np.where(completion_mask, -adv * lp, 0.0)


def _ppo_np(
  token_logps,
  old_token_logps,
  advantages,
  completion_mask,
  epsilon=0.2,
  dual_clip=None,
):
  lp, old = _f64(token_logps, old_token_logps)
  ratio = np.exp(lp - old)
  out = _clip_np(
    ratio,
    _adv_np(advantages, lp.shape),
    1 - epsilon,
    1 + epsilon,
    dual=dual_clip,
  )
  return np.where(completion_mask, out, 0.0)


def _grpo_np(
  token_logps,
  old_token_logps,
  advantages,
  completion_mask,
  epsilon_low=0.2,
  epsilon_high=0.2,
  delta=None,
):
  lp, old = _f64(token_logps, old_token_logps)
  ratio = np.exp(lp - old)
  out = _clip_np(
    ratio,
    _adv_np(advantages, lp.shape),
    1 - epsilon_low,
    1 + epsilon_high,
    delta=delta,
  )
  return np.where(completion_mask, out, 0.0)


def _dapo_np(*args, epsilon_low=0.2, epsilon_high=0.28):
  return _grpo_np(*args, epsilon_low=epsilon_low, epsilon_high=epsilon_high)


def _gspo_np(
  token_logps,
  old_token_logps,
  advantages,
  completion_mask,
  epsilon_low=3e-4,
  epsilon_high=4e-4,
):
  lp, old = _f64(token_logps, old_token_logps)
  out = np.zeros(lp.shape)
  adv = _adv_np(advantages, lp.shape)
  for b in range(lp.shape[0]):
    m = completion_mask[b]
    if not m.any():
      continue
    # Eq. 7: (π(y)/π_old(y))^(1/|y|) with sequence probabilities.
    s = np.exp(np.sum(lp[b, m]) - np.sum(old[b, m])) ** (1.0 / m.sum())
    out[b] = _clip_np(s, adv[b], 1 - epsilon_low, 1 + epsilon_high)
  return np.where(completion_mask, out, 0.0)


def _cispo_np(
  token_logps,
  old_token_logps,
  advantages,
  completion_mask,
  epsilon_low=None,
  epsilon_high=4.0,
):
  lp, old = _f64(token_logps, old_token_logps)
  low = 0.0 if epsilon_low is None else 1 - epsilon_low
  weight = np.clip(np.exp(lp - old), low, 1 + epsilon_high)
  out = -weight * _adv_np(advantages, lp.shape) * lp
  return np.where(completion_mask, out, 0.0)


def _gmpo_np(
  token_logps,
  old_token_logps,
  advantages,
  completion_mask,
  epsilon_low=0.4,
  epsilon_high=0.4,
):
  """Eq. 4 of GMPO literally: geometric mean of |min(ρA, clip(ρ)A)|."""
  lp, old = _f64(token_logps, old_token_logps)
  out = np.zeros(lp.shape)
  for b in range(lp.shape[0]):
    m = completion_mask[b]
    a = float(advantages[b])
    if not m.any() or a == 0:
      continue
    rho = np.exp(lp[b, m] - old[b, m])
    terms = np.minimum(
      rho * a, np.clip(rho, math.exp(-epsilon_low), math.exp(epsilon_high)) * a
    )
    j = np.prod(np.abs(terms)) ** (1.0 / m.sum()) * np.sign(a)
    out[b] = -j
  return np.where(completion_mask, out, 0.0)


def _sapo_np(
  token_logps,
  old_token_logps,
  advantages,
  completion_mask,
  temperature_pos=1.0,
  temperature_neg=1.05,
):
  lp, old = _f64(token_logps, old_token_logps)
  ratio = np.exp(lp - old)
  adv = _adv_np(advantages, lp.shape)
  tau = np.where(adv > 0, temperature_pos, temperature_neg)
  gate = 4.0 / tau / (1.0 + np.exp(-tau * (ratio - 1.0)))
  return np.where(completion_mask, -gate * adv, 0.0)


def _stable_reinforce_np(
  token_logps,
  old_token_logps,
  advantages,
  completion_mask,
  epsilon=0.2,
  log_ratio_clip=LOG_1000,
  sigma_threshold=3.0,
):
  lp, old = _f64(token_logps, old_token_logps)
  ratio = np.exp(np.clip(lp - old, -log_ratio_clip, log_ratio_clip))
  adv = _adv_np(advantages, lp.shape)
  out = _clip_np(ratio, adv, 1 - epsilon, 1 + epsilon)
  keep = np.asarray(completion_mask, bool).copy()
  if sigma_threshold is not None:
    rows = completion_mask.any(-1)
    values = np.asarray(advantages, np.float64)[rows]
    mean, std = values.mean(), values.std(ddof=1)
    keep &= np.abs(adv - mean) <= sigma_threshold * std
  return np.where(keep, out, 0.0)


def _empg_advantages_np(
  advantages,
  token_entropies,
  completion_mask,
  step_ids,
  max_steps,
  k,
  k_future,
  zeta,
):
  """The authors' pseudocode, loop by loop."""
  steps, entropies = [], []
  for b in range(completion_mask.shape[0]):
    for s in range(max_steps):
      sel = completion_mask[b] & (step_ids[b] == s)
      if sel.any():
        steps.append((b, s, sel))
        entropies.append(np.mean(token_entropies[b][sel].astype(np.float64)))
  h = np.array(entropies)
  h_norm = (h - h.min()) / (h.max() - h.min() + 1e-8)
  g = np.exp(-k * h_norm)
  g = g / (g.mean() + 1e-8)
  f = np.exp(-k_future * h_norm)
  index = {(b, s): i for i, (b, s, _) in enumerate(steps)}
  out = np.zeros(completion_mask.shape)
  for i, (b, s, sel) in enumerate(steps):
    bonus = zeta * f[index[(b, s + 1)]] if (b, s + 1) in index else 0.0
    out[b][sel] = g[i] * advantages[b] + bonus
  return out


def _empg_np(
  token_logps,
  old_token_logps,
  advantages,
  token_entropies,
  completion_mask,
  step_ids,
  max_steps=1,
  k=1.0,
  k_future=1.0,
  zeta=0.1,
  epsilon_low=0.2,
  epsilon_high=0.2,
):
  adv = _empg_advantages_np(
    advantages,
    token_entropies,
    completion_mask,
    step_ids,
    max_steps,
    k,
    k_future,
    zeta,
  )
  return _grpo_np(
    token_logps,
    old_token_logps,
    adv,
    completion_mask,
    epsilon_low,
    epsilon_high,
  )


def _copg_np(policy_logps, ref_logps, rewards, beta=0.1):
  lp, ref, r = _f64(policy_logps, ref_logps, rewards)
  out = []
  for b in range(lp.shape[0]):
    pairs = []
    for i in range(lp.shape[1]):
      for j in range(i + 1, lp.shape[1]):
        d = (r[b, i] - r[b, j]) - beta * (
          (lp[b, i] - ref[b, i]) - (lp[b, j] - ref[b, j])
        )
        pairs.append(d * d / (2 * beta))
    out.append(np.mean(pairs))
  return np.array(out)


def _prdp_np(
  token_logps, old_token_logps, rewards, completion_mask, beta=1.0, epsilon=0.2
):
  lp, old, r = _f64(token_logps, old_token_logps, rewards)
  pred = beta * np.sum(
    np.where(completion_mask, np.clip(lp - old, -epsilon, epsilon), 0.0), -1
  )
  out = []
  for b in range(lp.shape[0]):
    pairs = [
      ((r[b, i] - r[b, j]) - (pred[b, i] - pred[b, j])) ** 2
      for i in range(lp.shape[1])
      for j in range(i + 1, lp.shape[1])
    ]
    out.append(np.mean(pairs))
  return np.array(out)


def _top_k_np(rewards, num_keep):
  keep = np.zeros(rewards.shape, bool)
  for b in range(rewards.shape[0]):
    keep[b, np.argsort(-rewards[b], kind="stable")[:num_keep]] = True
  return keep


def _raft_np(token_logps, rewards, completion_mask, num_keep=1):
  keep = _top_k_np(rewards, num_keep)[..., None] & completion_mask
  return np.where(keep, -np.asarray(token_logps, np.float64), 0.0)


def _superhf_np(
  token_logps,
  ref_token_logps,
  rewards,
  completion_mask,
  beta=0.1,
  num_keep=1,
  kl_estimator="k3",
):
  assert kl_estimator == "k3"
  lp, ref = _f64(token_logps, ref_token_logps)
  keep = _top_k_np(rewards, num_keep)[..., None] & completion_mask
  x = ref - lp
  return np.where(keep, -lp + beta * (np.exp(x) - 1 - x), 0.0)


# name -> (kind, oracle, hyperparameter sets, bad hyperparameters)
SPECS = {
  "reinforce": ("token", _reinforce_np, [{}], None),
  "ppo": (
    "token",
    _ppo_np,
    [{}, dict(epsilon=0.1, dual_clip=1.2)],
    dict(epsilon=1.5),
  ),
  "grpo": (
    "token",
    _grpo_np,
    [{}, dict(epsilon_low=0.1, epsilon_high=0.3, delta=1.35)],
    dict(delta=1.1),
  ),
  "dapo": (
    "token",
    _dapo_np,
    [{}, dict(epsilon_high=0.1)],
    dict(epsilon_low=1.0),
  ),
  "gspo": (
    "token",
    _gspo_np,
    [{}, dict(epsilon_low=0.05, epsilon_high=0.08)],
    dict(epsilon_high=-0.1),
  ),
  "gspo_token": (
    "token",
    _gspo_np,
    [dict(epsilon_low=0.05, epsilon_high=0.08)],
    dict(epsilon_low=-0.1),
  ),
  "cispo": (
    "token",
    _cispo_np,
    [{}, dict(epsilon_low=0.2, epsilon_high=0.2)],
    dict(epsilon_low=1.5),
  ),
  "gmpo": (
    "token",
    _gmpo_np,
    [{}, dict(epsilon_low=0.1, epsilon_high=0.15)],
    dict(epsilon_low=-0.4),
  ),
  "sapo": (
    "token",
    _sapo_np,
    [{}, dict(temperature_pos=2.0, temperature_neg=4.0)],
    dict(temperature_neg=0.0),
  ),
  "stable_reinforce": (
    "token",
    _stable_reinforce_np,
    [dict(log_ratio_clip=0.3, sigma_threshold=1.0), dict(sigma_threshold=None)],
    dict(sigma_threshold=0.0),
  ),
  "empg": (
    "token",
    _empg_np,
    [
      dict(max_steps=3),
      dict(max_steps=3, k=2.0, k_future=0.5, zeta=0.3, epsilon_high=0.28),
    ],
    dict(zeta=-1.0),
  ),
  "copg": ("group_sequence", _copg_np, [{}, dict(beta=0.5)], dict(beta=0.0)),
  "prdp": (
    "group_token",
    _prdp_np,
    [{}, dict(beta=0.5, epsilon=0.1)],
    dict(epsilon=0.0),
  ),
  "raft": ("group_token", _raft_np, [{}, dict(num_keep=2)], dict(num_keep=0)),
  "superhf": (
    "group_token",
    _superhf_np,
    [{}, dict(beta=0.5, num_keep=2)],
    dict(kl_estimator="k9"),
  ),
}
INPUTS = dict(
  token=_token_inputs(),
  group_token=_group_token_inputs(),
  group_sequence=_group_sequence_inputs(),
)
MASK_ARG = dict(
  token="completion_mask", group_token="completion_mask", group_sequence=None
)
NO_GRAD = (
  "old_token_logps",
  "ref_token_logps",
  "ref_logps",
  "advantages",
  "rewards",
  "token_entropies",
)
NAMES = sorted(SPECS)


def _kind(name):
  return SPECS[name][0]


def _evaluate(fn, inputs, settings):
  """``run(x) -> (losses per setting, (sum of loss, grads))``, one jit.

  The gradient (w.r.t. every float input) uses the last setting. Clean and
  NaN-padded inputs share the one compilation.
  """
  names = [
    n
    for n in _params(fn)
    if n in inputs and np.asarray(inputs[n]).dtype.kind == "f"
  ]

  def scalar(floats, rest):
    return jnp.sum(_call(fn, {**rest, **floats}, **settings[-1])[0])

  def both(floats, rest):
    x = {**rest, **floats}
    return (
      [_call(fn, x, **kw)[0] for kw in settings],
      jax.value_and_grad(scalar)(floats, rest),
    )

  jitted = jax.jit(both)

  def run(x):
    return jitted(
      {n: x[n] for n in names}, {n: v for n, v in x.items() if n not in names}
    )

  return run


class RegistryTest(parameterized.TestCase):
  def test_registry_covers_specs(self):
    self.assertEqual(set(pg.REGISTRY), set(SPECS))
    for name, fn in pg.REGISTRY.items():
      self.assertIn(fn.__name__, pg.__all__, name)

  @parameterized.parameters(*NAMES)
  def test_oracle_padding_and_stop_gradient(self, name):
    fn, (kind, oracle, settings, _) = pg.REGISTRY[name], SPECS[name]
    inputs = INPUTS[kind]
    run = _evaluate(fn, inputs, settings)
    outs, (clean_value, clean_grads) = run(inputs)
    # 1. The float64 NumPy transcription of the paper's equation.
    args = [inputs[n] for n in _params(fn) if n in inputs]
    for kwargs, got in zip(settings, outs, strict=True):
      np.testing.assert_allclose(
        got,
        oracle(*args, **kwargs),
        rtol=2e-5,
        atol=2e-6,
        err_msg=f"{name} {kwargs}",
      )
    # 2. No gradient into old/ref log-probs, advantages, rewards, entropies.
    for arg, g in clean_grads.items():
      if arg in NO_GRAD:
        np.testing.assert_array_equal(g, 0.0, err_msg=f"{name}: {arg}")
    differentiated = (
      "policy_logps" if kind == "group_sequence" else ("token_logps")
    )
    self.assertGreater(np.abs(clean_grads[differentiated]).sum(), 0.0)
    # 3. NaN in padded positions changes neither value nor gradient.
    mask_arg = MASK_ARG[kind]
    if mask_arg is None:
      return
    mask = inputs[mask_arg]
    dirty = {
      n: testing.with_nan_padding(v, mask)
      if np.shape(v) == mask.shape and v.dtype.kind == "f"
      else v
      for n, v in inputs.items()
    }
    dirty_outs, (value, grads) = run(dirty)
    for got, want in zip(dirty_outs, outs, strict=True):
      np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    for arg, g in grads.items():
      self.assertTrue(np.all(np.isfinite(g)), f"{name}: {arg}")
      np.testing.assert_allclose(g, clean_grads[arg], rtol=1e-6, atol=1e-7)

  @parameterized.parameters(*NAMES)
  def test_dtype_shape_contract_and_hyperparameters(self, name):
    fn, (kind, _, _, bad) = pg.REGISTRY[name], SPECS[name]
    inputs = INPUTS[kind]
    bf16 = {
      n: v.astype(jnp.bfloat16) if v.dtype.kind == "f" else v
      for n, v in inputs.items()
    }
    loss, aux = jax.eval_shape(lambda x: _call(fn, x), bf16)
    self.assertEqual(loss.dtype, jnp.float32)
    for leaf in jax.tree.leaves(aux):
      self.assertIn(leaf.dtype, (jnp.float32, jnp.bool_))
    first = _params(fn)[0]
    wrong_rank = {**inputs, first: inputs[first][..., None]}
    with self.assertRaises(jaxtyping.TypeCheckError):
      _call(fn, wrong_rank)
    short = {**inputs, first: inputs[first][:-1]}
    with self.assertRaises(jaxtyping.TypeCheckError):
      _call(fn, short)
    if bad is not None:
      ((arg, _),) = bad.items()
      with self.assertRaisesRegex(ValueError, arg):
        _call(fn, inputs, **bad)


# ------------------------------------------------------------- closed forms


def _token_mean(loss, mask):
  return _masked.aggregate_token_loss(loss, mask).value()


class ClippedSurrogateTest(absltest.TestCase):
  def test_on_policy_gradients(self):
    # ρ = 1: GRPO with token_mean has gradient −A/n_tokens per token, and
    # PPO, DAPO, SAPO, CISPO, GSPO-token and REINFORCE give the same.
    x = _token_inputs()
    mask, adv = x["completion_mask"], x["advantages"]
    fns = (
      pg.grpo_loss,
      pg.reinforce_loss,
      pg.ppo_loss,
      pg.dapo_loss,
      pg.sapo_loss,
      pg.cispo_loss,
      pg.gspo_token_loss,
    )

    def grads(lp):
      on = {**x, "old_token_logps": lp}
      return [
        jax.grad(
          lambda l, f=f: _token_mean(
            _call(f, {**on, "token_logps": l})[0], mask
          )
        )(lp)
        for f in fns
      ]

    out = jax.jit(grads)(x["token_logps"])
    want = np.where(mask, -adv[:, None] / mask.sum(), 0.0)
    for g in out:
      np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8)

  def test_limits_and_flags(self):
    x = _token_inputs()
    mask, adv = x["completion_mask"], x["advantages"]
    lp, old = x["token_logps"], x["old_token_logps"]
    # ρ = [0.5, 2, 10], A = −1, ε = 0.2, dual clip c = 3.
    d_old = np.log(1.0 / np.array([[0.5, 2.0, 10.0]], np.float32))
    d_lp = np.zeros((1, 3), np.float32)
    d_adv, d_mask = np.array([-1.0], np.float32), np.ones((1, 3), bool)
    outer = np.random.RandomState(0).randn(64).astype(np.float32)
    outer[63] = 50.0  # a 10-sigma outlier for StableReinforce's filter
    single = np.zeros((B, T), bool)
    single[:, 0] = True

    def compute():
      dual, dual_aux = pg.ppo_loss(d_lp, d_old, d_adv, d_mask, dual_clip=3.0)
      dual_grad = jax.grad(
        lambda l: jnp.sum(
          pg.ppo_loss(l, d_old, d_adv, d_mask, dual_clip=3.0)[0]
        )
      )(d_lp)
      return dict(
        on_policy=pg.ppo_loss(lp, lp, adv, mask),
        dual=dual,
        dual_aux=dual_aux,
        dual_grad=dual_grad,
        delta=pg.grpo_loss(lp, old - 0.5, adv, mask, delta=1.3)[0],
        dual13=pg.ppo_loss(lp, old - 0.5, adv, mask, dual_clip=1.3)[0],
        grpo=pg.grpo_loss(lp, old, adv, mask),
        dapo=pg.dapo_loss(lp, old, adv, mask)[0],
        gmpo1=pg.gmpo_loss(
          lp, old - 0.3, adv, single, epsilon_low=0.1, epsilon_high=0.2
        )[0],
        grpo1=pg.grpo_loss(
          lp,
          old - 0.3,
          adv,
          single,
          epsilon_low=1 - math.exp(-0.1),
          epsilon_high=math.exp(0.2) - 1,
        )[0],
        stable=pg.stable_reinforce_loss(lp, old, adv, mask),
        ppo=pg.ppo_loss(lp, old, adv, mask)[0],
        filtered=pg.stable_reinforce_loss(
          np.zeros((64, 2), np.float32),
          np.full((64, 2), 20.0, np.float32),
          outer,
          np.ones((64, 2), bool),
        ),
      )

    out = jax.jit(compute)()
    # ρ = 1 gives −A and no clipping.
    np.testing.assert_allclose(
      out["on_policy"][0], np.where(mask, -adv[:, None], 0.0)
    )
    self.assertFalse(np.any(out["on_policy"][1].clipped))
    # Dual clip bounds a negative-advantage loss by c|A| and stops its
    # gradient; the ordinary lower clip also stops it.
    np.testing.assert_allclose(out["dual"], [[0.8, 2.0, 3.0]], rtol=1e-6)
    np.testing.assert_array_equal(
      out["dual_aux"].clipped, [[True, False, True]]
    )
    np.testing.assert_allclose(out["dual_grad"], [[0.0, 2.0, 0.0]], rtol=1e-6)
    # TRL's delta is dual-clip PPO with c = δ.
    np.testing.assert_allclose(out["delta"], out["dual13"], rtol=1e-6)
    # Clip-higher only changes tokens with positive advantages.
    grpo, aux = out["grpo"]
    negative = np.broadcast_to(adv[:, None] <= 0, grpo.shape)
    np.testing.assert_allclose(
      np.where(negative, grpo, 0), np.where(negative, out["dapo"], 0)
    )
    self.assertFalse(np.allclose(grpo, out["dapo"]))
    # Flags: TRL's clip_ratio/region definition; ratio on completion tokens.
    ratio = np.exp(lp.astype(np.float64) - old)
    want = mask & (
      ((ratio > 1.2) & (adv[:, None] > 0))
      | ((ratio < 0.8) & (adv[:, None] < 0))
    )
    np.testing.assert_array_equal(aux.clipped, want)
    np.testing.assert_allclose(aux.ratio, np.where(mask, ratio, 0.0), rtol=1e-6)
    self.assertTrue(np.any(want))
    # GMPO on one-token sequences is GRPO with ε mapped from log space.
    np.testing.assert_allclose(out["gmpo1"], out["grpo1"], rtol=1e-5, atol=1e-7)
    # StableReinforce = PPO when no log-ratio or advantage is extreme.
    stable, stable_aux = out["stable"]
    np.testing.assert_allclose(stable, out["ppo"], rtol=1e-6)
    np.testing.assert_array_equal(stable_aux.kept, mask)
    # ... drops a 10-sigma advantage, and pre-clips absurd log-ratios.
    filtered, filtered_aux = out["filtered"]
    self.assertFalse(np.any(filtered_aux.kept[63]))
    self.assertTrue(np.all(filtered_aux.kept[:63]))
    self.assertTrue(np.all(np.isfinite(filtered)))

  def test_gspo_token_equals_gspo_for_sequence_advantages(self):
    x = _token_inputs()
    mask = x["completion_mask"]
    kw = dict(epsilon_low=0.05, epsilon_high=0.08)
    token_adv = np.random.RandomState(3).randn(B, T).astype(np.float32)

    def grads(fn, advantages, mode):
      return jax.grad(
        lambda lp: _masked.aggregate_token_loss(
          fn(lp, x["old_token_logps"], advantages, mask, **kw)[0],
          mask,
          mode=mode,
        ).value()
      )(x["token_logps"])

    def compute():
      seq = [
        [
          grads(fn, x["advantages"], mode)
          for fn in (pg.gspo_loss, pg.gspo_token_loss)
        ]
        for mode in _masked.AGGREGATION_MODES
      ]
      tok = [
        grads(fn, token_adv, "sequence_mean")
        for fn in (pg.gspo_loss, pg.gspo_token_loss)
      ]
      return seq, tok

    seq, tok = jax.jit(compute)()
    for a, b in seq:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
      self.assertGreater(np.abs(a).sum(), 0.0)
    self.assertFalse(np.allclose(tok[0], tok[1], atol=1e-6))

  def test_cispo_keeps_gradient_of_clipped_tokens(self):
    x = _token_inputs()
    mask, adv = x["completion_mask"], x["advantages"]
    old = x["old_token_logps"] - 1.0  # ratios ≈ e: all above 1 + ε_high

    def grads(lp):
      return [
        jax.grad(
          lambda l, f=f: _token_mean(
            f(l, old, adv, mask, epsilon_high=0.2)[0], mask
          )
        )(lp)
        for f in (pg.cispo_loss, pg.grpo_loss)
      ]

    cispo, grpo = jax.jit(grads)(x["token_logps"])
    want = np.where(mask, -1.2 * adv[:, None] / mask.sum(), 0.0)
    np.testing.assert_allclose(cispo, want, rtol=1e-5, atol=1e-8)
    positive = np.broadcast_to(adv[:, None] > 0, mask.shape)
    np.testing.assert_array_equal(np.where(positive, grpo, 0.0), 0.0)

  def test_sapo_gate_is_smooth_and_bounded(self):
    ratio = np.linspace(0.2, 5.0, 40, dtype=np.float32)[None]
    lp, old = np.log(ratio), np.zeros_like(ratio)
    mask = np.ones_like(lp, bool)
    pos, neg = jax.jit(
      lambda: [
        pg.sapo_loss(lp, old, s * np.ones(1, np.float32), mask)[0]
        for s in (1, -1)
      ]
    )()
    # Loss magnitude bounded by 4/τ and monotone in ρ.
    self.assertTrue(np.all(-np.asarray(pos) < 4.0))
    self.assertTrue(np.all(np.diff(np.asarray(pos)) < 0))
    self.assertTrue(np.all(np.diff(np.asarray(neg)) > 0))
    self.assertLess(float(neg.max()), 4.0 / 1.05)


class EmpgTest(absltest.TestCase):
  def test_modulation_limits(self):
    x = _token_inputs()
    mask = x["completion_mask"]
    args = (x["token_entropies"], mask, x["step_ids"])
    plain, ones = jax.jit(
      lambda: [
        pg.empg_advantages(
          x["advantages"], *args, max_steps=3, k=0.0, zeta=0.0
        ),
        pg.empg_advantages(
          np.ones(B, np.float32), *args, max_steps=3, zeta=0.0
        ),
      ]
    )()
    # k = 0, ζ = 0 leaves the advantages unchanged.
    np.testing.assert_allclose(
      plain, np.where(mask, x["advantages"][:, None], 0.0), rtol=1e-6
    )
    # With A = 1 the modulated advantage is g: mean 1, positive, largest on
    # the most confident step.
    scales, entropies = [], []
    for b in range(B):
      for s in range(3):
        sel = mask[b] & (x["step_ids"][b] == s)
        if sel.any():
          scales.append(np.asarray(ones)[b][sel][0])
          entropies.append(x["token_entropies"][b][sel].mean())
    self.assertAlmostEqual(float(np.mean(scales)), 1.0, places=5)
    self.assertEqual(int(np.argmax(scales)), int(np.argmin(entropies)))
    self.assertTrue(np.all(np.asarray(scales) > 0))

  def test_axis_name_gives_global_statistics(self):
    x = _token_inputs()
    mesh = testing.data_mesh(8)
    spec = jax.sharding.PartitionSpec("data")
    args = (
      x["advantages"],
      x["token_entropies"],
      x["completion_mask"],
      x["step_ids"],
    )

    def local(a, h, m, s):
      return pg.empg_advantages(a, h, m, s, max_steps=3, axis_name="data")

    got = jax.jit(
      jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    )(*args)
    want = pg.empg_advantages(*args, max_steps=3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


class GroupObjectivesTest(absltest.TestCase):
  def test_copg(self):
    x = _group_sequence_inputs()
    beta = 0.1
    ipo_rewards = np.tile(np.array([[0.5, 0.0]], np.float32), (B, 1))
    optimum = x["ref_logps"] + x["rewards"] / 0.5 + 3.0  # π ∝ π_ref e^{R/β}

    def compute():
      grads = [
        jax.grad(
          lambda lp, g=g: jnp.sum(
            pg.copg_loss(
              lp, x["ref_logps"][:, :g], x["rewards"][:, :g], beta=beta
            )[0]
          )
        )(x["policy_logps"][:, :g])
        for g in (2, 4)
      ]
      ipo = pg.copg_loss(
        x["policy_logps"][:, :2], x["ref_logps"][:, :2], ipo_rewards, beta=0.3
      )[0]
      at_optimum = pg.copg_loss(
        optimum, x["ref_logps"], x["rewards"], beta=0.5
      )[0]
      return grads, ipo, at_optimum

    grads, ipo, at_optimum = jax.jit(compute)()
    # G = 2: the gradient is RLOO's (K = 2) on R_β = R − β log π/π_ref with
    # stop-gradient, summed over the pair; for any G it is 2× the RLOO
    # gradient of −mean_i A_i log π(y_i).
    for group, grad in zip((2, 4), grads, strict=True):
      xg = {k: v[:, :group].astype(np.float64) for k, v in x.items()}
      reg = xg["rewards"] - beta * (xg["policy_logps"] - xg["ref_logps"])
      rloo = reg - (reg.sum(-1, keepdims=True) - reg) / (group - 1)
      np.testing.assert_allclose(
        grad, 2 * (-rloo / group), rtol=1e-4, atol=1e-6
      )
      if group == 2:
        np.testing.assert_allclose(
          grad[:, 0], -(reg[:, 0] - reg[:, 1]), rtol=1e-4, atol=1e-6
        )
    # R(y_w) − R(y_l) = ½ gives β/2 times the IPO loss.
    h = (
      (x["policy_logps"][:, 0] - x["ref_logps"][:, 0])
      - (x["policy_logps"][:, 1] - x["ref_logps"][:, 1])
    ).astype(np.float64)
    np.testing.assert_allclose(
      ipo, 0.3 / 2 * (h - 1 / (2 * 0.3)) ** 2, rtol=1e-4
    )
    np.testing.assert_allclose(at_optimum, 0.0, atol=1e-6)

  def test_prdp(self):
    y = _group_token_inputs()
    mask, old = y["completion_mask"], y["old_token_logps"]
    args = [y["token_logps"], old, y["rewards"], mask]
    rewards = 0.05 * y["rewards"]
    optimum = old.copy()
    optimum[..., 0] += rewards / 0.5  # r/β on the first token, within ±ε

    def compute():
      return dict(
        loss=pg.prdp_loss(*args)[0],
        flipped=pg.prdp_loss(*[a[:, ::-1] for a in args])[0],
        grad=jax.grad(
          lambda lp: jnp.sum(pg.prdp_loss(lp, *args[1:], epsilon=0.1)[0])
        )(args[0]),
        optimum=pg.prdp_loss(
          optimum, old, rewards, mask, beta=0.5, epsilon=0.3
        ),
      )

    out = jax.jit(compute)()
    np.testing.assert_allclose(out["loss"], out["flipped"], rtol=1e-5)
    outside = np.abs(args[0] - old) > 0.1
    np.testing.assert_array_equal(np.where(outside, out["grad"], 0.0), 0.0)
    loss, aux = out["optimum"]
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    np.testing.assert_allclose(aux.predicted_rewards, rewards, atol=1e-6)

  def test_raft_and_superhf(self):
    y = _group_token_inputs()
    lp, ref, rewards, mask = (
      y["token_logps"],
      y["ref_token_logps"],
      y["rewards"],
      y["completion_mask"],
    )
    selected = _top_k_np(rewards, 1)

    def compute():
      return dict(
        raft=pg.raft_loss(lp, rewards, mask),
        reinforce=pg.reinforce_loss(
          lp.reshape(B * G, TG),
          selected.reshape(-1).astype(np.float32),
          mask.reshape(B * G, TG),
        )[0],
        every=pg.raft_loss(lp, rewards, mask, num_keep=G),
        no_kl=pg.superhf_loss(lp, ref, rewards, mask, beta=0.0)[0],
        same_ref=pg.superhf_loss(lp, lp, rewards, mask, beta=5.0)[0],
      )

    out = jax.jit(compute)()
    raft, aux = out["raft"]
    # RAFT is REINFORCE with the 0/1 advantage of being selected.
    np.testing.assert_array_equal(aux.selected, selected)
    np.testing.assert_allclose(raft.reshape(B * G, TG), out["reinforce"])
    every, every_aux = out["every"]
    np.testing.assert_array_equal(every_aux.loss_mask, mask)
    np.testing.assert_allclose(every, np.where(mask, -lp, 0.0))
    # SuperHF: β = 0 is RAFT; the KL term vanishes when π = π_ref.
    np.testing.assert_allclose(out["no_kl"], raft)
    np.testing.assert_allclose(out["same_ref"], raft, atol=1e-7)

  def test_best_of_k_mask(self):
    rewards = np.array(
      [[0.0, 2.0, 2.0, np.nan], [3.0, 1.0, 2.0, 0.0]], np.float32
    )
    got = pg.best_of_k_mask(rewards, num_keep=2)
    np.testing.assert_array_equal(
      got, [[False, True, True, False], [True, False, True, False]]
    )
    with self.assertRaisesRegex(ValueError, "num_keep"):
      pg.best_of_k_mask(rewards, num_keep=5)


class RtoTokenRewardsTest(absltest.TestCase):
  def test_matches_oracle_and_limits(self):
    x = _token_inputs()
    mask, ref, lp = (
      x["completion_mask"],
      x["ref_token_logps"],
      x["token_logps"],
    )
    dpo = (ref + 0.3).astype(np.float32)
    seq_rewards = np.random.RandomState(4).randn(B).astype(np.float32)

    def compute():
      return dict(
        out=pg.rto_token_rewards(
          dpo,
          ref,
          lp,
          mask,
          seq_rewards,
          beta_dpo=0.2,
          beta_kl=0.1,
          beta_reward=2.0,
        ),
        sparse=pg.rto_token_rewards(
          ref, ref, lp, mask, seq_rewards, beta_dpo=0.0, beta_kl=0.1
        ),
        plain=pg.rto_token_rewards(
          ref, ref, lp, mask, seq_rewards, beta_dpo=0.7, beta_kl=0.1
        ),
        dpo_only=pg.rto_token_rewards(
          dpo, ref, lp, mask, beta_dpo=0.2, beta_kl=0.0
        ),
        grad=jax.grad(
          lambda l: jnp.sum(pg.rto_token_rewards(dpo, ref, l, mask))
        )(lp),
        dirty=pg.rto_token_rewards(
          testing.with_nan_padding(dpo, mask),
          testing.with_nan_padding(ref, mask),
          testing.with_nan_padding(lp, mask),
          mask,
          seq_rewards,
          beta_dpo=0.2,
          beta_kl=0.1,
          beta_reward=2.0,
        ),
      )

    out = jax.jit(compute)()
    r64, l64 = _f64(ref, lp)
    want = 0.2 * (dpo - r64) - 0.1 * (l64 - r64)
    for b in range(B):
      idx = np.nonzero(mask[b])[0]
      if idx.size:
        want[b, idx[-1]] += 2.0 * seq_rewards[b]
    np.testing.assert_allclose(
      out["out"], np.where(mask, want, 0.0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(out["dirty"], out["out"])
    # π_dpo = π_ref: the DPO term vanishes, and β₁ = 0, β₃ = 1 is
    # sparse-reward PPO-RLHF with a per-token KL penalty.
    np.testing.assert_allclose(out["sparse"], out["plain"], atol=1e-7)
    # Σ_t of the DPO term is β₁ times the sequence log-ratio.
    np.testing.assert_allclose(
      np.sum(out["dpo_only"], -1), 0.2 * 0.3 * mask.sum(-1), rtol=1e-5
    )
    np.testing.assert_array_equal(out["grad"], 0.0)
    with self.assertRaisesRegex(ValueError, "beta_kl"):
      pg.rto_token_rewards(dpo, dpo, dpo, mask, beta_kl=-1.0)


class ValueAndEntropyTest(absltest.TestCase):
  def test_clipped_value_loss(self):
    x = _token_inputs()
    mask = x["completion_mask"]
    arrays = (x["token_logps"], x["old_token_logps"], x["ref_token_logps"])
    dirty = [testing.with_nan_padding(a, mask) for a in arrays]

    def compute():
      return dict(
        clipped=pg.clipped_value_loss(*arrays, mask, clip_range=0.1),
        plain=pg.clipped_value_loss(*arrays, mask, clip_range=None)[0],
        dirty=pg.clipped_value_loss(*dirty, mask, clip_range=0.1)[0],
        grads=jax.grad(
          lambda *a: jnp.sum(pg.clipped_value_loss(*a, mask)[0]),
          argnums=(0, 1, 2),
        )(*dirty),
      )

    out = jax.jit(compute)()
    v, vo, r = _f64(*arrays)
    want = 0.5 * np.maximum(
      (v - r) ** 2, (vo + np.clip(v - vo, -0.1, 0.1) - r) ** 2
    )
    loss, aux = out["clipped"]
    np.testing.assert_allclose(loss, np.where(mask, want, 0.0), rtol=1e-5)
    self.assertTrue(np.any(aux.clipped))
    np.testing.assert_allclose(
      out["plain"], np.where(mask, 0.5 * (v - r) ** 2, 0.0), rtol=1e-5
    )
    np.testing.assert_array_equal(out["dirty"], loss)
    self.assertTrue(np.all(np.isfinite(out["grads"][0])))
    np.testing.assert_array_equal(out["grads"][1], 0.0)
    np.testing.assert_array_equal(out["grads"][2], 0.0)
    with self.assertRaisesRegex(ValueError, "clip_range"):
      pg.clipped_value_loss(*arrays, mask, clip_range=0.0)

  def test_entropy_bonus(self):
    x = _token_inputs()
    mask, h = x["completion_mask"], x["token_entropies"]
    loss, grad = jax.jit(
      lambda: (
        pg.entropy_bonus_loss(h, mask, coefficient=0.1),
        jax.grad(lambda e: jnp.sum(pg.entropy_bonus_loss(e, mask)))(
          testing.with_nan_padding(h, mask)
        ),
      )
    )()
    np.testing.assert_allclose(loss, np.where(mask, -0.1 * h, 0.0), rtol=1e-6)
    np.testing.assert_allclose(grad, np.where(mask, -0.01, 0.0))
    out = jax.eval_shape(
      lambda: pg.entropy_bonus_loss(h.astype(jnp.bfloat16), mask)
    )
    self.assertEqual(out.dtype, jnp.float32)
    with self.assertRaisesRegex(ValueError, "coefficient"):
      pg.entropy_bonus_loss(h, mask, coefficient=-1.0)


class ShardingAndVmapTest(absltest.TestCase):
  def test_sharded_equals_unsharded(self):
    names = ("grpo", "gmpo", "copg", "superhf")

    def some(token, group_token, group_sequence):
      out = {}
      for name in names:
        inputs = dict(
          token=token, group_token=group_token, group_sequence=group_sequence
        )[_kind(name)]
        out[name] = _call(pg.REGISTRY[name], inputs, **SPECS[name][2][-1])
      return out

    testing.assert_sharded_equals_unsharded(
      some,
      (INPUTS["token"], INPUTS["group_token"], INPUTS["group_sequence"]),
      rtol=1e-5,
      atol=1e-6,
    )

  def test_vmap_over_a_leading_axis(self):
    x = _token_inputs()
    stacked = [
      np.stack([x[n], x[n][::-1]])
      for n in (
        "token_logps",
        "old_token_logps",
        "advantages",
        "completion_mask",
      )
    ]
    got, want = jax.jit(
      lambda: (
        jax.vmap(pg.grpo_loss)(*stacked)[0],
        [pg.grpo_loss(*[s[i] for s in stacked])[0] for i in range(2)],
      )
    )()
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-6)


# ------------------------------------------------------------ TRL goldens


def _ours(name, x):
  """Our objective + aggregation for each TRL case, as a function of logps.

  Mapping (TRL 1.16 ``loss_type`` → our aggregation): ``grpo``/``sapo`` →
  ``sequence_mean``; ``bnpo`` → ``token_mean`` on one micro-batch and
  :func:`bnpo_aggregate` over several; ``dr_grpo`` → ``constant_norm`` with
  ``max_tokens = max_completion_length``; ``dapo``/``cispo`` →
  ``token_mean``; TRL's ``epsilon_high`` for ``cispo`` is our
  ``1 + epsilon_high``; GSPO is ``importance_sampling_level="sequence"``;
  GMPO is ``GMPOTrainer``. TRL's KL (``beta``) is ``k3·ρ``
  (``use_bias_correction_kl``) added per token; its entropy bonus is the
  token mean of :func:`entropy_bonus_loss`. Micro-batched TRL runs equal our
  single full-batch value for every mode except ``bnpo``.
  """
  mask, old = x["completion_mask"], x["old_token_logps"]
  adv, ent = x["advantages"], x["token_entropies"]

  def agg(loss, mode="sequence_mean", **kw):
    return _masked.aggregate_token_loss(loss, mask, mode=mode, **kw).value()

  def grpo(lp, **kw):
    return pg.grpo_loss(lp, old, adv, mask, **kw)[0]

  cases = {
    "grpo": lambda lp: agg(grpo(lp)),
    "grpo_on_policy": lambda lp: agg(pg.grpo_loss(lp, lp, adv, mask)[0]),
    "grpo_clip_higher_delta": lambda lp: agg(
      grpo(lp, epsilon_high=0.28, delta=1.4)
    ),
    "grpo_token_advantages": lambda lp: agg(
      pg.grpo_loss(lp, old, x["token_advantages"], mask)[0]
    ),
    "grpo_kl": lambda lp: agg(
      grpo(lp) + 0.04 * _kl.kl_k3(lp, x["ref_token_logps"]) * jnp.exp(lp - old)
    ),
    "bnpo": lambda lp: agg(grpo(lp), "token_mean"),
    "bnpo_two_micro_batches": lambda lp: pg.bnpo_aggregate(
      grpo(lp), mask, num_micro_batches=2
    ),
    "dr_grpo": lambda lp: agg(grpo(lp), "constant_norm", max_tokens=16),
    "dapo": lambda lp: agg(pg.dapo_loss(lp, old, adv, mask)[0], "token_mean"),
    "dapo_entropy_bonus": lambda lp: (
      agg(pg.dapo_loss(lp, old, adv, mask)[0], "token_mean")
      + agg(pg.entropy_bonus_loss(ent, mask, coefficient=0.01), "token_mean")
    ),
    "cispo": lambda lp: agg(
      pg.cispo_loss(lp, old, adv, mask, epsilon_high=0.3)[0], "token_mean"
    ),
    "sapo": lambda lp: agg(pg.sapo_loss(lp, old, adv, mask)[0]),
    "gspo": lambda lp: agg(
      pg.gspo_loss(lp, old, adv, mask, epsilon_low=0.04, epsilon_high=0.05)[0]
    ),
    "gmpo": lambda lp: agg(pg.gmpo_loss(lp, old, adv, mask)[0]),
    "gmpo_narrow": lambda lp: agg(
      pg.gmpo_loss(lp, old, adv, mask, epsilon_low=0.1, epsilon_high=0.15)[0]
    ),
  }
  return cases[name]


_GOLDEN_CASES = sorted(json.loads(GOLDENS.read_text())["cases"])
# TRL runs split into micro-batches are compared with our full-batch value:
# accumulating (total, weight) makes them identical by construction.
_SAME_AS = {
  "grpo_two_micro_batches": "grpo",
  "dr_grpo_two_micro_batches": "dr_grpo",
  "dapo_four_micro_batches": "dapo",
}


class TrlGoldensTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    data = json.loads(GOLDENS.read_text())
    cls.inputs = {
      k: np.asarray(v, bool if k == "completion_mask" else np.float32)
      for k, v in data["inputs"].items()
    }
    cls.cases = data["cases"]
    cls.ours = jax.jit(
      lambda lp: {
        n: jax.value_and_grad(_ours(n, cls.inputs))(lp)
        for n in _GOLDEN_CASES
        if n not in _SAME_AS
      }
    )(cls.inputs["token_logps"])

  @parameterized.parameters(*_GOLDEN_CASES)
  def test_matches_trl(self, name):
    value, grad = self.ours[_SAME_AS.get(name, name)]
    case = self.cases[name]
    np.testing.assert_allclose(value, case["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
      grad, np.asarray(case["grad"]), rtol=1e-5, atol=1e-7
    )

  def test_goldens_exercise_clipping_and_bnpo_differs(self):
    x = self.inputs
    mask = x["completion_mask"]
    log_ratio = x["token_logps"].astype(np.float64) - x["old_token_logps"]
    ratio = np.exp(log_ratio)
    adv = x["advantages"][:, None]
    seq = np.exp(np.sum(np.where(mask, log_ratio, 0), -1) / mask.sum(-1))
    clipped = [
      ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0)),  # grpo
      ratio > 1.3,  # cispo
      ((seq[:, None] > 1.05) & (adv > 0))
      | ((seq[:, None] < 0.96) & (adv < 0)),  # gspo
      ((log_ratio > 0.15) & (adv > 0))
      | ((log_ratio < -0.1) & (adv < 0)),  # gmpo_narrow
    ]
    for c in clipped:
      fraction = np.mean(np.broadcast_to(c, mask.shape)[mask])
      self.assertBetween(float(fraction), 0.05, 0.95)
    self.assertNotAlmostEqual(
      self.cases["bnpo_two_micro_batches"]["loss"],
      self.cases["bnpo"]["loss"],
      places=4,
    )


if __name__ == "__main__":
  absltest.main()
