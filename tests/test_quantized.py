"""4-bit and 8-bit (bitsandbytes) bases: SFT, RM and PPO train LoRA on them on CPU, their final/ stays a
plain peft adapter on the full-precision base, export merges into that base, and the refusals come before
anything loads or is written.

The stages run in this process (`run_cli_in_process`) on the session's tiny Llama (hidden size 64, which
bitsandbytes' 64-wide 4-bit blocks accept), a few steps each.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli_in_process
from omegaconf import OmegaConf
from ppo_helpers import assert_never_moved
from safetensors.torch import load_file

from ppo_cli import checkpoint as ckpt

CPU = ["train.device=cpu", "logger.progress=false", "logger.plots=false"]
FOUR_BIT = ["model.load_in_4bit=true", *CPU]


def run(*args: str) -> tuple[int, str]:
    result = run_cli_in_process(*args)
    return result.returncode, result.stdout + result.stderr


def first_rows(path: Path, n: int, out: Path) -> Path:
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


def last_trainable(output_dir: Path) -> dict[str, torch.Tensor]:
    _, path = ckpt.list_checkpoints(output_dir)[-1]
    return ckpt.load_checkpoint(path).trainable


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict[str, Path]:
    """SFT (4 steps, checkpoints at 2 and 4), RM from it, PPO from both (train.lr=0 for the policy, the
    value adapter and head still train), all on a 4-bit base."""
    root = tmp_path_factory.mktemp("quantized")
    sft_data = first_rows(tiny["sft"], 16, root / "sft.jsonl")
    prefs = first_rows(tiny["prefs"], 16, root / "prefs.jsonl")
    stages = {
        "sft": ["train-sft", f"model.name_or_path={tiny['model']}", f"data.train={sft_data}",
                "data.eval_fraction=0", "train.max_steps=4", "train.save_every=2", "train.batch_size=2"],
        "rm": ["train-rm", f"sft_checkpoint={root / 'sft' / 'final'}", f"data.train={prefs}",
               "data.eval_fraction=0", "train.max_steps=2", "train.batch_size=2"],
        "ppo": ["train-ppo", f"sft_checkpoint={root / 'sft' / 'final'}", f"data.train={tiny['prompts']}",
                f"reward_checkpoint={root / 'rm' / 'final'}", "train.lr=0", "ppo.value_lr=0.001",
                "train.max_steps=3", "train.save_every=2", "train.batch_size=4", "ppo.num_minibatches=2",
                "ppo.epochs=2", "generation.max_new_tokens=6", "ppo.kl_coef=0.1",
                "ppo.missing_eos_score=null", "sample_every=0"],
    }  # fmt: skip
    for stage, args in stages.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, output = run(*args, *FOUR_BIT, f"output_dir={root / stage}")
        assert code == 0, output[-3000:]
        # No training pass ran bitsandbytes' CPU inference kernel, which has no backward.
        assert not [w for w in caught if "gemv_4bit" in str(w.message)], stage
    return {"root": root, "base": tiny["model"], **{stage: root / stage for stage in stages}}


def plain(base: Path, adapter: Path, classifier: bool = False):
    """base (full precision, plain transformers) + adapter (plain peft), as the README loads a product."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if classifier:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
    assert getattr(model.config, "quantization_config", None) is None
    return PeftModel.from_pretrained(model, adapter)


def assert_same_weights(loaded: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> None:
    assert trained and loaded.keys() >= trained.keys(), trained.keys() - loaded.keys()
    for name, tensor in trained.items():
        assert torch.equal(loaded[name].float(), tensor.float()), name


def test_every_stage_trains_on_a_4bit_base_and_its_final_loads_on_the_full_precision_base(runs):
    for stage in ("sft", "rm", "ppo"):
        config = OmegaConf.load(runs[stage] / "config.yaml")
        assert config.model.load_in_4bit is True and config.model.bnb_4bit_quant_type == "nf4"
    # SFT: the trained LoRA weights (the last checkpoint) are what plain peft loads from final/.
    sft = plain(runs["base"], runs["sft"] / "final")
    assert_same_weights(dict(sft.named_parameters()), last_trainable(runs["sft"]))
    assert any(
        t.abs().sum() > 0 for k, t in last_trainable(runs["sft"]).items() if "lora_B" in k
    )  # it trained
    # RM: LoRA and the fp32 score head.
    rm_trained = last_trainable(runs["rm"])
    assert any("score.modules_to_save" in name for name in rm_trained)
    assert {t.dtype for t in rm_trained.values()} == {torch.float32}
    rm = plain(runs["base"], runs["rm"] / "final", classifier=True)
    assert_same_weights(dict(rm.named_parameters()), rm_trained)
    # PPO: the policy (final/) and the value adapter (final/value/) with its head.
    ppo_trained = last_trainable(runs["ppo"])
    policy = plain(runs["base"], runs["ppo"] / "final")
    policy_params = {f"model.{name}": p for name, p in policy.named_parameters() if ".default." in name}
    assert_same_weights(policy_params, {k: v for k, v in ppo_trained.items() if ".default." in k})
    value = plain(runs["base"], runs["ppo"] / "final" / "value")
    value_params = {
        f"model.{name.replace('.default.', '.value.')}": p
        for name, p in value.named_parameters()
        if ".default." in name
    }
    value_trained = {k: v for k, v in ppo_trained.items() if ".value." in k}
    assert_same_weights(value_params, value_trained)
    head = load_file(runs["ppo"] / "final" / "value" / "value_head.safetensors")
    assert torch.equal(head["weight"], ppo_trained["value_head.weight"])
    batch = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.isfinite(policy(input_ids=batch).logits).all()
        assert torch.isfinite(rm(input_ids=batch).logits).all()


def test_ppo_lr0_never_moves_on_a_4bit_base(runs):
    """Ratio 1 and KL 0 exactly at every step (docs/ppo-details.md, details 15 and 16), with the
    rollouts, the no-grad passes and the update passes all going through the 4-bit layers."""
    metrics = [json.loads(line) for line in (runs["ppo"] / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "objective/kl" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert_never_moved(metrics, first_ratio=False)


def test_resume_on_a_4bit_base_gives_the_same_final_weights(runs, tmp_path):
    """The SFT run, as a kill right after its step-2 checkpoint leaves it (no step-4 checkpoint, no
    final/), resumed with resume=auto, ends with exactly the uninterrupted run's adapter."""
    killed = tmp_path / "killed"
    shutil.copytree(runs["sft"], killed)
    shutil.rmtree(killed / "final")
    shutil.rmtree(killed / "checkpoints" / "step-000004")
    code, output = run(
        "train-sft", f"output_dir={killed}", "resume=auto", "logger.progress=false", "logger.plots=false"
    )
    assert code == 0, output[-3000:]
    assert "resumed at" in output and "step 2" in output, output[-3000:]
    reference = load_file(runs["sft"] / "final" / "adapter_model.safetensors")
    resumed = load_file(killed / "final" / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_an_eval_pass_does_not_break_the_gradients_of_a_4bit_base(tiny):
    """bitsandbytes repacks a 4-bit CPU weight for a kernel without a backward on the first eval-mode,
    no-grad pass (on AVX512-BF16 CPUs); the LoRA gradients after such a pass must equal those of a
    model that never ran one."""
    from ppo_cli.models import apply_lora, load_causal_lm, load_tokenizer

    model_cfg = OmegaConf.create(
        {"name_or_path": str(tiny["model"]), "dtype": "float32", "trust_remote_code": False,
         "attn_implementation": "sdpa", "revision": None, "load_in_4bit": True, "load_in_8bit": False,
         "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "auto"}
    )  # fmt: skip
    lora_cfg = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None})
    tokenizer = load_tokenizer(str(tiny["model"]))
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])

    def grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = apply_lora(load_causal_lm(model_cfg, tokenizer, torch.device("cpu")), lora_cfg)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids).logits.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = grads(False), grads(True)
    layer0 = [n for n in fresh if "layers.0." in n and "lora_B" in n]  # lora_A starts with 0 grads
    assert layer0 and all(fresh[n].abs().sum() > 0 for n in layer0)
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=0, atol=0)


def test_an_8bit_base_trains_a_step(tiny, tmp_path):
    data = first_rows(tiny["sft"], 4, tmp_path / "sft.jsonl")
    out = tmp_path / "sft8"
    code, output = run(
        "train-sft", f"model.name_or_path={tiny['model']}", f"data.train={data}", "data.eval_fraction=0",
        "train.max_steps=1", "train.batch_size=2", "model.load_in_8bit=true", *CPU, f"output_dir={out}",
    )  # fmt: skip
    assert code == 0, output[-3000:]
    assert "MatMul8bitLt" not in output  # bitsandbytes' per-layer fp16 notice is kept off the console
    assert OmegaConf.load(out / "config.yaml").model.load_in_8bit is True
    assert (out / "final" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- refusals


def _no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


def _cuda_only_bitsandbytes(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})


REFUSALS = {
    "full_fine_tuning": (["model.load_in_4bit=true", "lora.enabled=false"], None,
                         ["model.load_in_4bit=true", "lora.enabled=true"]),
    "both_sizes": (["model.load_in_4bit=true", "model.load_in_8bit=true"], None,
                   ["model.load_in_4bit=true", "model.load_in_8bit=true"]),
    "not_installed": (["model.load_in_8bit=true"], _no_bitsandbytes,
                      ["model.load_in_8bit", 'pip install "bitsandbytes>=0.47"']),
    "device_not_served": (["model.load_in_4bit=true"], _cuda_only_bitsandbytes,
                          ["model.load_in_4bit=true", "train.device=cpu", "cuda"]),
    "device_not_here": (["model.load_in_4bit=true", "train.device=mps"], None,
                        ["model.load_in_4bit=true", "train.device=mps", "no such device is available"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_come_before_anything_loads(tiny, tmp_path, monkeypatch, name):
    overrides, patch, needles = REFUSALS[name]
    if patch is not None:
        patch(monkeypatch)
    out = tmp_path / "run"
    result = run_cli_in_process(
        "train-sft", f"model.name_or_path={tiny['model']}", f"data.train={tiny['sft']}",
        "logger.progress=false", "logger.plots=false", f"output_dir={out}",
        *([] if any(o.startswith("train.device=") for o in overrides) else ["train.device=cpu"]), *overrides,
    )  # fmt: skip
    everything = result.stdout + result.stderr
    assert result.returncode == 2, everything[-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    paragraph = result.stderr.strip()
    assert paragraph.startswith("ppo-cli train-sft: error: ") and "\n" not in paragraph, paragraph
    for needle in needles:
        assert needle in paragraph, paragraph
    assert not out.exists()


# ------------------------------------------------------------------------------------ export, generate


def test_export_merges_into_the_full_precision_base_and_says_so(runs, tmp_path, capsys):
    from test_generate_export import config
    from transformers import AutoModelForCausalLM

    from ppo_cli import export

    final = runs["sft"] / "final"
    out = export.run(config("export", [f"checkpoint={final}", f"output={tmp_path / 'merged'}"]))
    said = " ".join(capsys.readouterr().out.split())
    assert "trained on a base loaded with model.load_in_4bit=true" in said
    assert "merges the adapter into the full-precision base" in said
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    reference = plain(runs["base"], final).merge_and_unload()
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged.state_dict()[name], reference.state_dict()[name], rtol=0, atol=0)

    export.run(
        config("export", [f"checkpoint={final}", f"output={tmp_path / 'asked'}", "model.load_in_4bit=true"])
    )
    said = " ".join(capsys.readouterr().out.split())
    assert "model.load_in_4bit=true is ignored" in said
    assert (
        getattr(AutoModelForCausalLM.from_pretrained(tmp_path / "asked").config, "quantization_config", None)
        is None
    )


def test_generate_samples_from_a_4bit_base(runs, tiny, tmp_path):
    prompts = first_rows(tiny["prompts"], 3, tmp_path / "prompts.jsonl")
    output = tmp_path / "samples.jsonl"
    code, said = run(
        "generate", f"checkpoint={runs['sft'] / 'final'}", f"data.prompts={prompts}", f"output={output}",
        "model.load_in_4bit=true", "device=cpu", "generation.max_new_tokens=4", "preview_rows=0",
    )  # fmt: skip
    assert code == 0, said[-3000:]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["completion"], str | list) for r in rows)
