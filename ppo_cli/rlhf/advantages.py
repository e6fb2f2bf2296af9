"""Generalised advantage estimation."""

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
