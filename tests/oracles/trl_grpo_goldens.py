r"""Generates TRL GRPO/GMPO goldens for tests/losses/policy_gradient_test.py.

Run in the oracle venv (torch 2.13 CPU, trl 1.16.0), never in CI:

  .venv-oracle/bin/python tests/oracles/trl_grpo_goldens.py

Route: this script **executes TRL's own code**. It calls the unbound
``trl.GRPOTrainer._compute_loss`` (and
``trl.experimental.gmpo.GMPOTrainer._compute_loss``) with a stub ``self``
whose ``_get_per_token_logps_and_entropies`` returns fixed per-token
log-probs and entropies instead of running a model, so everything after the
model forward — ratios, clipping, ``delta``, CISPO/SAPO, sequence-level
(GSPO) ratios, the k3 KL with its ratio correction, the entropy bonus, and
every ``loss_type`` normalisation including gradient-accumulation divisors —
is TRL's. Gradients with respect to the per-token log-probs come from torch
autograd through the same code. Computation is float64 on inputs that are
exactly representable in float32.

Micro-batching is reproduced as TRL's trainer does it: the batch is split
into ``num_micro_batches`` consecutive slices, ``_compute_loss`` runs once
per slice with ``current_gradient_accumulation_steps = num_micro_batches``
(and, for ``dapo``/``cispo``, ``num_items_in_batch`` = the token count of the
whole generation batch with ``steps_per_generation`` = the number of slices),
and the returned losses and gradients are summed, which is what the optimizer
sees after accumulation.

Output: tests/testdata/goldens/trl_grpo.json (inputs, per-case TRL settings,
loss and gradient).
"""

import json
import pathlib
import types
from collections import defaultdict

import numpy as np
import torch
import trl
from trl import GRPOTrainer
from trl.experimental.gmpo import GMPOTrainer

OUT = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "goldens"
  / "trl_grpo.json"
)
B, T = 8, 12


def make_inputs(seed=0):
  """Fixed random inputs, float32-exact; no empty completion."""
  rng = np.random.default_rng(seed)
  lengths = np.array([12, 7, 3, 10, 1, 12, 5, 9])
  mask = np.arange(T)[None, :] < lengths[:, None]
  logps = rng.uniform(-3.0, -0.05, (B, T)).astype(np.float32)
  # Old log-probs spread the ratios over roughly [0.55, 1.8]: some tokens
  # inside every clip range, some outside.
  old = (logps + rng.uniform(-0.6, 0.6, (B, T))).astype(np.float32)
  # Near-on-policy rows 0 and 5 keep the sequence (GSPO) ratio inside its
  # narrow clip range for some sequences.
  old[[0, 5]] = (logps[[0, 5]] + rng.uniform(-0.02, 0.02, (2, T))).astype(
    np.float32
  )
  ref = (logps + rng.uniform(-0.5, 0.5, (B, T))).astype(np.float32)
  advantages = rng.normal(size=B).astype(np.float32)
  advantages[3] = 0.0
  token_advantages = rng.normal(size=(B, T)).astype(np.float32)
  entropies = rng.uniform(0.0, 3.0, (B, T)).astype(np.float32)
  return dict(
    token_logps=logps,
    old_token_logps=old,
    ref_token_logps=ref,
    advantages=advantages,
    token_advantages=token_advantages,
    token_entropies=entropies,
    completion_mask=mask,
  )


class _Accelerator:
  num_processes = 1
  sync_gradients = True

  @staticmethod
  def gather(x):
    return x

  gather_for_metrics = gather

  @staticmethod
  def reduce(x, reduction="sum"):
    del reduction
    return x


def make_stub(
  per_token_logps,
  entropies,
  *,
  loss_type="dapo",
  epsilon=0.2,
  epsilon_high=None,
  delta=None,
  beta=0.0,
  importance_sampling_level="token",
  sapo_temperature_pos=1.0,
  sapo_temperature_neg=1.05,
  entropy_coef=0.0,
  max_completion_length=16,
  num_micro_batches=1,
):
  """A stand-in ``self`` with exactly the attributes ``_compute_loss`` reads."""
  args = types.SimpleNamespace(
    delta=delta,
    use_bias_correction_kl=True,
    sapo_temperature_pos=sapo_temperature_pos,
    sapo_temperature_neg=sapo_temperature_neg,
    steps_per_generation=num_micro_batches,
    entropy_target=0.0,
  )
  stub = types.SimpleNamespace(
    args=args,
    loss_type=loss_type,
    beta=beta,
    epsilon_low=epsilon,
    epsilon_high=epsilon if epsilon_high is None else epsilon_high,
    importance_sampling_level=importance_sampling_level,
    top_entropy_quantile=1.0,
    off_policy_mask_threshold=None,
    use_vllm=False,
    vllm_importance_sampling_correction=False,
    aux_loss_enabled=False,
    max_completion_length=max_completion_length,
    current_gradient_accumulation_steps=num_micro_batches,
    accelerator=_Accelerator(),
    model=types.SimpleNamespace(training=True),
    _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    entropy_coef=entropy_coef,
    use_adaptive_entropy=False,
    _entropy_bonus_enabled=entropy_coef != 0.0,
    get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
    get_high_entropy_mask=None,
  )

  def forward(model, input_ids, attention_mask, logits_to_keep, **kwargs):
    del model, input_ids, attention_mask, logits_to_keep, kwargs
    return per_token_logps, entropies, None

  stub._get_per_token_logps_and_entropies = forward
  return stub


def run_case(
  inputs,
  *,
  trainer=GRPOTrainer,
  num_micro_batches=1,
  token_advantages=False,
  on_policy=False,
  **config,
):
  """Runs TRL's ``_compute_loss`` per micro-batch; sums losses and grads."""
  mask = torch.tensor(inputs["completion_mask"], dtype=torch.float64)
  logps = torch.tensor(
    inputs["token_logps"], dtype=torch.float64, requires_grad=True
  )
  key = "token_advantages" if token_advantages else "advantages"
  advantages = torch.tensor(inputs[key], dtype=torch.float64)
  num_items = mask.sum()
  total = torch.zeros((), dtype=torch.float64)
  size = B // num_micro_batches
  for m in range(num_micro_batches):
    rows = slice(m * size, (m + 1) * size)
    micro_logps = logps[rows]
    stub = make_stub(
      micro_logps,
      torch.tensor(inputs["token_entropies"][rows], dtype=torch.float64),
      num_micro_batches=num_micro_batches,
      **config,
    )
    batch = {
      "prompt_ids": torch.zeros((size, 2), dtype=torch.long),
      "prompt_mask": torch.ones((size, 2), dtype=torch.long),
      "completion_ids": torch.zeros((size, T), dtype=torch.long),
      "completion_mask": mask[rows],
      "advantages": advantages[rows],
      "ref_per_token_logps": torch.tensor(
        inputs["ref_token_logps"][rows], dtype=torch.float64
      ),
      "num_items_in_batch": num_items,
    }
    if not on_policy:
      batch["old_per_token_logps"] = torch.tensor(
        inputs["old_token_logps"][rows], dtype=torch.float64
      )
    total = total + trainer._compute_loss(stub, None, batch)
  total.backward()
  return float(total.detach()), logps.grad.numpy().tolist()


CASES = {
  # name: TRL settings (see the test for the mapping to our functions)
  "grpo": dict(loss_type="grpo"),
  "grpo_on_policy": dict(loss_type="grpo", on_policy=True),
  "grpo_clip_higher_delta": dict(
    loss_type="grpo", epsilon=0.2, epsilon_high=0.28, delta=1.4
  ),
  "grpo_token_advantages": dict(loss_type="grpo", token_advantages=True),
  "grpo_kl": dict(loss_type="grpo", beta=0.04),
  "grpo_two_micro_batches": dict(loss_type="grpo", num_micro_batches=2),
  "bnpo": dict(loss_type="bnpo"),
  "bnpo_two_micro_batches": dict(loss_type="bnpo", num_micro_batches=2),
  "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=16),
  "dr_grpo_two_micro_batches": dict(
    loss_type="dr_grpo", max_completion_length=16, num_micro_batches=2
  ),
  "dapo": dict(loss_type="dapo", epsilon_high=0.28),
  "dapo_four_micro_batches": dict(
    loss_type="dapo", epsilon_high=0.28, num_micro_batches=4
  ),
  "dapo_entropy_bonus": dict(
    loss_type="dapo", epsilon_high=0.28, entropy_coef=0.01
  ),
  "cispo": dict(loss_type="cispo", epsilon_high=1.3),
  "sapo": dict(loss_type="sapo"),
  "gspo": dict(
    loss_type="grpo",
    importance_sampling_level="sequence",
    epsilon=0.04,
    epsilon_high=0.05,
  ),
  "gmpo": dict(trainer=GMPOTrainer, loss_type="grpo", epsilon=0.4),
  "gmpo_narrow": dict(
    trainer=GMPOTrainer, loss_type="grpo", epsilon=0.1, epsilon_high=0.15
  ),
}


def main():
  torch.set_default_dtype(torch.float64)
  inputs = make_inputs()
  cases = {}
  for name, config in CASES.items():
    loss, grad = run_case(inputs, **config)
    record = {k: v for k, v in config.items() if k != "trainer"}
    record["trainer"] = config.get("trainer", GRPOTrainer).__name__
    cases[name] = dict(trl=record, loss=loss, grad=grad)
    print(f"{name:28s} {loss: .8f}")
  payload = dict(
    generator="tests/oracles/trl_grpo_goldens.py",
    trl_version=trl.__version__,
    torch_version=torch.__version__,
    route="TRL GRPOTrainer/GMPOTrainer._compute_loss executed with a stub "
    "self (fixed per-token log-probs, no model), float64",
    inputs={k: v.tolist() for k, v in inputs.items()},
    cases=cases,
  )
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(json.dumps(payload, indent=1) + "\n")
  print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
