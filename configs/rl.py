r"""Online RL (GRPO, DAPO, PPO, GSPO, ... every ``losses.POLICY_LOSSES`` name).

Local smoke run (CPU, tiny model, gold reward of the synthetic task):
  python -m alignment.main --config=configs/rl.py:runlocal --workdir=runs/grpo
Structural args: ``loss=`` (policy loss), ``advantage=`` (estimator; ``gae``
adds a critic), ``reward=`` (gold | verifier | model | ensemble):
  ... --config=configs/rl.py:loss=dapo,advantage=rloo,runlocal
  ... --config=configs/rl.py:loss=ppo,advantage=gae,runlocal
``advantage=remax`` decodes one greedy completion per prompt as baseline;
``arena_rank`` compares the G samples pairwise (``reward.preferences``);
``gdpo`` takes ``reward.components`` (default ``reward`` + ``length``).
Process credit: ``pure_min`` needs ``--config.reward.process_model=<PRM
workdir>`` (a reward-model run with ``loss=prm_hard``); ``igpo`` scores
turns (completion segments) by the gain in the policy's probability of the
record's answer; ``prime`` trains an implicit PRM online
(``reward.implicit_prm``).
Scalars: --config.kl.beta=0.02 --config.rl.num_generations=16 ...
"""

import ml_collections

from alignment import config_lib

# Aggregation as each method was published.
_AGGREGATION = {
  "grpo": "sequence_mean",
  "dapo": "token_mean",
  "gspo": "sequence_mean",
  "gspo_token": "sequence_mean",
  "cispo": "token_mean",
  "gmpo": "sequence_mean",
  "sapo": "sequence_mean",
  "ppo": "token_mean",
  "reinforce": "token_mean",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(
    arg,
    model="small",
    loss="grpo",
    advantage="grpo",
    reward="gold",
    runlocal=False,
  )
  config = config_lib.base(
    "rl",
    total_steps=500,
    batch_size=32,
    learning_rate=1e-6,
    model_preset=arg.model,
  )
  config.loss = config_lib.loss(arg.loss)
  config.loss_aggregation = _AGGREGATION.get(arg.loss, "token_mean")
  config.loss_max_tokens = 0  # constant_norm: 0 means the padded length
  config.advantage = config_lib.advantage(arg.advantage)
  config.rl = ml_collections.ConfigDict(
    dict(
      num_generations=8,
      max_new_tokens=256,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      ppo_epochs=1,
      num_minibatches=1,
      # Run each group's prompt once: the G samples of a prompt are read
      # as one packed row [prompt | c_1 | ... | c_G] (exact).
      share_prompt=True,
    )
  )
  config.reward = ml_collections.ConfigDict(
    dict(
      source=arg.reward,
      checkpoint="",
      verifier="math_answer",
      shaping=[],
      shaping_kwargs={},
      ensemble_aggregator="mean",
      ensemble_kwargs={},
      # gdpo: K rewards per sample (trainers._rl_inputs.COMPONENTS).
      components=["reward", "length"] if arg.advantage == "gdpo" else [],
      # arena_rank: pairwise verdicts from the rewards (auto | sigmoid |
      # hard; auto = sigmoid for model/ensemble sources, hard otherwise).
      preferences="auto",
      preference_temperature=1.0,
      # pure_min / igpo (trainers._rl_process): steps (turns) are segments
      # of the completion ending at step_separator ("auto": "" = one step
      # per token for synthetic data, "\n" otherwise); max_steps S (0:
      # rl.max_new_tokens; more steps are merged into the last).
      step_separator="auto",
      max_steps=0,
      # pure_min: workdir of a reward-model run with loss prm_hard,
      # prm_soft or prm_scan; verifiable_rewards adds the scalar reward
      # (reward.source) on the last step.
      process_model="",
      verifiable_rewards=False,
      # igpo: the record field holding the ground-truth answer.
      answer_key="answer",
      # prime: implicit PRM (a copy of the reference, updated online with
      # BCE(σ(β Σ_t log π_φ/π_ref), outcome > threshold)); verl recipe
      # defaults.
      implicit_prm=dict(
        beta=0.05,
        learning_rate=1e-6,
        weight_decay=0.0,
        grad_clip_norm=1.0,
        threshold=0.5,
        update="before",
        norm="batch_norm",
      ),
    )
  )
  config.kl = ml_collections.ConfigDict(
    dict(
      mode="loss",
      beta=0.04,
      estimator="k3",
      adaptive=False,
      target=6.0,
      horizon=10000.0,
    )
  )
  config.off_policy = ml_collections.ConfigDict(
    dict(correction="none", kwargs={})
  )
  config.entropy_coefficient = 0.0
  config.value_coefficient = 0.5
  config.value_clip = 0.2
  config.data = config_lib.data(
    "synthetic", max_prompt_len=256, max_completion_len=256
  )
  if arg.runlocal:
    # 8 prompts: divisible over the data axis of any host with 1, 2, 4
    # or 8 devices (a batch must split evenly over the batch shards).
    config_lib.runlocal(config, steps=2, batch_size=8)
    config.rl.num_generations = 4
    config.rl.max_new_tokens = 9
    config.optimizer.learning_rate = 1e-4
    config.reward.implicit_prm.learning_rate = 1e-4
  return config


def get_sweep(add):
  """KL strength × group size."""
  for beta in (0.0, 0.04):
    for group in (4, 8):
      add(**{"kl.beta": beta, "rl.num_generations": group})
