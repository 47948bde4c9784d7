"""Array primitives shared by losses, advantages and trainers.

Pure functions of arrays: no Flax, no configs.
"""

from alignment.ops._attention import *  # noqa: F403
from alignment.ops._fused import FUSED_DEFAULT_CHUNK_SIZE
from alignment.ops._fused import FUSED_DEFAULT_VOCAB_CHUNK_SIZE
from alignment.ops._fused import fused_token_logps
from alignment.ops._kl import KL_ESTIMATORS
from alignment.ops._kl import kl_estimate
from alignment.ops._kl import kl_k1
from alignment.ops._kl import kl_k2
from alignment.ops._kl import kl_k3
from alignment.ops._kl import kl_k3_straight_through
from alignment.ops._logprobs import entropy_from_logits
from alignment.ops._logprobs import sequence_logps
from alignment.ops._logprobs import token_logps
from alignment.ops._masked import AGGREGATION_MODES
from alignment.ops._masked import WeightedMean
from alignment.ops._masked import aggregate_sequence_loss
from alignment.ops._masked import aggregate_token_loss
from alignment.ops._masked import masked_mean
from alignment.ops._masked import masked_sum
from alignment.ops._masked import masked_var
from alignment.ops._masked import masked_whiten
from alignment.ops._masked import safe_divide
from alignment.ops._normalizers import *  # noqa: F403
