"""Preference pairs for reward-model training: row checks, tokenization, length limits, batching.

Rows (TRL's column conventions, as the README's Data table):
- explicit prompt: {"prompt", "chosen", "rejected"}: all three text, or all three conversations
  (the prompt's messages, then the chosen/rejected assistant turn(s));
- implicit prompt: {"chosen", "rejected"}: two full texts, or two full conversations;
- optional "margin" (a number): the loss asks r_chosen - r_rejected to exceed it (Llama 2).

Each side becomes one token sequence that the RM scores at its last token:
- text: the prompt tokenized with special tokens, then the completion without, then EOS if missing;
- conversation: the prompt + answer messages rendered through the chat template, ending with the token
  that closes the answer's turn (<|im_end|>, <|eot_id|>...; EOS when the template has none): where a
  policy's response stops, so where PPO reads the score.
Sequences longer than data.max_length keep their start (data.overflow=truncate) or drop the pair
(data.overflow=drop); the counts are reported.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ppo_cli.data import (
    LengthReport,
    Row,
    _check_text_or_conversation,
    _encode,
    _render_chat,
    _require,
    _with_eos,
    end_conversation,
    fit_examples,
    pad_right,
)
from ppo_cli.errors import UserError

SIDES = ("chosen", "rejected")


def _check_row(row: Row) -> None:
    missing = [name for name in SIDES if name not in row.data or row.data[name] is None]
    if missing:
        raise UserError(
            f"{row.where()}: missing field '{missing[0]}': a preference row needs 'chosen' and 'rejected' "
            f"(and optionally 'prompt', 'margin') (have: {', '.join(row.data) or 'nothing'})."
        )
    _require(row, *SIDES)
    names = ["prompt", *SIDES] if row.data.get("prompt") is not None else list(SIDES)
    for name in names:
        _check_text_or_conversation(row, name)
    kinds = {name: isinstance(row.data[name], str) for name in names}
    if len(set(kinds.values())) > 1:
        texts = [n for n, is_text in kinds.items() if is_text]
        convs = [n for n, is_text in kinds.items() if not is_text]
        raise UserError(
            f"{row.where()}: fields {', '.join(names)} must all be text or all be conversations "
            f"({', '.join(texts)} text; {', '.join(convs)} conversation)."
        )


def margin_of(row: Row) -> float | None:
    """The row's optional 'margin', checked to be a finite number."""
    value = row.data.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise UserError(f"{row.where()}: field 'margin' must be a finite number, got {value!r}.")
    return float(value)


def encode_side(
    tokenizer, prompt: Any, answer: Any, where: str, prompt_ids: list[int] | None = None
) -> list[int]:
    """Token ids of prompt + answer (prompt None for implicit-prompt rows), ending with the stop token.

    `prompt_ids`, when given, are the text prompt's ids (so that a pair encodes its prompt once)."""
    if isinstance(answer, str):
        if prompt is None:
            ids = _encode(tokenizer, answer, add_special_tokens=True)
        else:
            if prompt_ids is None:
                prompt_ids = _encode(tokenizer, prompt, add_special_tokens=True)
            ids = prompt_ids + _encode(tokenizer, answer, add_special_tokens=False)
        return _with_eos(ids, tokenizer.eos_token_id)
    messages = [*(prompt or []), *answer]
    ids = _encode(
        tokenizer,
        _render_chat(tokenizer, messages, add_generation_prompt=False, where=where),
        add_special_tokens=False,
    )
    # Not EOS after the whole rendering: ChatML's "<|im_end|>\n" + EOS would put the score two tokens
    # past the <|im_end|> at which PPO's response stops.
    return end_conversation(tokenizer, ids)


def encode_pair(tokenizer, row: Row) -> dict[str, Any]:
    """{"chosen": ids, "rejected": ids, "margin": float | None} of one preference row."""
    _check_row(row)
    prompt = row.data.get("prompt")
    prompt_ids = _encode(tokenizer, prompt, add_special_tokens=True) if isinstance(prompt, str) else None
    example: dict[str, Any] = {
        side: encode_side(tokenizer, prompt, row.data[side], row.where(), prompt_ids) for side in SIDES
    }
    example["margin"] = margin_of(row)
    return example


def build_pair_examples(
    tokenizer, rows: list[Row], max_length: int, overflow: str
) -> tuple[list[dict], LengthReport]:
    """Encoded pairs within max_length, and how many were truncated or dropped (counted per pair). A cut
    keeps the start (the prompt and the answer's opening); a pair whose shared prompt fills max_length has
    nothing to compare and is dropped."""
    return fit_examples(
        rows,
        lambda row: encode_pair(tokenizer, row),
        SIDES,
        max_length,
        overflow,
        is_useless=lambda example: example["chosen"] == example["rejected"],
        useless_why="the prompt, with any start both answers share, is at least data.max_length={max_length} "
        "tokens long, leaving chosen and rejected the same",
    )


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B sequences: the B chosen first, then the B rejected (one forward pass).

    Returns input_ids, attention_mask (2B, L) and margin (B,) (0 where a row has none).
    """
    sequences = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    return {
        "input_ids": pad_right(sequences, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in sequences], 0),
        "margin": torch.tensor([e["margin"] or 0.0 for e in examples], dtype=torch.float32),
    }
