"""Text and conversations to token ids: chat-template rendering, the assistant-token mask, and the token
that ends an assistant turn."""

from __future__ import annotations

import re
import weakref
from typing import Any

from ppo_cli.errors import UserError


def _render_chat(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool, where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}: conversational data needs a tokenizer with a chat template, and this tokenizer has none; "
            "use prompt/completion or text rows."
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # noqa: BLE001 - jinja/transformers raise many types for a conversation it cannot render
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{where}: the chat template cannot render these messages ({type(exc).__name__}: {reason}); "
            "a conversation is a non-empty list of {role, content} objects with string values."
        ) from exc


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else [*ids, eos_id]


_PROBE_ANSWER = "Probe answer 7."
# tokenizer -> (what the answer depends on, turn-end id): encoding a data set asks once per row.
_TURN_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, EOS...),
    or None without a template or when only plain text follows the answer.

    A chat policy ends its answer with this token, so generation stops at it and the reward model is
    trained to score at it; what the template writes after it (ChatML's newline) is never sampled."""
    key = (str(getattr(tokenizer, "chat_template", None)), tokenizer.eos_token, len(tokenizer))
    cached = _TURN_ENDS.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    found = _find_turn_end(tokenizer)
    _TURN_ENDS[tokenizer] = (key, found)
    return found


def _find_turn_end(tokenizer) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: fall back to EOS
        return None
    if not isinstance(text, str) or _PROBE_ANSWER not in text:
        return None
    after_answer = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    tail = _encode(tokenizer, after_answer, add_special_tokens=False)
    # Templates' turn tokens are special in the vocabulary, though not always named special tokens
    # (Llama 3's <|eot_id|>).
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return next((t for t in tail if t in special), None)


def end_conversation(tokenizer, ids: list[int]) -> list[int]:
    """A rendered conversation that ends with an assistant turn, cut where a policy's answer stops: after
    the template's turn-end token, or with EOS appended when the template has none."""
    turn_end = turn_end_id(tokenizer)
    if turn_end is not None and turn_end in ids:
        return ids[: len(ids) - ids[::-1].index(turn_end)]
    return _with_eos(ids, tokenizer.eos_token_id)


def encode_prompt(tokenizer, prompt: Any, where: str) -> list[int]:
    """Token ids of a prompt: plain text as is, a conversation through the chat template."""
    if isinstance(prompt, str):
        return _encode(tokenizer, prompt, add_special_tokens=True)
    text = _render_chat(tokenizer, prompt, add_generation_prompt=True, where=where)
    return _encode(tokenizer, text, add_special_tokens=False)


def _encode_messages_with_mask(
    tokenizer, messages: list[dict[str, Any]], where: str
) -> tuple[list[int], list[bool]]:
    """Ids of a whole conversation and a mask of the assistant tokens.

    Rendering prefixes works with any chat template: the assistant turn i spans from the end of the
    conversation rendered up to turn i with the generation prompt, to the end of it rendered through i.
    """
    full = _encode(tokenizer, _render_chat(tokenizer, messages, False, where), add_special_tokens=False)
    mask = [False] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(
            _encode(tokenizer, _render_chat(tokenizer, messages[:i], True, where), add_special_tokens=False)
        )
        end = len(
            _encode(
                tokenizer, _render_chat(tokenizer, messages[: i + 1], False, where), add_special_tokens=False
            )
        )
        for j in range(start, min(end, len(full))):
            mask[j] = True
    generated = _generation_mask(tokenizer, messages, full)
    if generated is not None:  # drop template glue inside the turn span (e.g. the newline after <|im_end|>)
        mask = [m and g for m, g in zip(mask, generated)]
    if messages[-1]["role"] == "assistant" and turn_end_id(tokenizer) is None:
        # No token of the template ends the answer: the policy must learn to stop with EOS, where
        # generation stops and the reward model scores.
        full, mask = [*full, tokenizer.eos_token_id], [*mask, True]
    return full, mask


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _generation_mask(tokenizer, messages: list[dict[str, Any]], full: list[int]) -> list[bool] | None:
    """The chat template's own assistant mask (its `{% generation %}` blocks: what the model must emit),
    or None when the template has no such blocks or its tokens differ from `full`."""
    if not _GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        return None
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception:  # noqa: BLE001 - e.g. a slow tokenizer without offsets: keep the prefix mask
        return None
    if list(out["input_ids"]) != full or not any(out["assistant_masks"]):
        return None
    return [bool(m) for m in out["assistant_masks"]]
