"""Tests for alignment/advantages/_group.py (critic-free group estimators).

Oracles are float64 NumPy loops over groups that transcribe the papers and
the TRL / verl code paths (anchors.md section 9.4), not our implementation.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import PartitionSpec as P

from alignment import advantages
from alignment.advantages import _group
from tests import testing

B, G, K, T = 8, 4, 2, 5


def _data(seed=0):
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(B, G)).astype(np.float32)
  rewards[1] = 0.3  # all-equal group
  rewards[2, :2] = rewards[2, 2]  # ties
  binary = (rng.uniform(size=(B, G)) > 0.5).astype(np.float32)
  binary[3] = 1.0
  mask = rng.uniform(size=(B, G)) > 0.2
  mask[0] = True
  mask[4] = [True, False, False, False]  # a single valid sample
  mask[5] = [True, True, False, True]
  lengths = rng.integers(1, T + 1, size=(B, G)).astype(np.int32)
  multi = rng.normal(size=(B, G, K)).astype(np.float32)
  multi[6, :, 0] = 1.0
  baseline = rng.normal(size=(B,)).astype(np.float32)
  return dict(
    rewards=rewards,
    binary=binary,
    mask=mask,
    lengths=lengths,
    multi=multi,
    baseline=baseline,
  )


# ----------------------------------------------------------------------------
# float64 oracles (one group at a time).


def _per_group(fn, rewards, mask, *extra):
  out = np.zeros(rewards.shape[:2])
  for b in range(rewards.shape[0]):
    keep = mask[b]
    if keep.any():
      out[b, keep] = fn(
        rewards[b, keep].astype(np.float64),
        *(e[b, keep].astype(np.float64) for e in extra),
      )
  return out


def _np_grpo(x, eps=1e-6, scale=True):
  if len(x) < 2 or np.all(x == x[0]):
    return np.zeros_like(x)
  c = x - x.mean()
  return c / (x.std(ddof=1) + eps) if scale else c


def _np_rloo(x):
  if len(x) < 2 or np.all(x == x[0]):
    return np.zeros_like(x)
  return np.array([x[i] - np.delete(x, i).mean() for i in range(len(x))])


def _np_opo(x, lengths):
  if np.all(x == x[0]):
    return np.zeros_like(x)
  return x - (lengths * x).sum() / lengths.sum()


def _np_pass_at_k_enumerated(x, k, thr=0.5, eps=1e-6):
  """A_i = mean over k-subsets containing i of (pass@k(subset) - R)/sigma."""
  n = len(x)
  if n < k:
    return np.zeros_like(x)
  passed = x > thr
  subsets = list(itertools.combinations(range(n), k))
  score = {s: float(passed[list(s)].any()) for s in subsets}
  mean = np.mean(list(score.values()))
  std = math.sqrt(mean * (1 - mean))
  return np.array(
    [
      np.mean([(score[s] - mean) / (std + eps) for s in subsets if i in s])
      for i in range(n)
    ]
  )


def _np_passk_authors(x, k, eps=1e-6):
  """The authors' calc_adv (RUCAIBox/Passk_Training), with math.comb."""
  n, c = len(x), int((x == 1).sum())
  rho = 1 - math.comb(n - c, k) / math.comb(n, k)
  sigma = math.sqrt(rho * (1 - rho))
  pos = (1 - rho) / (sigma + eps)
  neg_ratio = (
    math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1) if n - c >= 1 else 0.0
  )
  neg = (1 - rho - neg_ratio) / (sigma + eps)
  return np.where(x == 1, pos, neg)


def _np_best_of_group(x, eps=1e-6):
  """verl compute_grpo_passk_outcome_advantage for one group."""
  out = np.zeros_like(x)
  if len(x) < 2:
    return out
  order = np.argsort(-x, kind="stable")
  out[order[0]] = (x[order[0]] - x[order[1]]) / (x.std(ddof=1) + eps)
  return out


def _np_batch_std(values, weights):
  total = weights.sum()
  mean = (weights * values).sum() / total
  var = (weights * (values - mean) ** 2).sum() / (total - 1)
  return mean, math.sqrt(var)


def _oracle_grpo_batch(d, eps=1e-6):
  r, m = d["rewards"].astype(np.float64), d["mask"]
  std = r[m].std(ddof=1)
  centred = _per_group(lambda x: _np_grpo(x, scale=False), r, m)
  return centred / (std + eps)


def _oracle_reinforce_pp_baseline(d, eps=1e-8):
  """verl: group mean subtraction, tile to tokens, masked_whiten on tokens."""
  r, m, lengths = d["rewards"], d["mask"], d["lengths"]
  centred = _per_group(lambda x: x - x.mean(), r, m)
  token_mask = (np.arange(T)[None, None] < lengths[..., None]) & m[..., None]
  tokens = np.where(token_mask, centred[..., None], 0.0)
  vals = tokens[token_mask]
  mean, var = vals.mean(), vals.var(ddof=1)
  whitened = (tokens - mean) / np.sqrt(var + eps)
  return np.where(m, whitened[..., 0], 0.0)


def _oracle_gpg(d):
  r, m = d["rewards"], d["mask"]
  zero = 0
  for b in range(B):
    x = r[b, m[b]]
    zero += len(x) if np.all(x == x[0]) else 0
  alpha = m.sum() / (m.sum() - zero)
  return alpha * _per_group(lambda x: _np_grpo(x, scale=False), r, m)


def _oracle_gdpo(d, weights=(1.0, 0.5), eps=1e-6):
  """TRL normalize_then_sum (grpo_trainer.py, 1.16.0) with mask as NaN."""
  r, m = d["multi"].astype(np.float64), d["mask"]
  summed = np.zeros((B, G))
  for k, w in enumerate(weights):
    summed += w * _per_group(lambda x: _np_grpo(x, eps=eps), r[..., k], m)
  vals = summed[m]
  if np.all(vals == vals[0]):
    return np.zeros((B, G))
  return np.where(m, (summed - vals.mean()) / (vals.std(ddof=1) + eps), 0.0)


# Registry-driven cases: name -> (oracle(data), call(fn, data)).
CASES = {
  "grpo": (
    lambda d: _per_group(_np_grpo, d["rewards"], d["mask"]),
    lambda f, d: f(d["rewards"], d["mask"]),
  ),
  "dr_grpo": (
    lambda d: _per_group(
      functools.partial(_np_grpo, scale=False), d["rewards"], d["mask"]
    ),
    lambda f, d: f(d["rewards"], d["mask"]),
  ),
  "rloo": (
    lambda d: _per_group(_np_rloo, d["rewards"], d["mask"]),
    lambda f, d: f(d["rewards"], d["mask"]),
  ),
  "reinforce_pp_baseline": (
    _oracle_reinforce_pp_baseline,
    lambda f, d: f(d["rewards"], d["mask"], d["lengths"]),
  ),
  "remax": (
    lambda d: np.where(d["mask"], d["rewards"] - d["baseline"][:, None], 0.0),
    lambda f, d: f(d["rewards"], d["baseline"], d["mask"]),
  ),
  "opo": (
    lambda d: _per_group(_np_opo, d["rewards"], d["mask"], d["lengths"]),
    lambda f, d: f(d["rewards"], d["lengths"], d["mask"]),
  ),
  "gpg": (_oracle_gpg, lambda f, d: f(d["rewards"], d["mask"])),
  "pass_at_k": (
    lambda d: _per_group(
      functools.partial(_np_pass_at_k_enumerated, k=2), d["binary"], d["mask"]
    ),
    lambda f, d: f(d["binary"], d["mask"], k=2),
  ),
  "grpo_passk": (
    lambda d: _per_group(_np_best_of_group, d["rewards"], d["mask"]),
    lambda f, d: f(d["rewards"], d["mask"]),
  ),
  "gdpo": (
    _oracle_gdpo,
    lambda f, d: f(d["multi"], d["mask"], reward_weights=(1.0, 0.5)),
  ),
}


class RegistryTest(parameterized.TestCase):
  def test_registry_is_complete(self):
    self.assertContainsSubset(
      set(CASES) | {"reinforce_pp"}, set(_group.REGISTRY)
    )
    for name, fn in _group.REGISTRY.items():
      self.assertIs(advantages.REGISTRY[name], fn)

  @parameterized.named_parameters((n, n) for n in sorted(CASES))
  def test_matches_oracle_nan_padding_and_no_gradient(self, name):
    oracle, call = CASES[name]
    fn = _group.REGISTRY[name]
    d = _data()
    jitted = jax.jit(lambda d: call(fn, d))
    got = jitted(d)
    self.assertEqual(got.dtype, jnp.float32)
    self.assertEqual(got.shape, (B, G))
    np.testing.assert_allclose(got, oracle(d), rtol=2e-5, atol=2e-5)
    self.assertFalse(np.any(np.isnan(got)))
    np.testing.assert_array_equal(np.asarray(got)[~d["mask"]], 0.0)
    # NaN in masked samples changes nothing and no gradient reaches inputs.
    nan = dict(d)
    nan["rewards"] = testing.with_nan_padding(d["rewards"], d["mask"])
    nan["binary"] = testing.with_nan_padding(d["binary"], d["mask"])
    nan["multi"] = np.where(d["mask"][..., None], d["multi"], np.nan)
    np.testing.assert_array_equal(jitted(nan), got)
    floats = {k: v for k, v in nan.items() if v.dtype == np.float32}
    grads = jax.jit(jax.grad(lambda fl: jnp.sum(call(fn, {**nan, **fl}))))(
      floats
    )
    for g in jax.tree.leaves(grads):
      np.testing.assert_array_equal(g, np.zeros_like(g))
    # bf16 in, float32 out.
    bf16 = {
      k: (v.astype(jnp.bfloat16) if v.dtype == np.float32 else v)
      for k, v in d.items()
    }
    out = jax.eval_shape(lambda d: call(fn, d), bf16)  # traces, no compile
    self.assertEqual(out.dtype, jnp.float32)


class GroupEstimatorTest(parameterized.TestCase):
  def test_grpo_scalings_and_epsilon(self):
    d = _data(1)
    r, m = d["rewards"], d["mask"]
    np.testing.assert_allclose(
      _group.grpo_advantages(r, m, scale="batch"),
      _oracle_grpo_batch(d),
      rtol=1e-5,
      atol=1e-5,
    )
    # TRL uses epsilon = 1e-4 where verl/Tunix (our default) use 1e-6.
    trl = _per_group(functools.partial(_np_grpo, eps=1e-4), r, m)
    np.testing.assert_allclose(
      _group.grpo_advantages(r, m, epsilon=1e-4), trl, rtol=1e-5, atol=1e-5
    )
    self.assertGreater(
      np.abs(np.asarray(_group.grpo_advantages(r, m)) - trl).max(), 1e-6
    )
    np.testing.assert_allclose(
      _group.grpo_advantages(r, m, scale="none"),
      _group.dr_grpo_advantages(r, m),
    )
    # Dr. GRPO is (n-1)/n times RLOO (full groups).
    np.testing.assert_allclose(
      _group.dr_grpo_advantages(r),
      (G - 1) / G * _group.rloo_advantages(r),
      rtol=1e-5,
      atol=1e-6,
    )
    # GRPO advantages sum to 0 per group and have unit Bessel std.
    full = _group.grpo_advantages(r)
    np.testing.assert_allclose(np.sum(full, 1), 0.0, atol=1e-5)
    np.testing.assert_allclose(
      np.std(np.asarray(full)[0], ddof=1), 1.0, rtol=1e-4
    )

  def test_all_equal_and_degenerate_groups_are_exactly_zero(self):
    # 0.1 is not exact in binary: a naive (r - mean) / (0 + eps) gives
    # ulp / eps != 0.
    r = np.full((2, 3), 0.1, np.float32)
    r[1] = [0.7, 0.7, 0.7]

    def everything(r):
      outs = [
        _group.REGISTRY[n](r)
        for n in ("grpo", "dr_grpo", "rloo", "gpg", "grpo_passk")
      ]
      outs += [
        _group.opo_advantages(r, jnp.ones_like(r)),
        _group.gdpo_advantages(jnp.stack([r, r], -1)),
        _group.pass_at_k_advantages(jnp.ones_like(r), k=2),
        _group.pass_at_k_advantages(jnp.zeros_like(r), k=2),
      ]
      outs += [
        _group.grpo_advantages(r, scale=s, epsilon=0.0)
        for s in ("batch", "none")
      ]
      return outs

    for i, out in enumerate(jax.jit(everything)(r)):
      np.testing.assert_array_equal(out, 0.0, err_msg=str(i))

  def test_pass_at_k(self):
    d = _data(2)
    x, m = d["binary"], d["mask"]
    for k in (1, 2, 3):
      want = _per_group(
        functools.partial(_np_passk_authors, k=k),
        x,
        m & (m.sum(1, keepdims=True) >= k),
      )
      want = np.where(m.sum(1, keepdims=True) >= k, want, 0.0)
      np.testing.assert_allclose(
        _group.pass_at_k_advantages(x, m, k=k), want, rtol=1e-5, atol=1e-5
      )
    # k = 1 is GRPO with the population std.
    pop = _per_group(
      lambda v: (v - v.mean()) / (v.std() + 1e-6) if len(v) > 1 else 0 * v, x, m
    )
    np.testing.assert_allclose(
      _group.pass_at_k_advantages(x, m, k=1), pop, rtol=1e-5, atol=1e-5
    )
    with self.assertRaisesRegex(ValueError, "k must"):
      _group.pass_at_k_advantages(x, k=G + 1)
    with self.assertRaisesRegex(ValueError, "k must"):
      _group.pass_at_k_advantages(x, k=0)

  def test_gpg_and_reinforce_pp(self):
    d = _data(3)
    r, m = d["rewards"], d["mask"]
    np.testing.assert_allclose(
      _group.gpg_advantages(r, m, alpha=1.0),
      _per_group(functools.partial(_np_grpo, scale=False), r, m),
      atol=1e-6,
    )
    np.testing.assert_allclose(
      _group.gpg_advantages(r, m, alpha=1.0, normalize_std=True),
      _per_group(_np_grpo, r, m),
      rtol=1e-5,
      atol=1e-5,
    )
    # REINFORCE++: reverse cumsum then whitening over all valid tokens.
    rng = np.random.default_rng(3)
    tok = rng.normal(size=(B, T)).astype(np.float32)
    tmask = np.arange(T)[None] < rng.integers(1, T + 1, size=(B, 1))
    got = _group.reinforce_plus_plus_advantages(tok, tmask, gamma=0.9)
    ret = np.zeros((B, T))
    for b in range(B):
      run = 0.0
      for t in reversed(range(T)):
        run = (tok[b, t] + 0.9 * run) * tmask[b, t]
        ret[b, t] = run
    vals = ret[tmask]
    want = np.where(
      tmask, (ret - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8), 0.0
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Without lengths every sample has weight 1 in REINFORCE++-baseline.
    centred = _per_group(lambda x: x - x.mean(), r, m)
    mean, std = _np_batch_std(centred[m], np.ones(m.sum()))
    np.testing.assert_allclose(
      _group.reinforce_plus_plus_baseline_advantages(r, m),
      np.where(m, (centred - mean) / np.sqrt(std**2 + 1e-8), 0.0),
      rtol=1e-5,
      atol=1e-5,
    )

  def test_reshape_to_groups(self):
    flat = np.arange(12.0)
    grouped = _group.reshape_to_groups(flat, group_size=3)
    np.testing.assert_array_equal(grouped, flat.reshape(4, 3))
    np.testing.assert_array_equal(_group.flatten_groups(grouped), flat)
    self.assertEqual(
      _group.reshape_to_groups(np.zeros((6, 5)), group_size=2).shape, (3, 2, 5)
    )
    with self.assertRaisesRegex(ValueError, "group_size=5"):
      _group.reshape_to_groups(flat, group_size=5)
    with self.assertRaisesRegex(ValueError, "group_size"):
      _group.reshape_to_groups(flat, group_size=0)

  def test_errors(self):
    d = _data()
    r = d["rewards"]
    for name in (
      "grpo",
      "dr_grpo",
      "rloo",
      "reinforce_pp_baseline",
      "opo",
      "gpg",
      "grpo_passk",
    ):
      fn = _group.REGISTRY[name]
      args = (r[:, :1], np.ones((B, 1))) if name == "opo" else (r[:, :1],)
      with self.assertRaisesRegex(ValueError, "rewards has group size G=1"):
        fn(*args)
    with self.assertRaisesRegex(ValueError, "G=1"):
      _group.gdpo_advantages(d["multi"][:, :1])
    with self.assertRaisesRegex(ValueError, "G=1"):
      _group.pass_at_k_advantages(r[:, :1], k=1)
    # ReMax is not a group estimator: one sample per prompt is its setting.
    self.assertEqual(
      _group.remax_advantages(r[:, :1], d["baseline"]).shape, (B, 1)
    )
    with self.assertRaisesRegex(ValueError, "scale"):
      _group.grpo_advantages(r, scale="prompt")
    with self.assertRaisesRegex(ValueError, "epsilon"):
      _group.grpo_advantages(r, epsilon=-1.0)
    with self.assertRaisesRegex(ValueError, "alpha"):
      _group.gpg_advantages(r, alpha=0.0)
    with self.assertRaisesRegex(ValueError, "reward_weights"):
      _group.gdpo_advantages(d["multi"], reward_weights=(1.0,))
    with self.assertRaises(jaxtyping.TypeCheckError):
      _group.grpo_advantages(r[0])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _group.grpo_advantages(r, d["mask"][:-1])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _group.remax_advantages(r, d["baseline"][:-1])
    with self.assertRaises(jaxtyping.TypeCheckError):
      _group.opo_advantages(r, d["lengths"][:, :-1])

  def test_vmap(self):
    d = _data(4)
    out = jax.jit(jax.vmap(_group.grpo_advantages))(
      np.stack([d["rewards"]] * 2)
    )
    np.testing.assert_allclose(
      out[1], _group.grpo_advantages(d["rewards"]), rtol=1e-6
    )


class ShardingTest(absltest.TestCase):
  """Batch statistics: per-device results under shard_map equal global."""

  def test_shard_map_axis_name_equals_global(self):
    d = _data(5)
    d = {
      k: np.concatenate(
        [v, v[::-1] * 0.5 if v.dtype == np.float32 else v[::-1]]
      )
      for k, v in d.items()
    }
    rng = np.random.default_rng(5)
    tok = rng.normal(size=(2 * B, T)).astype(np.float32)
    tmask = np.arange(T)[None] < rng.integers(1, T + 1, size=(2 * B, 1))

    def all_estimators(r, m, lengths, multi, tok, tmask, axis_name=None):
      return (
        _group.grpo_advantages(r, m, scale="batch", axis_name=axis_name),
        _group.gpg_advantages(r, m, axis_name=axis_name),
        _group.gdpo_advantages(multi, m, axis_name=axis_name),
        _group.reinforce_plus_plus_baseline_advantages(
          r, m, lengths, axis_name=axis_name
        ),
        _group.reinforce_plus_plus_advantages(tok, tmask, axis_name=axis_name),
      )

    args = (d["rewards"], d["mask"], d["lengths"], d["multi"], tok, tmask)
    want = jax.jit(all_estimators)(*args)
    mesh = testing.data_mesh(8)
    sharded = jax.jit(
      jax.shard_map(
        functools.partial(all_estimators, axis_name="data"),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
      )
    )
    got = sharded(*args)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Without axis_name each device would use local statistics.
    batch_grpo = lambda r, m: _group.grpo_advantages(r, m, scale="batch")
    local = jax.jit(
      jax.shard_map(
        batch_grpo, mesh=mesh, in_specs=P("data"), out_specs=P("data")
      )
    )
    self.assertGreater(
      np.abs(np.asarray(local(*args[:2]) - want[0])).max(), 1e-3
    )
    # Plain jit on sharded global arrays (GSPMD) needs no axis_name.
    testing.assert_sharded_equals_unsharded(batch_grpo, args[:2], rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
