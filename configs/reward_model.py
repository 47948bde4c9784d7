r"""Reward models: every ``losses.REWARD_MODEL_LOSSES`` name, ensembles, PRMs.

Local smoke run (CPU, tiny model, synthetic pairs):
  python -m alignment.main --config=configs/reward_model.py:runlocal --workdir=runs/rm
Objective and ensemble are structural args:
  ... --config=configs/reward_model.py:loss=gaussian_bt,runlocal
  ... --config=configs/reward_model.py:ensemble=heads,members=4,runlocal
"""

import ml_collections

from alignment import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, model="small", loss="bradley_terry",
                             ensemble="none", members=4, runlocal=False)
  config = config_lib.base("reward_model", total_steps=2000, batch_size=64,
                           learning_rate=1e-5, model_preset=arg.model)
  config.loss = config_lib.loss(arg.loss)
  config.ensemble = ml_collections.ConfigDict(dict(
      kind=arg.ensemble, num_members=arg.members))
  config.reward_model = ml_collections.ConfigDict(dict(
      direction=[0.7, 0.3], embed_dim=8))
  config.data = config_lib.data("synthetic", max_prompt_len=256,
                                max_completion_len=256)
  config.eval_data = config_lib.data("synthetic", max_prompt_len=256,
                                     max_completion_len=256, shuffle=False,
                                     task_seed=1, num_examples=512)
  config.eval_data.num_epochs = 1
  config.eval_batches = 16
  if arg.runlocal:
    config_lib.runlocal(config)
    config.optimizer.learning_rate = 1e-3
    config.eval_data.max_prompt_len = config.data.max_prompt_len
    config.eval_data.max_completion_len = config.data.max_completion_len
    config.eval_data.num_examples = 32
    config.eval_batches = 2
  return config


def get_sweep(add):
  """Reward centring × learning rate for the Bradley–Terry objective."""
  for coef in (0.0, 0.01):
    for lr in (3e-6, 1e-5):
      add(**{"loss.center_rewards_coefficient": coef,
             "optimizer.learning_rate": lr})
