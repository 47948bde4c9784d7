"""``config.share_prompt`` (reward-model trainer): one packed row per pair.

The reward head reads each response's last real token of the packed row
``[prompt | chosen | rejected]`` (``score_at``); loss, metrics and
parameter gradients must equal the unpacked step's (1e-5, float32) for a
scalar head and for a stacked ensemble (members under ``nnx.vmap``).
"""

from absl.testing import absltest, parameterized

from alignment.trainers import reward_model as rm
from tests.trainers import _share_prompt as sp
from tests.trainers import _util


class RewardModelSharePromptTest(parameterized.TestCase):
  @parameterized.parameters(
    ("bradley_terry", "none"), ("bradley_terry", "stacked")
  )
  def test_reward_model_loss_and_grads_equal_unpacked(self, name, ensemble):
    config = _util.load_config(
      "reward_model", f"loss={name},ensemble={ensemble},members=2,runlocal"
    )
    kind, kwargs = rm.model_kind(config)
    graphdef, params, rest = sp.split(kind, 0, **kwargs)

    def make(share):
      config.share_prompt = share
      return rm.make_loss_fn(graphdef, rest, config)

    sp.assert_same(
      self, sp.value_and_grad(make, graphdef, rest, params, None, sp.pairs())
    )


if __name__ == "__main__":
  absltest.main()
