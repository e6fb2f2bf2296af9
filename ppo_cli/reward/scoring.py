"""How a reward model scores a sequence: the score head's output at the last real token.

A reward model here is a Hugging Face `AutoModelForSequenceClassification(num_labels=1)` (usually with a
LoRA adapter, the head saved with it through peft's `modules_to_save`). Its score for a sequence is the
head's logit at the last real token (`ppo_cli.rlhf.last_token_index`). We find that token from the
attention mask, never from `pad_token_id`, and feed position ids derived from the mask, so left padding,
right padding or any amount of extra padding gives the same score. The classifier's own pooled
`logits[:, 0]` is never used: it finds the last token by pad id, which is the token BEFORE the EOS when
pad id == eos id, while our RMs are trained to score at the EOS.

Every RM goes through here: train-rm, PPO's RM adapter on the shared base (`head_scores` on the hidden
states it computes itself), and a separate RM in train-ppo and generate (`sequence_scores`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from ppo_cli.data import pad_right
from ppo_cli.rlhf import last_token_index, position_ids_from_mask

# ---------------------------------------------------------------------------------------------
# Unwrapping


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / peft wrappers (the module that owns the score head)."""
    if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):  # peft.PeftModel
        model = get_base()
    return model


def _plain_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """`module` as a Linear, looking through peft's ModulesToSaveWrapper (which keeps `original_module`)."""
    if isinstance(module, torch.nn.Linear):
        return module
    original = getattr(module, "original_module", None)
    if isinstance(original, torch.nn.Linear):
        return original
    return None


def score_head_name(model: torch.nn.Module) -> str:
    """Name of the scalar score head: the top-level Linear with out_features == 1 (`score` in llama,
    qwen2, gpt2, gpt_neox). Works on a plain, peft-wrapped or DDP-wrapped sequence classifier."""
    inner = unwrap(model)
    found = [
        name
        for name, child in inner.named_children()
        if (lin := _plain_linear(child)) is not None and lin.out_features == 1
    ]
    if len(found) != 1:
        raise ValueError(
            f"{type(inner).__name__} has {len(found)} top-level Linear layers with one output "
            f"({', '.join(found) or 'none'}); expected exactly one score head."
        )
    return found[0]


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The score head module as the forward pass calls it (peft's wrapper when there is one)."""
    return getattr(unwrap(model), score_head_name(model))


def init_score_head(linear: torch.nn.Linear) -> None:
    """Small initial scores: weight ~ N(0, 1/sqrt(hidden + 1)), bias 0 (N implementation details #1,
    Ziegler et al. 2019's reward head), so the untrained RM starts near 0 with unit-scale outputs."""
    std = 1.0 / math.sqrt(linear.in_features + 1)
    with torch.no_grad():
        torch.nn.init.normal_(linear.weight, mean=0.0, std=std)
        if linear.bias is not None:
            linear.bias.zero_()


# ---------------------------------------------------------------------------------------------
# Scores


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values[b, last real token of b]: (B, L) -> (B,), or (B, L, H) -> (B, H)."""
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_token_index(attention_mask).to(values.device)]


def head_scores(head: torch.nn.Linear, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A score head applied to the hidden state of each sequence's last real token: (B, L, H) -> (B,).

    For a trunk run outside a sequence classifier (PPO's reward adapter on the shared base): the same
    token `sequence_scores` reads the head's output at, without running the head on every position."""
    picked = gather_last(hidden, attention_mask)
    return head(picked.to(head.weight.dtype)).squeeze(-1)


@contextlib.contextmanager
def _some_pad_id(model: torch.nn.Module) -> Iterator[None]:
    """transformers' classifiers refuse batches > 1 without config.pad_token_id even though we never use
    their pad-based pooling; lend them one for the call when it is unset."""
    config = getattr(unwrap(model), "config", None)
    missing = config is not None and getattr(config, "pad_token_id", 0) is None
    if missing:
        config.pad_token_id = 0
    try:
        yield
    finally:
        if missing:
            config.pad_token_id = None


def sequence_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Score of each sequence: the score head's output at its last real token, as float32 (B,).

    Shapes: `input_ids`, `attention_mask` (B, L), left- or right-padded -> (B,).

    The forward pass goes through `model` itself (so DDP and peft wrappers do their work) with position
    ids from the mask; a hook on the head captures its per-token output (B, L, 1), and we take the column
    of the last real token. The classifier's own pad-token-based pooling is ignored.
    """
    head = score_head(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with _some_pad_id(model):
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the score head was not called in the forward pass")
    per_token = captured[-1]
    if per_token.dim() != 3 or per_token.shape[-1] != 1:
        raise RuntimeError(f"expected per-token head output (B, L, 1), got {tuple(per_token.shape)}")
    return gather_last(per_token[..., 0], attention_mask).float()


@torch.no_grad()
def batched_scores(
    model: torch.nn.Module,
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast_ctx=contextlib.nullcontext,
) -> torch.Tensor:
    """Scores of many token sequences (right-padded in batches of `batch_size`), as a float32 CPU tensor."""

    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids = pad_right(chunk, pad_id).to(device)
        mask = pad_right([[1] * len(s) for s in chunk], 0).to(device)
        with autocast_ctx():
            out.append(sequence_scores(model, ids, mask).cpu())
    return torch.cat(out) if out else torch.zeros(0)
