"""The precision policy (ppo_cli.models): what `auto` means on which hardware, the frozen base's dtype,
and the attention kernel chosen for CPU bf16 runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppo_cli import models

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("native", "setting", "expected"),
    [
        (True, "auto", torch.bfloat16),  # AMX / AVX512-BF16: bf16 like a bf16 GPU
        (False, "auto", None),  # emulated bf16 would be slower: fp32
        (False, "bf16", torch.bfloat16),  # asked for
        (True, "no", None),
        (True, "fp16", None),  # fp16 autocast is a GPU option; on CPU it is plain fp32
    ],
)
def test_autocast_dtype_on_cpu(monkeypatch, native, setting, expected):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert models.autocast_dtype(CPU, setting) == expected


def test_frozen_base_follows_the_compute_dtype_only_when_auto():
    assert models.resolve_dtype("auto", CPU) == torch.float32
    assert models.resolve_dtype("auto", CPU, frozen_compute=torch.bfloat16) == torch.bfloat16
    assert models.resolve_dtype("auto", CPU, frozen_compute=None) == torch.float32
    assert models.resolve_dtype("float32", CPU, frozen_compute=torch.bfloat16) == torch.float32


def _attention_grads(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
    return q.grad


def test_attention_kernel_is_the_math_kernel_for_cpu_bf16_only():
    """Under the kernel context a bf16 attention runs the math kernel — the same numbers as the math
    kernel chosen by hand — while fp32 keeps the default (flash) kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        math_grad = _attention_grads(torch.bfloat16)
    with models.attention_kernel(CPU, "no", torch.bfloat16):
        ours = _attention_grads(torch.bfloat16)
    assert torch.equal(ours, math_grad)
    # Outside it (or for fp32) the flash kernel may be picked: the context is a no-op there.
    assert isinstance(
        models.attention_kernel(CPU, "no", torch.float32), type(models.contextlib.nullcontext())
    )
    assert isinstance(
        models.attention_kernel(torch.device("meta"), "bf16", torch.bfloat16),
        type(models.contextlib.nullcontext()),
    )
