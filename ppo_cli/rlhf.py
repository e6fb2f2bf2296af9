"""RLHF maths as pure functions on torch tensors: no models, no I/O, no global state.

Conventions used throughout this module:

* Tensors are batch-first. Per-token quantities have shape ``(B, T)`` and cover the RESPONSE tokens
  only (the prompt has already been sliced off by the caller).
* ``mask`` is a bool or 0/1 tensor of shape ``(B, T)`` marking the real response tokens: 1 up to and
  including the first EOS, 0 after it. Responses are therefore *right*-padded and the valid tokens form
  a contiguous prefix of each row (this is what :func:`truncate_after_eos` produces).
* Nothing here calls ``.detach()`` on its inputs except the monitoring statistics returned next to a
  loss; the caller decides what carries gradient.

References cited in comments:

* [Huang24] S. Huang et al., "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
  Summarization", 2024 (arXiv:2403.17031), which re-implements OpenAI's lm-human-preferences.
* [Ziegler19] D. Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019
  (arXiv:1909.08593).
* [Schulman-KL] J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html, 2020.
* [GAE] J. Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", 2015. [PPO] J. Schulman et al., "Proximal Policy Optimization Algorithms", 2017.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "apply_missing_eos_penalty",
    "entropy_from_logits",
    "first_true_indices",
    "gae",
    "has_eos",
    "kl_per_token",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_scores",
    "pairwise_reward_loss",
    "policy_loss",
    "position_ids_from_mask",
    "replace_missing_eos_score",
    "run_kl_horizon",
    "shape_rewards",
    "truncate_after_eos",
    "value_loss",
]

EosIds = int | Sequence[int] | torch.Tensor


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a bool tensor (accepts bool, 0/1 integer or 0./1. float masks)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _eos_tensor(eos_token_id: EosIds, device: torch.device) -> torch.Tensor:
    """Return the EOS id(s) as a 1-D long tensor on ``device`` (an int, a list/tuple, or a tensor)."""
    eos = torch.as_tensor(eos_token_id, dtype=torch.long, device=device).reshape(-1)
    if eos.numel() == 0:
        raise ValueError("eos_token_id must name at least one token id")
    return eos


def _is_eos(ids: torch.Tensor, eos_token_id: EosIds) -> torch.Tensor:
    """Elementwise ``ids in eos_token_id`` (several EOS ids are allowed, any of them stops)."""
    return torch.isin(ids, _eos_tensor(eos_token_id, ids.device))


# --------------------------------------------------------------------------------------------------
# Positions, EOS handling and indexing
# --------------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding.

    Shapes: ``attention_mask`` ``(B, L)`` (bool or 0/1) -> ``LongTensor (B, L)``.

    Formula: ``pos = clamp(cumsum(mask, -1) - 1, min=0)``.

    Why: generation batches are LEFT-padded so that every prompt ends at the same column. A model fed
    ``arange(L)`` as positions would see the first real token at position ``n_pad`` instead of 0 and
    produce different logits from an unpadded forward pass ([Huang24], the "left padding / position ids"
    detail). Pads get position 0; their logits are never used.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def first_true_indices(bools: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Index of the first ``True`` along the last dimension, or ``T`` if a row has none.

    Shapes: ``bools`` ``(B, T)`` -> ``(B,)`` of ``dtype``.

    Formula: ``min_t ( t if bools[b, t] else T )`` -- vectorised (no Python loop), as in TRL.
    """
    bools = _as_bool(bools)
    row_len = bools.size(-1)
    # True positions keep their index, False positions become T; the row minimum is the first True.
    idx = torch.arange(row_len, dtype=dtype, device=bools.device)
    zero_or_index = row_len * (~bools).to(dtype) + idx
    return zero_or_index.min(dim=-1).values


def truncate_after_eos(
    response_ids: torch.Tensor, eos_token_id: EosIds, pad_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS; replace what follows by ``pad_token_id``.

    Shapes: ``response_ids`` ``(B, T)`` long -> ``(ids (B, T) long, mask (B, T) bool)``.

    Formula: ``e_b = first_true_indices(response_ids in eos)``, ``mask[b, t] = t <= e_b`` (a row with no
    EOS is kept whole, ``e_b = T``), ``ids = where(mask, response_ids, pad)``.

    ``eos_token_id`` may be an int or a list/tuple/tensor of ids (chat models often stop on several,
    e.g. ``<|eot_id|>`` and ``<|end_of_text|>``); the first occurrence of ANY of them ends the response.
    ``pad_token_id=None`` falls back to the first EOS id (what HF does for models without a pad token).

    Why: ``generate`` keeps sampling after EOS in a batch until every row is done; those tokens are
    garbage that must not be scored, rewarded or trained on ([Huang24], "truncate after EOS").
    """
    if pad_token_id is None:
        pad_token_id = int(_eos_tensor(eos_token_id, response_ids.device)[0])
    eos_at = first_true_indices(_is_eos(response_ids, eos_token_id))  # (B,)
    positions = torch.arange(response_ids.size(-1), device=response_ids.device)
    mask = positions.unsqueeze(0) <= eos_at.unsqueeze(-1)  # includes the EOS itself
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row, from the mask alone: the one definition of "the last
    real token" (left, right or no padding; responses, RM sequences and value targets all use it).

    Shapes: ``mask`` ``(B, T)`` -> ``LongTensor (B,)``.

    Formula: ``argmax_t(t * mask[b, t])``. An all-zero row gives 0 (callers that care should check
    ``mask.any(-1)``).
    """
    columns = torch.arange(mask.shape[-1], device=mask.device)
    return (columns * mask.long()).argmax(-1)


def has_eos(response_ids: torch.Tensor, mask: torch.Tensor, eos_token_id: EosIds) -> torch.Tensor:
    """Whether the kept part of each response ends with an EOS token.

    Shapes: ``response_ids`` ``(B, T)``, ``mask`` ``(B, T)`` -> ``BoolTensor (B,)``.

    Formula: ``any_t(mask[b]) and response_ids[b, last_token_index(mask)[b]] in eos``.

    A response that hit the generation length limit before emitting EOS returns ``False``; see
    :func:`apply_missing_eos_penalty`.
    """
    last = last_token_index(mask)
    last_ids = response_ids.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    return _is_eos(last_ids, eos_token_id) & _as_bool(mask).any(-1)


# --------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------------


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``.

    Shapes: ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)`` long -> ``(B, T)`` float32.
    (``logits[:, t]`` must already be the prediction for ``labels[:, t]``, i.e. shifted by the caller.)

    Formula: ``log p = z[label] - logsumexp(z)`` with ``z = float32(logits) / temperature``, which equals
    ``log_softmax(z).gather(-1, labels)`` without materialising the full log-softmax.

    Why float32: in bf16/fp16 the log-softmax of a 32k-256k vocabulary loses several digits, and PPO
    consumes these numbers through ``exp(new - old)``, where a 1e-2 error is a 1% ratio error on every
    token. Why temperature: the rollout was sampled from ``softmax(logits / T)``, so the log-probs of
    the policy, the reference and the old policy must all be computed with the same ``T`` or the KL
    penalty and the PPO ratio are wrong from the first step ([Huang24], "dividing logits by the sampling
    temperature").
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the categorical ``softmax(logits / temperature)`` at every position.

    Shapes: ``logits`` ``(B, T, V)`` -> ``(B, T)`` float32.

    Formula: ``H = -sum_v p_v log p_v`` (``= logsumexp(z) - sum_v p_v z_v``) with ``p = softmax(z)``,
    ``z = float32(logits)/T``, summed as ``entr(p) = -p log p`` with ``entr(0) = 0``: a token whose logit
    is -inf (suppressed, like PPO's pad token) adds nothing, where ``p_v z_v = 0 * -inf`` would be NaN;
    and no two large numbers are subtracted. Computed in float32 for the same reason as
    :func:`logprobs_from_logits`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.special.entr(torch.softmax(z, dim=-1)).sum(-1)


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the entries where ``mask`` is set.

    Shapes: ``x``, ``mask`` broadcastable (normally both ``(B, T)``) -> scalar if ``dim is None`` else
    ``x`` reduced over ``dim``.

    Formula: ``sum_i [mask_i] x_i``. Implemented with ``where`` rather than ``x * mask`` so that NaN/inf
    values at padded positions (e.g. logits of pad tokens) cannot leak into the result.
    """
    m = _as_bool(mask)
    x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is set.

    Shapes: as :func:`masked_sum`.

    Formula: ``sum_i [mask_i] x_i / max(sum_i mask_i, 1)``. A reduction with no valid entry returns 0
    instead of NaN, so an empty micro-batch cannot poison a loss.

    Why a token-level mean over the whole batch (not a mean of per-sequence means): this is what
    lm-human-preferences and TRL's PPO do ([Huang24]); every valid token has the same weight.
    """
    m = _as_bool(mask)
    count = m.expand_as(x).sum() if dim is None else m.expand_as(x).sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype if x.is_floating_point() else torch.float)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all entries where ``mask`` is set (a scalar).

    Shapes: ``x``, ``mask`` ``(B, T)`` -> scalar.

    Formula: ``mu = masked_mean(x)``, ``var = masked_mean((x - mu)^2)``, times ``n / (n - 1)`` if
    ``unbiased`` (Bessel's correction, as in lm-human-preferences / TRL), with ``n = sum(mask)``.

    With ``n <= 1`` the (biased) value 0 is returned instead of raising or dividing by zero (TRL raises);
    a batch with a single valid token has no spread to estimate.
    """
    m = _as_bool(mask)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.expand_as(x).sum()
        if n > 1:
            var = var * (n / (n - 1))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance using statistics of the valid entries only.

    Shapes: ``x``, ``mask`` ``(B, T)`` -> ``(B, T)``.

    Formula: ``y = (x - mu) * rsqrt(var + eps)`` with ``mu, var = masked_mean(x), masked_var(x)``
    (unbiased); if ``not shift_mean`` the mean is added back, ``y += mu`` (only the scale changes).
    ``y`` is 0 wherever ``mask`` is 0.

    Why only valid entries: pads carry advantage 0; including them would pull the mean towards 0 and
    shrink the variance depending on how much padding a batch happens to have ([Huang24], "advantage
    whitening"). Zeroing the pads afterwards keeps them from contributing to any later (masked or not)
    sum.
    """
    m = _as_bool(mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# --------------------------------------------------------------------------------------------------
# KL and reward shaping
# --------------------------------------------------------------------------------------------------


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens sampled from ``pi``.

    Shapes: ``logprobs``, ``ref_logprobs``, ``mask`` ``(B, T)`` -> ``(B, T)``, 0 where ``mask`` is 0.

    Estimators ([Schulman-KL]), with ``log r = ref_logprobs - logprobs`` (``r = pi_ref / pi``):

    * ``"k1"``: ``-log r = logprobs - ref_logprobs``. Unbiased, high variance, can be negative per token.
      This is the one used as the per-token penalty in [Ziegler19] / lm-human-preferences / [Huang24].
    * ``"k2"``: ``0.5 * (log r)^2``. Biased, low variance, always >= 0.
    * ``"k3"``: ``(r - 1) - log r``. Unbiased, low variance, always >= 0 (since ``log r <= r - 1``).
    """
    m = _as_bool(mask)
    # Zero the log-ratio at pads BEFORE any exp: pad log-probs may be arbitrary, and exp(+large) -> inf
    # would give NaN gradients through `where` even though the value itself is masked out.
    log_r = torch.where(
        m, ref_logprobs - logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    )
    if estimator == "k1":
        kl = -log_r
    elif estimator == "k2":
        kl = 0.5 * log_r**2
    elif estimator == "k3":
        kl = (torch.exp(log_r) - 1) - log_r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")
    return torch.where(m, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
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
    The KL term uses the ``k1`` estimator, as in lm-human-preferences and TRL.
    """
    m = _as_bool(mask)
    kl = kl_per_token(logprobs, ref_logprobs, m, estimator="k1")
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


# --------------------------------------------------------------------------------------------------
# Advantages and PPO losses
# --------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation ([GAE]) over the response tokens, backwards in time.

    Shapes: ``rewards``, ``values``, ``mask`` ``(B, T)`` -> ``(advantages (B, T), returns (B, T))``.

    Formula, with ``r`` and ``V`` set to 0 where ``mask`` is 0::

        delta_t = r_t + gamma * V_{t+1} - V_t           (V_T = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}       (A_T = 0), then A_t = 0 where mask is 0
        returns = A + V

    The value after the last valid token is 0: the response is the whole episode and ends there, so
    there is nothing to bootstrap from ([Huang24]; lm-human-preferences uses ``gamma=1, lam=0.95``).
    ``returns`` are computed from the raw advantages, BEFORE any whitening (whitening the advantages
    is the caller's job, see :func:`masked_whiten`).
    ``mask`` is expected to be a contiguous prefix per row (right padding); a hole would act as an
    episode boundary.
    """
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(m, values, zero)
    rewards = torch.where(m, rewards.to(values.dtype), zero)
    maskf = m.to(values.dtype)
    T = rewards.size(-1)
    advantages_reversed = []
    last_gae = torch.zeros_like(values[..., 0])
    for t in reversed(range(T)):
        next_value = values[..., t + 1] if t < T - 1 else torch.zeros_like(last_gae)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        # Multiplying by the mask keeps pads at 0 and stops A_{t+1} of a pad from leaking backwards.
        last_gae = (delta + gamma * lam * last_gae) * maskf[..., t]
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    returns = advantages + values
    return advantages, returns


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> dict[str, torch.Tensor]:
    """PPO clipped surrogate loss ([PPO] eq. 7) and its diagnostics.

    Shapes: ``new_logprobs``, ``old_logprobs``, ``advantages``, ``mask`` ``(B, T)`` -> dict of scalars.

    Formula, with ``rho = exp(new - old)`` and ``c = clip_range``::

        pg1 = -A * rho
        pg2 = -A * clip(rho, 1 - c, 1 + c)
        loss     = masked_mean(max(pg1, pg2))               (the pessimistic bound)
        clipfrac = masked_mean([pg2 > pg1])                  (tokens where the clip is active)
        approxkl = masked_mean(0.5 * (new - old)^2)          (k2 estimator of KL(old || new))
        ratio    = masked_mean(rho)

    ``approxkl`` uses the ``0.5 * logratio^2`` form of lm-human-preferences / [Huang24] rather than
    ``mean(old - new)``: it is always >= 0 and less noisy ([Schulman-KL]). Only ``loss`` carries
    gradient; the diagnostics are detached. ``clip_range=None`` disables clipping.
    """
    m = _as_bool(mask)
    # Zero the log-ratio at pads before exp (see kl_per_token): keeps pads from producing inf/NaN grads.
    log_ratio = torch.where(
        m, new_logprobs - old_logprobs, torch.zeros((), dtype=new_logprobs.dtype, device=new_logprobs.device)
    )
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    if clip_range is None:
        pg_losses2 = pg_losses1
    else:
        pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg_losses1, pg_losses2), m)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses1).float(), m)
        approxkl = masked_mean(0.5 * log_ratio.float() ** 2, m)
        mean_ratio = masked_mean(ratio.float(), m)
    return {"loss": loss, "clipfrac": clipfrac, "approxkl": approxkl, "ratio": mean_ratio}


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> dict[str, torch.Tensor]:
    """Clipped value-function loss and its clip fraction.

    Shapes: ``new_values``, ``old_values``, ``returns``, ``mask`` ``(B, T)`` -> dict of scalars.

    Formula, with ``c = clip_range``::

        v_clip   = clip(v, v_old - c, v_old + c)
        loss     = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))
        clipfrac = masked_mean([(v_clip - R)^2 > (v - R)^2])

    Why: value clipping keeps the value head from moving far from the values used to compute the
    advantages in one PPO epoch; lm-human-preferences and TRL use it ([Huang24], "value clipping"),
    with the same pessimistic ``max`` as the policy loss. ``clip_range=None`` disables clipping.
    Only ``loss`` carries gradient.
    """
    m = _as_bool(mask)
    if clip_range is None:
        v_clipped = new_values
    else:
        v_clipped = old_values + torch.clamp(new_values - old_values, -clip_range, clip_range)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_losses1, vf_losses2), m)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), m)
    return {"loss": loss, "clipfrac": clipfrac}


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient ``beta``.

    ``value`` is the coefficient; ``update`` does nothing. ``state_dict`` is ``{"value": float}``.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        """Plain, JSON-serialisable state: ``{"value": beta}``."""
        return {"value": float(self.value)}

    def load_state_dict(self, d: dict[str, float]) -> None:
        """Restore ``value`` from :meth:`state_dict`."""
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of [Ziegler19] (section 2.2), a proportional controller.

    After each PPO batch with measured KL ``KL`` (sequence-level, summed over tokens, averaged over the
    batch) over ``n_steps`` samples::

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    so ``beta`` grows when the policy drifts further than ``target`` nats from the reference and
    shrinks when it stays closer. The clip bounds how fast ``beta`` can move per step whatever the
    measured KL. ``state_dict`` holds plain floats (``value``, ``target``, ``horizon``).
    """

    def __init__(self, init_kl_coef: float, target: float = 6.0, horizon: float = 10000) -> None:
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` by the factor ``1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, float]:
        """Plain, JSON-serialisable state: ``{"value", "target", "horizon"}``."""
        return {"value": float(self.value), "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict[str, float]) -> None:
        """Restore from :meth:`state_dict` (``target`` / ``horizon`` only if present)."""
        self.value = float(d["value"])
        if "target" in d:
            self.target = float(d["target"])
        if "horizon" in d:
            self.horizon = float(d["horizon"])


def run_kl_horizon(total_episodes: int, episodes_per_step: int, share: float = 0.1) -> float:
    """The adaptive controller's horizon for a run: ``share`` of its episodes, at least two steps' worth.

    Formula: ``horizon = max(share * total_episodes, 2 * episodes_per_step)`` (a tenth by default).

    Why a share of the run: a KL held on one side of the target moves beta by up to
    ``(1 +- 0.2 n / horizon)^(N / n)``, about ``exp(+-0.2 N / horizon)``, over a run of N episodes.
    [Ziegler19]'s 10,000 episodes suit runs of ~10^5 episodes (beta can move by e^2, and a tenth of 10^5
    is that horizon); in a run of 2,560 they allow a factor of 1.05 at most, so the controller never
    binds. A tenth of the run gives any run the same reach, e^(+-2). Why the floor: the factor
    ``1 + e n / horizon`` must stay positive; two steps' worth keeps each step's change within +-10%.
    """
    if total_episodes <= 0 or episodes_per_step <= 0:
        raise ValueError(f"episodes must be > 0, got {total_episodes} in all, {episodes_per_step} per step")
    return max(share * float(total_episodes), 2.0 * episodes_per_step)


# --------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float | torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Bradley-Terry loss for a reward model on (chosen, rejected) pairs.

    Shapes: ``chosen_rewards``, ``rejected_rewards`` ``(B,)`` (or ``(B, 1)``, flattened);
    ``margin`` scalar or ``(B,)`` -> dict of scalars.

    Formula::

        loss     = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)
        accuracy = mean([r_c > r_r])        (float, margin not applied)

    ``-logsigmoid(d) = -log P(chosen > rejected)`` under Bradley-Terry, as in [Ziegler19]'s reward model
    (there with 4-way choices). ``margin`` (Llama 2 style) demands the gap exceed the annotated
    preference strength. The centering term (TRL's ``center_rewards_coefficient``) pulls the mean reward
    towards 0, since the BT loss only sees differences and leaves the offset free to drift.
    Also returns ``chosen_mean`` / ``rejected_mean`` (detached) for logging.
    """
    r_c = chosen_rewards.reshape(-1)
    r_r = rejected_rewards.reshape(-1)
    if r_c.shape != r_r.shape:
        # Catch (B,) vs (B, k) mix-ups that would otherwise broadcast to (B, B) silently.
        raise ValueError(
            f"chosen/rejected shapes differ: {tuple(chosen_rewards.shape)} vs {tuple(rejected_rewards.shape)}"
        )
    diff = r_c - r_r
    if margin is not None:
        margin_t = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
        diff = diff - margin_t.reshape(-1) if margin_t.ndim > 0 else diff - margin_t
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_c + r_r) ** 2).mean()
    with torch.no_grad():
        accuracy = (r_c > r_r).float().mean()
        chosen_mean = r_c.float().mean()
        rejected_mean = r_r.float().mean()
    return {"loss": loss, "accuracy": accuracy, "chosen_mean": chosen_mean, "rejected_mean": rejected_mean}
