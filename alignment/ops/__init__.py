"""Array primitives shared by losses, advantages and trainers.

Pure functions of arrays: no Flax, no configs.
"""

from alignment.ops._attention import *  # noqa: F403
from alignment.ops._fused import (
  FUSED_DEFAULT_CHUNK_SIZE,
  FUSED_DEFAULT_VOCAB_CHUNK_SIZE,
  FUSED_DENSE_LOGITS_BYTES,
  fused_dense_rows,
  fused_token_logps,
)
from alignment.ops._kl import (
  KL_ESTIMATORS,
  kl_estimate,
  kl_k1,
  kl_k2,
  kl_k3,
  kl_k3_straight_through,
)
from alignment.ops._logprobs import (
  entropy_from_logits,
  sequence_logps,
  token_logps,
)
from alignment.ops._masked import (
  AGGREGATION_MODES,
  WeightedMean,
  aggregate_sequence_loss,
  aggregate_token_loss,
  masked_mean,
  masked_sum,
  masked_var,
  masked_whiten,
  safe_divide,
)
from alignment.ops._normalizers import *  # noqa: F403
