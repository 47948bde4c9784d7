r"""Offline preference optimisation: every ``losses.PREFERENCE_LOSSES`` name.

Local smoke run (CPU, tiny model, synthetic pairs):
  python -m alignment.main --config=configs/preference.py:runlocal --workdir=runs/dpo
Pick the objective structurally with ``loss=`` (its hyperparameters and
their defaults then appear under ``config.loss``):
  ... --config=configs/preference.py:loss=ipo,runlocal --config.loss.beta=0.5
Scalar overrides:
  ... --config.optimizer.learning_rate=5e-7 --config.batch_size=128
"""

import ml_collections

from alignment import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, model="small", loss="dpo", runlocal=False)
  config = config_lib.base("preference", total_steps=2000, batch_size=64,
                           learning_rate=5e-7, model_preset=arg.model)
  config.loss = config_lib.loss(arg.loss)
  config.reference = "init"  # frozen copy of the initial policy
  config.data = config_lib.data("synthetic", max_prompt_len=256,
                                max_completion_len=256)
  if arg.runlocal:
    config_lib.runlocal(config)
    config.optimizer.learning_rate = 1e-3
  return config


def get_sweep(add):
  """beta × label smoothing for the default DPO loss (loss names are
  structural: sweep them with one sweep per ``:loss=`` config arg)."""
  for beta in (0.05, 0.1, 0.5):
    for label_smoothing in (0.0, 0.1):
      add(**{"loss.beta": beta, "loss.label_smoothing": label_smoothing})
