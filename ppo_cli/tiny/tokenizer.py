"""The tiny byte-level BPE tokenizer, trained offline on the task's text, with a ChatML chat template."""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ppo_cli.tiny.task import (
    NEGATIVE_WORDS,
    NEUTRAL_WORDS,
    POSITIVE_WORDS,
    TOPICS,
    all_prompts,
    sample_completion,
)

if TYPE_CHECKING:  # transformers is imported only when a tokenizer is built
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
MODEL_MAX_LENGTH = 512
# Qwen2's split regex (as in transformers.models.qwen2.tokenization_qwen2), applied before byte-level encoding.
_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen/ChatML style. The assistant's content *and* its closing <|im_end|> are inside {% generation %}, so the
# assistant mask covers what the model must learn to emit, including the token that ends its turn; the "\n"
# after <|im_end|> is template glue and stays unmasked.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _tokenizer_corpus(seed: int = 0) -> Iterator[str]:
    """Text the BPE merges are learned from: task words, prompts, sample answers, chat glue, random ASCII."""
    rng = random.Random(f"tokenizer-{seed}")
    for word in POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS + TOPICS:
        yield word
        yield " " + word  # the in-sentence form (space + word) is what actually occurs
    # Many sampled answers, so that most merges go to the task's words and sequences stay short.
    prompts = all_prompts()
    for i in range(4000):
        yield prompts[i % len(prompts)] + sample_completion(rng)
    for role in ("system", "user", "assistant"):
        yield f"{role}\n"
    # Some random printable ASCII so that merges also exist for general text; round-tripping any string is
    # guaranteed by the byte-level alphabet regardless.
    for _ in range(100):
        yield "".join(rng.choice(string.printable) for _ in range(rng.randint(5, 60)))


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (len == vocab_size) on the task's text; save it if out_dir is given.

    Special tokens are ``<|endoftext|>`` (BOS and EOS), ``<|im_start|>`` and ``<|im_end|>``; they get the last
    ids, as in real checkpoints. There is deliberately NO pad token: loaders must add one, as for real models.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Exactly the pipeline transformers' Qwen2Tokenizer rebuilds when it loads a qwen2 checkpoint (it ignores
    # tokenizer.json's pre-tokenizer), so every arch and the in-memory object tokenize identically.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact, which `return_assistant_tokens_mask` relies on (char_to_token).
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),  # specials are appended after training
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any string round-trips
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """`save_pretrained`, plus an explicit ``"pad_token": null`` in tokenizer_config.json.

    Without it, loading a qwen2 checkpoint (AutoTokenizer -> Qwen2Tokenizer) silently defaults the pad token
    to <|endoftext|>; the explicit null keeps "no pad token" true for every arch.
    """
    tokenizer.save_pretrained(str(out_dir))
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("pad_token") is None:
        config["pad_token"] = None
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
