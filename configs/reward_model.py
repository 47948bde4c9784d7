r"""Reward models: every ``losses.REWARD_MODEL_LOSSES`` name, ensembles, PRMs.

Local smoke run (CPU, tiny model, synthetic pairs):
  python -m alignment.main --config=configs/reward_model.py:runlocal --workdir=runs/rm
Objective and ensemble are structural args:
  ... --config=configs/reward_model.py:loss=gaussian_bt,runlocal
  ... --config=configs/reward_model.py:ensemble=heads,members=4,runlocal
Named variants (``variant=``, see ``VARIANTS``) pick the objective and the
head that its inputs need; on the synthetic data the per-response score
columns hold the task's gold reward (BT regression targets, scaled-BT
magnitudes, ties):
  ... --config=configs/reward_model.py:variant=brme,members=2,runlocal
``multi_objective_regression`` (SteerLM / DPA / ArmoRM attribute regression)
trains K = len(reward_model.direction) heads on per-response attribute
ratings: on the synthetic data the task rates ``ATTRIBUTES`` (gold reward,
vowel fraction, distinct-letter fraction, with rater noise); the eval
scalarises the heads with ``direction`` (here the gold head alone) for
pairwise accuracy and reports per-attribute RMSE / Pearson:
  ... --config=configs/reward_model.py:variant=multi_objective_regression,runlocal
"""

import ml_collections

from alignment import config_lib

# variant -> (loss, ensemble kind or None to keep the ensemble= arg).
VARIANTS = {
  # targets: the chosen_score / rejected_score columns.
  "bt_regression": ("bt_regression", None),
  # magnitude: |margin|, else |chosen_score - rejected_score|.
  "scaled_bt": ("scaled_bt", None),
  # ties: pairs whose margin (else score gap) is exactly 0.
  "ties_rao_kupper": ("bt_ties_rao_kupper", None),
  "ties_davidson": ("bt_ties_davidson", None),
  # BRME: M stacked Gaussian members ([M, B] means and log-variances).
  "brme": ("brme", "stacked"),
  # margin from the ensemble's preference strength.
  "adaptive_margin": ("bt_adaptive_margin", "heads"),
  # SCAN: step MC scores (the step labels), outcome (the last step's label).
  "prm_scan": ("prm_scan", None),
  # rewards/targets/target_mask: K heads regress the per-response
  # chosen_ratings / rejected_ratings columns (ATTRIBUTES on synthetic data).
  "multi_objective_regression": ("multi_objective_regression", None),
}
# multi_objective_regression on the synthetic task: the attributes its
# pairs are rated on (synthetic.ATTRIBUTES) and the fixed weights that
# scalarise the K heads for pairwise accuracy (the gold-reward head, so
# the accuracy compares with the other objectives').
ATTRIBUTES = ("gold", "vowels", "distinct")
ATTRIBUTE_WEIGHTS = (1.0, 0.0, 0.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(
    arg,
    model="small",
    loss="bradley_terry",
    ensemble="none",
    members=4,
    variant="",
    runlocal=False,
  )
  if arg.variant:
    if arg.variant not in VARIANTS:
      raise ValueError(
        f"config arg: variant={arg.variant!r}; valid "
        f"variants are {sorted(VARIANTS)}."
      )
    loss, ensemble = VARIANTS[arg.variant]
    if arg.loss not in ("bradley_terry", loss):
      raise ValueError(
        f"config arg: variant={arg.variant!r} trains "
        f"{loss!r}, not loss={arg.loss!r}."
      )
    arg.loss = loss
    arg.ensemble = ensemble or arg.ensemble
  config = config_lib.base(
    "reward_model",
    total_steps=2000,
    batch_size=64,
    learning_rate=1e-5,
    model_preset=arg.model,
  )
  config.loss = config_lib.loss(arg.loss)
  config.ensemble = ml_collections.ConfigDict(
    dict(kind=arg.ensemble, num_members=arg.members)
  )
  config.reward_model = ml_collections.ConfigDict(
    dict(
      direction=[0.7, 0.3],
      embed_dim=8,
      noise_samples=1,
      # prm_scan: the completer's accuracy on the questions (SCAN's
      # self-confidence) when the step data carries none; 1 keeps all.
      self_confidence=1.0,
    )
  )
  config.data = config_lib.data(
    "synthetic", max_prompt_len=256, max_completion_len=256
  )
  # Pairs: one packed row [prompt | chosen | rejected], the prompt run once
  # (exact; rows sized by data.max_completion_len).
  config.share_prompt = True
  config.eval_data = config_lib.data(
    "synthetic",
    max_prompt_len=256,
    max_completion_len=256,
    shuffle=False,
    task_seed=1,
    num_examples=512,
  )
  config.eval_data.num_epochs = 1
  if arg.loss == "multi_objective_regression":
    config.reward_model.direction = list(ATTRIBUTE_WEIGHTS)
    for block in (config.data, config.eval_data):
      block.task.attributes = list(ATTRIBUTES)
  config.eval_batches = 16
  # RewardBench-2-style best-of-4 on lists of 4 responses: the synthetic
  # eval task draws them with gold rewards (else set eval_ranked_data to a
  # ranked source); 0 turns it off.
  config.eval_best_of = 4
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
      add(
        **{
          "loss.center_rewards_coefficient": coef,
          "optimizer.learning_rate": lr,
        }
      )
