"""Loading base models, tokenizers and adapters; device and precision choices.

Every stage goes through here, so the rules live in one place:
- the pad token is never EOS (a model trained with pad == EOS never learns to stop);
- LoRA through peft on peft's default targets, `all-linear`, or a list; or full fine-tuning;
- `trust_remote_code` only when the config asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ppo_cli.data import turn_end_id
from ppo_cli.errors import UserError

PAD_TOKEN = "<|pad|>"
PRODUCT_FILE = "ppo_cli.json"  # written in every final/: stage, base model, stats for later stages


# ---------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"train.device={name} is not a device: use auto, cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available; use train.device=cpu or auto.")
    return device


def resolve_dtype(name: str, device: torch.device, frozen_compute: torch.dtype | None = None) -> torch.dtype:
    """Weights dtype. auto: bf16 on a GPU that supports it (half the memory), else fp32 — except that a
    base which never trains (`frozen_compute`: the dtype its passes compute in, e.g. train-ppo's shared
    base under bf16 autocast) is kept in that dtype: nothing is lost to rounding in weights that never
    update, and each pass skips casting them."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and frozen_compute == torch.bfloat16:
            return torch.bfloat16
        return torch.float32
    if name not in table:
        raise UserError(f"model.dtype={name} is not one of auto, float32, bfloat16, float16.")
    return table[name]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (Intel AMX or AVX512-BF16): there bf16
    autocast is ~2x faster than fp32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """The dtype forward passes compute in under train.mixed_precision, None for plain fp32.

    auto: bf16 where the hardware multiplies bf16 natively — a GPU that supports it or a CPU with
    AMX/AVX512-BF16 (`cpu_has_native_bf16`, ~4x the fp32 matmul rate) — and fp32 elsewhere, where bf16
    would be emulated and slower. Never fp16: its narrow range needs loss scaling (a GradScaler), which
    the training loops do not do, so small gradients would underflow to zero.
    """
    if mixed_precision == "no" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        if mixed_precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if mixed_precision == "bf16" else None
    if mixed_precision == "bf16" or (mixed_precision == "auto" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes (`autocast_dtype`); weights and optimizer state keep their dtype."""
    dtype = autocast_dtype(device, mixed_precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def attention_kernel(
    device: torch.device, mixed_precision: str, weights_dtype: torch.dtype
) -> contextlib.AbstractContextManager:
    """The attention kernel for a whole training loop.

    On CPU with bf16 compute (autocast or bf16 weights), the math SDPA kernel: the CPU flash kernel's
    bf16 backward is ~3x slower. It is chosen around the whole loop, not per pass, because the forward
    pass, its backward, a gradient-checkpoint recomputation and PPO's no-grad scoring passes must all
    run the same kernel (recomputation checks it; PPO's ratio 1 at the first minibatch and KL 0 against
    an identical reference need the same numbers: details 15 and 16 of docs/ppo-details.md).
    """
    compute_dtypes = (autocast_dtype(device, mixed_precision), weights_dtype)
    if device.type != "cpu" or torch.bfloat16 not in compute_dtypes:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


# ---------------------------------------------------------------------------------------------
# Tokenizer


def looks_local(name_or_path: str) -> bool:
    """True for what can only be a local path (a Hub id is `name` or `owner/name`)."""
    return str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") > 1


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """Load a tokenizer and make sure it has a pad token distinct from EOS.

    Order of preference: the tokenizer's own pad token (if not EOS); its UNK token (if not EOS); a new
    `<|pad|>` token. A new token fits without resizing when the embedding matrix has spare rows (Qwen,
    Pythia); otherwise `load_causal_lm` resizes the embeddings.
    """
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not local.is_dir():
        raise UserError(f"cannot load the tokenizer of '{name_or_path}': no such directory.")
    if local.is_dir() and not any(
        (local / name).is_file() for name in ("config.json", "tokenizer_config.json", "tokenizer.json")
    ):
        raise UserError(
            f"cannot load the tokenizer of '{name_or_path}': the directory holds no Hugging Face model or "
            "tokenizer (no config.json, tokenizer_config.json or tokenizer.json)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for "not found"
        raise UserError(f"cannot load the tokenizer of '{name_or_path}': {_first_line(exc)}") from exc
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of '{name_or_path}' has no EOS token; set one in its tokenizer_config.json."
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token_id
        if unk is not None and unk != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Models


def local_or_hub(name_or_path: str) -> str:
    """An absolute path for a local directory (so adapter configs stay valid from any working
    directory), the Hub id unchanged otherwise."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def _from_pretrained(cls, name_or_path: str, model_cfg: DictConfig, dtype: torch.dtype, **kwargs: Any):
    name_or_path = local_or_hub(name_or_path)
    extra = {}
    if model_cfg.attn_implementation:
        extra["attn_implementation"] = model_cfg.attn_implementation
    try:
        return cls.from_pretrained(
            name_or_path,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            revision=model_cfg.revision,
            **extra,
            **kwargs,
        )
    except (ValueError, ImportError) as exc:
        if extra and "attn" in str(exc).lower():  # the architecture lacks this kernel: fall back
            return cls.from_pretrained(
                name_or_path,
                dtype=dtype,
                trust_remote_code=model_cfg.trust_remote_code,
                revision=model_cfg.revision,
                **kwargs,
            )
        raise UserError(f"cannot load model '{name_or_path}': {_first_line(exc)}") from exc
    except OSError as exc:
        raise UserError(f"cannot load model '{name_or_path}': {_first_line(exc)}") from exc


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embedding matrix when the tokenizer gained a token the model has no row for."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(
    model_cfg: DictConfig,
    tokenizer,
    device: torch.device,
    name_or_path: str | None = None,
    frozen_compute: torch.dtype | None = None,
):
    """A causal LM on `device`; `frozen_compute`: see `resolve_dtype` (a base that never trains)."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(model_cfg.dtype, device, frozen_compute)
    model = _from_pretrained(AutoModelForCausalLM, name_or_path or model_cfg.name_or_path, model_cfg, dtype)
    fit_embeddings(model, tokenizer)
    return model.to(device)


def load_sequence_classifier(
    model_cfg: DictConfig, tokenizer, device: torch.device, name_or_path: str | None = None
):
    from transformers import AutoModelForSequenceClassification

    dtype = resolve_dtype(model_cfg.dtype, device)
    model = _from_pretrained(
        AutoModelForSequenceClassification,
        name_or_path or model_cfg.name_or_path,
        model_cfg,
        dtype,
        num_labels=1,
    )
    fit_embeddings(model, tokenizer)
    return model.to(device)


def lora_target_modules(lora_cfg: DictConfig) -> Any:
    targets = lora_cfg.target_modules
    if isinstance(targets, ListConfig):
        return list(targets)
    return targets


def has_conv1d_layers(model) -> bool:
    """True for GPT-2-style models, whose linear layers are transformers' Conv1D (weight stored as
    (in, out)). LoRA on them needs peft's fan_in_fan_out=True; left False, peft warns on every layer and
    sets it itself."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for module in model.modules())


def peft_lora_config(
    lora_cfg: DictConfig,
    task_type: str,
    modules_to_save: list[str] | None = None,
    dropout: float | None = None,
    fan_in_fan_out: bool = False,
):
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout if dropout is None else dropout,
        target_modules=lora_target_modules(lora_cfg),
        task_type=task_type,
        modules_to_save=modules_to_save,
        fan_in_fan_out=fan_in_fan_out,
    )


def peft_default_targets(model_type: str | None) -> list[str] | None:
    """The modules peft targets for this architecture when target_modules is not set."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    return sorted(targets) if targets else None


def lora_targets_text(asked: Any, resolved: Any, model_type: str | None) -> str:
    """LoRA targets on one line, the same way in every stage.

    asked: lora.target_modules as the user gave it (None = peft's default, "all-linear", a list or a
    regex); resolved: the modules peft chose (a collection of names, or the regex), None when unknown.
    """
    if isinstance(resolved, str):
        return resolved
    # all-linear resolves to full module paths (one per layer): their last parts are what was targeted.
    short = sorted({str(name).rsplit(".", 1)[-1] for name in resolved or ()})
    names = ", ".join(short) or None
    if asked == "all-linear":
        return f"all-linear ({names})" if names else "all-linear"
    if short and short == peft_default_targets(model_type):
        return f"peft default for {model_type} ({names})"
    if names:
        return names
    return "peft default for the architecture" if asked is None else ", ".join(sorted(map(str, asked)))


def describe_lora(model, asked: Any = None, adapter: str = "default") -> str:
    """'r=16 alpha=32 targets=...' of the LoRA adapter `adapter` the model really has (its shape may come
    from an SFT adapter rather than lora.*); 'off (full fine-tuning)' without one."""
    config = getattr(model, "peft_config", {}).get(adapter)
    if config is None:
        return "off (full fine-tuning)"
    if OmegaConf.is_list(asked):
        asked = list(asked)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = lora_targets_text(asked, config.target_modules, model_type)
    return f"r={config.r} alpha={config.lora_alpha} targets={targets}"


def apply_lora(
    model,
    lora_cfg: DictConfig,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
    adapter_name: str = "default",
    dropout: float | None = None,
):
    """Wrap `model` with a fresh LoRA adapter (or, for lora.enabled=false, leave every weight trainable)."""
    if not lora_cfg.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    try:
        config = peft_lora_config(lora_cfg, task_type, modules_to_save, dropout, has_conv1d_layers(model))
        return get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as exc:
        raise UserError(
            f"cannot apply LoRA with lora.target_modules={lora_cfg.target_modules}: {_first_line(exc)}"
        ) from exc


def keep_trainable_in_fp32(model: torch.nn.Module) -> None:
    """Make every trainable floating-point parameter fp32, whatever dtype the model was loaded in.

    An Adam step is about lr in size; in bf16 a weight near 0.03 moves in steps of ~1.2e-4, so a step of
    5e-5 rounds to nothing and the weight never trains. peft upcasts LoRA weights itself, but not the
    copies it trains for `modules_to_save` (the RM's score head), nor full fine-tuning's weights. A
    module whose own weights were upcast while the rest of the model stays in low precision gets its
    floating-point inputs cast to fp32 (without autocast, a bf16 activation cannot meet an fp32 weight).
    """
    upcast: list[torch.nn.Module] = []
    for module in model.modules():
        own = [
            p
            for p in module.parameters(recurse=False)
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32
        ]
        for param in own:
            param.data = param.data.float()
        if own:
            upcast.append(module)
    low_precision_left = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    if not low_precision_left:
        return  # all fp32 now (e.g. full fine-tuning): every activation is fp32 already
    for module in upcast:
        module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def enable_gradient_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed it activation checkpointing (the old name warns); older versions lack the new one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False


def eos_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS, the model's generation EOS ids, and the chat template's end-of-turn token: a
    chat policy ends its answer there (SFT teaches it, the RM scores at it) even when the model's
    generation config leaves it out (a base model given a chat template)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in [*(extra if isinstance(extra, list) else [extra]), turn_end_id(tokenizer)]:
        if value is not None and value not in ids and value != tokenizer.pad_token_id:
            ids.append(int(value))
    return ids


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------
# Stage products (final/)


def write_product_info(final_dir: Path, stage: str, base_model: str, **extra: Any) -> None:
    # A local base is stored as an absolute path, so the product works from any working directory.
    info = {"stage": stage, "base_model": local_or_hub(base_model), **extra}
    (Path(final_dir) / PRODUCT_FILE).write_text(json.dumps(info, indent=1))


def read_product_info(path: str | Path, key: str) -> dict[str, Any]:
    """The ppo_cli.json of a stage's final/ (empty when the directory was not written by ppo-cli).

    `key` is the config key that named the directory, for the error message.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{key}={path}: no such directory.")
    info_path = path / PRODUCT_FILE
    if not info_path.is_file():
        return {}
    return json.loads(info_path.read_text())


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_model(path: str | Path) -> str | None:
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")


def recorded_base_model(path: str | Path, key: str) -> str:
    """The base model an adapter directory was trained on: ppo_cli.json's record, else peft's
    adapter_config.json. A recorded local path that no longer exists is an error at once — without it the
    name would be tried as a Hub id (slow retries, then an unrelated message)."""
    base = read_product_info(path, key).get("base_model") or adapter_base_model(path)
    if not base:
        raise UserError(
            f"{key}={path}: the adapter does not name its base model; set model.name_or_path=BASE."
        )
    base = str(base)
    if looks_local(base) and not Path(base).expanduser().is_dir():
        raise UserError(
            f"{key}={path} was trained on the local base model '{base}', which does not exist any more "
            "(moved or deleted?); set model.name_or_path=BASE to the model's new location."
        )
    return base


def base_model_of_checkpoint(path: str | Path, key: str, expected_stage: str) -> str:
    """The base model a stage product was trained on; checks that the product is of `expected_stage`."""
    info = read_product_info(path, key)
    stage = info.get("stage")
    if stage is not None and stage != expected_stage:
        raise UserError(
            f"{key}={path} is the product of the {stage} stage, not of the {expected_stage} stage."
        )
    if is_adapter_dir(path):
        return recorded_base_model(path, key)
    if (Path(path) / "config.json").is_file():  # a full model (full fine-tuning): it is its own base
        return str(path)
    raise UserError(
        f"{key}={path} holds neither a peft adapter (adapter_config.json) nor a model (config.json)."
    )


def fill_base_model(cfg: DictConfig, key: str, expected_stage: str) -> None:
    """Take model.name_or_path from the checkpoint named by `key` when the user did not set it; when the
    user did set it, check that it matches the checkpoint's base."""
    ckpt = OmegaConf.select(cfg, key)
    if not ckpt:
        return
    base = base_model_of_checkpoint(ckpt, key, expected_stage)
    if OmegaConf.is_missing(cfg.model, "name_or_path"):
        cfg.model.name_or_path = base
    elif is_adapter_dir(ckpt) and not _same_model(cfg.model.name_or_path, base):
        raise UserError(
            f"{key}={ckpt} was trained on base model '{base}', but model.name_or_path={cfg.model.name_or_path}; "
            "leave model.name_or_path unset to use the checkpoint's base."
        )


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
