"""Benchmark worker, TRL side (runs in ``.venv-oracle``: torch 2.13 CPU,
trl 1.16.0, transformers 5.23.0).

``python bench/peers/trl_worker.py '<spec json>'``; protocol in
``bench/_protocol.py``. Runs the real ``trainer.train()`` loop of TRL's
``DPOTrainer`` / ``RewardTrainer`` / ``GRPOTrainer`` on a randomly
initialised ``LlamaForCausalLM`` (``LlamaForSequenceClassification`` for the
reward model) with the same dimensions as our preset; a ``TrainerCallback``
times each optimiser step from ``on_step_begin`` to ``on_step_end`` (forward,
backward, clipping, AdamW, and for GRPO the generation and scoring, which
TRL runs inside the step) and pauses there between the parent's step blocks.
Batch collation happens before ``on_step_begin`` and is not timed (our side
is timed without its data pipeline too).

Text in, same ids out: each token id is one character (``_protocol.
char_vocab``), so TRL's tokenisation reproduces our random token ids
exactly (prompt P + completion C + EOS).

``spec["variant"]``: ``fp32`` (float32, gradient checkpointing off: like
for like with our float32 steps) or ``defaults`` (TRL's own defaults:
``bf16=True`` autocast, ``gradient_checkpointing=True``).
"""

import copy
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _protocol  # noqa: E402


def main():
  spec = _protocol.read_spec()
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  warnings.filterwarnings("ignore")
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers
  from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
  )

  transformers.logging.set_verbosity_error()
  m = spec["model"]
  task = spec["task"]
  variant = spec.get("variant", "fp32")
  torch.manual_seed(spec.get("seed", 0))

  vocab = _protocol.char_vocab(
    m["vocab_size"], m["pad_id"], m["bos_id"], m["eos_id"]
  )
  tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
  tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
  tok = PreTrainedTokenizerFast(
    tokenizer_object=tk,
    pad_token="<pad>",
    bos_token="<bos>",
    eos_token="<eos>",
    unk_token="<pad>",
  )
  llama = LlamaConfig(
    vocab_size=m["vocab_size"],
    hidden_size=m["d_model"],
    intermediate_size=m["d_ff"],
    num_hidden_layers=m["n_layers"],
    num_attention_heads=m["n_heads"],
    num_key_value_heads=m["n_kv_heads"],
    head_dim=m["head_dim"],
    max_position_embeddings=m["max_len"],
    rms_norm_eps=m["norm_eps"],
    rope_theta=m["rope_theta"],
    tie_word_embeddings=m["tie_embeddings"],
    pad_token_id=m["pad_id"],
    bos_token_id=m["bos_id"],
    eos_token_id=m["eos_id"],
    hidden_act="silu",
    num_labels=1,
  )

  fp32 = variant == "fp32"
  common = dict(
    output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
    use_cpu=True,
    bf16=not fp32,
    gradient_checkpointing=not fp32,
    per_device_train_batch_size=spec["batch"],
    gradient_accumulation_steps=1,
    max_steps=10**6,
    learning_rate=spec["learning_rate"],
    lr_scheduler_type="constant",
    weight_decay=spec.get("weight_decay", 0.0),
    max_grad_norm=spec.get("max_grad_norm", 0.0),
    report_to=[],
    save_strategy="no",
    logging_steps=10**6,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=spec.get("seed", 0),
  )
  b = spec["batch"]

  if task in ("dpo", "rm"):
    prompt, chosen, rejected = _protocol.preference_ids(spec)
    n_rows = 4 * b
    rows = [
      {
        "prompt": _protocol.text_of(prompt[i % b]),
        "chosen": _protocol.text_of(chosen[i % b]),
        "rejected": _protocol.text_of(rejected[i % b]),
      }
      for i in range(n_rows)
    ]
    length = spec["prompt_len"] + spec["completion_len"] + 1
    tokens_per_step = 2 * b * length
    if task == "dpo":
      model = LlamaForCausalLM(llama)
      args = trl.DPOConfig(
        beta=spec.get("beta", 0.1),
        loss_type=["sigmoid"],
        max_length=None,
        **common,
      )
      trainer = trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
      )
    else:
      model = LlamaForSequenceClassification(llama)
      # RewardTrainer takes implicit-prompt pairs: prompt + completion text.
      rows = [
        {
          "chosen": r["prompt"] + r["chosen"],
          "rejected": r["prompt"] + r["rejected"],
        }
        for r in rows
      ]
      args = trl.RewardConfig(max_length=None, **common)
      trainer = trl.RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
      )
  elif task == "grpo":
    group = spec["num_generations"]
    t = spec["completion_len"]
    prompts = _protocol.random_ids(spec, (b, spec["prompt_len"]), 4)
    rows = [{"prompt": _protocol.text_of(p)} for p in prompts] * 4
    model_dir = tempfile.mkdtemp(prefix="bench_trl_policy_")
    LlamaForCausalLM(llama).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    def even_fraction(completions, **kwargs):
      del kwargs
      return [
        sum(ord(ch) % 2 == 0 for ch in c) / max(len(c), 1) for c in completions
      ]

    common["per_device_train_batch_size"] = b * group
    args = trl.GRPOConfig(
      num_generations=group,
      max_completion_length=t,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      beta=spec.get("beta", 0.04),
      loss_type="grpo",
      num_iterations=1,
      shuffle_dataset=False,
      # Every row samples exactly T tokens, as on our side.
      generation_kwargs={"min_new_tokens": t},
      **common,
    )
    trainer = trl.GRPOTrainer(
      model=model_dir,
      reward_funcs=even_fraction,
      args=args,
      train_dataset=Dataset.from_list(rows),
      processing_class=tok,
    )
    model = trainer.model
    tokens_per_step = b * group * (spec["prompt_len"] + t)
  else:
    raise ValueError(f"unknown task {task!r}")

  info = {}
  if task in ("dpo", "rm"):
    collated = trainer.data_collator(
      [trainer.train_dataset[i] for i in range(b)]
    )
    ids = collated.get("input_ids", collated.get("chosen_input_ids"))
    if "rejected_input_ids" in collated:
      ids = torch.cat([ids, collated["rejected_input_ids"]], 0)
    info["batch_shape"] = list(ids.shape)
    info["ids_checksum"] = int(ids.sum())
  info |= {
    "side": "trl",
    "variant": variant,
    "torch": torch.__version__,
    "trl": trl.__version__,
    "transformers": transformers.__version__,
    "threads": torch.get_num_threads(),
    "params": int(sum(p.numel() for p in model.parameters())),
    "setup_s": time.perf_counter() - T0,
    "attn_implementation": getattr(model.config, "_attn_implementation", ""),
  }
  server = _protocol.StepServer(
    warmup=spec.get("warmup", 2), tokens_per_step=tokens_per_step, info=info
  )
  timer = _protocol.StepTimer(server)

  class Timing(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      timer.begin()

    def on_step_end(self, args, state, control, **kwargs):
      timer.end()

  trainer.add_callback(Timing())
  server.start()
  trainer.train()
  _protocol.fail("trainer.train() returned before the parent said quit")


if __name__ == "__main__":
  T0 = time.perf_counter()
  _protocol.guarded(main)
