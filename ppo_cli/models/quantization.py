"""4-bit and 8-bit bases through bitsandbytes (model.load_in_4bit / model.load_in_8bit, TRL's names).

Only the base's linear layers are quantized; LoRA adapters (and the RM's score head, PPO's heads) train
on top of it in fp32, and a stage's final/ stays a plain peft adapter that loads on the full-precision
base. The checks run before anything loads or is written: every training stage calls
`check_quantization` from `run.validate_train`, and the loaders call it again for generate.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ppo_cli.errors import UserError
from ppo_cli.models.devices import resolve_device

MIN_BITSANDBYTES = "0.47"
INSTALL = f'pip install "bitsandbytes>={MIN_BITSANDBYTES}"'
QUANTIZATION_KEYS = ("model.load_in_4bit", "model.load_in_8bit")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantization_key(model_cfg: DictConfig) -> str | None:
    """The key that asks for a quantized base ('model.load_in_4bit' or 'model.load_in_8bit'), None for a
    full-precision one (also for a config without these keys)."""
    asked = [key for key in QUANTIZATION_KEYS if OmegaConf.select(model_cfg, key.removeprefix("model."))]
    return asked[0] if asked else None


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a model loaded in 4 or 8 bits (also under a peft wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False))


def _bitsandbytes():
    """The bitsandbytes module, or a UserError naming the install command."""
    key = "model.load_in_4bit / model.load_in_8bit"
    try:
        import bitsandbytes
    except Exception as exc:  # not installed, or its native library fails to load
        raise UserError(
            f"{key} needs bitsandbytes, which cannot be imported here ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no details'}). Install it with "
            f"{INSTALL}, or leave both keys false to load the base in full precision."
        ) from exc
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES):
        raise UserError(
            f"{key} needs bitsandbytes >= {MIN_BITSANDBYTES}, but {bitsandbytes.__version__} is installed "
            f"(older versions quantize on CUDA only). Upgrade it with {INSTALL}."
        )
    return bitsandbytes


def _device_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, device.type, None)
    return bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())


def check_quantization(
    model_cfg: DictConfig,
    device: torch.device | str,
    lora_enabled: bool = True,
    device_key: str = "train.device",
) -> None:
    """Refuse, before anything loads, a quantized base that cannot work: both sizes at once, full
    fine-tuning (quantized weights cannot train), bitsandbytes missing, or a device it cannot serve.
    `device`: the device, or its config value (resolved only for a quantized base)."""
    if model_cfg.get("load_in_4bit") and model_cfg.get("load_in_8bit"):
        raise UserError(
            "model.load_in_4bit=true and model.load_in_8bit=true: choose one of them (4-bit NF4/FP4 with "
            "model.bnb_4bit_* settings, or 8-bit LLM.int8)."
        )
    key = quantization_key(model_cfg)
    if key is None:
        return
    if not lora_enabled:
        raise UserError(
            f"{key}=true needs lora.enabled=true: a quantized base cannot be trained itself, only LoRA "
            f"adapters on top of it (QLoRA). Set lora.enabled=true, or {key}=false for full fine-tuning."
        )
    bitsandbytes = _bitsandbytes()
    if isinstance(device, str):
        device = resolve_device(device)
    served = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
    if device.type not in served or not _device_available(device):
        raise UserError(
            f"{key}=true: bitsandbytes cannot run on {device_key}={device} "
            f"({'no such device is available here' if device.type in served else 'not a device it supports'}"
            f"; it serves {', '.join(sorted(served))}). Use {device_key}=cpu or a supported GPU, or set "
            f"{key}=false."
        )


def compute_dtype(model_cfg: DictConfig, autocast: torch.dtype | None) -> torch.dtype:
    """model.bnb_4bit_compute_dtype; auto = the stage's autocast dtype, else float32."""
    name = str(model_cfg.get("bnb_4bit_compute_dtype") or "auto")
    if name == "auto":
        return autocast or torch.float32
    return _DTYPES[name]


def bnb_config(model_cfg: DictConfig, device: torch.device, autocast: torch.dtype | None = None) -> Any:
    """transformers' BitsAndBytesConfig for model.load_in_4bit / load_in_8bit, None for a full-precision base."""
    key = quantization_key(model_cfg)
    if key is None:
        return None
    check_quantization(model_cfg, device, device_key="device")
    from transformers import BitsAndBytesConfig

    if key == "model.load_in_8bit":
        quiet_int8_cast()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(model_cfg.bnb_4bit_quant_type),
        bnb_4bit_use_double_quant=bool(model_cfg.bnb_4bit_use_double_quant),
        bnb_4bit_compute_dtype=compute_dtype(model_cfg, autocast),
    )


def keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Switch off bitsandbytes' CPU repacking of 4-bit weights, for a base that LoRA trains on.

    On a CPU with AVX512-BF16, the first eval-mode, no-grad pass through a 4-bit layer (a rollout, an
    evaluation) repacks its weight for a fast inference kernel, and from then on every pass uses that
    kernel, training passes included; it has no backward, so the LoRA layers below would silently get
    wrong gradients (torch warns "bitsandbytes::gemv_4bit: an autograd kernel was not registered")."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _int8_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_cast() -> None:
    """bitsandbytes' 8-bit matmul logs a warning on every fp32 input (it computes in fp16, which is how
    LLM.int8 works); once per layer and pass it would flood the console."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _int8_cast_notice not in logger.filters:
        logger.addFilter(_int8_cast_notice)
