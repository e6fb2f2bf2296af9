"""Tiny causal LMs of several architectures (Llama, Qwen2, GPT-2, GPT-NeoX), built and saved offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ppo_cli.tiny.pretrain import pretrain
from ppo_cli.tiny.tokenizer import MODEL_MAX_LENGTH, build_tokenizer, save_tokenizer

if TYPE_CHECKING:  # torch and transformers are imported only when a model is built
    from transformers import PreTrainedTokenizerFast

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
