"""``alignment.main`` with a pause before every train step (tests only).

  python -m tests.trainers._slow_main --config=... --workdir=...

The pause (``ALIGNMENT_TEST_STEP_SLEEP`` seconds) only spaces the steps out
in time, so that a test can signal the process part-way through a run; it
changes no value the run computes.
"""

import os
import sys
import time

from alignment import main
from alignment.trainers import common

_train_loop = common.train_loop


def _slow_train_loop(**kwargs):
  pause = float(os.environ.get("ALIGNMENT_TEST_STEP_SLEEP", "0.5"))
  batches = kwargs["batches"]

  def slow():
    for batch in batches:
      time.sleep(pause)
      yield batch

  kwargs["batches"] = slow()
  return _train_loop(**kwargs)


if __name__ == "__main__":
  common.train_loop = _slow_train_loop
  sys.argv[0] = "alignment.main"
  main.run_main()
