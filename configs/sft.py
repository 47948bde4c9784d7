r"""Supervised fine-tuning on (prompt, completion) data.

Local smoke run (CPU, tiny model, synthetic data):
  python -m alignment.main --config=configs/sft.py:runlocal --workdir=runs/sft
Real data (JSONL rows {"prompt", "completion"}):
  ... --config=configs/sft.py:model=llama-3.2-1b --config.data.source=jsonl \
      --config.data.path=/data/sft.jsonl --config.model.init_from=/ckpt/llama
"""

import ml_collections

from alignment import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, model="small", runlocal=False)
  config = config_lib.base(
    "sft",
    total_steps=2000,
    batch_size=64,
    learning_rate=1e-4,
    model_preset=arg.model,
  )
  config.data = config_lib.data(
    "synthetic", max_prompt_len=256, max_completion_len=256
  )
  if arg.runlocal:
    config_lib.runlocal(config)
  return config


def get_sweep(add):
  for lr in (3e-5, 1e-4, 3e-4):
    add(**{"optimizer.learning_rate": lr})
