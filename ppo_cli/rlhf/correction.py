"""The sampler correction: importance weights between the policy that sampled a rollout and the trained one.

With generation.engine=vllm the tokens come from vLLM while the ratio, the KL and the gradient come from the
training model: two implementations of one policy (other kernels, another precision, a quantized training
base that vLLM loads at full precision) that give the same token slightly different probabilities. The
rollout is then slightly off-policy for the trainer, and the weights below put it back on the trainer's
policy, truncated so that one token the sampler all but ruled out cannot dominate a batch ([TIS]).
"""

from __future__ import annotations

import torch

from ppo_cli.rlhf.stats import masked_mean
from ppo_cli.rlhf.tokens import _as_bool

# ppo.sampler_correction (ppo_cli/choices.py's SamplerCorrection holds the same names).
SAMPLER_CORRECTIONS = ("none", "tis", "seq_tis")


def sampler_weights(
    old_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    mode: str = "tis",
    cap: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, capped): each token's truncated importance weight of the trained policy against the
    sampler, and where the cap bound it.

    Shapes: ``old_logprobs``, ``sampler_logprobs``, ``mask`` ``(B, T)`` -> ``(B, T)`` float weights
    (detached, 1 at pads), ``(B, T)`` bool ``capped`` (False at pads).

    Formula, with ``d_t = old_logprobs - sampler_logprobs`` (log pi_train / pi_sampler at the sampled
    token, the trainer's logprob from the rollout, before any update) and ``C = cap``::

        none     w_t = 1
        tis      w_t = min(exp(d_t), C)                            ([TIS]; verl's token-level rollout IS)
        seq_tis  w_t = min(exp((1 / n_b) sum_t' d_t'), C)           one weight per sequence b: the
                                                                   geometric mean of its token ratios

    ``sampler_logprobs=None`` (generation.engine=hf): the sampler IS the trained policy, every weight is
    exactly 1 and nothing is capped, whatever ``mode``.

    Why truncated: the plain ratio is unbiased but has unbounded variance where the sampler gave a token
    far less probability than the trainer; capping it at C trades a little bias for a bounded weight
    ([TIS]). Why seq_tis takes the geometric mean, not the product of the token ratios (the sequence's
    exact likelihood ratio): the product's log is a sum over the response, so a steady per-token gap of
    0.02 nats is a factor e^4 over 200 tokens: the cap would bind on nearly every long response (every
    weight C or tiny, a function of length rather than of the mismatch). The geometric mean is on the
    token ratios' scale, so one cap means the same for both modes, and it is GSPO's sequence ratio.
    """
    m = _as_bool(mask)
    ones = torch.ones(old_logprobs.shape, dtype=torch.float32, device=old_logprobs.device)
    if sampler_logprobs is None or mode == "none":
        return ones, torch.zeros_like(m)
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"unknown sampler correction {mode!r}")
    if not cap > 0:
        raise ValueError(f"the sampler correction's cap must be positive, got {cap}")
    zero = torch.zeros((), dtype=torch.float32, device=old_logprobs.device)
    # Pads: the trained policy's logprob there is -inf (a pad is never sampled); keep it out of the exp.
    log_ratio = torch.where(m, old_logprobs.detach().float() - sampler_logprobs.detach().float(), zero)
    if mode == "seq_tis":
        log_ratio = masked_mean(log_ratio, m, dim=-1).unsqueeze(-1).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    capped = (ratio > cap) & m
    return torch.where(m, ratio.clamp(max=cap), ones), capped


def capped_share(capped: torch.Tensor, mask: torch.Tensor) -> float:
    """The share of real tokens (``mask``) whose weight the cap bound (rollout/sampler_capped_share)."""
    return float(masked_mean(capped.float(), mask))
