"""Prompts of PPO and generate rows: a string, or a conversation ending before the assistant's turn."""

from __future__ import annotations

from typing import Any

from ppo_cli.data.chat import encode_prompt
from ppo_cli.data.lengths import LengthReport, fit_examples
from ppo_cli.data.rows import Row, _check_text_or_conversation, _is_conversation
from ppo_cli.errors import UserError


def prompt_of(row: Row) -> Any:
    """The prompt of a PPO/generate row: a string, or a conversation ending before the assistant's turn."""
    if "prompt" in row.data:
        _check_text_or_conversation(row, "prompt")
        _check_ends_before_assistant(row, "prompt")
        return row.data["prompt"]
    if "messages" in row.data:
        messages = row.data["messages"]
        if not _is_conversation(messages) or not messages:
            raise UserError(
                f"{row.where()}: field 'messages' must be a non-empty list of {{role, content}} objects."
            )
        _check_ends_before_assistant(row, "messages")
        return messages
    raise UserError(
        f"{row.where()}: missing field 'prompt' (or 'messages') (have: {', '.join(row.data) or 'nothing'})."
    )


def _check_ends_before_assistant(row: Row, name: str) -> None:
    """A prompt conversation is what the policy answers: ending on an assistant turn it would be an SFT row
    (the answer already given) or a prefill, and silently dropping or continuing that turn would train on
    something other than what the file says."""
    value = row.data[name]
    if isinstance(value, list) and value and value[-1].get("role") == "assistant":
        raise UserError(
            f"{row.where()}: field '{name}' ends with an assistant turn; a prompt must end before the "
            "assistant's turn (the policy writes it). Remove the last message (e.g. a reference answer) "
            "from every such row."
        )


def prompt_text(prompt: Any) -> str:
    """A display/reward-function form of a prompt: the string, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def build_prompts(
    tokenizer, rows: list[Row], max_length: int, overflow: str
) -> tuple[list[dict], LengthReport]:
    """Tokenized prompts. A prompt longer than max_length keeps its last max_length tokens (the end of a
    prompt is what the response continues) or is dropped."""

    def encode(row: Row) -> dict[str, Any]:
        prompt = prompt_of(row)
        ids = encode_prompt(tokenizer, prompt, row.where())
        if not ids:
            raise UserError(f"{row.where()}: the prompt is empty.")
        # "prompt": text for logs and reward functions; "original": the row's own string or conversation,
        # which a reward model with its own chat template renders itself.
        return {"input_ids": ids, "prompt": prompt_text(prompt), "original": prompt}

    return fit_examples(rows, encode, ("input_ids",), max_length, overflow, keep="end")
