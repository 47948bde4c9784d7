"""The logits path stays vocabulary-sharded in the compiled DPO/GRPO steps.

The DPO-like and GRPO-like steps of ``alignment.sharding.planner`` (policy
and frozen reference log-probs through ``ops.fused_token_logps`` on a
``CausalLM``, ``losses.dpo_loss`` / ``losses.grpo_loss`` + k3 KL, AdamW via
``trainers.common.make_train_step``) are compiled for a data x fsdp x tensor
mesh of 8 fake CPU devices. In the partitioned HLO no all-gather produces a
logits-sized array with the whole vocabulary, and the logit tiles are
``[local tokens, V / tensor]``.
"""

import re

import numpy as np
from absl.testing import absltest, parameterized

from alignment import config_lib, models, sharding
from alignment.sharding import planner

RULES = config_lib.DEFAULT_RULES
VOCAB = 260  # tiny: V / 2 = 130, D = 64, so tiles and weights differ
SEQ_LEN = 32
ROWS = 16  # 8 DPO pairs, or 4 GRPO prompts x 4 samples
FSDP, TENSOR = 4, 2
LOCAL_TOKENS = ROWS // FSDP * (SEQ_LEN - 1)  # 124


def _compiled_hlo(trainer: str) -> str:
  cfg = models.get_preset("tiny")
  assert cfg.vocab_size == VOCAB
  mesh = sharding.make_mesh([("data", 1), ("fsdp", FSDP), ("tensor", TENSOR)])
  batch = ROWS // 2 if trainer == "dpo" else ROWS // 4
  workload = planner.Workload(
    trainer, batch=batch, seq_len=SEQ_LEN, num_samples=4
  )
  lowered = planner.lower_train_step(cfg, workload, mesh, RULES)
  return lowered.compile().as_text()


class LogitsPathTest(parameterized.TestCase):
  def test_hlo_collective_parser(self):
    text = (
      "%all-gather.3 = f32[64,130]{0,1} all-gather(%p), dimensions={1}\n"
      "%ag = (f32[8,260]{1,0}, u32[]) all-gather-start(%x)\n"
      "%ar = f32[4]{0} all-reduce(%y), to_apply=%add\n"
    )
    self.assertEqual(
      planner.hlo_collectives(text, "all-gather"),
      [("f32", (64, 130)), ("f32", (8, 260))],
    )
    self.assertEqual(
      planner.hlo_collectives(text, "all-reduce"), [("f32", (4,))]
    )

  @parameterized.parameters("dpo", "grpo")
  def test_vocabulary_is_never_gathered_whole(self, trainer):
    text = _compiled_hlo(trainer)
    gathers = planner.hlo_collectives(text, "all-gather")
    self.assertNotEmpty(gathers)  # FSDP does gather weights
    for dtype, dims in gathers:
      if VOCAB in dims:
        rows = int(np.prod(dims)) // VOCAB
        # Weight-shaped gathers ([D/k, V] or [V, D/k]) are fine; a gather
        # with a token dimension and the whole vocabulary is not.
        self.assertLess(
          rows,
          LOCAL_TOKENS,
          f"{trainer}: all-gather of {dtype}{list(dims)} holds the whole "
          f"vocabulary for {rows} rows",
        )
    # The logits tiles are computed with the vocabulary split over tensor.
    tile = f"f32[{LOCAL_TOKENS},{VOCAB // TENSOR}]"
    self.assertTrue(tile in text, f"{trainer}: no {tile} logits tile")
    whole = f"f32[{LOCAL_TOKENS},{VOCAB}]"
    self.assertFalse(whole in text, f"{trainer}: a {whole} tile exists")
    self.assertIsNone(
      re.search(rf"f32\[{ROWS},{SEQ_LEN - 1},{VOCAB}\]", text),
      f"{trainer}: a full [B, T, V] array exists",
    )


if __name__ == "__main__":
  absltest.main()
