r"""Offline preference optimisation: every ``losses.PREFERENCE_LOSSES`` name.

Local smoke run (CPU, tiny model, synthetic pairs):
  python -m alignment.main --config=configs/preference.py:runlocal --workdir=runs/dpo
Pick the objective structurally with ``loss=`` (its hyperparameters and
their defaults then appear under ``config.loss``):
  ... --config=configs/preference.py:loss=ipo,runlocal --config.loss.beta=0.5
Scalar overrides:
  ... --config.optimizer.learning_rate=5e-7 --config.batch_size=128

Losses that need more than log-probs get their own block (see
``alignment/trainers/preference.py``):
  loss=wpo        config.log_normalizers.alignment  (sampled | greedy | none)
  loss=sparse_po  config.reward_weights  (reference-activation token masks,
                  activations=modules | layers, token_kl=True: MaPO)
  loss=cream      config.consistency  (normalize_by_length, granularity=
                  pair | batch)
  loss=tgdpo, loss=t_reg  config.token_rewards  (a guidance model; required):
    ... :loss=tgdpo,runlocal --config.token_rewards.checkpoint=runs/dpo/export
"""

import ml_collections

from alignment import config_lib

# Loss name -> the block of the derived inputs it takes, with defaults.
_INPUT_BLOCKS = {
  "wpo": ("log_normalizers", dict(alignment="sampled")),
  "sparse_po": (
    "reward_weights",
    dict(source="activations", activations="modules", token_kl=True),
  ),
  "cream": ("consistency", dict(normalize_by_length=True, granularity="pair")),
  # The guidance model's implicit reward β·(log π_g - log π_ref) per token;
  # checkpoint: a Hugging Face directory or a workdir with export/.
  "tgdpo": ("token_rewards", dict(source="guidance", checkpoint="", beta=0.1)),
  "t_reg": ("token_rewards", dict(source="guidance", checkpoint="", beta=0.1)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, model="small", loss="dpo", runlocal=False)
  config = config_lib.base(
    "preference",
    total_steps=2000,
    batch_size=64,
    learning_rate=5e-7,
    model_preset=arg.model,
  )
  config.loss = config_lib.loss(arg.loss)
  config.reference = "init"  # frozen copy of the initial policy
  # One packed row [prompt | chosen | rejected] per pair: the prompt runs
  # once, not twice (exact; rows sized by data.max_completion_len).
  config.share_prompt = True
  if arg.loss in _INPUT_BLOCKS:
    name, fields = _INPUT_BLOCKS[arg.loss]
    config[name] = ml_collections.ConfigDict(fields)
  config.data = config_lib.data(
    "synthetic", max_prompt_len=256, max_completion_len=256
  )
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
