r"""Iterative on-policy preference optimisation: online DPO and DNO.

Local smoke run (CPU, tiny model, gold reward of the synthetic task):
  python -m alignment.main --config=configs/online_preference.py:runlocal --workdir=runs/dno
With a learned reward model:
  ... --config.reward.source=model --config.reward.checkpoint=runs/rm
"""

import ml_collections

from alignment import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(
    arg, model="small", loss="dpo", reward="gold", runlocal=False
  )
  config = config_lib.base(
    "online_preference",
    total_steps=200,
    batch_size=32,
    learning_rate=5e-7,
    model_preset=arg.model,
  )
  config.loss = config_lib.loss(arg.loss)
  config.online = ml_collections.ConfigDict(
    dict(
      num_generations=4,
      max_new_tokens=256,
      temperature=1.0,
      updates_per_iteration=1,
      min_margin=0.0,
      reference="swap",
    )
  )
  config.reward = ml_collections.ConfigDict(
    dict(
      source=arg.reward,
      checkpoint="",
      verifier="math_answer",
      ensemble_aggregator="mean",
      ensemble_kwargs={},
    )
  )
  config.data = config_lib.data(
    "synthetic", max_prompt_len=256, max_completion_len=256
  )
  # One packed row [prompt | best | worst] per pair, the prompt run once
  # (exact; rows sized by online.max_new_tokens).
  config.share_prompt = True
  if arg.runlocal:
    # 8 prompts: divisible over the data axis of any host with 1, 2, 4
    # or 8 devices (a batch must split evenly over the batch shards).
    config_lib.runlocal(config, steps=2, batch_size=8)
    config.online.max_new_tokens = 9
    config.optimizer.learning_rate = 1e-4
  return config


def get_sweep(add):
  for reference in ("swap", "fixed"):
    for beta in (0.05, 0.1):
      add(**{"online.reference": reference, "loss.beta": beta})
