"""Writes TRL 0.28 goldens for the reference-free and unpaired losses.

Read by tests/losses/reference_free_test.py. How to run (from the repository
root; needs the git-ignored ``.venv-trl028`` of environment.md section 4, not
CI):

  .venv-trl028/bin/python tests/oracles/trl_unpaired_goldens.py

It writes ``tests/testdata/goldens/trl_unpaired_0_28.json`` holding fixed
random inputs and TRL's outputs. Every TRL loss is called unbound with a stub
``self`` in float64:

* ``CPOTrainer.cpo_loss`` with ``loss_type="sigmoid"`` (CPO's preference term)
  and ``"simpo"`` (fed per-token average log-probs, as TRL's forward pass
  does for SimPO);
* ``ORPOTrainer.odds_ratio_loss`` (fed average log-probs; it returns
  ``beta * log σ(log odds)``, the negative of the paper's weighted term);
* ``KTOTrainer.kto_loss`` with ``calculate_KL`` on (the mismatched-pair KL
  estimate, clamped at 0) and off, including a batch with no undesirable
  rows. TRL returns the desirable rows' losses first, then the undesirable;
  the row order is recorded;
* ``BCOTrainer.bco_loss`` over two batches through a real ``RunningMoments``
  (the reward shift δ is updated with each batch before use), with and
  without underlying-distribution matching (``_get_chosen_prob`` is stubbed
  to return given classifier probabilities).

The NLL terms of CPO/ORPO are computed by TRL from logits outside these
functions, so they are not part of the goldens (the tests check them against
a NumPy oracle).
"""

import json
import os
import pathlib
import types

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402
from trl.experimental.bco import BCOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.kto import KTOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.utils import RunningMoments  # noqa: E402

OUT = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "goldens"
  / "trl_unpaired_0_28.json"
)
B = 8


def _t(x):
  return torch.tensor(np.asarray(x, np.float64), dtype=torch.float64)


def _np(x):
  return np.asarray(x.detach().cpu().numpy(), np.float64).tolist()


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  chosen_len = np.array([7, 1, 4, 6, 3, 5, 7, 2])
  rejected_len = np.array([3, 5, 7, 2, 6, 1, 7, 4])
  # Sums of per-token log-probs (each token log-prob in about [-3, -0.01]).
  pc = -np.array([rng.gamma(2.0, 0.6, n).sum() for n in chosen_len])
  pr = -np.array([rng.gamma(2.0, 0.7, n).sum() for n in rejected_len])
  rc = pc + rng.normal(0.0, 1.0, B)
  rr = pr + rng.normal(0.0, 1.0, B)
  # Unpaired batch: one completion per row.
  policy = -rng.gamma(4.0, 2.0, B)
  ref = policy + rng.normal(0.0, 1.5, B)
  labels = np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)
  policy_kl = policy[np.roll(np.arange(B), 1)] + rng.normal(0.0, 1.0, B)
  ref_kl = policy_kl - rng.normal(0.4, 1.0, B)
  policy2 = -rng.gamma(4.0, 2.0, B)
  ref2 = policy2 + rng.normal(0.3, 1.5, B)
  labels2 = np.array([0, 1, 1, 0, 1, 0, 1, 1], bool)
  desirable_probs = rng.uniform(0.02, 0.995, B)
  return {
    "policy_chosen_logps": pc,
    "policy_rejected_logps": pr,
    "ref_chosen_logps": rc,
    "ref_rejected_logps": rr,
    "chosen_lengths": chosen_len,
    "rejected_lengths": rejected_len,
    "policy_logps": policy,
    "ref_logps": ref,
    "labels": labels,
    "policy_mismatched_logps": policy_kl,
    "ref_mismatched_logps": ref_kl,
    "policy_logps_2": policy2,
    "ref_logps_2": ref2,
    "labels_2": labels2,
    "desirable_probs": desirable_probs,
  }


def _accelerator():
  return types.SimpleNamespace(
    device=torch.device("cpu"),
    use_distributed=False,
    gather_for_metrics=lambda x: x,
  )


def cpo_cases(inp):
  cases = []
  pc, pr = inp["policy_chosen_logps"], inp["policy_rejected_logps"]
  avg_c = pc / inp["chosen_lengths"]
  avg_r = pr / inp["rejected_lengths"]
  for beta in (0.1, 0.5):
    for eps in (0.0, 0.2):
      stub = types.SimpleNamespace(
        alpha=0.0,
        accelerator=_accelerator(),
        loss_type="sigmoid",
        beta=beta,
        label_smoothing=eps,
        simpo_gamma=0.5,
      )
      loss, cr, rr = CPOTrainer.cpo_loss(stub, _t(pc), _t(pr))
      cases.append(
        {
          "name": f"cpo_sigmoid_b{beta}_ls{eps}",
          "fn": "cpo",
          "params": {"beta": beta, "label_smoothing": eps},
          "losses": _np(loss),
          "chosen_rewards": _np(cr),
          "rejected_rewards": _np(rr),
        }
      )
  for beta, gamma, eps in ((2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.0, 0.1)):
    stub = types.SimpleNamespace(
      alpha=0.0,
      accelerator=_accelerator(),
      loss_type="simpo",
      beta=beta,
      label_smoothing=eps,
      simpo_gamma=gamma,
    )
    loss, cr, rr = CPOTrainer.cpo_loss(stub, _t(avg_c), _t(avg_r))
    cases.append(
      {
        "name": f"simpo_b{beta}_g{gamma}_ls{eps}",
        "fn": "simpo",
        "params": {"beta": beta, "gamma": gamma, "label_smoothing": eps},
        "losses": _np(loss),
        "chosen_rewards": _np(cr),
        "rejected_rewards": _np(rr),
      }
    )
  return cases


def orpo_cases(inp):
  cases = []
  avg_c = inp["policy_chosen_logps"] / inp["chosen_lengths"]
  avg_r = inp["policy_rejected_logps"] / inp["rejected_lengths"]
  for beta in (0.1, 0.25):
    stub = types.SimpleNamespace(beta=beta, accelerator=_accelerator())
    loss, cr, rr, ratio_mean, log_odds_mean = ORPOTrainer.odds_ratio_loss(
      stub, _t(avg_c), _t(avg_r)
    )
    cases.append(
      {
        "name": f"orpo_b{beta}",
        "fn": "orpo",
        "params": {"lam": beta},
        "losses": _np(loss),
        "mean_log_sigmoid_log_odds": float(ratio_mean),
        "mean_log_odds": float(log_odds_mean),
      }
    )
  return cases


def kto_cases(inp):
  cases = []
  policy, ref, labels = inp["policy_logps"], inp["ref_logps"], inp["labels"]
  pkl, rkl = inp["policy_mismatched_logps"], inp["ref_mismatched_logps"]
  settings = [
    ("kto_b0.1", 0.1, 1.0, 1.0, True, labels),
    ("kto_b0.5_weighted", 0.5, 1.33, 0.8, True, labels),
    ("kto_no_kl", 0.1, 1.0, 1.0, False, labels),
    ("kto_all_desirable", 0.1, 1.0, 1.0, True, np.ones(B, bool)),
    # Mismatched log-ratios shifted down so that the mean KL is negative
    # and TRL's clamp at 0 is exercised.
    ("kto_negative_kl_clamped", 0.1, 1.0, 1.0, "neg", labels),
  ]
  for name, beta, wd, wu, calc, lab in settings:
    kl_pol = pkl - 5.0 if calc == "neg" else pkl
    stub = types.SimpleNamespace(
      calculate_KL=bool(calc),
      accelerator=_accelerator(),
      loss_type="kto",
      beta=beta,
      desirable_weight=wd,
      undesirable_weight=wu,
    )
    loss, cr, rr, kl = KTOTrainer.kto_loss(
      stub,
      _t(policy[lab]),
      _t(policy[~lab]),
      _t(kl_pol),
      _t(ref[lab]),
      _t(ref[~lab]),
      _t(rkl),
    )
    order = np.concatenate([np.flatnonzero(lab), np.flatnonzero(~lab)])
    cases.append(
      {
        "name": name,
        "fn": "kto",
        "params": {
          "beta": beta,
          "desirable_weight": wd,
          "undesirable_weight": wu,
        },
        "labels": lab.tolist(),
        "calculate_kl": bool(calc),
        "mismatched_shift": -5.0 if calc == "neg" else 0.0,
        "row_order": order.tolist(),
        "losses": _np(loss),
        "chosen_rewards": _np(cr),
        "rejected_rewards": _np(rr),
        "kl": float(kl.reshape(-1)[0]),
      }
    )
  return cases


def bco_cases(inp):
  cases = []
  batches = [
    (inp["policy_logps"], inp["ref_logps"], inp["labels"]),
    (inp["policy_logps_2"], inp["ref_logps_2"], inp["labels_2"]),
  ]
  probs = inp["desirable_probs"]
  for udm in (False, True):
    for beta in (0.1, 0.5):
      running = RunningMoments(accelerator=_accelerator())
      stub = types.SimpleNamespace(
        beta=beta,
        running=running,
        match_underlying_distribution=udm,
        args=types.SimpleNamespace(
          min_density_ratio=0.5, max_density_ratio=10.0
        ),
        _get_chosen_prob=lambda p: p,
      )
      stub._get_udm_weight = types.MethodType(BCOTrainer._get_udm_weight, stub)
      out = []
      for policy, ref, lab in batches:
        rejected_probs = _t(probs[~lab])
        loss, cr, rr, delta = BCOTrainer.bco_loss(
          stub,
          _t(policy[lab]),
          _t(policy[~lab]),
          _t(ref[lab]),
          _t(ref[~lab]),
          None,
          rejected_probs,
          do_train=True,
        )
        order = np.concatenate([np.flatnonzero(lab), np.flatnonzero(~lab)])
        out.append(
          {
            "row_order": order.tolist(),
            "losses": _np(loss),
            "chosen_rewards": _np(cr),
            "rejected_rewards": _np(rr),
            "delta": float(delta),
          }
        )
      cases.append(
        {
          "name": f"bco_b{beta}_udm{udm}",
          "fn": "bco",
          "params": {"beta": beta},
          "udm": udm,
          "min_density_ratio": 0.5,
          "max_density_ratio": 10.0,
          "batches": out,
        }
      )
  return cases


def main():
  torch.set_default_dtype(torch.float64)
  inp = make_inputs()
  cases = cpo_cases(inp) + orpo_cases(inp) + kto_cases(inp) + bco_cases(inp)
  golden = {
    "generator": "tests/oracles/trl_unpaired_goldens.py",
    "trl_version": trl.__version__,
    "torch_version": torch.__version__,
    "inputs": {k: np.asarray(v).tolist() for k, v in inp.items()},
    "cases": cases,
  }
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(json.dumps(golden, indent=1) + "\n")
  print(f"wrote {OUT} ({len(cases)} cases, trl {trl.__version__})")


if __name__ == "__main__":
  main()
