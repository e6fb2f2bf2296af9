"""A tiny, fully local task + tokenizer + models for fast end-to-end tests of SFT -> RM -> PPO.

The task ("positive words"): a prompt such as ``"Describe the river:"`` is answered by a short sentence made of
words from three lists (positive, negative, neutral). The gold metric is the share of positive minus the share of
negative words, so a policy improves by using more positive and fewer negative words. SFT data mixes the three
lists uniformly (the model learns the *format*, not the preference); preference pairs rank two such sentences by
the gold metric, so a reward model can learn it and PPO can then push the policy towards it.

Everything (tokenizer, models of several architectures, JSONL data) is built offline: random-init models in
seconds; with ``pretrain_steps`` (the demo's base model) a short full-parameter pretraining on the task's text
first makes the model a base that speaks the task's language, in well under a minute on 2 CPU cores.

Usage::

    python -m ppo_cli.tiny OUT_DIR [--arch llama] [--hidden-size 64] [--layers 2] [--pretrain-steps 300]
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy imports are deferred so that `positive_reward` stays cheap to import
    from transformers import PreTrainedTokenizerFast

# --------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------

POSITIVE_WORDS: tuple[str, ...] = (
    "good", "happy", "great", "kind", "bright", "joyful", "lovely", "warm", "gentle", "brave",
    "calm", "cheerful", "wonderful", "friendly", "sunny", "sweet", "fresh", "clever", "proud", "glad",
    "hopeful", "nice", "excellent", "delightful", "beautiful", "peaceful", "fun", "amazing", "love", "smile",
)  # fmt: skip
NEGATIVE_WORDS: tuple[str, ...] = (
    "bad", "sad", "awful", "angry", "terrible", "cruel", "dark", "cold", "ugly", "nasty",
    "gloomy", "bitter", "lonely", "rude", "horrible", "dull", "grim", "harsh", "mean", "poor",
    "sick", "scary", "broken", "boring", "dirty", "evil", "weak", "hate", "worst", "tired",
)  # fmt: skip
NEUTRAL_WORDS: tuple[str, ...] = (
    "table", "river", "blue", "seven", "chair", "window", "paper", "stone", "green", "three",
    "door", "road", "tree", "water", "cloud", "book", "clock", "wall", "car", "bridge",
    "garden", "red", "yellow", "five", "two", "city", "house", "street", "train", "box",
    "cup", "lamp", "hill", "field", "boat", "shoe", "glass", "sand", "wood", "metal",
)  # fmt: skip

# Prompts = templates x topics (10 x 40 = 400 distinct prompts). "{a}" becomes "a"/"an" to keep them grammatical.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Describe the {t}:",
    "Tell me about {a} {t}:",
    "Write a sentence about the {t}:",
    "What do you think of the {t}?",
    "Say something about {a} {t}:",
    "Comment on the {t}:",
    "Give your opinion of the {t}:",
    "Describe {a} {t} in a few words:",
    "How was the {t}?",
    "Write about the {t}:",
)
TOPICS: tuple[str, ...] = (
    "river", "dog", "cat", "city", "garden", "teacher", "storm", "morning", "school", "forest",
    "ocean", "friend", "market", "winter", "train", "house", "mountain", "song", "book", "dinner",
    "park", "village", "day", "robot", "painting", "bridge", "festival", "kitchen", "library", "journey",
    "summer", "neighbor", "game", "movie", "beach", "museum", "farm", "party", "road", "sky",
)  # fmt: skip

MIN_WORDS, MAX_WORDS = 4, 10  # completion length in words
N_EVAL_ROWS = 200  # rows of sft_eval / prefs_eval / sft_messages

_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)
_WORD_RE = re.compile(
    r"[a-z0-9]+"
)  # a "word" is a maximal run of ASCII letters/digits: punctuation is ignored


def _words(text: str) -> list[str]:
    """Lower-cased words of `text`, punctuation and whitespace dropped."""
    return _WORD_RE.findall(text.lower())


def gold_score(completion: str) -> float:
    """The task's gold metric: (#positive - #negative) / max(1, #words), in [-1, 1].

    Word-level and case-insensitive; punctuation is ignored ("Good, happy!" has two positive words).
    """
    words = _words(completion)
    n_pos = sum(w in _POSITIVE for w in words)
    n_neg = sum(w in _NEGATIVE for w in words)
    return (n_pos - n_neg) / max(1, len(words))


def positive_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward function for `reward_fn=ppo_cli.tiny:positive_reward`: the gold score of each completion."""
    del prompts  # the gold metric does not depend on the prompt
    return [gold_score(c) for c in completions]


def all_prompts() -> list[str]:
    """Every distinct prompt of the task, in a fixed order."""
    prompts = []
    for template in PROMPT_TEMPLATES:
        for topic in TOPICS:
            article = "an" if topic[0] in "aeiou" else "a"
            prompts.append(template.format(t=topic, a=article))
    return prompts


def sample_completion(rng: random.Random) -> str:
    """A mixed completion: 4-10 words, each from a uniformly chosen list, e.g. ``" good river sad."``.

    The leading space matters: prompt + completion then tokenizes as cleanly as the two parts do apart
    (byte-level BPE keeps the space with the following word).
    """
    n_words = rng.randint(MIN_WORDS, MAX_WORDS)
    lists = (POSITIVE_WORDS, NEGATIVE_WORDS, NEUTRAL_WORDS)
    words = [rng.choice(rng.choice(lists)) for _ in range(n_words)]
    return " " + " ".join(words) + "."


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")


def _model_config(
    arch: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, bos: int, eos: int
):
    """The transformers config of a tiny `arch` model.

    Dropout is off everywhere (GPT-2 defaults to 0.1): PPO compares log-probs of the same tokens across forward
    passes, and random dropout masks would make those comparisons noisy. pad_token_id stays None on purpose.
    """
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None}
    if arch in ("llama", "qwen2"):
        config_cls = LlamaConfig if arch == "llama" else Qwen2Config
        return config_cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=MODEL_MAX_LENGTH,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=MODEL_MAX_LENGTH,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=4 * hidden_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **ids,  # embeddings stay tied, as in real GPT-2
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=4 * hidden_size,
            max_position_embeddings=MODEL_MAX_LENGTH,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            classifier_dropout=0.0,
            tie_word_embeddings=False,
            **ids,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def embedding_rows(n_tokens: int, multiple: int | None) -> int:
    """Rows of the embedding matrix for a tokenizer of `n_tokens`: exactly `n_tokens` when `multiple` is None,
    else rounded up to a multiple of `multiple` leaving at least one spare row (like Qwen or Pythia, whose
    matrices are larger than their tokenizers: a pad token added by the loader then needs no resize)."""
    if multiple is None:
        return n_tokens
    if multiple < 1:
        raise ValueError(f"vocab_multiple must be positive, got {multiple}")
    return -(-(n_tokens + 1) // multiple) * multiple


def pretraining_texts(tokenizer: PreTrainedTokenizerFast, n: int, seed: int = 0) -> list[list[int]]:
    """`n` token sequences of the task's "language", each ending with EOS: a plain prompt followed by a mixed
    completion (3 in 4), or the same exchange in the chat format (1 in 4). The sentiment is uniform, so the
    pretrained base has no preference for positive words: that is left for PPO to learn."""
    rng = random.Random(f"pretrain-{seed}")
    prompts = all_prompts()
    eos = tokenizer.eos_token_id
    sequences = []
    for _ in range(n):
        prompt, completion = rng.choice(prompts), sample_completion(rng)
        if rng.random() < 0.75:
            ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        else:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion.strip()},
            ]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        sequences.append([*ids, eos])
    return sequences


def pretrain(
    model,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> list[float]:
    """Full-parameter next-token training of `model` on `pretraining_texts` (AdamW, warmup + cosine decay).

    A few hundred steps turn the random-init model into a base that "speaks" the task: it continues a prompt
    with task words and ends with EOS, like a small pretrained LM. Returns the loss of every step.
    """
    import math

    import torch

    sequences = pretraining_texts(tokenizer, steps * batch_size, seed)
    eos = tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    # One thread: the matrices are too small to gain from more, a busy machine makes extra threads much
    # slower, and the result does not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            losses.append(_pretrain_step(model, sequences[step * batch_size : (step + 1) * batch_size], eos))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def _pretrain_step(model, batch: list[list[int]], eos: int) -> float:
    """Forward + backward of one right-padded batch (pads masked out of attention and loss); returns the loss."""
    import torch

    width = max(len(s) for s in batch)
    input_ids = torch.tensor([s + [eos] * (width - len(s)) for s in batch])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return loss.detach().item()


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    pretrain_steps: int = 0,
    vocab_multiple: int | None = None,
) -> Path:
    """Build a causal LM of `arch` and save it, with its tokenizer, to `out_dir`.

    `pretrain_steps` > 0 pretrains the random-init weights on the task's text (see `pretrain`): a base model
    that LoRA SFT can adapt and PPO can steer. `vocab_multiple` (e.g. 64) gives the embedding matrix spare rows
    (see `embedding_rows`); None keeps it exactly the tokenizer's size, so loaders must resize it for a pad token.

    The directory loads with AutoModelForCausalLM, AutoModelForSequenceClassification(num_labels=1) and
    AutoTokenizer. Same arguments and seed -> identical weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if tokenizer is None:
        tokenizer = build_tokenizer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = _model_config(
        arch,
        vocab_size=embedding_rows(len(tokenizer), vocab_multiple),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)  # weight init draws from torch's global RNG
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if pretrain_steps > 0:
        torch.manual_seed(seed)
        pretrain(model, tokenizer, pretrain_steps, seed=seed)
    model.generation_config.pad_token_id = None  # same reason as config.pad_token_id: the loader picks one
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` as one JSON object per line."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _sft_rows(n: int, rng: random.Random, prompts: list[str]) -> list[dict[str, str]]:
    """Prompt/completion rows with mixed completions (format, not preference)."""
    return [{"prompt": rng.choice(prompts), "completion": sample_completion(rng)} for _ in range(n)]


def _pref_rows(n: int, rng: random.Random, prompts: list[str]) -> list[dict[str, str]]:
    """Prompt/chosen/rejected rows: two completions per prompt, the higher gold score is chosen, ties skipped."""
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        prompt, a, b = rng.choice(prompts), sample_completion(rng), sample_completion(rng)
        score_a, score_b = gold_score(a), gold_score(b)
        if score_a == score_b:
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _split_prompts(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Disjoint train/eval prompt lists when the pool allows it; otherwise they cycle through the pool."""
    pool = all_prompts()
    rng.shuffle(pool)
    if n_train + n_eval <= len(pool):
        return pool[:n_train], pool[n_train : n_train + n_eval]
    # Not enough distinct prompts: keep eval disjoint from as much of train as possible, then repeat.
    train = [pool[i % len(pool)] for i in range(n_train)]
    eval_ = [pool[(len(pool) - 1 - i) % len(pool)] for i in range(n_eval)]
    return train, eval_


def write_task_data(
    out_dir: str | Path,
    n_sft: int = 2000,
    n_pref: int = 2000,
    n_prompts: int = 256,
    n_eval_prompts: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the task's JSONL files (TRL column conventions) to `out_dir`; return {name: path}.

    sft / sft_eval: prompt, completion; prefs / prefs_eval: prompt, chosen, rejected; prompts / prompts_eval:
    prompt; sft_messages: messages (user + assistant), for chat-format tests. Each split has its own RNG stream,
    so e.g. changing n_sft does not change prefs.jsonl.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = all_prompts()

    def rng(split: str) -> random.Random:
        return random.Random(f"{seed}-{split}")  # str seeds are hashed deterministically (no PYTHONHASHSEED)

    train_prompts, eval_prompts = _split_prompts(rng("prompts"), n_prompts, n_eval_prompts)
    messages = [
        {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                # In chat form the turn boundary already separates the answer: no leading space.
                {"role": "assistant", "content": row["completion"].strip()},
            ]
        }
        for row in _sft_rows(N_EVAL_ROWS, rng("sft_messages"), pool)
    ]
    files: dict[str, list[dict[str, Any]]] = {
        "sft": _sft_rows(n_sft, rng("sft"), pool),
        "sft_eval": _sft_rows(N_EVAL_ROWS, rng("sft_eval"), pool),
        "prefs": _pref_rows(n_pref, rng("prefs"), pool),
        "prefs_eval": _pref_rows(N_EVAL_ROWS, rng("prefs_eval"), pool),
        "prompts": [{"prompt": p} for p in train_prompts],
        "prompts_eval": [{"prompt": p} for p in eval_prompts],
        "sft_messages": messages,
    }
    return {name: _write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in files.items()}


# --------------------------------------------------------------------------------------------------------------
# Everything at once (cached) + CLI
# --------------------------------------------------------------------------------------------------------------

# Bump when the generated artefacts change, so that cached builds from older code are rebuilt.
BUILD_VERSION = 1
_STAMP = "tiny_build.json"
_DATA_NAMES = ("sft", "sft_eval", "prefs", "prefs_eval", "prompts", "prompts_eval", "sft_messages")


def _build_args(arch: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The full argument set of a build, defaults filled in, so equal builds compare equal however called."""
    params = inspect.signature(build_tiny_model).bind("<out_dir>", arch=arch, **model_kwargs)
    params.apply_defaults()
    args = dict(params.arguments)
    del args["out_dir"], args["tokenizer"]
    return {"version": BUILD_VERSION, **args}


def build_all(out_dir: str | Path, arch: str = "llama", **model_kwargs: Any) -> dict[str, Path]:
    """Build tokenizer + model (out_dir/model) + data (out_dir/data); return their paths.

    Returns {"root", "model", "data", and one key per data file (see write_task_data)}. If out_dir holds a
    finished build with the same arguments, nothing is rebuilt. `model_kwargs` go to build_tiny_model
    (hidden_size, num_layers, num_heads, seed, pretrain_steps, vocab_multiple).
    """
    if "tokenizer" in model_kwargs:
        raise TypeError("build_all builds its own tokenizer; do not pass one")
    out_dir = Path(out_dir)
    model_dir, data_dir = out_dir / "model", out_dir / "data"
    paths: dict[str, Path] = {"root": out_dir, "model": model_dir, "data": data_dir}
    paths.update({name: data_dir / f"{name}.jsonl" for name in _DATA_NAMES})

    args = _build_args(arch, model_kwargs)
    stamp = out_dir / _STAMP
    if _is_cached(stamp, args, paths):
        return paths

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    build_tiny_model(model_dir, arch=arch, tokenizer=build_tokenizer(), **model_kwargs)
    write_task_data(data_dir)
    stamp.write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")  # written last: marks the build done
    return paths


def _is_cached(stamp: Path, args: dict[str, Any], paths: dict[str, Path]) -> bool:
    """True if a finished build with exactly `args` is already on disk."""
    if not stamp.is_file() or not (paths["model"] / "config.json").is_file():
        return False
    try:
        if json.loads(stamp.read_text()) != args:
            return False
    except json.JSONDecodeError:
        return False
    return all(paths[name].is_file() for name in _DATA_NAMES)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """CLI entry point: build everything into OUT_DIR and print the paths as JSON."""
    parser = argparse.ArgumentParser(prog="python -m ppo_cli.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", default="llama", choices=ARCHS)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrain-steps", type=int, default=0, help="full-parameter pretraining steps on the task's text"
    )
    parser.add_argument(
        "--vocab-multiple", type=int, default=None, help="round the embedding rows up to a multiple of this"
    )
    ns = parser.parse_args(argv)
    from ppo_cli.app import quiet_libraries

    quiet_libraries()  # no "Writing model shards" bars from save_pretrained
    paths = build_all(
        ns.out_dir,
        arch=ns.arch,
        hidden_size=ns.hidden_size,
        num_layers=ns.layers,
        num_heads=ns.heads,
        seed=ns.seed,
        pretrain_steps=ns.pretrain_steps,
        vocab_multiple=ns.vocab_multiple,
    )
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return paths


if __name__ == "__main__":
    main()
