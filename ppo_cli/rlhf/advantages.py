"""Advantages: generalised advantage estimation with a critic, and the critic-free estimators (GRPO,
RLOO, REINFORCE++)."""

from __future__ import annotations

import torch

from ppo_cli.rlhf.tokens import _as_bool


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


# ---------------------------------------------------------------------------------------------
# Critic-free estimators: a baseline from the other samples of the same prompt, or none (whitening).
# A rollout of B prompts x K samples holds each prompt's K samples in consecutive rows (a group).


def _groups(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    if returns.ndim != 1 or group_size < 1 or returns.numel() % group_size:
        raise ValueError(f"returns {tuple(returns.shape)} must be (B * group_size,), group_size={group_size}")
    return returns.reshape(-1, group_size)


def group_advantages(
    returns: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's advantage of each sample: its return against the mean of its group ([GRPO] eq. 3's A_i).

    Shapes: ``returns`` ``(B * K,)``, each prompt's K samples in consecutive rows -> ``(B * K,)``.

    Formula, over the group g of sample i::

        A_i = (R_i - mean_g(R)) / (std_g(R) + eps)     scale_by_std (GRPO)
        A_i =  R_i - mean_g(R)                         otherwise (Dr. GRPO [DrGRPO]: the std scaling
                                                       weights prompts whose samples agree more)

    ``std`` is the sample standard deviation (n - 1), as in TRL and verl; a group whose returns are all
    equal gets 0 whichever form (nothing to learn from it).
    """
    g = _groups(returns, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage: the return minus the mean of the OTHER samples of its group ([RLOO] eq. 5).

    Shapes: ``returns`` ``(B * K,)``, each prompt's K samples in consecutive rows -> ``(B * K,)``.

    Formula: ``A_i = R_i - (sum_g(R) - R_i) / (K - 1) = K / (K - 1) * (R_i - mean_g(R))``. The baseline
    does not depend on the sample it is subtracted from, so the estimate is unbiased (GRPO's group mean
    includes the sample itself).
    """
    if group_size < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples per prompt, got {group_size}")
    g = _groups(returns, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE's return at every token: the discounted sum of the rewards from that token on.

    Shapes: ``rewards``, ``mask`` ``(B, T)`` -> ``(B, T)``, 0 where ``mask`` is 0.

    Formula: ``G_t = r_t + gamma * G_{t+1}`` (``G_T = 0``), over the real tokens. REINFORCE++ [RPP] puts
    the score on the last token and the per-token KL penalty on every token (the rewards of
    :func:`shape_rewards`), then whitens ``G`` over the whole batch as its only baseline.
    """
    m = _as_bool(mask)
    r = torch.where(m, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = (r[:, t] + gamma * running) * m[:, t].to(r.dtype)
        out[:, t] = running
    return out


def per_token(sequence_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value ``(B,)`` on every real token of its response ``(B, T)``, 0 elsewhere."""
    m = _as_bool(mask)
    return torch.where(
        m,
        sequence_values[:, None],
        torch.zeros((), dtype=sequence_values.dtype, device=sequence_values.device),
    )
