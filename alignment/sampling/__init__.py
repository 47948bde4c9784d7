"""Jitted KV-cache sampling for on-policy rollouts."""

from alignment.sampling.sampler import SampleOutput, Sampler, process_logits
