"""Writes rlax goldens for the masked return estimators in advantages/_gae.py.

Run in the oracle venv (jax + rlax 0.1.9), never in CI:

  .venv-rlax/bin/python tests/oracles/rlax_goldens.py

It builds a ragged, right-padded float64 batch (including a row with no
valid token and a full row), and for each (gamma, lambda) configuration
computes with rlax, row by row on the valid prefix of length L:

* GAE: ``truncated_generalized_advantage_estimation(r[:L], gamma*1, lam,
  concat(v[:L], [bootstrap]))``;
* TD(lambda) returns: ``lambda_returns(r[:L], gamma*1,
  concat(v[1:L], [bootstrap]), lam)``;
* discounted returns: ``discounted_returns(r[:L], gamma*1, bootstrap)``.

Padded positions are 0 in the goldens. As a cross-check it also evaluates the
batched mapping of anchors.md section 9.3 (``vmap`` over the padded rows with
``discount_t = gamma * mask[t+1]``, bootstrap 0) and asserts it agrees with
the row-by-row result to 1e-12. Output:
``tests/testdata/goldens/rlax_multistep.json``.
"""

import json
import pathlib

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import rlax  # noqa: E402

OUT = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "goldens"
  / "rlax_multistep.json"
)
CONFIGS = [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.97, 0.5)]
LENGTHS = [9, 5, 0, 1, 7, 3]
T = 9


def _batch(seed, truncated):
  rng = np.random.default_rng(seed)
  b = len(LENGTHS)
  mask = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
  rewards = rng.normal(size=(b, T))
  values = rng.normal(size=(b, T))
  boot = rng.normal(size=(b,)) if truncated else np.zeros(b)
  boot = np.where(np.asarray(LENGTHS) > 0, boot, 0.0)
  return rewards, values, mask, boot


def _row_by_row(rewards, values, mask, boot, gamma, lam):
  outs = {k: np.zeros_like(rewards) for k in ("gae", "lambda", "disc")}
  for i, length in enumerate(mask.sum(1)):
    if length == 0:
      continue
    r = jnp.asarray(rewards[i, :length])
    v = jnp.asarray(values[i, :length])
    disc = gamma * jnp.ones(length)
    b = jnp.asarray(boot[i])
    outs["gae"][i, :length] = rlax.truncated_generalized_advantage_estimation(
      r, disc, lam, jnp.concatenate([v, b[None]])
    )
    outs["lambda"][i, :length] = rlax.lambda_returns(
      r, disc, jnp.concatenate([v[1:], b[None]]), lam
    )
    outs["disc"][i, :length] = rlax.discounted_returns(r, disc, b)
  return outs


def _anchor_mapping(rewards, values, mask, gamma, lam):
  """anchors.md 9.3: vmap over padded rows, bootstrap 0."""

  def one(r, v, m):
    v_ext = jnp.concatenate([v, jnp.zeros(1)])
    disc = gamma * jnp.concatenate([m[1:], jnp.zeros(1)])
    return (
      rlax.truncated_generalized_advantage_estimation(r, disc, lam, v_ext) * m
    )

  return np.asarray(
    jax.vmap(one)(
      jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask, jnp.float64)
    )
  )


def main():
  cases = []
  for seed, truncated in ((0, False), (1, True)):
    rewards, values, mask, boot = _batch(seed, truncated)
    for gamma, lam in CONFIGS:
      outs = _row_by_row(rewards, values, mask, boot, gamma, lam)
      if not truncated:
        anchor = _anchor_mapping(rewards, values, mask, gamma, lam)
        np.testing.assert_allclose(anchor, outs["gae"], rtol=0, atol=1e-12)
      cases.append(
        {
          "gamma": gamma,
          "lam": lam,
          "truncated": truncated,
          "rewards": rewards.tolist(),
          "values": values.tolist(),
          "completion_mask": mask.tolist(),
          "bootstrap_values": boot.tolist(),
          "gae_advantages": outs["gae"].tolist(),
          "lambda_returns": outs["lambda"].tolist(),
          "discounted_returns": outs["disc"].tolist(),
        }
      )
  payload = {
    "generator": "tests/oracles/rlax_goldens.py",
    "rlax_version": rlax.__version__,
    "jax_version": jax.__version__,
    "dtype": "float64",
    "cases": cases,
  }
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(json.dumps(payload, indent=None, separators=(",", ":")))
  print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
  main()
