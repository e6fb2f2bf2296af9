"""What a run is, in the numbers the estimate needs: the model's shape from its config (never its weights),
the LoRA targets and ranks of every adapter, dtypes and quantization, batch and lengths (RunShape)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ppo_cli.errors import UserError
from ppo_cli.plan.estimate import ModelShape, RunShape, linears_of

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_shape(config: Any) -> ModelShape:
    """The numbers of a transformers config (GPT-2's n_embd/n_layer/n_head names included)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return default

    model_type = str(getattr(config, "model_type", "") or "")
    hidden = int(first("hidden_size", "n_embd", "d_model"))
    layers = int(first("num_hidden_layers", "n_layer", "num_layers"))
    heads = int(first("num_attention_heads", "n_head"))
    kv_heads = int(first("num_key_value_heads", default=heads))
    head_dim = int(first("head_dim", default=hidden // heads))
    inter = int(first("intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden)
    return ModelShape(
        model_type=model_type,
        vocab_size=int(first("vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        tie_word_embeddings=bool(first("tie_word_embeddings", default=model_type == "gpt2")),
        linears=linears_of(model_type, hidden, heads, kv_heads, head_dim, inter),
    )


def load_model_config(model_cfg: DictConfig, key: str = "model.name_or_path"):
    from transformers import AutoConfig

    from ppo_cli.models import first_line, looks_local

    name = str(model_cfg.name_or_path)
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise UserError(f"{key}={name}: no such directory.")
    try:
        return AutoConfig.from_pretrained(
            str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name,
            trust_remote_code=bool(model_cfg.trust_remote_code),
            revision=OmegaConf.select(model_cfg, "revision"),
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of {key}={name}: {first_line(exc)}") from exc


def stored_dtype_bytes(config: Any) -> int:
    """Bytes per weight in the checkpoint (its config's dtype; fp32 when it does not say)."""
    stored = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
    return DTYPE_BYTES.get(stored.removeprefix("torch."), 4)


def checkpoint_file_bytes(name_or_path: str, shape: ModelShape, config: Any) -> int:
    """Size of the weight files (local directory), else the parameters at the config's stored dtype."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = [*path.glob("*.safetensors"), *path.glob("*.bin")]
        if files:
            return sum(f.stat().st_size for f in files)
    return shape.params * stored_dtype_bytes(config)


def lora_targets(lora_cfg: DictConfig, shape: ModelShape) -> list[str] | str:
    """Module names LoRA adapts: peft's default for the architecture, all-linear, a list, or a regex."""
    from ppo_cli.models import peft_default_targets

    asked = lora_cfg.target_modules
    if asked is None:
        return peft_default_targets(shape.model_type) or ["q_proj", "v_proj"]
    if OmegaConf.is_list(asked) or isinstance(asked, list | tuple):
        return [str(t) for t in asked]
    if asked == "all-linear":
        return "all-linear"
    return sorted({name for name, _, _ in shape.linears if re.search(str(asked), name)})


def policy_lora(cfg: DictConfig, shape: ModelShape) -> tuple[int | None, list[str] | str]:
    """(r, targets) of the adapter that trains; train-ppo's policy keeps its SFT adapter's shape."""
    sft = OmegaConf.select(cfg, "sft_checkpoint")
    if sft and (Path(sft) / "adapter_config.json").is_file():
        saved = json.loads((Path(sft) / "adapter_config.json").read_text())
        targets = saved.get("target_modules") or lora_targets(cfg.lora, shape)
        if isinstance(targets, str) and targets != "all-linear":  # peft's regex form
            targets = sorted({n for n, _, _ in shape.linears if re.search(targets, n)})
        return int(saved.get("r", cfg.lora.r)), targets
    if not cfg.lora.enabled:
        return None, []
    return int(cfg.lora.r), lora_targets(cfg.lora, shape)


def frozen_adapters(cfg: DictConfig) -> int:
    """train-ppo's frozen adapters on the shared base: the reference (an SFT adapter) and the RM adapter."""
    from ppo_cli.models import is_adapter_dir

    count = 0
    sft = OmegaConf.select(cfg, "sft_checkpoint")
    if sft and is_adapter_dir(sft):
        count += 1
    reward = OmegaConf.select(cfg, "reward_checkpoint")
    if reward:
        from ppo_cli.reward.sources import rm_shares_base

        with contextlib.suppress(UserError):  # an unreadable RM: train-ppo reports it, the plan goes on
            count += int(rm_shares_base(reward, cfg.model.name_or_path))
    return count


def quant_bits(cfg: DictConfig) -> int | None:
    if OmegaConf.select(cfg, "model.load_in_4bit", default=False):
        return 4
    if OmegaConf.select(cfg, "model.load_in_8bit", default=False):
        return 8
    return None


# Rows of data.train read to find the longest sequence: enough to meet a dataset's long tail, bounded so that
# a plan (and the start-up table's row) stays quick on a large dataset.
DATA_ROWS_READ = 5000


def longest_tokens(examples: list[dict], max_length: int) -> int:
    """The longest token sequence among encoded examples (any list-of-ids value: prompt, example, either
    side of a pair), capped at max_length; max_length when there are none."""
    longest = max(
        (
            len(v)
            for ex in examples
            for v in ex.values()
            if isinstance(v, list) and v and isinstance(v[0], int)
        ),
        default=max_length,
    )
    return min(longest, max_length)


def data_length(cfg: DictConfig, stage: str) -> tuple[int | None, str]:
    """The longest sequence among the first DATA_ROWS_READ rows of data.train, tokenized as the stage will
    (prompts for train-ppo, prompt + completion for train-sft, the longer side of a pair for train-rm),
    capped at data.max_length; and how the lengths were found. (None, why) when data.train is not local
    files or cannot be read: the plan then assumes data.max_length, an upper bound."""
    max_length = int(cfg.data.max_length)
    spec = OmegaConf.select(cfg, "data.train")
    files = list(spec) if OmegaConf.is_list(spec) else [spec]
    if not files or not all(isinstance(f, str) and Path(f).expanduser().is_file() for f in files):
        return None, f"data.max_length={max_length} tokens (data.train is not local files: not read)"
    try:
        from ppo_cli.data import build_prompts, build_sft_examples, load_rows
        from ppo_cli.models import load_tokenizer
        from ppo_cli.rm.pairs import build_pair_examples

        build = {"ppo": build_prompts, "sft": build_sft_examples, "rm": build_pair_examples}[stage]
        tokenizer = load_tokenizer(
            str(cfg.model.name_or_path),
            bool(cfg.model.trust_remote_code),
            OmegaConf.select(cfg, "model.revision"),
        )
        rows = load_rows(spec, "data.train", str(cfg.data.split))[:DATA_ROWS_READ]
        examples, _ = build(tokenizer, rows, max_length, str(cfg.data.overflow))
    except Exception as exc:  # noqa: BLE001 - a plan is a hint: unreadable data falls back to the bound
        return (
            None,
            f"data.max_length={max_length} tokens (data.train could not be read: {type(exc).__name__})",
        )
    longest = longest_tokens(examples, max_length)
    what = {"ppo": "prompt", "sft": "example", "rm": "side of a pair"}[stage]
    return (
        longest,
        f"longest {what} of the first {min(len(rows), DATA_ROWS_READ):,} rows of data.train: {longest} tokens",
    )


def run_shape(
    cfg: DictConfig,
    stage: str,
    shape: ModelShape,
    device,
    checkpoint_bytes: int,
    stored_bytes: int = 4,
    data_tokens: int | None = None,
) -> RunShape:
    """What the stage will do with `cfg` on `device`, as numbers. `data_tokens`: the longest prompt (train-ppo)
    or example the data gives (`data_length`); None = data.max_length."""
    import torch

    from ppo_cli.models import autocast_dtype, resolve_dtype

    mixed, dtype, bits = str(cfg.train.mixed_precision), str(cfg.model.dtype), quant_bits(cfg)
    compute = autocast_dtype(device, mixed)
    # a quantized base keeps model.dtype for the layers left unquantized (the loader ignores frozen_compute)
    frozen_compute = compute if stage == "ppo" and bits is None else None
    weights = resolve_dtype(dtype, device, frozen_compute)
    if device.type == "cuda" and not torch.cuda.is_available():
        # a GPU planned from a machine without one (plan.device): assume one that supports bf16 (Ampere or
        # later), where auto means bf16 for both
        compute = torch.bfloat16 if mixed in ("auto", "bf16") else None
        weights = torch.bfloat16 if dtype == "auto" else weights
    load_bytes = torch.finfo(weights).bits // 8
    if bits is not None and stage != "ppo":
        # peft's prepare_model_for_kbit_training (models.prepare_quantized) casts the unquantized layers to
        # fp32; train-ppo's shared base skips it and keeps them at model.dtype
        weights = torch.float32
    weight_bytes = torch.finfo(weights).bits // 8
    act_bytes = torch.finfo(compute).bits // 8 if compute is not None else weight_bytes
    r, targets = policy_lora(cfg, shape)
    batch = int(cfg.train.batch_size)
    accum = max(1, int(cfg.train.grad_accum_steps))
    critic = True
    if stage == "ppo":
        from ppo_cli.ppo.estimators import resolve_estimation

        # a rollout holds samples_per_prompt responses to each prompt; only gae trains a critic
        estimation = resolve_estimation(cfg.ppo, cfg.generation)
        batch *= estimation.group_size
        critic = estimation.critic
        minibatch = max(1, batch // max(1, int(cfg.ppo.num_minibatches)))
        micro = max(1, minibatch // accum)
        response = int(cfg.generation.max_new_tokens)
        seq = (data_tokens or int(cfg.data.max_length)) + response
    else:
        micro, response, seq = batch, 0, data_tokens or int(cfg.data.max_length)
    return RunShape(
        stage=stage,
        micro_batch=micro,
        seq_len=seq,
        weight_bytes=weight_bytes,
        act_bytes=act_bytes,
        lora_r=r,
        lora_targets=targets,
        # train-ppo forces LoRA dropout off (it would break the ratio)
        lora_dropout=stage != "ppo" and float(cfg.lora.dropout) > 0,
        quant_bits=bits,
        gradient_checkpointing=bool(cfg.model.gradient_checkpointing),
        # eager attention, and the CPU's math kernel under bf16 (models.devices.attention_kernel), keep the
        # attention probabilities
        attention_scores=(device.type == "cpu" and 2 in (act_bytes, weight_bytes))
        or OmegaConf.select(cfg, "model.attn_implementation") == "eager",
        rollout_batch=batch if stage == "ppo" else 0,
        critic=critic,
        response_len=response,
        frozen_adapters=frozen_adapters(cfg) if stage == "ppo" else 0,
        cpu=device.type == "cpu",
        checkpoint_file_bytes=checkpoint_bytes if device.type == "cpu" else 0,
        load_converts=load_bytes != stored_bytes or bits is not None,
        # loaded at the file's dtype and kept there, the unquantized layers are the file's mapped pages
        file_stays_mapped=device.type == "cpu"
        and bits is not None
        and load_bytes == weight_bytes == stored_bytes,
    )


def separate_reward_model_bytes(cfg: DictConfig, run: RunShape) -> int:
    """train-ppo's reward model when it is a separate model (not an RM adapter on the shared base): its
    weights at the base's dtype (its activations come and go within the scoring pass); 0 when unknown."""
    reward = OmegaConf.select(cfg, "reward_checkpoint")
    if not reward or (Path(reward) / "adapter_config.json").is_file():
        return 0  # an RM adapter: on the shared base (frozen adapters) or, on another base, not estimated
    try:
        model_cfg = OmegaConf.create(
            {"name_or_path": reward, "trust_remote_code": cfg.model.trust_remote_code}
        )
        other = dataclasses.replace(
            model_shape(load_model_config(model_cfg, "reward_checkpoint")), tie_word_embeddings=True
        )
    except (UserError, TypeError, ValueError):
        return 0
    return int(other.params * run.weight_bytes)
