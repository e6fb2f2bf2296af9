"""LoRA through peft (peft's default targets, `all-linear`, or a list) or full fine-tuning; trainable
weights in fp32; gradient checkpointing."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ppo_cli.errors import UserError
from ppo_cli.models.loading import first_line
from ppo_cli.models.quantization import is_quantized, keep_4bit_differentiable


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

    prepare_quantized(model)
    try:
        config = peft_lora_config(lora_cfg, task_type, modules_to_save, dropout, has_conv1d_layers(model))
        return get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as exc:
        raise UserError(
            f"cannot apply LoRA with lora.target_modules={lora_cfg.target_modules}: {first_line(exc)}"
        ) from exc


def prepare_quantized(model) -> None:
    """peft's preparation of a 4/8-bit base for LoRA training (a no-op for a full-precision one): every
    base weight frozen, and the layers left unquantized (embeddings, norms, output head) in fp32, which
    QLoRA trains against for stability. Gradient checkpointing stays with model.gradient_checkpointing."""
    if not is_quantized(model):
        return
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_4bit_differentiable(model)


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
