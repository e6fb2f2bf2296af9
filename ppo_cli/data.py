"""Reading data files and turning rows into token ids, for every stage.

Rows follow TRL's column conventions (the README's Data table):
- SFT: {"prompt", "completion"} (loss on the completion), {"messages"} (loss on assistant turns), {"text"}.
- RM: {"prompt", "chosen", "rejected"} or {"chosen", "rejected"}, as text or conversations; optional "margin".
- PPO and generate: {"prompt"} as a string, or {"messages"} ending before the assistant's turn.

A row that fits none of these is a UserError naming the file, the row number and the missing field.
"""

from __future__ import annotations

import json
import math
import random
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import ListConfig

from ppo_cli.errors import UserError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
IGNORE_INDEX = -100


@dataclass
class Row:
    """One data row and where it came from (for error messages)."""

    data: dict[str, Any]
    source: str
    index: int  # 1-based row number within its file

    def where(self) -> str:
        return f"{self.source}, row {self.index}"


# ---------------------------------------------------------------------------------------------
# Loading


def _as_list(spec: Any) -> list[str]:
    if isinstance(spec, list | tuple | ListConfig):
        return [str(s) for s in spec]
    return [str(spec)]


def _looks_local(spec: str) -> bool:
    return (
        Path(spec).suffix.lower() in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")) or Path(spec).exists()
    )


def load_rows(spec: Any, key: str, split: str = "train") -> list[Row]:
    """All rows of `spec` (a file, a list of files, or a Hub dataset id). `key` names the config key."""
    rows: list[Row] = []
    for item in _as_list(spec):
        rows.extend(_load_one(item, key, split))
    if not rows:
        raise UserError(f"{key}={spec}: no rows (the data is empty).")
    return rows


def _load_one(spec: str, key: str, split: str) -> list[Row]:
    if _looks_local(spec):
        path = Path(spec).expanduser()
        if path.is_dir():  # a folder of data files, or a dataset saved with `save_to_disk`
            return _read_hub(str(path), key, split)
        if not path.is_file():
            raise UserError(f"{key}={spec}: file not found.")
        suffix = path.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise UserError(
                f"{key}={spec}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or .csv)."
            )
        if suffix in (".jsonl", ".json"):
            rows = _read_json_rows(path, key)
        else:
            rows = _read_with_datasets(LOCAL_SUFFIXES[suffix], str(path), key)
        if not rows:
            raise UserError(f"{key}={spec}: the file is empty.")
        return [Row(r, str(path), i + 1) for i, r in enumerate(rows)]
    return _read_hub(spec, key, split)


def _read_json_rows(path: Path, key: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{key}: {path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
        rows = data
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{key}: {path}, line {lineno} is not valid JSON ({exc.msg}).") from exc
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{key}: {path}, row {i} is a {type(row).__name__}, not a JSON object.")
    return rows


def _read_with_datasets(builder: str, path: str, key: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
        raise UserError(
            f"{key}: cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    return [dict(r) for r in ds]


def _read_hub(spec: str, key: str, split: str) -> list[Row]:
    import datasets

    local = Path(spec)
    try:
        if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))  # written by Dataset(Dict).save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(spec, split=split)
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if local.is_dir():
            raise UserError(
                f"{key}={spec}: cannot load this dataset folder (split {split}): {reason}"
            ) from exc
        raise UserError(
            f"{key}={spec}: not a local file, and loading it as a Hub dataset failed: {reason}"
        ) from exc
    return [Row(dict(r), f"{spec}[{split}]", i + 1) for i, r in enumerate(ds)]


def load_train_eval_rows(data_cfg, seed: int) -> tuple[list[Row], list[Row]]:
    """data.train's rows and the eval rows: data.eval when given, else a held-out data.eval_fraction."""
    rows = load_rows(data_cfg.train, "data.train", data_cfg.split)
    if data_cfg.eval:
        return rows, load_rows(data_cfg.eval, "data.eval", data_cfg.split)
    return split_eval(rows, data_cfg.eval_fraction, seed)


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out `fraction` of the rows (at least one, when fraction > 0 and there are 2+ rows)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ---------------------------------------------------------------------------------------------
# Field checks


def _require(row: Row, *fields: str) -> None:
    for name in fields:
        if name not in row.data or row.data[name] is None:
            raise UserError(
                f"{row.where()}: missing field '{name}' (have: {', '.join(row.data) or 'nothing'})."
            )


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _check_text_or_conversation(row: Row, name: str) -> None:
    value = row.data[name]
    if not (isinstance(value, str) or _is_conversation(value)):
        raise UserError(
            f"{row.where()}: field '{name}' must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}."
        )


# ---------------------------------------------------------------------------------------------
# Tokenization helpers


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


# ---------------------------------------------------------------------------------------------
# SFT


@dataclass
class LengthReport:
    """How many examples were truncated or dropped for being longer than data.max_length, or dropped for
    having no token to learn (`empty`)."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    empty: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, what: str, where: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        if len(self.examples) < 3:
            self.examples.append(where)

    def describe(self, max_length: int) -> str | None:
        parts = []
        if self.truncated or self.dropped:
            parts.append(
                f"{self.truncated} of {self.total} examples truncated and {self.dropped} dropped at "
                f"data.max_length={max_length}"
            )
        if self.empty:
            parts.append(
                f"{self.empty} of {self.total} examples dropped for having no token to learn (empty)"
            )
        if not parts:
            return None
        return f"{'; '.join(parts)} (e.g. {', '.join(self.examples)})"


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
    report = LengthReport()
    examples = []
    for row in rows:
        report.total += 1
        ids, labels = encode_sft_row(tokenizer, row)
        if all(label == IGNORE_INDEX for label in labels[1:]):
            # Token t predicts t+1, so the first label never counts: {"text": ""} (EOS alone) has no target,
            # and a micro-batch of only such rows would make the loss 0/0 = NaN.
            report.note("empty", row.where())
            continue
        if len(ids) > max_length:
            if overflow == "drop":
                report.note("dropped", row.where())
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                report.note("dropped", row.where())  # the prompt alone fills max_length: nothing to learn
                continue
            report.note("truncated", row.where())
        examples.append({"input_ids": ids, "labels": labels})
    return examples, report


def pad_right(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def pad_left(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + s for s in sequences], dtype=torch.long)


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "labels": pad_right([e["labels"] for e in examples], IGNORE_INDEX),
    }


# ---------------------------------------------------------------------------------------------
# Prompts (PPO, generate)


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
    report = LengthReport()
    prompts = []
    for row in rows:
        report.total += 1
        prompt = prompt_of(row)
        ids = encode_prompt(tokenizer, prompt, row.where())
        if not ids:
            raise UserError(f"{row.where()}: the prompt is empty.")
        if len(ids) > max_length:
            if overflow == "drop":
                report.note("dropped", row.where())
                continue
            ids = ids[-max_length:]
            report.note("truncated", row.where())
        # "prompt": text for logs and reward functions; "original": the row's own string or conversation,
        # which a reward model with its own chat template renders itself.
        prompts.append({"input_ids": ids, "prompt": prompt_text(prompt), "original": prompt})
    return prompts, report


# ---------------------------------------------------------------------------------------------
# Data order that can be resumed exactly


class EpochBatches:
    """Shuffled batches of indices, reshuffled each epoch with (seed, epoch); resumable from (epoch, offset).

    The state is just two integers, so a resumed run sees exactly the batches the uninterrupted run
    would have seen. An epoch's last batch is short, dropped (drop_last), or topped up to full size from
    the start of the same epoch's order (pad_last, as torch's DistributedSampler pads). Training pads:
    each rank takes a slice of one global batch, and a short one would give ranks unequal or empty
    slices, so their collectives would no longer match.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False, pad_last: bool = False):
        if n <= 0:
            raise ValueError("no examples")
        if drop_last and pad_last:
            raise ValueError("drop_last and pad_last exclude each other")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.drop_last, self.pad_last = drop_last, pad_last
        self.epoch, self.offset = 0, 0

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return max(1, self.n // self.batch_size)
        return math.ceil(self.n / self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        if self.offset >= self.batches_per_epoch():
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset * self.batch_size
        self.offset += 1
        order = self._order(self.epoch)
        batch = order[start : start + self.batch_size]
        if self.pad_last and len(batch) < self.batch_size:
            # The order's head is disjoint from its tail while n >= batch_size: no index twice in a batch.
            missing = self.batch_size - len(batch)
            batch += (order * math.ceil(missing / self.n))[:missing]
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
