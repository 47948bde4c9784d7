"""Writes TRL DPO goldens for tests/losses/preference_test.py.

How to run (from the repository root; needs the git-ignored oracle venvs of
environment.md section 4, not CI):

  .venv-trl028/bin/python tests/oracles/trl_dpo_goldens.py   # trl 0.28.0
  .venv-oracle/bin/python tests/oracles/trl_dpo_goldens.py   # trl 1.16.0

or both at once with ``sh tests/oracles/run_trl_dpo_goldens.sh``. Each run
writes ``tests/testdata/goldens/trl_dpo_<major>_<minor>.json`` holding the
fixed random inputs and TRL's outputs for every loss type and option.

* TRL 0.28: the standalone ``DPOTrainer.dpo_loss(self, chosen_logps, ...)`` is
  called unbound with a stub ``self`` (float64). It returns per-pair losses
  and rewards. ``bco_pair`` runs two batches through a real ``RunningMoments``
  and records the running mean it used.
* TRL 1.16: there is no standalone loss; ``DPOTrainer._compute_loss(self,
  model, inputs)`` is called unbound with a stub ``self`` and stub policy and
  reference "models" that return fixed per-token log-probs (what the fused LM
  head would produce), so the real code path runs on our inputs, including
  LD-DPO, WPO, f-divergences and the length-normalised losses. It returns the
  batch mean; per-pair values come from one call per pair (except the
  batch-coupled ``aot`` types). Float64, except ``alpha_divergence``, whose
  clamp table in 1.16 has no float64 entry (float32 there).

The inputs are sequence and token log-probs, not models: the goldens test the
loss math, and the JAX side reads the same arrays.
"""

import json
import pathlib
import sys
import types
from collections import defaultdict

import numpy as np
import torch
import trl
from trl import DPOTrainer

OUT_DIR = pathlib.Path(__file__).resolve().parents[1] / "testdata" / "goldens"
B, T, P = 8, 7, 3  # pairs, completion slots, prompt tokens (1.16 layout)


def make_inputs(seed):
  """Random but realistic log-probs: policy and reference differ by ~1 nat."""
  rng = np.random.default_rng(seed)
  chosen_len = np.array([7, 1, 4, 6, 3, 5, 7, 2])
  rejected_len = np.array([3, 5, 7, 2, 6, 1, 7, 4])
  if seed != 0:
    chosen_len, rejected_len = (
      rng.permutation(chosen_len),
      rng.permutation(rejected_len),
    )
  pos = np.arange(T)[None, :]
  chosen_mask = pos < chosen_len[:, None]
  rejected_mask = pos < rejected_len[:, None]

  def token_logps(mask):
    x = -rng.gamma(2.0, 0.8, size=(B, T))
    return np.where(mask, x, 0.0)

  def perturb(x, mask):
    return np.where(
      mask, np.minimum(x + rng.normal(0.0, 0.6, size=x.shape), -1e-3), 0.0
    )

  pc_tok = token_logps(chosen_mask)
  pr_tok = token_logps(rejected_mask)
  rc_tok = perturb(pc_tok, chosen_mask)
  rr_tok = perturb(pr_tok, rejected_mask)
  # log sum_v p_v^2 <= log max_v p_v <= 0; keep it near the token log-probs.
  cn_tok = np.where(chosen_mask, -rng.uniform(0.3, 2.5, size=(B, T)), 0.0)
  rn_tok = np.where(rejected_mask, -rng.uniform(0.3, 2.5, size=(B, T)), 0.0)
  return {
    "policy_chosen_logps": pc_tok.sum(1),
    "policy_rejected_logps": pr_tok.sum(1),
    "ref_chosen_logps": rc_tok.sum(1),
    "ref_rejected_logps": rr_tok.sum(1),
    "policy_chosen_token_logps": pc_tok,
    "policy_rejected_token_logps": pr_tok,
    "ref_chosen_token_logps": rc_tok,
    "ref_rejected_token_logps": rr_tok,
    "chosen_token_log_normalizers": cn_tok,
    "rejected_token_log_normalizers": rn_tok,
    "chosen_mask": chosen_mask,
    "rejected_mask": rejected_mask,
    "chosen_lengths": chosen_len,
    "rejected_lengths": rejected_len,
  }


def tolist(x):
  return np.asarray(x).tolist()


# --------------------------------------------------------------------------
# TRL 0.28: standalone dpo_loss.


def run_028(inputs, inputs_2):
  from trl.trainer.dpo_config import FDivergenceConstants, FDivergenceType
  from trl.trainer.utils import RunningMoments

  accelerator = types.SimpleNamespace(
    device=torch.device("cpu"), use_distributed=False, is_main_process=True
  )

  def stub(beta, label_smoothing=0.0, tau=0.05, divergence=None, alpha=None):
    params = (
      None
      if alpha is None
      else {FDivergenceConstants.ALPHA_DIVERGENCE_COEF_KEY: alpha}
    )
    return types.SimpleNamespace(
      accelerator=accelerator,
      reference_free=False,
      f_divergence_type=divergence or FDivergenceType.REVERSE_KL,
      f_divergence_params=params,
      beta=beta,
      label_smoothing=label_smoothing,
      args=types.SimpleNamespace(discopop_tau=tau),
      running=None,
    )

  def seq(inp):
    return [
      torch.tensor(inp[k], dtype=torch.float64)
      for k in (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
      )
    ]

  cases = []

  def add(name, loss_type, self_, config, inp=inputs):
    losses, cr, rr = DPOTrainer.dpo_loss(self_, *seq(inp), loss_type=loss_type)
    case = {
      "name": name,
      "loss_type": loss_type,
      "config": config,
      "losses": tolist(losses),
      "chosen_rewards": tolist(cr),
      "rejected_rewards": tolist(rr),
    }
    cases.append(case)
    return case

  # beta only scales most losses: one non-default beta each; two where beta
  # also sets a target (ipo, sppo_hard) or mixes with another knob.
  for beta, ls in ((0.1, 0.0), (0.5, 0.2)):
    add(
      f"sigmoid_b{beta}_ls{ls}",
      "sigmoid",
      stub(beta, ls),
      {"beta": beta, "label_smoothing": ls},
    )
  for lt in ("hinge", "nca_pair", "apo_zero", "apo_down"):
    add(f"{lt}_b0.5", lt, stub(0.5), {"beta": 0.5})
  for lt in ("ipo", "sppo_hard"):
    for beta in (0.1, 0.5):
      add(f"{lt}_b{beta}", lt, stub(beta), {"beta": beta})
  for beta, tau in ((0.1, 0.05), (0.5, 0.5)):
    add(
      f"discopop_b{beta}_tau{tau}",
      "discopop",
      stub(beta, tau=tau),
      {"beta": beta, "tau": tau},
    )
  for ls in (1e-3, 0.2):
    add(
      f"exo_pair_ls{ls}",
      "exo_pair",
      stub(0.1, ls),
      {"beta": 0.1, "label_smoothing": ls},
    )
  for ls in (0.1, 0.3):
    add(
      f"robust_ls{ls}",
      "robust",
      stub(0.1, ls),
      {"beta": 0.1, "label_smoothing": ls},
    )
  for lt in ("aot", "aot_unpaired"):
    add(
      f"{lt}_ls0.1", lt, stub(0.1, 0.1), {"beta": 0.1, "label_smoothing": 0.1}
    )
  # f-divergences (0.28 honours them only when the enum is passed directly).
  add(
    "sigmoid_js",
    "sigmoid",
    stub(0.1, divergence=FDivergenceType.JS_DIVERGENCE),
    {"beta": 0.1, "divergence": "js_divergence"},
  )
  for alpha in (0.3, 1.0):
    add(
      f"sigmoid_alpha{alpha}",
      "sigmoid",
      stub(0.1, divergence=FDivergenceType.ALPHA_DIVERGENCE, alpha=alpha),
      {"beta": 0.1, "divergence": "alpha_divergence", "alpha": alpha},
    )
  # bco_pair: the running mean is state; two consecutive batches.
  bco = stub(0.1)
  bco.running = RunningMoments(accelerator)
  for step, inp in enumerate((inputs, inputs_2)):
    case = add(
      f"bco_pair_step{step}",
      "bco_pair",
      bco,
      {"beta": 0.1, "step": step},
      inp=inp,
    )
    # The running mean after the update inside the call: the delta it used.
    case["reward_mean"] = float(bco.running.mean)
  return cases


# --------------------------------------------------------------------------
# TRL 1.16: _compute_loss with stub self and stub models.


class _FakeModel:
  """Returns fixed per-token outputs as TRL's fused LM head would."""

  is_gradient_checkpointing = False
  training = True

  def __init__(self, log_probs, log_sum_sq_probs):
    self.log_probs = log_probs
    self.log_sum_sq_probs = log_sum_sq_probs

  def __call__(self, **kwargs):
    zeros = torch.zeros_like(self.log_probs)
    return types.SimpleNamespace(
      log_probs=self.log_probs,
      log_sum_sq_probs=self.log_sum_sq_probs,
      entropy=zeros,
      mean_logits=zeros,
      is_top1=torch.zeros_like(self.log_probs, dtype=torch.bool),
      aux_loss=None,
    )


def _layout(chosen, rejected, idx, dtype):
  """Places [B, T] completion values at their shifted positions of [2b, P+T-1]."""
  both = np.concatenate([chosen[idx], rejected[idx]], 0)
  out = np.zeros((both.shape[0], P + T - 1))
  out[:, P - 1 :] = both
  return torch.tensor(out, dtype=dtype)


def _compute_loss_116(inputs, idx, config, dtype):
  n = len(idx)
  mask = np.concatenate(
    [inputs["chosen_mask"][idx], inputs["rejected_mask"][idx]], 0
  )
  completion_mask = np.zeros((2 * n, P + T), dtype=np.int64)
  completion_mask[:, P:] = mask
  policy = _FakeModel(
    _layout(
      inputs["policy_chosen_token_logps"],
      inputs["policy_rejected_token_logps"],
      idx,
      dtype,
    ),
    _layout(
      inputs["chosen_token_log_normalizers"],
      inputs["rejected_token_log_normalizers"],
      idx,
      dtype,
    ),
  )
  ref = _FakeModel(
    _layout(
      inputs["ref_chosen_token_logps"],
      inputs["ref_rejected_token_logps"],
      idx,
      dtype,
    ),
    None,
  )
  accelerator = types.SimpleNamespace(
    device=torch.device("cpu"),
    gather_for_metrics=lambda x: x,
    gather=lambda x: x,
  )
  self_ = types.SimpleNamespace(
    model=policy,
    ref_model=ref,
    accelerator=accelerator,
    aux_loss_enabled=False,
    ld_alpha=config.get("ld_alpha"),
    precompute_ref_logps=False,
    args=types.SimpleNamespace(
      gradient_checkpointing_kwargs=None, discopop_tau=config.get("tau", 0.05)
    ),
    f_divergence_type=config.get("divergence", "reverse_kl"),
    f_alpha_divergence_coef=config.get("f_alpha_divergence_coef", 0.5),
    loss_types=[config["loss_type"]],
    loss_weights=[1.0],
    beta=config["beta"],
    label_smoothing=config.get("label_smoothing", 0.0),
    use_weighting=config.get("use_weighting", False),
    _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    _total_train_tokens=0,
    _tp_size=1,
  )
  batch = {
    "input_ids": torch.ones((2 * n, P + T), dtype=torch.long),
    "attention_mask": torch.ones((2 * n, P + T), dtype=torch.long),
    "completion_mask": torch.tensor(completion_mask),
  }
  with torch.no_grad():
    loss = DPOTrainer._compute_loss(self_, policy, batch, return_outputs=False)
  return float(loss), self_._metrics["train"]


def run_116(inputs):
  cases = []

  def add(name, config):
    dtype = (
      torch.float32
      if config.get("divergence") == "alpha_divergence"
      else torch.float64
    )
    mean, metrics = _compute_loss_116(inputs, np.arange(B), config, dtype)
    case = {
      "name": name,
      "loss_type": config["loss_type"],
      "config": config,
      "loss_mean": mean,
      "dtype": str(dtype).replace("torch.", ""),
      "rewards_chosen_mean": metrics["rewards/chosen"][0],
      "rewards_rejected_mean": metrics["rewards/rejected"][0],
    }
    if not config["loss_type"].startswith("aot"):
      case["losses"] = [
        _compute_loss_116(inputs, np.array([i]), config, dtype)[0]
        for i in range(B)
      ]
    cases.append(case)

  for lt in (
    "sigmoid",
    "hinge",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
  ):
    add(lt, {"loss_type": lt, "beta": 0.1})
  add(
    "exo_pair", {"loss_type": "exo_pair", "beta": 0.1, "label_smoothing": 1e-3}
  )
  add("robust", {"loss_type": "robust", "beta": 0.1, "label_smoothing": 0.1})
  add("ipo_b0.1", {"loss_type": "ipo", "beta": 0.1})
  add("sigmoid_norm_b0.5", {"loss_type": "sigmoid_norm", "beta": 0.5})
  for divergence in ("forward_kl", "js_divergence"):
    add(
      f"sigmoid_{divergence}",
      {"loss_type": "sigmoid", "beta": 0.1, "divergence": divergence},
    )
  # coef 0.3 is alpha 0.7 in the f-DPO paper's convention (equal only at 0.5).
  add(
    "sigmoid_alpha_coef0.3",
    {
      "loss_type": "sigmoid",
      "beta": 0.1,
      "divergence": "alpha_divergence",
      "f_alpha_divergence_coef": 0.3,
    },
  )
  for ld_alpha in (0.0, 0.5):
    add(
      f"sigmoid_ld{ld_alpha}",
      {"loss_type": "sigmoid", "beta": 0.1, "ld_alpha": ld_alpha},
    )
  add(
    "sigmoid_wpo_b0.1",
    {"loss_type": "sigmoid", "beta": 0.1, "use_weighting": True},
  )
  add("ipo_wpo", {"loss_type": "ipo", "beta": 0.1, "use_weighting": True})
  return cases


def main():
  version = trl.__version__
  major, minor = version.split(".")[:2]
  inputs = make_inputs(0)
  payload = {
    "trl_version": version,
    "torch_version": torch.__version__,
    "generator": "tests/oracles/trl_dpo_goldens.py",
    "inputs": {k: tolist(v) for k, v in inputs.items()},
  }
  if (int(major), int(minor)) < (0, 29):
    inputs_2 = make_inputs(1)
    payload["inputs_2"] = {k: tolist(v) for k, v in inputs_2.items()}
    payload["cases"] = run_028(inputs, inputs_2)
  else:
    payload["cases"] = run_116(inputs)
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  path = OUT_DIR / f"trl_dpo_{major}_{minor}.json"
  path.write_text(json.dumps(payload, indent=1) + "\n")
  print(
    f"wrote {path} ({len(payload['cases'])} cases, trl {version})",
    file=sys.stderr,
  )


if __name__ == "__main__":
  main()
