"""Jitted KV-cache sampling for on-policy rollouts."""

from alignment.sampling.sampler import SampleOutput
from alignment.sampling.sampler import Sampler
from alignment.sampling.sampler import process_logits
