"""Token-level helpers on response tensors: masks, EOS, truncation, the last real token, and
log-probabilities / entropy from logits (conventions in the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

EosIds = int | Sequence[int] | torch.Tensor


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
