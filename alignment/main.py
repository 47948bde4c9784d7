r"""Entry point: flags → config → ``trainers.REGISTRY[config.trainer].run``.

  python -m alignment.main --config=configs/preference.py:runlocal \
      --workdir=runs/dpo --config.loss.beta=0.05

Kept short on purpose (as flax's lm1b and big_vision main files are).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, metrics and plots.",
  required=True,
)
config_flags.DEFINE_config_file(
  "config",
  None,
  "A configs/*.py file, optionally with ':arg'.",
  lock_config=True,
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from alignment import host_memory  # noqa: PLC0415

  # Before JAX starts its threads: with ALIGNMENT_MALLOC=keep (or auto on
  # the CPU) freed step temporaries stay mapped instead of faulting in
  # again every step (default: the C library's defaults).
  host_memory.configure()
  import jax  # noqa: PLC0415 - after flags so XLA flags can be set first

  if os.environ.get("ALIGNMENT_DISTRIBUTED"):
    # TPU pods and SLURM fill in the coordinator from the environment; a
    # local multi-process run passes them explicitly.
    kwargs = {}
    if os.environ.get("ALIGNMENT_COORDINATOR"):
      kwargs = dict(
        coordinator_address=os.environ["ALIGNMENT_COORDINATOR"],
        num_processes=int(os.environ["ALIGNMENT_NUM_PROCESSES"]),
        process_id=int(os.environ["ALIGNMENT_PROCESS_ID"]),
      )
    jax.distributed.initialize(**kwargs)
  jax.config.update("jax_threefry_partitionable", True)

  from alignment import config_lib, trainers  # noqa: PLC0415

  config = flags.FLAGS.config
  config_lib.check_required(config)  # hyperparameters without a default
  if jax.process_index() == 0:
    logging.info("config:\n%s", config)
  trainer = trainers.get_trainer(config.trainer)
  trainer.run(config, _WORKDIR.value)


def run_main():
  app.run(main)


if __name__ == "__main__":
  run_main()
