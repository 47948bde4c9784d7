r"""Generates TRL RewardTrainer loss goldens for tests/losses/reward_model_test.py.

Run in the oracle venv (torch 2.13 CPU, trl 1.16.0), never in CI:

  .venv-oracle/bin/python tests/oracles/trl_reward_goldens.py

Route: this script **executes TRL's own code**. It calls the unbound
``trl.RewardTrainer.compute_loss`` with a stub ``self`` (eval mode, identity
gathers) and a stub model whose forward returns the fixed scores as
``logits`` in TRL's ``[chosen; rejected]`` layout, so the Bradley–Terry loss,
the optional per-pair ``margin`` and the ``center_rewards_coefficient`` term
are TRL's. The gradient with respect to the scores comes from torch autograd
through the same code. Computation is float64 on float32-exact inputs.

Output: tests/testdata/goldens/trl_reward_model.json (inputs, per-case
settings, the batch-mean loss and its gradient).
"""

import json
import pathlib
import types
from collections import defaultdict

import numpy as np
import torch
import trl
from trl import RewardTrainer

OUT = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "goldens"
  / "trl_reward_model.json"
)
B = 8


def trl_loss(chosen, rejected, margin, center):
  scores = torch.tensor(
    np.concatenate([chosen, rejected]), dtype=torch.float64, requires_grad=True
  )
  model = lambda **kwargs: types.SimpleNamespace(logits=scores[:, None])
  model.training = False
  stub = types.SimpleNamespace(
    model=model,
    args=types.SimpleNamespace(center_rewards_coefficient=center),
    accelerator=types.SimpleNamespace(
      gather=lambda x: x, gather_for_metrics=lambda x: x
    ),
    _metrics=defaultdict(lambda: defaultdict(list)),
    _total_train_tokens=0,
  )
  inputs = {}
  if margin is not None:
    inputs["margin"] = torch.tensor(margin, dtype=torch.float64)
  loss = RewardTrainer.compute_loss(stub, model, inputs)
  loss.backward()
  grad = scores.grad.numpy()
  return float(loss.detach()), grad[:B].tolist(), grad[B:].tolist()


def main():
  rng = np.random.default_rng(0)
  chosen = rng.normal(0.3, 1.5, B).astype(np.float32)
  rejected = rng.normal(-0.2, 1.5, B).astype(np.float32)
  margin = rng.uniform(0.0, 2.0, B).astype(np.float32)
  cases = []
  for name, use_margin, center in [
    ("plain", False, None),
    ("margin", True, None),
    ("center", False, 0.01),
    ("margin_center", True, 0.05),
  ]:
    m = margin.astype(np.float64) if use_margin else None
    loss, g_c, g_r = trl_loss(
      chosen.astype(np.float64), rejected.astype(np.float64), m, center
    )
    cases.append(
      {
        "name": name,
        "use_margin": use_margin,
        "center_rewards_coefficient": center or 0.0,
        "loss": loss,
        "grad_chosen": g_c,
        "grad_rejected": g_r,
      }
    )
  OUT.write_text(
    json.dumps(
      {
        "source": f"trl {trl.__version__} RewardTrainer.compute_loss",
        "chosen_rewards": chosen.tolist(),
        "rejected_rewards": rejected.tolist(),
        "margin": margin.tolist(),
        "cases": cases,
      },
      indent=1,
    )
  )
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
