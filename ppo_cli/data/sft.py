"""SFT rows (prompt/completion, messages, text) to input ids and labels, and their batches."""

from __future__ import annotations

import torch

from ppo_cli.data.batches import pad_right
from ppo_cli.data.chat import _encode, _encode_messages_with_mask, _render_chat, _with_eos
from ppo_cli.data.lengths import LengthReport, fit_examples
from ppo_cli.data.rows import Row, _check_text_or_conversation, _is_conversation, _require
from ppo_cli.errors import UserError

IGNORE_INDEX = -100


def sft_format(row: Row) -> str:
    if "messages" in row.data:
        return "messages"
    if "prompt" in row.data or "completion" in row.data:
        _require(row, "prompt", "completion")
        return "prompt_completion"
    if "text" in row.data:
        return "text"
    raise UserError(
        f"{row.where()}: missing field: an SFT row needs 'prompt' and 'completion', 'messages', or 'text' "
        f"(have: {', '.join(row.data) or 'nothing'})."
    )


def encode_sft_row(tokenizer, row: Row) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one SFT row; labels are IGNORE_INDEX where no loss is taken."""
    kind = sft_format(row)
    eos = tokenizer.eos_token_id
    if kind == "prompt_completion":
        _check_text_or_conversation(row, "prompt")
        _check_text_or_conversation(row, "completion")
        prompt, completion = row.data["prompt"], row.data["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise UserError(
                f"{row.where()}: 'prompt' and 'completion' must both be text or both conversations."
            )
        if isinstance(prompt, str):
            prompt_ids = _encode(tokenizer, prompt, add_special_tokens=True)
            completion_ids = _with_eos(_encode(tokenizer, completion, add_special_tokens=False), eos)
            return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        ids, mask = _encode_messages_with_mask(tokenizer, [*prompt, *completion], row.where())
        # Only the completion's assistant turns carry loss, not assistant turns inside the prompt.
        n_prompt = len(
            _encode(tokenizer, _render_chat(tokenizer, prompt, True, row.where()), add_special_tokens=False)
        )
        mask = [m and j >= n_prompt for j, m in enumerate(mask)]
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if kind == "messages":
        messages = row.data["messages"]
        if not _is_conversation(messages):
            raise UserError(f"{row.where()}: field 'messages' must be a list of {{role, content}} objects.")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{row.where()}: 'messages' has no assistant turn, so there is nothing to learn.")
        ids, mask = _encode_messages_with_mask(tokenizer, messages, row.where())
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    text = row.data["text"]
    if not isinstance(text, str):
        raise UserError(f"{row.where()}: field 'text' must be a string.")
    ids = _with_eos(_encode(tokenizer, text, add_special_tokens=True), eos)
    return ids, list(ids)


def build_sft_examples(
    tokenizer, rows: list[Row], max_length: int, overflow: str
) -> tuple[list[dict], LengthReport]:
    def encode(row: Row) -> dict[str, list[int]]:
        ids, labels = encode_sft_row(tokenizer, row)
        return {"input_ids": ids, "labels": labels}

    return fit_examples(
        rows,
        encode,
        ("input_ids", "labels"),
        max_length,
        overflow,
        # Token t predicts t+1, so the first label never counts: {"text": ""} (EOS alone) has no target,
        # and a micro-batch of only such rows would make the loss 0/0 = NaN.
        is_empty=lambda example: all(label == IGNORE_INDEX for label in example["labels"][1:]),
        # The prompt alone fills max_length: nothing to learn.
        is_useless=lambda example: all(label == IGNORE_INDEX for label in example["labels"]),
    )


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "labels": pad_right([e["labels"] for e in examples], IGNORE_INDEX),
    }
