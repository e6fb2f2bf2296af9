"""The PPO policy and value losses, and the reward model's pairwise loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ppo_cli.rlhf.stats import masked_mean
from ppo_cli.rlhf.tokens import _as_bool


@dataclass(frozen=True)
class LossScale:
    """What a micro-batch's loss is divided by: the real tokens and the rows of the WHOLE minibatch it
    is part of, per rank (the global minibatch's counts over the world size, since the gradients are
    then averaged over ranks).

    Why: a minibatch split into micro-batches (grad_accum_steps > 1, or several ranks) must give the
    gradient of the minibatch's loss, not a mean of the micro-batches' means. Dividing each micro-batch's
    token sum by its own token count would weigh a token of a short micro-batch more than one of a long
    micro-batch: a length bias that comes and goes with the micro-batch size (verl's ``agg_loss`` and
    transformers' ``num_items_in_batch`` divide by the global count for the same reason).
    """

    tokens: float
    rows: float


def aggregate_loss(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_mean",
    max_tokens: int | None = None,
    scale: LossScale | None = None,
) -> torch.Tensor:
    """One loss from per-token losses; the modes weigh tokens of long and short sequences differently.

    Shapes: ``token_losses``, ``mask`` ``(B, T)`` -> scalar.

    Formula, with ``n_b`` the real tokens of row b and ``L`` ``max_tokens`` (default ``T``)::

        token_mean          = sum_b,t l / sum_b n_b       every token weighs the same (PPO, DAPO)
        seq_mean_token_mean = mean_b (sum_t l / n_b)      every sequence weighs the same ([GRPO] eq. 3)
        seq_mean_token_sum  = mean_b (sum_t l / L)        [DrGRPO]: a constant normaliser, so neither
                                                          long nor short responses are favoured

    Rows without a real token count as sequences with a zero loss in the per-sequence modes.

    With ``scale`` (a micro-batch of a larger minibatch), the sums over tokens (token_mean) or over rows
    (the per-sequence modes) are divided by the minibatch's counts instead of this batch's own: the
    micro-batches' losses then add up to the minibatch's loss, whatever their lengths (:class:`LossScale`).
    """
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=token_losses.dtype, device=token_losses.device)
    masked = torch.where(m, token_losses, zero)
    if mode == "token_mean":
        if scale is None:
            return masked_mean(token_losses, m)
        return masked.sum() / max(scale.tokens, 1.0)
    rows = float(token_losses.shape[0]) if scale is None else max(scale.rows, 1.0)
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1)).sum() / rows
    if mode == "seq_mean_token_sum":
        return (masked.sum(-1) / float(max_tokens or token_losses.shape[-1])).sum() / rows
    raise ValueError(f"unknown loss aggregation {mode!r}")


# ppo.ratio_level: the importance ratio per token (PPO) or per sequence (GSPO).
RATIO_LEVELS = ("token", "sequence")


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log-ratio on every token of its sequence, with GSPO-token's gradient.

    Shapes: ``log_ratio`` (``log pi - log pi_old`` per token, 0 at pads), ``mask`` ``(B, T)`` -> ``(B, T)``.

    Formula ([GSPO] eqs. 7 and 13), with ``n_b`` the real tokens of row b::

        log s_b   = (1 / n_b) sum_t log_ratio[b, t]          s_b: the geometric mean of the token ratios
        out[b, t] = sg(log s_b) + log pi[b, t] - sg(log pi[b, t])

    so ``exp(out[b, t]) = s_b`` (its value is the sequence's ratio, clipped at the sequence level) while
    its gradient is ``s_b * grad log pi[b, t]``: each token carries its own gradient, weighted by its
    sequence's ratio (``sg`` = detach). With one advantage per sequence and a per-sequence mean loss
    this is exactly GSPO's gradient; with per-token advantages (GAE) each token keeps its own.

    Why the geometric mean: the product of the token ratios (the sequence's likelihood ratio) grows or
    shrinks exponentially with length, so no clip range would suit both short and long responses;
    the length-normalised ratio stays near 1 and is clipped once for the whole response.
    Rows without a real token get 0.
    """
    m = _as_bool(mask)
    seq = masked_mean(log_ratio, m, dim=-1).unsqueeze(-1)  # (B, 1)
    out = seq.detach() + log_ratio - log_ratio.detach()
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


def clipped_ratio(ratio: torch.Tensor, clip_range: float | None, clip_range_high: float | None = None):
    """The ratio clipped to ``[1 - clip_range, 1 + clip_range_high]``; ``clip_range_high=None``: the
    symmetric ``1 + clip_range`` (PPO), ``clip_range=None``: no clip.

    DAPO's "clip-higher" ([DAPO] sec. 3.1: eps_low 0.2, eps_high 0.28): the upper bound caps how much a
    token's probability may grow in one update, and a low-probability token with a positive advantage
    hits it long before a likely one can (0.01 -> 0.012 at most), so the symmetric clip starves
    exploration and the entropy collapses; a higher upper bound leaves such tokens room to rise, while the
    lower bound still keeps unlikely tokens from being pushed to 0.
    """
    if clip_range is None:
        return ratio
    high = clip_range if clip_range_high is None else clip_range_high
    return torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
    scale: LossScale | None = None,
    clip_range_high: float | None = None,
    ratio_level: str = "token",
    weights: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """PPO clipped surrogate loss ([PPO] eq. 7) and its diagnostics.

    Shapes: ``new_logprobs``, ``old_logprobs``, ``advantages``, ``mask``, ``weights``, ``loss_mask``
    ``(B, T)`` -> dict of scalars.

    Formula, with ``rho = exp(new - old)`` and ``c = clip_range``, ``c_hi = clip_range_high`` (default
    ``c``)::

        pg1 = -A * rho
        pg2 = -A * clip(rho, 1 - c, 1 + c_hi)
        loss     = aggregate(w * max(pg1, pg2))             (the pessimistic bound; token mean by
                                                             default, see :func:`aggregate_loss`)
        clipfrac = masked_mean([pg2 > pg1])                  (tokens where the clip is active)
        approxkl = masked_mean(0.5 * (new - old)^2)          (k2 estimator of KL(old || new))
        ratio    = masked_mean(rho)

    ``approxkl`` uses the ``0.5 * logratio^2`` form of lm-human-preferences / [Huang24] rather than
    ``mean(old - new)``: it is always >= 0 and less noisy ([Schulman-KL]). Only ``loss`` carries
    gradient; the diagnostics are detached. ``clip_range=None`` disables clipping. ``scale``: this batch
    is a micro-batch of a larger minibatch (:class:`LossScale`); ``loss`` is then its share of the
    minibatch's loss, and ``mean_loss`` (detached) this batch's own aggregate, for logging.

    The options (docs/ppo-details.md, "Off-policy corrections, DAPO and GSPO"): ``clip_range_high``
    (:func:`clipped_ratio`); ``ratio_level="sequence"``: ``rho`` is GSPO's sequence ratio on every token
    (:func:`sequence_log_ratio`); ``weights``: a detached per-token weight of each token's loss term (the
    sampler correction, ``rlhf.sampler_weights``; None = 1); ``loss_mask``: the tokens that carry loss
    (default ``mask``; ``ppo.mask_truncated`` leaves the truncated responses out), while the diagnostics
    stay over every real token of ``mask``: they watch how far the policy moved.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio level {ratio_level!r}")
    m = _as_bool(mask)
    lm = m if loss_mask is None else _as_bool(loss_mask)
    # Zero the log-ratio at pads before exp (see kl_per_token): keeps pads from producing inf/NaN grads.
    token_log_ratio = torch.where(
        m, new_logprobs - old_logprobs, torch.zeros((), dtype=new_logprobs.dtype, device=new_logprobs.device)
    )
    log_ratio = token_log_ratio if ratio_level == "token" else sequence_log_ratio(token_log_ratio, m)
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * clipped_ratio(ratio, clip_range, clip_range_high)
    token_losses = torch.maximum(pg_losses1, pg_losses2)
    if weights is not None:
        token_losses = token_losses * weights.detach()
    loss = aggregate_loss(token_losses, lm, aggregation, max_tokens, scale)
    with torch.no_grad():
        mean_loss = loss if scale is None else aggregate_loss(token_losses, lm, aggregation, max_tokens)
        clipfrac = masked_mean((pg_losses2 > pg_losses1).float(), m)
        approxkl = masked_mean(0.5 * token_log_ratio.float() ** 2, m)
        mean_ratio = masked_mean(ratio.float(), m)
    return {
        "loss": loss,
        "mean_loss": mean_loss.detach(),
        "clipfrac": clipfrac,
        "approxkl": approxkl,
        "ratio": mean_ratio,
    }


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    scale: LossScale | None = None,
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
    Only ``loss`` carries gradient. ``scale``: as in :func:`policy_loss` (the value loss is a token mean;
    ``mean_loss`` is this batch's own).
    """
    m = _as_bool(mask)
    if clip_range is None:
        v_clipped = new_values
    else:
        v_clipped = old_values + torch.clamp(new_values - old_values, -clip_range, clip_range)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    token_losses = torch.maximum(vf_losses1, vf_losses2)
    loss = 0.5 * aggregate_loss(token_losses, m, "token_mean", scale=scale)
    with torch.no_grad():
        mean_loss = loss if scale is None else 0.5 * masked_mean(token_losses, m)
        clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), m)
    return {"loss": loss, "mean_loss": mean_loss.detach(), "clipfrac": clipfrac}


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
