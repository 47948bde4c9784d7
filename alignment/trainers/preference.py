"""Offline preference optimisation: every loss of ``losses.PREFERENCE_LOSSES``.

One forward of the policy over ``[chosen; rejected]`` (and one of the frozen
reference unless the batch carries precomputed reference log-probs or the
loss is reference-free) produces every array a preference loss may name
(summed and per-token log-probs, masks, lengths); the configured loss picks
the ones it needs by parameter name. Unpaired losses (KTO, BCO) read
``UnpairedBatch`` rows instead.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from alignment import losses, ops
from alignment.trainers import _data, _lm, _setup, common

# Arrays a trainer can supply without extra models.
_PAIRED = ("policy_chosen_logps", "policy_rejected_logps",
           "ref_chosen_logps", "ref_rejected_logps",
           "policy_chosen_token_logps", "policy_rejected_token_logps",
           "ref_chosen_token_logps", "ref_rejected_token_logps",
           "chosen_mask", "rejected_mask", "chosen_lengths",
           "rejected_lengths", "reward_mean")
_UNPAIRED = ("policy_logps", "ref_logps", "labels", "kl_reference",
             "reward_shift")


def loss_spec(config: ml_collections.ConfigDict, extra_supplied=()):
  """``(fn, hyperparameters, data kind, needs_reference)`` for config.loss.

  ``extra_supplied`` names arrays a caller adds to the batch (the online
  trainer supplies reward-model scores as ``chosen_rewards`` /
  ``rejected_rewards``).
  """
  name = config.loss.name
  if name not in losses.PREFERENCE_LOSSES:
    raise ValueError(f"config.loss.name={name!r} is not a preference loss; "
                     f"valid choices are {sorted(losses.PREFERENCE_LOSSES)}.")
  fn = losses.PREFERENCE_LOSSES[name]
  hyper = {k: v for k, v in config.loss.items() if k != "name"}
  _lm.check_hyperparameters(fn, hyper, "config.loss", name)
  arrays, required, _ = _lm.split_kwargs(fn)
  kind = "unpaired" if "labels" in arrays else "preference"
  supplied = (_UNPAIRED if kind == "unpaired" else _PAIRED) + tuple(
      extra_supplied)
  missing = [a for a in required if a not in supplied]
  if missing:
    raise ValueError(
        f"config.loss.name={name!r} needs {missing}, which the offline "
        f"preference trainer cannot compute from (prompt, chosen, rejected) "
        f"data; it supplies {list(supplied)}. Use the online_preference "
        f"trainer (reward-model scores) or precomputed columns.")
  needs_ref = any(a.startswith("ref_") for a in arrays if a in required)
  return fn, hyper, kind, needs_ref


def _split_pairs(x, b):
  return x[:b], x[b:]


def paired_logps(model, batch, *, chunk_size):
  """Per-token log-probs of chosen and rejected in one forward.

  Returns ``(chosen_token_logps, rejected_token_logps, chosen_mask,
  rejected_mask)``, each ``[B, L-1]``, log-probs zeroed where masked.
  """
  b = batch.chosen_tokens.shape[0]
  tokens = jnp.concatenate(_lm.pad_to_same_length(
      batch.chosen_tokens, batch.rejected_tokens), axis=0)
  attn = jnp.concatenate(_lm.pad_to_same_length(
      batch.chosen_attention_mask, batch.rejected_attention_mask), axis=0)
  comp = jnp.concatenate(_lm.pad_to_same_length(
      batch.chosen_completion_mask, batch.rejected_completion_mask), axis=0)
  token_logps, mask = _lm.completion_token_logps(
      model, tokens, attn, comp, chunk_size=chunk_size)
  token_logps = jnp.where(mask, token_logps, 0.0)
  lc, lr = _split_pairs(token_logps, b)
  mc, mr = _split_pairs(mask, b)
  return lc, lr, mc, mr


def make_loss_fn(graphdef, rest, config, extra_supplied=()):
  """``loss_fn(params, frozen, batch, rng)`` for the configured loss.

  ``frozen`` is the reference model's params (or None). Fields of the batch
  named in ``extra_supplied`` are passed to the loss as arrays.
  """
  fn, hyper, kind, needs_ref = loss_spec(config, extra_supplied)
  chunk = config.get("logps_chunk_size", 2048)
  beta = float(hyper.get("beta", 0.1))

  def ref_model(frozen):
    return nnx.merge(graphdef, jax.lax.stop_gradient(frozen), rest)

  def paired(params, frozen, batch, rng):
    del rng
    model = nnx.merge(graphdef, params, rest)
    lc, lr, mc, mr = paired_logps(model, batch, chunk_size=chunk)
    avail = {
        "policy_chosen_token_logps": lc, "policy_rejected_token_logps": lr,
        "chosen_mask": mc, "rejected_mask": mr,
        "policy_chosen_logps": lc.sum(-1), "policy_rejected_logps":
        lr.sum(-1), "chosen_lengths": mc.sum(-1).astype(jnp.float32),
        "rejected_lengths": mr.sum(-1).astype(jnp.float32)}
    if needs_ref:
      if batch.ref_chosen_logps is not None and frozen is None:
        avail["ref_chosen_logps"] = batch.ref_chosen_logps
        avail["ref_rejected_logps"] = batch.ref_rejected_logps
      else:
        rc, rr, _, _ = paired_logps(ref_model(frozen), batch,
                                    chunk_size=chunk)
        avail.update(ref_chosen_token_logps=rc, ref_rejected_token_logps=rr,
                     ref_chosen_logps=rc.sum(-1),
                     ref_rejected_logps=rr.sum(-1))
      # BCO-pair's reference point: the batch mean implicit reward
      # (stop-gradient; TRL keeps a running mean across steps instead).
      avail["reward_mean"] = jax.lax.stop_gradient(jnp.mean(beta * jnp.concatenate([
          avail["policy_chosen_logps"] - avail["ref_chosen_logps"],
          avail["policy_rejected_logps"] - avail["ref_rejected_logps"]])))
    for name in extra_supplied:
      avail[name] = getattr(batch, name)
    loss, aux = _lm.call_by_name(fn, avail, hyper, config.loss.name)
    wm = ops.aggregate_sequence_loss(loss, batch.example_mask)
    metrics = {"pref_loss": wm.value()}
    chosen_r = getattr(aux, "chosen_rewards", None)
    rejected_r = getattr(aux, "rejected_rewards", None)
    if chosen_r is not None and rejected_r is not None:
      m = batch.example_mask
      metrics["reward_accuracy"] = _lm.masked_batch_mean(
          (chosen_r > rejected_r).astype(jnp.float32), m)
      metrics["reward_margin"] = _lm.masked_batch_mean(chosen_r - rejected_r,
                                                       m)
      metrics["chosen_reward"] = _lm.masked_batch_mean(chosen_r, m)
      metrics["rejected_reward"] = _lm.masked_batch_mean(rejected_r, m)
    metrics["policy_chosen_logps"] = _lm.masked_batch_mean(
        avail["policy_chosen_logps"], batch.example_mask)
    return wm, metrics

  def unpaired(params, frozen, batch, rng):
    del rng
    model = nnx.merge(graphdef, params, rest)
    lp, mask = _lm.completion_token_logps(
        model, batch.tokens, batch.attention_mask, batch.completion_mask,
        chunk_size=chunk)
    policy_logps = jnp.where(mask, lp, 0.0).sum(-1)
    avail = {"policy_logps": policy_logps, "labels": batch.labels}
    if frozen is not None:
      rlp, _ = _lm.completion_token_logps(
          ref_model(frozen), batch.tokens, batch.attention_mask,
          batch.completion_mask, chunk_size=chunk)
      avail["ref_logps"] = jnp.where(mask, rlp, 0.0).sum(-1)
    elif batch.ref_logps is not None:
      avail["ref_logps"] = batch.ref_logps
    if batch.kl_tokens is not None and frozen is not None:
      # KTO's z0: KL(π || π_ref) on mismatched (prompt, completion) rows,
      # clamped at 0, no gradient (Ethayarajh et al. 2024, §4.2).
      klp, kmask = _lm.completion_token_logps(
          model, batch.kl_tokens, batch.kl_attention_mask,
          batch.kl_completion_mask, chunk_size=chunk)
      rklp, _ = _lm.completion_token_logps(
          ref_model(frozen), batch.kl_tokens, batch.kl_attention_mask,
          batch.kl_completion_mask, chunk_size=chunk)
      diff = jnp.where(kmask, klp - rklp, 0.0).sum(-1)
      z0 = jnp.maximum(_lm.masked_batch_mean(diff, batch.example_mask), 0.0)
      avail["kl_reference"] = jax.lax.stop_gradient(z0)
    else:
      avail["kl_reference"] = jnp.zeros((), jnp.float32)
    if "ref_logps" in avail:
      avail["reward_shift"] = jax.lax.stop_gradient(_lm.masked_batch_mean(
          beta * (policy_logps - avail["ref_logps"]), batch.example_mask))
    loss, aux = _lm.call_by_name(fn, avail, hyper, config.loss.name)
    del aux
    wm = ops.aggregate_sequence_loss(loss, batch.example_mask)
    return wm, {"pref_loss": wm.value(),
                "kl_reference": avail["kl_reference"]}

  return (unpaired if kind == "unpaired" else paired), kind, needs_ref


@_setup.in_mesh_context
def run(config: ml_collections.ConfigDict, workdir: str, *,
        init_params=None, reference_params=None):
  """Trains the configured preference loss; returns ``(state, run)``.

  Args:
    config: a ``configs/preference.py`` config.
    workdir: checkpoints, metrics and plots go here.
    init_params: optional params to start the policy from (the default
      pipeline passes the SFT policy); else ``config.model`` (preset or
      ``init_from`` Hugging Face checkpoint).
    reference_params: optional frozen reference params (default: a copy of
      the initial policy).
  """
  _, _, kind, needs_ref = loss_spec(config)
  tokenizer = _data.tokenizer_of(config)
  run_ = _setup.setup_run(
      config, workdir, kind="causal_lm", total_steps=config.total_steps,
      init_params=(lambda _: init_params) if init_params is not None
      else None)
  batches = _data.iterator(config, kind, tokenizer, run_)
  frozen = None
  if needs_ref and config.get("reference", "init") != "precomputed":
    if reference_params is not None:
      frozen = reference_params
    elif int(run_.state["step"]) == 0:
      frozen = _setup.frozen_copy(run_.state["params"],
                                  run_.model.param_shardings)
    else:  # resumed: the reference is the initial policy, rebuild it
      fresh, _ = _setup.build_model("causal_lm", config.model, run_.mesh,
                                    run_.rules, config.seed)
      frozen = init_params if init_params is not None else fresh.params
  loss_fn, _, _ = make_loss_fn(run_.model.graphdef, run_.model.rest, config)
  step = common.make_train_step(loss_fn, run_.tx,
                                num_microbatches=config.get("microbatches", 1))
  jitted = jax.jit(step, out_shardings=(run_.state_shardings, None),
                   donate_argnums=(0,))
  state, history = common.train_loop(
      step_fn=jitted, state=run_.state, frozen=frozen,
      batches=_data.device_batches(batches, run_),
      total_steps=config.total_steps, workdir=run_.workdir,
      checkpointer=run_.checkpointer, name="preference",
      log_every=config.get("log_every", 1), data_state_fn=batches.get_state,
      progress=config.get("progress", True),
      console_keys=("loss", "reward_accuracy"))
  _setup.finish(run_, state, history, kind="causal_lm", name="preference")
  return state, run_
