"""Iterative on-policy preference optimisation (online DPO, DNO).

Each iteration: sample ``G >= 2`` completions per prompt from the current
policy, score them (reward model, ensemble, gold or verifier: the scorer of
the RL trainer), pair the best with the worst completion of every prompt
(pairs whose score margin is below ``config.online.min_margin`` are masked
out, DNO's filter), take ``config.online.updates_per_iteration`` steps of
the configured preference loss on the pairs, and — with
``config.online.reference = "swap"`` (DNO, Rosset et al. 2024, Alg. 2) —
make the updated policy the next iteration's reference. The reward-model
scores are passed to the loss as ``chosen_rewards`` / ``rejected_rewards``
(used by ``dno`` and ``copg_preference``).
"""

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignment import sampling
from alignment import sharding as sharding_lib
from alignment.trainers import _data, _setup, common, policy_eval, rl
from alignment.trainers import preference as preference_lib

REFERENCE_MODES = ("swap", "fixed")


class OnlinePairBatch(NamedTuple):
  """A ``PreferenceBatch`` plus the scores that picked the pairs."""

  chosen_tokens: jax.Array
  chosen_attention_mask: jax.Array
  chosen_completion_mask: jax.Array
  rejected_tokens: jax.Array
  rejected_attention_mask: jax.Array
  rejected_completion_mask: jax.Array
  example_mask: jax.Array
  chosen_rewards: jax.Array
  rejected_rewards: jax.Array
  ref_chosen_logps: None = None
  ref_rejected_logps: None = None
  margin: None = None


def make_pairs(out, scores, group: int, min_margin: float) -> OnlinePairBatch:
  """Best-vs-worst pair per prompt from ``[B·G]`` samples and scores."""
  tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], 1)
  attn = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
  comp = jnp.concatenate(
    [jnp.zeros_like(out.prompt_mask), out.completion_mask], 1
  )
  n = tokens.shape[0]
  s = scores.reshape(n // group, group)
  best = jnp.argmax(s, axis=1) + jnp.arange(n // group) * group
  worst = jnp.argmin(s, axis=1) + jnp.arange(n // group) * group
  margin = scores[best] - scores[worst]
  keep = margin > min_margin
  return OnlinePairBatch(
    tokens[best],
    attn[best],
    comp[best],
    tokens[worst],
    attn[worst],
    comp[worst],
    keep,
    scores[best],
    scores[worst],
  )


@_setup.in_mesh_context
def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  init_params=None,
  reward_params=None,
  reward_model=None,
):
  """Online DPO / DNO; returns ``(state, run, history)``."""
  ref_mode = config.online.reference
  if ref_mode not in REFERENCE_MODES:
    raise ValueError(
      f"config.online.reference={ref_mode!r}; valid choices "
      f"are {REFERENCE_MODES}."
    )
  group = config.online.num_generations
  if group < 2:
    raise ValueError(
      f"config.online.num_generations must be >= 2 to form pairs, got {group}."
    )
  extra = ("chosen_rewards", "rejected_rewards")
  preference_lib.loss_spec(config, extra)
  tokenizer = _data.tokenizer_of(config)
  task = policy_eval.task_of(config)
  iterations = config.total_steps
  updates = config.online.updates_per_iteration
  run_ = _setup.setup_run(
    config,
    workdir,
    kind="causal_lm",
    total_steps=iterations * updates,
    init_params=(lambda _: init_params) if init_params is not None else None,
    restore=False,
  )
  state = run_.state
  prompts_it = _data.iterator(config, "prompt", tokenizer)
  reference = _setup.frozen_copy(state["params"], run_.model.param_shardings)
  start = 0
  if run_.checkpointer is not None:
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      {"state": state, "reference": reference},
      {"state": run_.state_shardings, "reference": run_.model.param_shardings},
    )
    restored = run_.checkpointer.restore(abstract)
    if restored is not None:
      both, extra_state = restored
      state, reference = both["state"], both["reference"]
      prompts_it.set_state(extra_state["data_state"])
      start = int(extra_state.get("iteration", 0))
  sampler = sampling.Sampler(
    run_.model.graphdef,
    run_.model.rest,
    max_new_tokens=config.online.max_new_tokens,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id,
  )
  if reward_params is None and config.reward.source in ("model", "ensemble"):
    reward_params, reward_model = _setup.load_reward_model(
      config.reward.checkpoint,
      run_.mesh,
      run_.rules,
      "config.reward.checkpoint",
    )
  scorer = rl.RewardScorer(
    config,
    tokenizer,
    reward_params=reward_params,
    reward_model=reward_model,
    task=task,
  )
  loss_fn, _, _ = preference_lib.make_loss_fn(
    run_.model.graphdef,
    run_.model.rest,
    config,
    extra,
    completion_len=config.online.max_new_tokens,
  )
  step = common.make_train_step(loss_fn, run_.tx)
  jitted = jax.jit(
    step, out_shardings=(run_.state_shardings, None), donate_argnums=(0,)
  )
  writer = common.MetricWriter(
    run_.workdir,
    total_steps=iterations,
    name="online_preference",
    resume_step=start,
    progress=config.get("progress", True),
  )
  # Resumed: the iterations before the checkpoint, as logged (the writer
  # has dropped any logged after it).
  history = common.read_metrics(writer.path) if start else []
  with common._Preemption() as preemption:  # noqa: SLF001
    for it in range(start + 1, iterations + 1):
      pb = next(prompts_it)
      records = [
        prompts_it.records[int(i)] for i in np.asarray(pb.prompt_index)
      ]
      dev = _data.device_batch(pb, run_)
      key = jax.random.fold_in(jax.random.key(config.seed + 23), it)
      out = sampler.generate(
        state["params"],
        dev.prompt_tokens,
        dev.prompt_mask,
        key,
        num_samples=group,
        temperature=config.online.temperature,
      )
      prompts = [r["prompt"] for r in records for _ in range(group)]
      texts = scorer.texts(out.completion_tokens, out.completion_mask)
      tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], 1)
      attn = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
      scores = scorer(
        tokens, attn, prompts, texts, [r for r in records for _ in range(group)]
      )
      pairs = make_pairs(
        out, jnp.asarray(scores, jnp.float32), group, config.online.min_margin
      )
      pairs = sharding_lib.shard_batch(
        jax.device_get(pairs), run_.mesh, run_.rules
      )
      step_metrics = []
      for _ in range(updates):
        state, metrics = jitted(state, reference, pairs)
        step_metrics.append(jax.device_get(metrics))
      metrics = {
        k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]
      }
      if not np.isfinite(metrics["loss"]):
        raise common.NonFiniteLossError(
          f"online_preference: non-finite loss at iteration {it}."
        )
      metrics["score"] = float(np.mean(np.asarray(scores)))
      metrics["pairs_kept"] = float(np.mean(np.asarray(pairs.example_mask)))
      gold = scorer.gold(prompts, texts)
      if gold is not None:
        metrics["gold_reward"] = float(np.mean(gold))
      if ref_mode == "swap":
        reference = _setup.frozen_copy(
          state["params"], run_.model.param_shardings
        )
      writer.write(it, metrics, console_keys=("loss", "score"))
      history.append({"step": it, **metrics})
      stop = preemption.requested
      ck = run_.checkpointer
      if ck is not None and (ck.should_save(it) or stop or it == iterations):
        ck.save(
          it,
          {"state": state, "reference": reference},
          {"data_state": prompts_it.get_state(), "iteration": it},
          force=True,
          wait=stop,
        )
      if stop:
        writer.close()
        raise common.Preempted()
  writer.close()
  _setup.finish(
    run_, state, history, kind="causal_lm", name="online_preference"
  )
  if _setup.is_main_process():
    (run_.workdir / "online_history.json").write_text(json.dumps(history))
  return state, run_, history
