"""Benchmark worker, Tunix side (runs in ``.venv-tunix``: google-tunix 0.1.7,
jax 0.10.2, flax 0.12.8).

``python bench/peers/tunix_worker.py '<spec json>'``; protocol in
``bench/_protocol.py``. Builds Tunix's own ``Llama3`` model
(``tunix.models.llama3.model``) with the dimensions of our preset (tied
embeddings; its MLP kernels, which Tunix initialises to zero, are
re-drawn from a normal distribution so the work is that of a real model)
and runs the real training loops:

* ``dpo``: ``tunix.sft.dpo.dpo_trainer.DPOTrainer.train`` on pre-tokenised
  ``TrainingInput`` batches (prompt left-padded, completions right-padded:
  the same ids as ours, prompt P + completion C + EOS);
* ``grpo``: ``tunix.rl.grpo.grpo_learner.GRPOLearner.train`` through an
  ``RLCluster`` with the ``vanilla`` rollout engine (Tunix's KV-cache
  sampler), actor and reference on one CPU device.

Steps are timed at the boundaries where the training loop asks the data
iterator for its next batch; there the worker first waits until the
model's parameters are computed (Tunix would otherwise keep up to
``max_inflight_computations`` steps in flight), so each step is timed
synchronously, as on the other sides.
"""

import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _protocol  # noqa: E402


def _model(spec, rngs_seed):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tunix.models.llama3 import model as llama3

  m = spec["model"]
  cfg = llama3.ModelConfig(
    num_layers=m["n_layers"],
    vocab_size=m["vocab_size"],
    embed_dim=m["d_model"],
    hidden_dim=m["d_ff"],
    num_heads=m["n_heads"],
    head_dim=m["head_dim"],
    num_kv_heads=m["n_kv_heads"],
    rope_theta=int(m["rope_theta"]),
    norm_eps=m["norm_eps"],
    weight_tying=m["tie_embeddings"],
  )
  model = llama3.Llama3(cfg, rngs=nnx.Rngs(rngs_seed))
  # Tunix initialises the MLP kernels to zero; draw them like the others.
  state = nnx.state(model, nnx.Param)
  key = jax.random.key(rngs_seed + 1)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  new = [
    (jax.random.normal(k, x.shape, x.dtype) * m["init_std"])
    if x.ndim >= 2 and not jnp.any(x)
    else x
    for k, x in zip(keys, leaves, strict=True)
  ]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model, cfg


def _optimizer(spec):
  import optax

  tx = optax.adamw(
    spec["learning_rate"],
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=spec.get("weight_decay", 0.0),
  )
  if spec.get("max_grad_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(spec["max_grad_norm"]), tx)
  return tx


def main():
  spec = _protocol.read_spec()
  warnings.filterwarnings("ignore")
  import jax
  import numpy as np
  import tunix
  from flax import nnx

  task = spec["task"]
  model, cfg = _model(spec, spec.get("seed", 0))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  info = {
    "side": "tunix",
    "tunix": getattr(tunix, "__version__", "0.1.7"),
    "jax": jax.__version__,
    "params": int(n_params),
  }
  holder = {}

  def timed_batches(server, make_batch):
    """An endless iterator that times the steps between its yields."""
    timer = _protocol.StepTimer(server)
    server.start()
    timer.begin()
    while True:
      yield make_batch()
      # The loop asks for the next batch: the previous step was dispatched.
      jax.block_until_ready(nnx.state(holder["model"], nnx.Param))
      timer.end()
      timer.begin()

  if task == "dpo":
    from tunix.sft.dpo import dpo_trainer as dpo_lib

    prompt, chosen, rejected = _protocol.preference_ids(spec)
    b = prompt.shape[0]
    eos = np.full((b, 1), spec["model"]["eos_id"])
    chosen = np.concatenate([chosen, eos], 1).astype(np.int32)
    rejected = np.concatenate([rejected, eos], 1).astype(np.int32)
    batch = dpo_lib.TrainingInput(
      prompt_ids=prompt.astype(np.int32),
      prompt_mask=np.ones(prompt.shape, np.int32),
      chosen_ids=chosen,
      chosen_mask=np.ones(chosen.shape, np.int32),
      rejected_ids=rejected,
      rejected_mask=np.ones(rejected.shape, np.int32),
    )
    length = prompt.shape[1] + chosen.shape[1]
    tokens_per_step = 2 * b * length
    info["batch_shape"] = [2 * b, length]
    info["ids_checksum"] = int(2 * prompt.sum() + chosen.sum() + rejected.sum())
    ref, _ = _model(spec, spec.get("seed", 0))
    trainer = dpo_lib.DPOTrainer(
      model=model,
      ref_model=ref,
      optimizer=_optimizer(spec),
      training_config=dpo_lib.DPOTrainingConfig(
        eval_every_n_steps=10**9,
        max_steps=10**9,
        beta=spec.get("beta", 0.1),
        pbar_description=None,
      ),
    )
    holder["model"] = model
    info["setup_s"] = time.perf_counter() - T0
    server = _protocol.StepServer(
      warmup=spec.get("warmup", 2),
      tokens_per_step=tokens_per_step,
      info=info,
    )
    trainer.train(timed_batches(server, lambda: batch))
  elif task == "grpo":
    _grpo(spec, model, cfg, info, holder, timed_batches)
  else:
    _protocol.fail(f"Tunix has no trainer for task {task!r}")
  _protocol.fail("Tunix's train() returned before the parent said quit")


def _grpo(spec, model, cfg, info, holder, timed_batches):
  del cfg
  import jax
  import numpy as np
  import optax
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  m = spec["model"]
  vocab = _protocol.char_vocab(
    m["vocab_size"], m["pad_id"], m["bos_id"], m["eos_id"]
  )
  tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
  tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
  tok = PreTrainedTokenizerFast(
    tokenizer_object=tk,
    pad_token="<pad>",
    eos_token="<eos>",
    unk_token="<pad>",
  )  # no BOS: Tunix's sampler would prepend it; the other sides do not
  b, group = spec["batch"], spec["num_generations"]
  p_len, t = spec["prompt_len"], spec["completion_len"]
  ref, _ = _model(spec, spec.get("seed", 0))
  mesh = jax.make_mesh(
    (1, 1),
    ("fsdp", "tp"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  role = rl_cluster_lib.Role
  cluster_config = rl_cluster_lib.ClusterConfig(
    role_to_mesh={role.ACTOR: mesh, role.REFERENCE: mesh, role.ROLLOUT: mesh},
    rollout_engine="vanilla",
    offload_to_cpu=False,
    training_config=rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=_optimizer(spec),
      eval_every_n_steps=10**9,
      max_steps=10**9,
      mini_batch_size=b,
      train_micro_batch_size=b,
      checkpoint_root_directory=tempfile.mkdtemp(prefix="bench_tunix_"),
      pbar_description=None,
    ),
    rollout_config=base_rollout.RolloutConfig(
      max_tokens_to_generate=t,
      max_prompt_length=p_len,
      kv_cache_size=p_len + t + 8,
      temperature=1.0,
      top_p=1.0,
      top_k=None,
      # EOS outside the vocabulary: every row samples exactly T tokens.
      eos_tokens=[m["vocab_size"]],
    ),
  )
  cluster = rl_cluster_lib.RLCluster(
    actor=model, reference=ref, tokenizer=tok, cluster_config=cluster_config
  )

  def even_fraction(prompts, completions, **kwargs):
    del prompts, kwargs
    return [
      sum(ord(ch) % 2 == 0 for ch in c) / max(len(c), 1) for c in completions
    ]

  learner = grpo_learner.GRPOLearner(
    rl_cluster=cluster,
    reward_fns=[even_fraction],
    algo_config=grpo_learner.GRPOConfig(
      num_generations=group,
      num_iterations=1,
      beta=spec.get("beta", 0.04),
      epsilon=0.2,
    ),
  )
  prompts = _protocol.random_ids(spec, (b, p_len), 4)
  texts = [_protocol.text_of(p) for p in prompts]
  holder["model"] = cluster.actor_trainer.model
  info["setup_s"] = time.perf_counter() - T0
  info["tokens_checked"] = len(tok(texts[0])["input_ids"]) == p_len
  del optax
  server = _protocol.StepServer(
    warmup=spec.get("warmup", 2),
    tokens_per_step=b * group * (p_len + t),
    info=info,
  )
  # Tunix's learner tree-maps np.repeat over the batch: prompts must be
  # one array of strings.
  batch = {"prompts": np.array(texts)}
  learner.train(timed_batches(server, lambda: batch))


if __name__ == "__main__":
  T0 = time.perf_counter()
  _protocol.guarded(main)
