"""ppo_cli.reward (scoring, stats, from_sft) and the RM's construction: scores at the last real token whatever the padding,
the score head, its small initialisation, the stored statistics, and starting the RM from an SFT adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ppo_cli.config import RMConfig
from ppo_cli.data import pad_left, pad_right
from ppo_cli.models import load_causal_lm, load_tokenizer, write_product_info
from ppo_cli.reward.scoring import gather_last, init_score_head, score_head_name, sequence_scores, unwrap
from ppo_cli.reward.stats import load_rm_stats
from ppo_cli.rlhf import last_token_index
from ppo_cli.rm.from_sft import copy_adapter_weights
from ppo_cli.rm.train import build_reward_model
from ppo_cli.tiny import models as tiny_lib

CPU = torch.device("cpu")


def rm_cfg(base: Path, **overrides) -> OmegaConf:
    cfg = OmegaConf.structured(RMConfig)
    cfg.model.name_or_path = str(base)
    cfg.model.dtype = "float32"
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def perturb_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every LoRA B matrix non-zero weights, so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    inner = unwrap(model)
    return getattr(inner, inner.base_model_prefix)


def make_sft_adapter(
    base: Path, out: Path, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj", "o_proj")
):
    """An SFT product as train-sft writes it (peft CausalLM adapter + tokenizer + ppo_cli.json) with
    non-zero random LoRA weights. Returns the in-memory PeftModel."""
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(str(base))
    model = load_causal_lm(rm_cfg(base).model, tokenizer, CPU)
    torch.manual_seed(123)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
    )
    perturb_lora(peft_model, seed=7)
    peft_model.save_pretrained(out, save_embedding_layers=False)  # as train-sft writes it
    tokenizer.save_pretrained(out)
    write_product_info(out, "sft", str(base), lora=True)
    return peft_model.eval(), tokenizer


SEQUENCES = [[5, 17, 42, 99, 7, 23, 61], [11, 3], [8, 200, 45, 45, 12]]


@pytest.fixture(scope="module")
def arch_models(tiny, tmp_path_factory) -> dict[str, Path]:
    """Tiny models of every architecture, sharing the tiny llama's tokenizer."""
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(tiny["model"]))
    root = tmp_path_factory.mktemp("rm-archs")
    models = {"llama": tiny["model"]}
    for arch in ("gpt2", "gpt_neox", "qwen2"):
        models[arch] = tiny_lib.build_tiny_model(root / arch, arch=arch, tokenizer=raw)
    return models


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_score_is_read_at_last_real_token_whatever_the_padding(arch, arch_models):
    base = arch_models[arch]
    tokenizer = load_tokenizer(str(base))
    torch.manual_seed(0)
    model, head, _ = build_reward_model(rm_cfg(base), tokenizer, CPU)
    assert head == "score" == score_head_name(model)
    perturb_lora(model)
    model.eval()
    pad = tokenizer.pad_token_id

    def scores(ids, mask):
        with torch.no_grad():
            return sequence_scores(model, ids, mask)

    mask_of = [[1] * len(s) for s in SEQUENCES]
    alone = torch.cat([scores(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in SEQUENCES])
    right = scores(pad_right(SEQUENCES, pad), pad_right(mask_of, 0))
    left = scores(pad_left(SEQUENCES, pad), pad_left(mask_of, 0))
    extra = [s + [pad] * 6 for s in SEQUENCES]
    right_extra = scores(pad_right(extra, pad), pad_right([m + [0] * 6 for m in mask_of], 0))
    left_extra = scores(
        pad_left([[pad] * 4 + s for s in SEQUENCES], pad), pad_left([[0] * 4 + m for m in mask_of], 0)
    )
    # A pad id that is also a real token id (here EOS) must not confuse the reading.
    eos_padded = scores(pad_right(SEQUENCES, tokenizer.eos_token_id), pad_right(mask_of, 0))
    for other in (right, left, right_extra, left_extra, eos_padded):
        torch.testing.assert_close(other, alone, atol=1e-5, rtol=0)
    assert alone.dtype == torch.float32 and alone.shape == (3,)
    assert alone.std() > 1e-3  # different sequences, different scores: the test can see a wrong column
    # The classifier's own output on an unpadded sequence agrees.
    with torch.no_grad():
        own = model(input_ids=torch.tensor([SEQUENCES[0]])).logits[0, 0]
    assert abs(float(own) - float(alone[0])) < 1e-5


def test_last_token_index_and_gather():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 1]
    values = torch.arange(15.0).reshape(3, 5)
    assert gather_last(values, mask).tolist() == [2.0, 9.0, 11.0]


def test_head_init_is_small():
    big = torch.nn.Linear(4096, 1, bias=True)
    torch.nn.init.constant_(big.bias, 3.0)
    torch.manual_seed(0)
    init_score_head(big)
    assert big.bias.item() == 0.0
    assert big.weight.std().item() == pytest.approx(1 / math.sqrt(4097), rel=0.05)
    assert abs(big.weight.mean().item()) < 0.005


def test_rm_from_base_has_small_head_and_fresh_lora(tiny):
    tokenizer = load_tokenizer(str(tiny["model"]))
    model, head, start = build_reward_model(rm_cfg(tiny["model"]), tokenizer, CPU)
    assert "fresh LoRA" in start
    hidden = unwrap(model).config.hidden_size
    weight = unwrap(model).score.modules_to_save["default"].weight
    assert weight.std().item() == pytest.approx(1 / math.sqrt(hidden + 1), rel=0.35)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(
        "score.modules_to_save" in n for n in trainable
    )  # the head trains and is saved with the adapter
    assert all("lora_" in n or "score.modules_to_save" in n for n in trainable)


def test_rm_starts_as_a_copy_of_the_sft_adapter(tiny, tmp_path, capsys):
    sft_dir = tmp_path / "sft"
    sft_model, tokenizer = make_sft_adapter(tiny["model"], sft_dir, r=4, alpha=8)
    cfg = rm_cfg(tiny["model"], sft_checkpoint=str(sft_dir))  # lora.r=16 by default: the SFT shape wins
    warnings: list[str] = []
    torch.manual_seed(1)
    rm, head, start = build_reward_model(cfg, tokenizer, CPU, warnings.append)
    rm.eval()
    assert "SFT adapter" in start and "(12 LoRA tensors)" in start  # 2 layers x 3 modules x (A, B)
    assert warnings and "lora.r=16" in warnings[0] and "lora.alpha=32" in warnings[0]
    assert (cfg.lora.r, cfg.lora.alpha) == (4, 8)
    assert sorted(cfg.lora.target_modules) == ["o_proj", "q_proj", "v_proj"]
    peft_cfg = rm.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.task_type) == (4, 8, "SEQ_CLS")

    ids = torch.tensor([SEQUENCES[0], SEQUENCES[0][::-1]])
    with torch.no_grad():
        want = trunk(sft_model)(input_ids=ids).last_hidden_state
        got = trunk(rm)(input_ids=ids).last_hidden_state
        with rm.disable_adapter():
            bare = trunk(rm)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (
        bare - want
    ).abs().max() > 1e-2  # without the copied adapter the trunk differs: the check has teeth

    weight = unwrap(rm).score.modules_to_save["default"].weight
    assert weight.std().item() == pytest.approx(1 / math.sqrt(unwrap(rm).config.hidden_size + 1), rel=0.35)


def test_full_fine_tuning_from_sft_adapter_merges_it(tiny, tmp_path):
    sft_dir = tmp_path / "sft"
    sft_model, tokenizer = make_sft_adapter(tiny["model"], sft_dir)
    cfg = rm_cfg(tiny["model"], sft_checkpoint=str(sft_dir), **{"lora.enabled": False})
    rm, _, start = build_reward_model(cfg, tokenizer, CPU)
    assert "merged" in start and not hasattr(rm, "peft_config")
    assert all(p.requires_grad for p in rm.parameters())
    ids = torch.tensor([SEQUENCES[2]])
    with torch.no_grad():
        torch.testing.assert_close(
            trunk(rm.eval())(input_ids=ids).last_hidden_state,
            trunk(sft_model)(input_ids=ids).last_hidden_state,
            atol=1e-5,
            rtol=1e-5,
        )


def test_copy_adapter_weights_refuses_a_mismatched_adapter(tiny, tmp_path):
    sft_dir = tmp_path / "sft"
    make_sft_adapter(tiny["model"], sft_dir, targets=("q_proj", "v_proj"))
    tokenizer = load_tokenizer(str(tiny["model"]))
    rm, _, _ = build_reward_model(
        rm_cfg(tiny["model"], **{"lora.target_modules": ["q_proj"], "lora.r": 4}), tokenizer, CPU
    )
    with pytest.raises(ValueError, match="unused"):
        copy_adapter_weights(rm, sft_dir)


def test_load_rm_stats(tmp_path):
    assert load_rm_stats(tmp_path) is None
    write_product_info(tmp_path, "rm", "base", lora=True)
    assert load_rm_stats(tmp_path) is None
    write_product_info(tmp_path, "rm", "base", lora=True, reward_mean=0.25, reward_std=1.5)
    assert load_rm_stats(tmp_path) == (0.25, 1.5)
    assert json.loads((tmp_path / "ppo_cli.json").read_text())["stage"] == "rm"
