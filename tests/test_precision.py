"""The precision policy (ppo_cli.models): what `auto` means on which hardware, the frozen base's dtype,
and the attention kernel chosen for CPU bf16 runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli_in_process

from ppo_cli import models

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("native", "setting", "expected"),
    [
        (True, "auto", torch.bfloat16),  # AMX / AVX512-BF16: bf16 like a bf16 GPU
        (False, "auto", None),  # emulated bf16 would be slower: fp32
        (False, "bf16", torch.bfloat16),  # asked for
        (True, "no", None),
    ],
)
def test_autocast_dtype_on_cpu(monkeypatch, native, setting, expected):
    monkeypatch.setattr(models.devices, "cpu_has_native_bf16", lambda: native)
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
        models.attention_kernel(CPU, "no", torch.float32), type(models.devices.contextlib.nullcontext())
    )
    assert isinstance(
        models.attention_kernel(torch.device("meta"), "bf16", torch.bfloat16),
        type(models.devices.contextlib.nullcontext()),
    )


# ---------------------------------------------------------------------------------------------
# What trains is fp32, whatever the frozen base's dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trainable_parameters_become_fp32_and_take_low_precision_inputs(dtype):
    """A frozen low-precision trunk feeding a trainable head (peft's modules_to_save): the head is made
    fp32, still accepts the trunk's activations, and a small Adam step on it is not rounded away."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(8, 8).to(dtype).requires_grad_(False)
    head = torch.nn.Linear(8, 1).to(dtype)
    with torch.no_grad():
        head.weight.fill_(0.03)
    model = torch.nn.Sequential(trunk, head)
    models.keep_trainable_in_fp32(model)
    assert head.weight.dtype == head.bias.dtype == torch.float32 and trunk.weight.dtype == dtype

    out = model(torch.randn(4, 8).to(dtype))  # the trunk's output is in `dtype`; no autocast
    assert out.dtype == torch.float32
    out.sum().backward()
    assert head.weight.grad.dtype == torch.float32
    before = head.weight.detach().clone()
    torch.optim.AdamW([head.weight], lr=5e-5, weight_decay=0.0).step()
    # In bf16 the step (5e-5) is under half the spacing of numbers near 0.03 (2^-13 ~ 1.2e-4): lost.
    assert (head.weight != before).all()
    models.keep_trainable_in_fp32(model)  # idempotent: no second hook, nothing changes
    assert len(head._forward_pre_hooks) == 1


def run_in_process(*args: str) -> tuple[int, str]:
    """`ppo-cli ARGS` in this process: (exit code, stdout + stderr)."""
    result = run_cli_in_process(*args)
    return result.returncode, result.stdout + result.stderr


def test_every_stage_trains_fp32_weights_on_a_bf16_base(tiny, tmp_path):
    """model.dtype=bfloat16 (what auto gives on a bf16 GPU), no autocast: SFT's adapter, the RM's
    adapter and score head (started from the SFT adapter), and PPO's policy and value adapters and value
    head (from the RM) are all fp32 in each stage's checkpoint, i.e. what the optimizer stepped."""
    from ppo_cli import checkpoint as ckpt

    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(tiny["sft"].read_text().splitlines(keepends=True)[:8]))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(tiny["prefs"].read_text().splitlines(keepends=True)[:8]))
    common = [
        "model.dtype=bfloat16",
        "train.mixed_precision=no",
        "train.device=cpu",
        "train.max_steps=1",
        "train.batch_size=2",
        "logger.progress=false",
        "logger.plots=false",
    ]
    runs = {
        "sft": ["train-sft", f"model.name_or_path={tiny['model']}", f"data.train={sft_data}",
                "data.eval_fraction=0"],
        "rm": ["train-rm", f"sft_checkpoint={tmp_path / 'sft' / 'final'}", f"data.train={prefs}",
               "data.eval_fraction=0"],
        "ppo": ["train-ppo", f"sft_checkpoint={tmp_path / 'sft' / 'final'}", f"data.train={tiny['prompts']}",
                f"reward_checkpoint={tmp_path / 'rm' / 'final'}", "generation.max_new_tokens=4",
                "ppo.epochs=1", "sample_every=0"],
    }  # fmt: skip
    for stage, args in runs.items():
        out = tmp_path / stage
        code, output = run_in_process(*args, *common, f"output_dir={out}")
        assert code == 0, output[-3000:]
        trainable = ckpt.load_checkpoint(out / "checkpoints" / "step-000001").trainable
        wrong = {name: t.dtype for name, t in trainable.items() if t.dtype != torch.float32}
        assert trainable and not wrong, f"{stage}: {wrong}"
        if stage == "rm":
            assert any("score.modules_to_save" in name for name in trainable)
        if stage == "ppo":
            assert "value_head.weight" in trainable and any(".value." in n for n in trainable)


# ---------------------------------------------------------------------------------------------
# fp16 autocast (it would need loss scaling) is not offered


def test_fp16_mixed_precision_is_refused_with_a_pointer_to_bf16_or_fp32():
    from conftest import run_cli_in_process

    refused = run_cli_in_process(
        "train-sft", "model.name_or_path=nowhere", "data.train=nowhere.jsonl", "train.mixed_precision=fp16"
    )
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert "train.mixed_precision=fp16" in message and "bf16" in message and "no" in message
    assert "loss scaling" in message
    assert "\n" not in message  # one paragraph


def test_auto_on_a_gpu_without_bf16_is_fp32_not_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert models.autocast_dtype(torch.device("cuda"), "auto") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert models.autocast_dtype(torch.device("cuda"), "auto") == torch.bfloat16
