"""Starting an RM from an SFT adapter (train-rm): copy a CausalLM adapter's LoRA weights into the
sequence classifier's adapter."""

from __future__ import annotations

from pathlib import Path

import torch


def copy_adapter_weights(
    model: torch.nn.Module, adapter_dir: str | Path, adapter_name: str = "default"
) -> dict:
    """Load a saved peft adapter's tensors into `model`'s adapter `adapter_name`, across task types.

    A CausalLM adapter and a SeqCls adapter on the same base share their trunk's parameter names (llama,
    qwen2: `model.*`; gpt2: `transformer.*`; gpt_neox: `gpt_neox.*`), so the mapping is by name: peft saves
    a parameter `X.lora_A.<adapter>.weight` as `X.lora_A.weight`. Every LoRA parameter of the adapter
    must be found (else ValueError), and every LoRA tensor in the file must be used. Other saved tensors
    (embeddings peft saves after a vocabulary resize) are copied when the model has them with the same
    shape; the rest (the CausalLM's lm_head) are skipped and returned.

    Returns {"lora": n LoRA tensors loaded, "other": names copied, "skipped": names not used}.
    """
    from peft.utils import load_peft_weights

    saved = load_peft_weights(str(adapter_dir), device="cpu")
    params = dict(model.named_parameters())
    marker = f".{adapter_name}"
    used: set[str] = set()
    missing: list[str] = []
    other: list[str] = []
    with torch.no_grad():
        for name, param in params.items():
            is_lora = ".lora_" in name and marker in name
            if not is_lora and (marker in name or "modules_to_save" in name or "original_module" in name):
                continue  # another adapter's or a head copy: not part of the trunk
            key = name.replace(marker, "") if is_lora else name
            if key not in saved:
                if is_lora:
                    missing.append(name)
                continue
            tensor = saved[key]
            if tuple(tensor.shape) != tuple(param.shape):
                if is_lora:
                    raise ValueError(
                        f"{adapter_dir}: {key} has shape {tuple(tensor.shape)}, the model expects "
                        f"{tuple(param.shape)}"
                    )
                continue
            param.copy_(tensor.to(param.device, param.dtype))
            used.add(key)
            if not is_lora:
                other.append(key)
    unused_lora = sorted(k for k in saved if ".lora_" in k and k not in used)
    if missing or unused_lora:
        raise ValueError(
            f"{adapter_dir}: the adapter does not match the model: {len(missing)} LoRA parameters not found in "
            f"the file (e.g. {missing[:2]}), {len(unused_lora)} LoRA tensors in the file unused (e.g. {unused_lora[:2]})"
        )
    n_lora = len(used) - len(other)
    if n_lora == 0:
        raise ValueError(f"{adapter_dir}: no LoRA tensor was loaded")
    return {"lora": n_lora, "other": other, "skipped": sorted(set(saved) - used)}
