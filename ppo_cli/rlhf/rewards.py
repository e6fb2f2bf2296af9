"""From scores to per-token rewards: score scaling and clipping, the missing-EOS rules, the KL penalty."""

from __future__ import annotations

import torch

from ppo_cli.rlhf.tokens import _as_bool, last_token_index


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens sampled from ``pi``.

    Shapes: ``logprobs``, ``ref_logprobs``, ``mask`` ``(B, T)`` -> ``(B, T)``, 0 where ``mask`` is 0.

    Formula: the ``k1`` estimator of [Schulman-KL], ``-log r = logprobs - ref_logprobs`` with
    ``r = pi_ref / pi``: unbiased, high variance, can be negative per token. It is the per-token penalty
    of [Ziegler19] / lm-human-preferences / [Huang24], and what TRL reports as objective/kl.
    """
    m = _as_bool(mask)
    log_r = torch.where(
        m, ref_logprobs - logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    )
    kl = -log_r
    return torch.where(m, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


# The per-token KL estimators (ppo.kl_estimator; ppo_cli/choices.py's KLEstimator holds the same names).
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_plus", "k3_iw")
# verl's clamps (low_var_kl): the log-ratio going into an exp, then the k3 value. Without them one
# token the policy has all but abandoned (x = -39) gives k3 = e^39 = 8.7e16 (and x < -88 an inf in
# fp32): a loss, and a gradient 1 - e^39, that nothing else in the batch can outweigh. A clamped
# value has no gradient: in the loss a token with k3 > 10 (pi / pi_ref < 0.074 or > e^11) stops
# pulling through k3's term (k3_plus keeps k2's gradient there, which is linear in x).
KL_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k1",
    old_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of a KL divergence between ``pi`` (``logprobs``) and ``pi_ref`` by one of
    [Schulman-KL]'s estimators, or a variant of k3 with another gradient.

    Shapes: ``logprobs``, ``ref_logprobs``, ``mask``, ``old_logprobs`` ``(B, T)`` -> ``(B, T)``, 0 where
    ``mask`` is 0.

    Formula, with ``x = logprobs - ref_logprobs`` (log pi / pi_ref at the sampled token) and
    ``clip(v) = clamp(v, -20, 20)``::

        k1      = x                                        unbiased, can be negative
        k2      = x^2 / 2                                  biased, >= 0, low variance
        k3      = min(exp(-clip(x)) + clip(x) - 1, 10)      unbiased but for the clamps, >= 0
        k3_plus = k3's value, k2's gradient                k2 + (k3 - k2).detach()
        k3_iw   = exp(clip(logprobs - old_logprobs)) * k3  k3, importance-weighted

    (values as estimates of KL(pi || pi_ref) from tokens sampled from ``pi``). k3 is [GRPO] eq. 4's
    and verl's ``low_var_kl`` (whose clamps these are), k3_plus verl's ``k3+``, k3_iw TRL's
    GRPOTrainer with ``use_bias_correction_kl`` (DeepSeek-V3.2), which does not clamp.

    What each one's gradient follows, in expectation over tokens sampled from ``pi`` (the gradient the
    trainer takes: the sampled tokens are fixed, only their log-probs move; docs/ppo-details.md):
    k1 -> 0 (``E_pi[grad log pi] = 0``: no penalty at all, so train-ppo refuses k1 in the loss);
    k2 and k3_plus -> grad KL(pi || pi_ref); k3 -> grad KL(pi_ref || pi), the reverse direction.
    k3_iw's tokens come from the policy that sampled them (``old_logprobs``; None: ``logprobs`` own,
    detached): its ratio, which carries gradient, makes value and gradient those of KL(pi || pi_ref)
    even after pi has moved away from the sampling policy within the PPO epochs.

    Gradients flow through ``logprobs`` (and ``ref_logprobs``); as a loss term the caller passes the
    new logprobs with gradient and the reference's and old policy's without. In the reward (no
    gradient, ``old_logprobs`` = ``logprobs``) k3_plus and k3_iw are k3.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}: one of {', '.join(KL_ESTIMATORS)}")
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Pads are zeroed before any arithmetic: their log-probs may be anything (-inf), and a NaN there
    # would reach the gradient through where's other branch.
    x = torch.where(m, logprobs - ref_logprobs, zero)
    if estimator == "k1":
        kl = x
    elif estimator == "k2":
        kl = 0.5 * x**2
    else:
        clipped = x.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        kl = (torch.exp(-clipped) + clipped - 1.0).clamp(max=K3_VALUE_CLAMP)
        if estimator == "k3_plus":
            # Straight-through: the forward value is k3 exactly (k2 - k2 is 0 in floating point), the
            # backward is k2's, x * grad log pi, linear in x: no clamp needed there.
            k2 = 0.5 * x**2
            kl = k2 - k2.detach() + kl.detach()
        elif estimator == "k3_iw":
            old = logprobs.detach() if old_logprobs is None else old_logprobs
            log_w = torch.where(m, logprobs - old, zero).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
            kl = torch.exp(log_w) * kl
    return torch.where(m, kl, zero)


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: a KL penalty on every token plus the sequence score on the last one.

    Shapes: ``scores`` ``(B,)``; ``logprobs``, ``ref_logprobs``, ``mask`` ``(B, T)`` ->
    ``(rewards (B, T), non_score_rewards (B, T))``.

    Formula ([Ziegler19] eq. 2, ``R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))`` spread over
    tokens)::

        non_score[b, t] = -kl_coef * (logprobs[b, t] - ref_logprobs[b, t])   if mask[b, t] else 0
        rewards = non_score;  rewards[b, last_token_index(mask)[b]] += scores[b]

    The score goes on the last real token (the EOS when there is one), not on the last column, so that
    a right-padded row still receives it ([Huang24], "reward at the EOS token"). A row with no valid
    token at all gets no score (there is no token to credit and GAE would ignore it anyway).
    The KL term is :func:`kl_per_token` (``k1``), as in lm-human-preferences and TRL, unless
    ``kl_estimator`` names another of :func:`kl_estimate`'s. The rewards carry no gradient and the
    log-probs are the sampling policy's own, so k3_plus and k3_iw give k3's rewards here.
    """
    m = _as_bool(mask)
    kl = kl_estimate(logprobs, ref_logprobs, m, kl_estimator)
    non_score_rewards = -kl_coef * kl
    last = last_token_index(m)
    score_on_last = torch.zeros_like(non_score_rewards)
    credited = scores.to(non_score_rewards.dtype) * m.any(-1).to(non_score_rewards.dtype)
    score_on_last.scatter_(-1, last.unsqueeze(-1), credited.unsqueeze(-1))
    rewards = non_score_rewards + score_on_last
    return rewards, non_score_rewards


def apply_missing_eos_penalty(
    scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Subtract ``penalty`` from the score of every response that did not end with EOS.

    Shapes: ``scores`` ``(B,)``, ``has_eos`` ``(B,)`` bool -> new ``(B,)`` tensor (input not modified).

    Formula (TRL's ``missing_eos_penalty``): ``scores[~has_eos] -= penalty``; ``penalty`` is a positive
    number; ``None`` or 0 returns an unchanged copy.

    Why: the reward model scores whatever text it is given, so a policy can learn to ramble until the
    length limit if truncated answers are not punished. [Huang24] / lm-human-preferences replace the
    score of such responses by a constant (-1); TRL subtracts a penalty, which keeps the ranking signal.
    """
    if penalty is None or penalty == 0:
        return scores.clone()
    if penalty < 0:
        raise ValueError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {penalty}")
    return torch.where(_as_bool(has_eos), scores, scores - penalty)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment ([DAPO] eq. 13): 0 up to ``max_tokens - buffer`` tokens, then a
    linear ramp down to ``-penalty`` at ``max_tokens``, added to the score.

    Shapes: ``lengths`` ``(B,)`` (real response tokens, EOS included) -> ``(B,)`` float.

    Formula, with ``L = max_tokens``, ``b = buffer``, ``p = penalty``::

        r(len) = -p * clamp((len - (L - b)) / b, 0, 1)

    Why: a response near the length limit is often one the limit will cut, and a truncated response is
    judged on text that never ended; the ramp tells the policy that length costs before the cut, rather
    than a cliff at ``L`` (the missing-EOS rules' step) that rewards a response one token shorter in full.
    ``penalty=0`` gives zeros.
    """
    if buffer < 1 or buffer > max_tokens:
        raise ValueError(f"overlong buffer {buffer} must be in [1, {max_tokens}]")
    excess = (lengths.float() - (max_tokens - buffer)) / buffer
    return -penalty * excess.clamp(min=0.0, max=1.0)


def replace_missing_eos_score(
    scores: torch.Tensor, has_eos: torch.Tensor, value: float | None
) -> torch.Tensor:
    """Replace the score of every response that did not end with EOS by the constant ``value``.

    Shapes: ``scores`` ``(B,)``, ``has_eos`` ``(B,)`` bool -> new ``(B,)`` tensor (input not modified).

    Formula (lm-human-preferences, [Huang24]'s "EOS trick"): ``scores[~has_eos] = value``; ``None``
    returns an unchanged copy. Unlike :func:`apply_missing_eos_penalty`, no score a reward model gives
    an unfinished response, however high, survives.
    """
    if value is None:
        return scores.clone()
    return torch.where(_as_bool(has_eos), scores, torch.full_like(scores, float(value)))


def normalize_scores(
    scores: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise reward-model scores with fixed statistics.

    Shapes: ``scores`` ``(B,)`` (any shape) -> same shape.

    Formula: ``(scores - mean) / (std + eps)``.

    Why: [Ziegler19] and [Huang24] ("reward normalisation") normalise the reward model so that its
    scores have mean 0 / std 1 on responses of the initial (SFT) policy; ``mean`` / ``std`` are those
    fixed statistics, not batch statistics, so the scale of the reward (and so the meaning of
    ``kl_coef``) does not drift during PPO.
    """
    return (scores - mean) / (std + eps)


# Reward scaling (ppo.reward_normalization): the scores PPO trades against the KL penalty, put on a
# fixed scale so that beta means the same whatever the reward source (docs/ppo-details.md, detail 17).
REWARD_NORMALIZATIONS = ("sft_samples", "sft_mean", "rm_stats", "whiten", "none")


def batch_score_stats(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) std of a batch of scores, in float64.

    Shapes: ``scores`` ``(N,)`` (every rank's scores, gathered) -> two floats.

    The std is 1 where it could not divide: a single score, or a spread under 1e-6 (every response
    scored alike), which would blow the normalised scores up.
    """
    values = scores.double()
    std = float(values.std()) if values.numel() > 1 else 1.0
    return float(values.mean()), (std if std > 1e-6 else 1.0)


def score_scale(
    mode: str, batch: tuple[float, float] | None, fixed: tuple[float, float] | None
) -> tuple[float, float] | None:
    """The (mean, std) that ``mode`` normalises this batch's scores with; None for ``"none"``.

    ``batch``: this batch's :func:`batch_score_stats`; ``fixed``: the run's scale once it is fixed
    (the RM's stored statistics for ``"rm_stats"``, or what the first batch gave), else None.

    * ``"none"``: raw scores (beta in the reward source's units, TRL's kl_coef);
    * ``"whiten"``: the batch's own statistics, every batch;
    * ``"sft_samples"``: ``fixed``, or the batch's while none is fixed (the first batch, sampled from
      the SFT policy, fixes it); ``"rm_stats"`` without stored statistics does the same;
    * ``"sft_mean"``: like ``sft_samples`` with std 1: only the mean moves, beta stays in raw units.
    """
    if mode == "none":
        return None
    if mode == "whiten":
        return batch
    if fixed is not None:
        return fixed
    mean, std = batch
    return (mean, 1.0) if mode == "sft_mean" else (mean, std)


def scale_scores(scores: torch.Tensor, scale: tuple[float, float] | None) -> torch.Tensor:
    """``scores`` on the scale of :func:`score_scale`: ``normalize_scores(scores, *scale)``, or unchanged."""
    return scores if scale is None else normalize_scores(scores, *scale)


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``clamp(scores, -clip, clip)`` (ppo.score_clip, in the units of the scaled scores); None: unchanged."""
    return scores if clip is None else scores.clamp(-clip, clip)
