"""rollout/sampler_logprob_gap (generation.engine=vllm) and the quantized-base warning, without vLLM: the
gap is the mean over real response tokens of (sampler logprob - trained policy's old logprob)."""

from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf

from ppo_cli.ppo.vllm_rollout import (
    GAP_METRIC,
    VLLMRollouts,
    gap_message,
    quantized_bits,
    sampler_logprob_gap,
)


def test_gap_is_the_masked_mean_over_real_tokens():
    """Two rows of 3 and 1 real tokens; the pads hold what a rollout holds there (the sampler's 0, the
    trained policy's -inf for a suppressed pad), which must not leak in."""
    sampler = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, 0.0, 0.0, 0.0]])
    trained = torch.tensor([[-1.5, -2.0, -1.0, -math.inf], [-2.0, -math.inf, -math.inf, -math.inf]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    # differences at the real tokens: 0.5, 0, 0.5, -1 -> sum 0, mean 0; then make it non-zero
    assert sampler_logprob_gap(sampler, trained, mask) == 0.0
    sampler[1, 0] = -2.5  # its difference becomes -0.5: (0.5 + 0 + 0.5 - 0.5) / 4
    assert sampler_logprob_gap(sampler, trained, mask) == 0.125
    assert sampler_logprob_gap(sampler, trained, mask.long()) == 0.125  # a 0/1 mask too
    assert sampler_logprob_gap(sampler, trained, torch.zeros_like(mask)) == 0.0  # no real token


def test_quantized_base_warning_once_with_the_gap():
    assert quantized_bits(OmegaConf.create({"load_in_4bit": True, "load_in_8bit": False})) == 4
    assert quantized_bits(OmegaConf.create({"load_in_4bit": False, "load_in_8bit": True})) == 8
    assert quantized_bits(OmegaConf.create({"load_in_4bit": False, "load_in_8bit": False})) is None

    message = gap_message(4, 0.0312, 1)
    assert "\n" not in message and "model.load_in_4bit" in message and GAP_METRIC in message
    assert "0.0312 nats/token above" in message and "exactly 1" in message
    assert "0.2 nats/token below" in gap_message(8, -0.2, 3)

    rollouts = VLLMRollouts.__new__(VLLMRollouts)  # its state only: no engine
    rollouts.quantized_bits, rollouts.gap_warned = 4, False
    assert rollouts.gap_warning(1, {"objective/kl": 0.0}) is None  # no gap measured: nothing to say yet
    assert "0.05 nats/token above" in rollouts.gap_warning(1, {GAP_METRIC: 0.05})
    assert rollouts.gap_warning(2, {GAP_METRIC: 0.05}) is None  # once
    rollouts.quantized_bits, rollouts.gap_warned = None, False
    assert rollouts.gap_warning(1, {GAP_METRIC: 0.05}) is None  # a full-precision base: no warning
