"""Reading data files and turning rows into token ids, for every stage.

Rows follow TRL's column conventions (the README's Data table):
- SFT: {"prompt", "completion"} (loss on the completion), {"messages"} (loss on assistant turns), {"text"}.
- RM: {"prompt", "chosen", "rejected"} or {"chosen", "rejected"}, as text or conversations; optional "margin".
- PPO and generate: {"prompt"} as a string, or {"messages"} ending before the assistant's turn.

A row that fits none of these is a UserError naming the file, the row number and the missing field.

Modules: `rows` (reading files, train/eval split, field checks), `chat` (chat templates, token ids, the
turn-end token), `lengths` (data.max_length), `sft`, `prompts` (PPO and generate), `batches` (padding and
a resumable batch order). The names below are the ones the rest of ppo_cli imports from `ppo_cli.data`.
"""

from ppo_cli.data.batches import EpochBatches, pad_left, pad_right
from ppo_cli.data.chat import (
    _encode,
    _render_chat,
    _with_eos,
    encode_prompt,
    end_conversation,
    turn_end_id,
)
from ppo_cli.data.lengths import LengthReport, fit_examples
from ppo_cli.data.prompts import build_prompts, prompt_of, prompt_text
from ppo_cli.data.rows import (
    LOCAL_SUFFIXES,
    Row,
    _check_text_or_conversation,
    _require,
    load_rows,
    load_train_eval_rows,
    split_eval,
)
from ppo_cli.data.sft import IGNORE_INDEX, build_sft_examples, collate_sft, encode_sft_row, sft_format

__all__ = [
    "IGNORE_INDEX",
    "LOCAL_SUFFIXES",
    "EpochBatches",
    "LengthReport",
    "Row",
    "_check_text_or_conversation",
    "_encode",
    "_render_chat",
    "_require",
    "_with_eos",
    "build_prompts",
    "build_sft_examples",
    "collate_sft",
    "encode_prompt",
    "encode_sft_row",
    "end_conversation",
    "fit_examples",
    "load_rows",
    "load_train_eval_rows",
    "pad_left",
    "pad_right",
    "prompt_of",
    "prompt_text",
    "sft_format",
    "split_eval",
    "turn_end_id",
]
