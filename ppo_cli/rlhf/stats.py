"""Masked statistics over the real tokens of a batch, and whitening (also across ranks)."""

from __future__ import annotations

import torch

from ppo_cli.rlhf.tokens import _as_bool


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


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance using statistics of the valid entries only.

    Shapes: ``x``, ``mask`` ``(B, T)`` -> ``(B, T)``.

    Formula: ``y = (x - mu) * rsqrt(var + eps)`` with ``mu, var = masked_mean(x), masked_var(x)``
    (unbiased). ``y`` is 0 wherever ``mask`` is 0.

    Why only valid entries: pads carry advantage 0; including them would pull the mean towards 0 and
    shrink the variance depending on how much padding a batch happens to have ([Huang24], "advantage
    whitening"). Zeroing the pads afterwards keeps them from contributing to any later (masked or not)
    sum.
    """
    m = _as_bool(mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum, sum of squares and count of ``x`` over the entries where ``mask`` is set, in float64.

    Shapes: ``x``, ``mask`` ``(B, T)`` -> ``(3,)`` float64.

    Why: these three add up across ranks (one all-reduce), and :func:`whiten_from_moments` whitens with
    their total exactly as :func:`masked_whiten` would over every rank's rows at once.
    """
    m = _as_bool(mask)
    real = x[m].double()
    return torch.stack([real.sum(), (real**2).sum(), m.sum().double()])


def whiten_from_moments(
    x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """:func:`masked_whiten` with the mean and variance of ``moments`` (sum, sum of squares, count).

    Shapes: ``x``, ``mask`` ``(B, T)``, ``moments`` ``(3,)`` -> ``(B, T)``, 0 wherever ``mask`` is 0.

    Formula, with ``n = max(count, 2)``: ``mu = sum / n``, ``var = (sumsq / n - mu^2) * n / (n - 1)``
    (unbiased), ``y = (x - mu) * rsqrt(var + eps)``. The moments are summed over ranks by the caller,
    so every rank scales its rows alike.
    """
    m = _as_bool(mask)
    n = moments[2].clamp(min=2)
    mean = moments[0] / n
    var = (moments[1] / n - mean**2) * n / (n - 1)
    return torch.where(m, (x - mean.float()) * torch.rsqrt(var.float() + eps), torch.zeros_like(x))
