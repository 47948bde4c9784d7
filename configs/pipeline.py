r"""The embedded default: SFT → preference pairs → reward model → DPO and
GRPO against the learned reward → report. What ``make run`` runs.

  python -m alignment.main --config=configs/pipeline.py --workdir=runs/default
A shorter version (what the test runs):
  ... --config=configs/pipeline.py:quick
Change one stage: --config.grpo.total_steps=40 --config.dpo.loss.beta=0.5
"""

import ml_collections

from alignment import config_lib


def _stage(trainer, *, steps, batch, lr, preset, data_kw):
  config = config_lib.base(
    trainer,
    total_steps=steps,
    batch_size=batch,
    learning_rate=lr,
    model_preset=preset,
  )
  data_kw = {"source": "synthetic", **data_kw}
  config.data = config_lib.data(
    max_prompt_len=8, max_completion_len=9, **data_kw
  )
  config.checkpoint.every = 0
  config.optimizer.schedule = "warmup_constant"
  if trainer in ("preference", "reward_model"):
    # One packed [prompt | chosen | rejected] row per pair (exact).
    config.share_prompt = True
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, model="tiny", quick=False, seed=0)
  q = arg.quick
  config = ml_collections.ConfigDict()
  config.trainer = "pipeline"
  config.seed = ml_collections.FieldReference(arg.seed)
  config.task = ml_collections.ConfigDict(
    dict(
      n_prompt_letters=5,
      completion_len=8,
      p_in=0.3,
      label_temperature=0.1,
      rule="first_half",
    )
  )

  config.sft = _stage(
    "sft",
    steps=10 if q else 400,
    batch=32,
    lr=3e-3,
    preset=arg.model,
    data_kw=dict(num_examples=4096, task_seed=arg.seed),
  )
  config.sft.data.task = config.task

  config.pairs = ml_collections.ConfigDict(
    dict(
      num_train=64 if q else 2048,
      num_eval=64 if q else 512,
      prompt_seed=100 + arg.seed,
      sample_seed=200 + arg.seed,
      label_seed=300 + arg.seed,
    )
  )
  config.dpo_pairs = ml_collections.ConfigDict(dict(num=64 if q else 1024))
  config.rm_from_sft = True  # reward-model backbone starts from the SFT policy

  rm = _stage(
    "reward_model",
    steps=5 if q else 400,
    batch=32,
    lr=1e-3,
    preset=arg.model,
    data_kw=dict(source="jsonl"),
  )
  rm.loss = config_lib.loss("bradley_terry")
  rm.ensemble = ml_collections.ConfigDict(dict(kind="none", num_members=1))
  rm.reward_model = ml_collections.ConfigDict(
    dict(direction=[1.0], embed_dim=8)
  )
  rm.eval_data = config_lib.data(
    "jsonl", max_prompt_len=8, max_completion_len=9, shuffle=False
  )
  rm.eval_data.num_epochs = 1
  rm.eval_batches = 1000
  config.reward_model = rm

  dpo = _stage(
    "preference",
    steps=5 if q else 150,
    batch=32,
    lr=1e-4,
    preset=arg.model,
    data_kw=dict(source="jsonl"),
  )
  # beta 1.0: at 0.1 the DPO stage overfit the learned labels on some seeds
  # (seed 0: gold 0.615, below SFT; 0.847 at 1.0, seeds 0-2 0.843-0.854).
  dpo.loss = config_lib.loss("dpo", beta=1.0)
  dpo.reference = "init"
  config.dpo = dpo

  grpo = _stage(
    "rl",
    steps=2 if q else 60,
    batch=16,
    lr=1e-3,
    preset=arg.model,
    data_kw=dict(num_examples=4096, task_seed=7 + arg.seed),
  )
  grpo.data.task = config.task
  grpo.loss = config_lib.loss("grpo")
  grpo.loss_aggregation = "sequence_mean"
  grpo.loss_max_tokens = 0
  grpo.advantage = config_lib.advantage("grpo")
  grpo.rl = ml_collections.ConfigDict(
    dict(
      num_generations=8,
      max_new_tokens=9,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      ppo_epochs=1,
      num_minibatches=2,
    )
  )
  grpo.reward = ml_collections.ConfigDict(
    dict(
      source="model",
      checkpoint="",
      verifier="math_answer",
      shaping=[],
      shaping_kwargs={},
      ensemble_aggregator="mean",
      ensemble_kwargs={},
    )
  )
  grpo.kl = ml_collections.ConfigDict(
    dict(
      mode="loss",
      beta=0.04,
      estimator="k3",
      adaptive=False,
      target=6.0,
      horizon=10000.0,
    )
  )
  grpo.off_policy = ml_collections.ConfigDict(
    dict(correction="none", kwargs={})
  )
  grpo.entropy_coefficient = 0.0
  grpo.value_coefficient = 0.5
  grpo.value_clip = 0.2
  config.grpo = grpo

  config.report = ml_collections.ConfigDict(
    dict(
      num_prompts=16 if q else 128,
      num_samples=4,
      seed=1234,
      prompt_seed=10_000 + arg.seed,
    )
  )
  for stage in (config.sft, rm, dpo, grpo):
    stage.seed = config.get_ref("seed")
  return config


def get_sweep(add):
  """The three seeds the README's figures come from."""
  for seed in (0, 1, 2):
    add(seed=seed)
