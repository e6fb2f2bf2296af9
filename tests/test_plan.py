"""`ppo-cli plan`: the estimator's arithmetic by hand on a toy shape, the command line (JSON keys, exit 2 on
a missing model directory or a bad key), and the stages' start-up row."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from conftest import run_cli_in_process

from ppo_cli.plan.estimate import (
    PROCESS_BASELINE,
    VLLM_CPU_OVERHEAD,
    ModelShape,
    RunShape,
    Sharding,
    activation_bytes,
    embedding_unit_bytes,
    estimate,
    gathered_bytes,
    gathered_layer_bytes,
    gb,
    kv_cache_bytes,
    linears_of,
    logits_bytes,
    lora_params,
    root_bytes,
    shard_parts,
    total,
    weight_bytes,
    with_vllm,
)

# A toy Llama: hidden 8, 2 layers, 2 heads of 4, one KV head, MLP 16, vocabulary 10, untied lm_head.
TOY = ModelShape(
    model_type="llama",
    vocab_size=10,
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    intermediate_size=16,
    tie_word_embeddings=False,
    linears=linears_of("llama", 8, 2, 1, 4, 16),
)


def test_parameters_of_the_toy_shape():
    # q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8
    assert TOY.layer_linear_params == 64 + 32 + 32 + 64 + 128 + 128 + 128 == 576
    # 2 layers of linears + embeddings and lm_head (10 x 8 each) + 5 norms of 8
    assert TOY.params == 2 * 576 + 160 + 40 == 1352


def test_lora_weights_count_r_times_in_plus_out_of_each_target():
    assert lora_params(TOY, ["q_proj", "v_proj"], r=2) == 2 * (2 * (8 + 8) + 2 * (8 + 4)) == 112
    assert lora_params(TOY, "all-linear", r=2) == 2 * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24) == 512
    assert lora_params(TOY, ["no_such_module"], r=2) == 0


def test_weights_at_their_dtype_or_quantized():
    assert weight_bytes(TOY, 4) == 4 * 1352
    # 4-bit: the 1152 linear weights at 4.5 bits = 648 bytes; embeddings and norms (200) in bf16
    assert weight_bytes(TOY, 2, quant_bits=4) == 648 + 400
    assert weight_bytes(TOY, 2, quant_bits=8) == int(1152 * 8.5 / 8) + 400


def test_activations_by_hand():
    # per token and layer: 16 x hidden (8) at 4 bytes + 4 x intermediate (16) at 4 bytes = 768 bytes
    assert activation_bytes(TOY, batch=1, seq=2, residual_bytes=4, act_bytes=4) == 2 * 2 * 768
    # checkpointing: each layer's input (2 tokens x 8 x 4 bytes) + one layer recomputed (1536)
    assert activation_bytes(TOY, 1, 2, 4, 4, checkpointing=True) == 2 * 64 + 1536
    # the math kernel's attention probabilities: 2 x heads x seq^2 per layer
    assert activation_bytes(TOY, 1, 2, 4, 4, attention_scores=True) == 2 * (1536 + 2 * 2 * 4 * 4)
    # LoRA dropout on q_proj and v_proj: mask and dropped input of 8 + 8 features, per token and layer
    assert activation_bytes(TOY, 1, 2, 4, 4, dropout_inputs=16) == 2 * 2 * (768 + 2 * 16 * 4)
    # bf16 autocast over fp32 weights: the intermediate at 2 bytes, plus 4 x hidden cast copies at 2 bytes
    assert activation_bytes(TOY, 1, 2, 4, 2) == 2 * 2 * (16 * 8 * 4 + 4 * 8 * 2 + 4 * 16 * 2)


def test_logits_and_kv_cache_by_hand():
    # logits at the activation dtype plus two fp32 copies
    assert logits_bytes(TOY, batch=2, positions=3, act_bytes=2) == 2 * 3 * 10 * (2 + 8)
    # K and V x 2 layers x 1 prompt x 3 positions x 1 KV head x 4 x 2 bytes
    assert kv_cache_bytes(TOY, batch=1, seq=3, act_bytes=2) == 2 * 2 * 3 * 4 * 2


def test_sft_parts_add_up_to_the_total():
    run = RunShape(stage="sft", micro_batch=1, seq_len=2, weight_bytes=4, act_bytes=4, lora_r=2,
                   lora_targets=["q_proj", "v_proj"])  # fmt: skip
    parts = estimate(TOY, run)
    assert parts == {
        "base weights": 4 * 1352,
        "trainable weights": 4 * 112,
        "gradients": 4 * 112,
        "AdamW state": 8 * 112,
        "activations": 3072,
        "logits": 2 * 10 * 12,
    }
    assert total(parts) == 5408 + 16 * 112 + 3072 + 240


def test_full_fine_tuning_trains_every_weight_in_fp32():
    parts = estimate(
        TOY, RunShape(stage="sft", micro_batch=1, seq_len=2, weight_bytes=2, act_bytes=2, lora_r=None)
    )
    assert parts["base weights"] == 0
    assert (parts["trainable weights"], parts["gradients"], parts["AdamW state"]) == (
        4 * 1352,
        4 * 1352,
        8 * 1352,
    )


def test_ppo_trains_policy_and_value_and_holds_the_rollout_cache():
    run = RunShape(stage="ppo", micro_batch=1, seq_len=3, weight_bytes=4, act_bytes=4, lora_r=2,
                   lora_targets=["q_proj", "v_proj"], rollout_batch=2, response_len=1, frozen_adapters=1)  # fmt: skip
    parts = estimate(TOY, run)
    # policy + value adapters (2 x 112) and the value head (8 + 1)
    assert parts["trainable weights"] == 4 * (2 * 112 + 9)
    assert parts["AdamW state"] == 8 * (2 * 112 + 9)
    # the reference adapter and a head, frozen, fp32
    assert parts["frozen adapters"] == 4 * (112 + 9)
    # policy and value passes, 3 tokens each
    assert parts["activations"] == 2 * 2 * 3 * 768
    # the update's micro-batch logits + the rollout's no-grad logits, at response positions
    assert parts["logits"] == 1 * 1 * 10 * 12 + 2 * 1 * 10 * 8
    assert parts["rollout KV cache"] == 2 * 2 * 2 * 3 * 1 * 4 * 4


def test_critic_free_ppo_has_no_value_adapter_head_or_pass():
    run = RunShape(stage="ppo", micro_batch=1, seq_len=3, weight_bytes=4, act_bytes=4, lora_r=2,
                   lora_targets=["q_proj", "v_proj"], rollout_batch=2, response_len=1, frozen_adapters=1,
                   critic=False)  # fmt: skip
    parts = estimate(TOY, run)
    assert parts["trainable weights"] == 4 * 112  # the policy adapter alone
    assert parts["AdamW state"] == 8 * 112
    assert parts["activations"] == 1 * 2 * 3 * 768  # the policy's pass alone


def test_plan_of_a_critic_free_run_counts_every_sample_of_each_prompt(tiny):
    args = ["train-ppo", f"model.name_or_path={tiny['model']}", f"data.train={tiny['prompts']}",
            "reward_fn=m:f", "train.device=cpu", "train.batch_size=2"]  # fmt: skip
    gae = plan_json(*args, "generation.samples_per_prompt=4")
    grpo = plan_json(*args, "generation.samples_per_prompt=4", "ppo.advantage_estimator=grpo")
    one = plan_json(*args, "ppo.advantage_estimator=grpo", "generation.samples_per_prompt=2")
    assert grpo["parts"]["trainable weights"] < gae["parts"]["trainable weights"]
    assert grpo["parts"]["activations"] * 2 == gae["parts"]["activations"]  # no value pass
    # 2 prompts x 4 samples: twice the rollout cache of 2 x 2
    assert grpo["parts"]["rollout KV cache"] == 2 * one["parts"]["rollout KV cache"]


def test_cpu_counts_the_process_and_a_converting_load():
    base = dict(
        stage="sft", micro_batch=1, seq_len=2, weight_bytes=2, act_bytes=2, lora_r=2, lora_targets=["q_proj"]
    )
    same = estimate(TOY, RunShape(**base, cpu=True, checkpoint_file_bytes=10**6))
    assert same["process baseline"] == PROCESS_BASELINE
    assert same["checkpoint load"] == 0  # the file's dtype is the weights': its pages are the weights
    converted = estimate(TOY, RunShape(**base, cpu=True, checkpoint_file_bytes=10**6, load_converts=True))
    step = converted["activations"] + converted["logits"]
    assert converted["checkpoint load"] == 10**6 - step  # only what the load needs beyond the step


def test_cpu_quantized_base_keeps_the_file_mapped_when_its_other_layers_alias_it():
    base = dict(stage="sft", micro_batch=1, seq_len=2, weight_bytes=4, act_bytes=4, lora_r=2,
                lora_targets=["q_proj"], quant_bits=4, cpu=True, checkpoint_file_bytes=4 * 1352)  # fmt: skip
    mapped = estimate(TOY, RunShape(**base, load_converts=True, file_stays_mapped=True))
    # the 1152 linear weights at 4.5 bits (648 bytes) + embeddings and norms (200) in fp32
    assert mapped["base weights"] == 648 + 800
    # the fp32 file stays resident: its pages of the 1152 linear weights come on top of their 4-bit copies
    assert mapped["checkpoint load"] == 4 * 1352 - 800 == 4 * 1152
    # converted on load (e.g. model.dtype=bfloat16): the file is only a transient, beyond the step's tensors
    converted = estimate(TOY, RunShape(**base, load_converts=True))
    step = converted["activations"] + converted["logits"]
    assert converted["checkpoint load"] == 4 * 1352 - step


def test_quantized_base_keeps_its_residual_stream_in_the_unquantized_layers_dtype():
    run = RunShape(stage="sft", micro_batch=1, seq_len=2, weight_bytes=4, act_bytes=2, lora_r=2,
                   lora_targets=["q_proj"], quant_bits=4)  # fmt: skip
    # fp32 residual (16 x hidden x 4 bytes), bf16 cast copies (4 x hidden x 2) and intermediate (4 x 16 x 2),
    # per token (2) and layer (2)
    assert estimate(TOY, run)["activations"] == 2 * 2 * (16 * 8 * 4 + 4 * 8 * 2 + 4 * 16 * 2)


def test_gb_formatting():
    assert gb(1.234e9) == "1.23 GB"
    assert gb(12_345_678) == "12.3 MB"


# --------------------------------------------------------------------------------------- the CLI


def plan_json(*args: str) -> dict:
    result = run_cli_in_process("plan", *args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_plan_json_of_train_ppo(tiny):
    plan = plan_json(
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        "train.device=cpu",
        "plan.device_memory_gb=1000",
    )
    assert {"total_bytes", "parts", "device", "fits"} <= set(plan)
    assert plan["device"] == "cpu" and plan["fits"] is True
    assert plan["total_bytes"] == sum(plan["parts"].values())
    assert {"base weights", "trainable weights", "gradients", "AdamW state", "activations"} <= set(
        plan["parts"]
    )
    assert plan["parts"]["rollout KV cache"] > 0
    assert plan["suggestions"] == []


def test_plan_that_does_not_fit_suggests_changes_with_their_totals(tiny):
    plan = plan_json(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        "train.device=cpu",
        "train.batch_size=64",
        "data.max_length=512",
        "plan.device_memory_gb=0.6",
    )
    assert plan["fits"] is False
    first = plan["suggestions"][0]
    assert first["overrides"] == ["model.gradient_checkpointing=true"]
    assert first["total_bytes"] < plan["total_bytes"]
    totals = [s["total_bytes"] for s in plan["suggestions"]]
    assert totals == sorted(totals, reverse=True)


def test_plan_of_train_rm_has_no_logits_and_two_sequences_per_pair(tiny):
    common = (f"model.name_or_path={tiny['model']}", "train.device=cpu", "train.mixed_precision=no")
    rm = plan_json("train-rm", *common)
    sft = plan_json("train-sft", *common)
    assert "logits" not in rm["parts"] and "logits" in sft["parts"]
    assert rm["parts"]["activations"] > sft["parts"]["activations"]


def test_plan_table_says_what_is_counted(tiny):
    result = run_cli_in_process(
        "plan", "train-sft", f"model.name_or_path={tiny['model']}", "train.device=cpu"
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "peak memory on cpu" in text and "total" in text and "fits" in text
    assert "counted on cpu: peak RSS of the process" in text


def test_plan_device_plans_for_a_gpu_from_anywhere(tiny):
    plan = plan_json(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        "lora.enabled=true",
        "plan.device=cuda",
        "plan.device_memory_gb=24",
    )
    assert plan["device"] == "cuda" and plan["fits"] is True
    # on a GPU nothing of the process or the file load is counted, and model.dtype=auto is bf16
    assert "process baseline" not in plan["parts"] and "checkpoint load" not in plan["parts"]
    assert plan["parts"]["base weights"] == 2 * plan["parameters"]
    assert "torch.cuda.max_memory_allocated" in plan["counted"]


def test_gradient_checkpointing_and_overrides_change_the_plan(tiny):
    common = ("train-sft", f"model.name_or_path={tiny['model']}", "train.device=cpu", "train.batch_size=16")
    plain = plan_json(*common)
    checkpointed = plan_json(*common, "model.gradient_checkpointing=true")
    assert checkpointed["parts"]["activations"] < plain["parts"]["activations"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (("train-sft", "model.name_or_path=/no/such/model/dir"), "no such directory"),
        (("train-sft", "model.name_or_path=/tmp", "train.lrr=1"), "unknown key train.lrr"),
        (("train-sft", "model.name_or_path=/tmp", "plan.device_memory=1"), "unknown key plan.device_memory"),
        (("train-sft", "plan.device_memory_gb=0"), "plan.device_memory_gb=0"),
        (("train-sft", "plan.device=tpu"), "plan.device=tpu is not a device"),
        (("generate",), "train-sft, train-rm, train-ppo"),
        (("train-sft", "--cfg"), "unknown flag --cfg"),
        (("train-sft",), "missing required value for model.name_or_path"),
    ],
)
def test_plan_mistakes_exit_2(args, needle):
    result = run_cli_in_process("plan", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    paragraph = result.stderr.strip()
    assert paragraph.startswith("ppo-cli plan: error: "), paragraph
    assert "\n" not in paragraph and "Traceback" not in paragraph
    assert needle in paragraph, paragraph


def test_plan_help_exits_0():
    result = run_cli_in_process("plan", "--help")
    assert result.returncode == 0
    assert "usage: ppo-cli plan COMMAND" in result.stdout


# ---------------------------------------------------------------------------- the stages' start row


def test_stage_start_panel_shows_the_memory_plan(tiny, tmp_path, capsys):
    import torch

    from ppo_cli.app import precheck
    from ppo_cli.logger import RunLogger
    from ppo_cli.plan.command import summary_row

    cfg = precheck(
        "train_sft",
        [f"model.name_or_path={tiny['model']}", f"data.train={tiny['sft']}", f"output_dir={tmp_path}"],
        "train-sft",
    )
    row = summary_row(cfg, "sft", torch.device("cpu"))
    assert re.fullmatch(
        r"\d+\.\d+ (GB|MB) peak on cpu \(ppo-cli plan train-sft \.\.\. for the parts\)", row
    ), row
    cfg.logger.progress = False
    RunLogger(tmp_path, cfg, "sft", memory_plan=row).start(total_steps=1)
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert f"memory plan {row}" in out


def test_train_sft_start_panel_has_the_memory_plan_row(tiny, tmp_path):
    result = run_cli_in_process(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['sft']}",
        f"output_dir={tmp_path / 'run'}",
        "train.device=cpu",
        "train.max_steps=1",
        "train.batch_size=2",
        "logger.progress=false",
        "logger.plots=false",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.replace("│", " ").split())
    assert re.search(r"memory plan \d+\.\d+ (GB|MB) peak on cpu \(ppo-cli plan train-sft", text), text


def test_summary_row_never_stops_a_run(tmp_path):
    import torch
    from omegaconf import OmegaConf

    from ppo_cli.plan.command import summary_row

    cfg = OmegaConf.create({"model": {"name_or_path": str(tmp_path / "gone")}})
    assert summary_row(cfg, "sft", torch.device("cpu")) is None


def test_plan_reads_the_sequence_lengths_of_local_data(tiny, tmp_path):
    """Activations follow the longest prompt the data gives, not data.max_length (an upper bound that can be
    several times the real peak); data that is not local files falls back to the bound and says so."""
    short, long_ = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    short.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Say hi:", "Tell me about rain:"]))
    long_.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n" for p in ["Say hi:", "Tell me about rain " + "and snow " * 30]
        )
    )

    def plan_of(data: str) -> dict:
        return plan_json(
            "train-ppo",
            f"model.name_or_path={tiny['model']}",
            f"data.train={data}",
            "reward_fn=ppo_cli.tiny.task:positive_reward",
            "train.device=cpu",
            "data.max_length=256",
        )

    p_short, p_long, p_hub = plan_of(str(short)), plan_of(str(long_)), plan_of("someone/prompts")
    assert p_short["lengths"].startswith("longest prompt of the first 2 rows of data.train:")
    assert "not local files" in p_hub["lengths"]
    act = [p["parts"]["activations"] for p in (p_short, p_long, p_hub)]
    assert act[0] < act[1] < act[2]


def test_stage_start_row_uses_the_examples_the_stage_loaded(tiny, tmp_path, monkeypatch):
    """At start-up the stage hands the plan the longest sequence of the examples it has already encoded:
    data.train is not read and tokenized a second time (the plan's own reader would fail here)."""
    import ppo_cli.plan.command

    def no_second_read(*args, **kwargs):
        raise AssertionError("data.train read again at start-up")

    monkeypatch.setattr(ppo_cli.plan.command, "data_length", no_second_read)
    result = run_cli_in_process(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['sft']}",
        f"output_dir={tmp_path / 'run'}",
        "train.device=cpu",
        "train.max_steps=1",
        "train.batch_size=2",
        "logger.progress=false",
        "logger.plots=false",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.replace("│", " ").split())
    assert re.search(r"memory plan \d+\.\d+ (GB|MB) peak on cpu", text), text


def test_vllm_engine_replaces_the_rollout_cache_and_sleeps_through_the_update():
    parts = {"base weights": 100, "activations": 30, "logits": 10, "rollout KV cache": 7}
    awake = with_vllm(parts, 50, sleeps=False)
    assert awake == {"base weights": 100, "activations": 30, "logits": 10, "vLLM engine": 50}
    # asleep during the update, the engine shares the peak with its 40 bytes of activations and logits
    assert with_vllm(parts, 50, sleeps=True)["vLLM engine"] == 10
    assert with_vllm(parts, 30, sleeps=True)["vLLM engine"] == 0


def test_plan_of_a_vllm_run_counts_the_engine(tiny):
    args = ["train-ppo", f"model.name_or_path={tiny['model']}", "reward_fn=m:f", "train.batch_size=4",
            "generation.max_new_tokens=8", "data.max_length=20", "train.mixed_precision=no"]  # fmt: skip
    hf = plan_json(*args, "train.device=cpu")
    cpu = plan_json(*args, "train.device=cpu", "generation.engine=vllm")
    assert "rollout KV cache" in hf["parts"] and "rollout KV cache" not in cpu["parts"]
    # the tiny Llama: 2 layers, 4 KV heads of 16; 4 sequences of 28 tokens, each in one 128-token block + a
    # spare; fp32 weights; vLLM's own overhead on CPU
    kv = 4 * 2 * 128 * (2 * 2 * 4 * 16 * 4)
    assert cpu["parts"]["vLLM engine"] == cpu["parameters"] * 4 + kv + VLLM_CPU_OVERHEAD
    gpu = ["plan.device=cuda", "plan.device_memory_gb=24", "generation.engine=vllm"]
    awake = plan_json(*args, *gpu, "generation.vllm.sleep_during_update=false")
    assert awake["parts"]["vLLM engine"] == int(0.3 * 24e9)  # gpu_memory_utilization of the device
    asleep = plan_json(*args, *gpu)
    transient = asleep["parts"]["activations"] + asleep["parts"]["logits"]
    assert asleep["parts"]["vLLM engine"] == int(0.3 * 24e9) - transient


# ------------------------------------------------------------------ train.strategy=fsdp: one rank's plan


def test_fsdp_rank_holds_half_the_base_plus_two_gathered_layers_and_its_own_activations():
    deep = dataclasses.replace(TOY, num_layers=8)
    run = RunShape(stage="sft", micro_batch=1, seq_len=2, weight_bytes=4, act_bytes=4, lora_r=2,
                   lora_targets=["q_proj", "v_proj"])  # fmt: skip
    whole = estimate(deep, run)
    rank = shard_parts(deep, run, whole, Sharding(world_size=2))
    # one layer gathered: 576 linear weights and 2 norms of 8 in fp32, and its LoRA (112 / 2 layers = 56)
    layer = gathered_layer_bytes(deep, run)
    assert layer == 4 * 576 + 4 * 16 + 4 * 56
    # the root (the final norm, 8) stays gathered through the step; the untied embeddings and lm_head
    # (10 x 8 each) are units of their own, smaller than a layer here: two layers are the largest pair
    assert root_bytes(deep, run) == 4 * 8
    assert embedding_unit_bytes(deep, run) == 4 * 80
    assert rank["base weights"] == whole["base weights"] // 2
    # ... plus the all-gather's flat buffer of one unit, a second copy until it is copied out
    assert rank["FSDP gathered weights"] == 4 * 8 + 2 * layer + layer
    # tied, the one matrix is in the root
    tied = dataclasses.replace(deep, tie_word_embeddings=True)
    assert root_bytes(tied, run) == 4 * 88 and embedding_unit_bytes(tied, run) == 0
    # a large vocabulary: the pair is a layer beside the output head
    wide = dataclasses.replace(deep, vocab_size=1000)
    assert gathered_bytes(wide, run, Sharding(world_size=2)) == 4 * 8 + layer + 4 * 8000 + 4 * 8000
    for name in ("trainable weights", "gradients", "AdamW state"):
        assert rank[name] == whole[name] // 2
    assert (rank["activations"], rank["logits"]) == (whole["activations"], whole["logits"])
    # the whole base loaded before sharding (19,616 + 1,792 bytes) is less than this step: not the peak
    assert rank["whole base while loading"] == 0
    # one process: nothing to shard
    assert shard_parts(deep, run, whole, Sharding(world_size=1)) == whole


def test_fsdp_keeps_every_layer_gathered_without_reshard_and_accumulates_full_gradients():
    deep = dataclasses.replace(TOY, num_layers=8)
    run = RunShape(stage="sft", micro_batch=1, seq_len=2, weight_bytes=4, act_bytes=4, lora_r=2,
                   lora_targets=["q_proj"])  # fmt: skip
    whole = estimate(deep, run)
    kept = shard_parts(deep, run, whole, Sharding(world_size=4, gathered_layers=10**9, unsharded_grads=True))
    # every unit: the root, the 8 layers, the input embeddings and the output head
    layer = gathered_layer_bytes(deep, run)
    assert kept["FSDP gathered weights"] == 4 * 8 + 8 * layer + 2 * 4 * 80 + layer
    assert kept["gradients"] == whole["gradients"]  # accumulated unreduced: full size on every rank
    # cpu_offload on a GPU: the shards, their gradients and the optimizer state are in CPU memory
    off = shard_parts(deep, run, whole, Sharding(world_size=4, offload=True))
    assert off["base weights"] == off["trainable weights"] == off["gradients"] == off["AdamW state"] == 0
    assert off["FSDP gathered weights"] > 0


def test_fsdp_whole_base_while_loading_is_the_peak_when_it_exceeds_the_step():
    deep = dataclasses.replace(TOY, num_layers=64)
    run = RunShape(stage="sft", micro_batch=1, seq_len=1, weight_bytes=4, act_bytes=4, lora_r=1,
                   lora_targets=["q_proj"])  # fmt: skip
    whole = estimate(deep, run)
    rank = shard_parts(deep, run, whole, Sharding(world_size=8))
    loaded = whole["base weights"] + whole["trainable weights"]
    shards = rank["base weights"] + rank["trainable weights"]
    assert total(rank) == loaded + shards  # the whole loaded base beside the shards cut from it
    assert rank["whole base while loading"] == loaded + shards - sum(
        v for k, v in rank.items() if k != "whole base while loading"
    )
    # read by rank 0, which drops each unit's whole weights once sent: the load peaks at the whole base
    dropped = shard_parts(deep, run, whole, Sharding(world_size=8, load_keeps_shards=False))
    assert total(dropped) == loaded
    # read by rank 0 into CPU memory while a GPU is planned: the device never holds the whole base
    on_gpu = shard_parts(deep, run, whole, Sharding(world_size=8, whole_load=False))
    assert on_gpu["whole base while loading"] == 0 and total(on_gpu) < loaded


def test_plan_per_rank_under_fsdp_and_ddp(tiny):
    common = (
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        "train.device=cpu",
        "plan.device_memory_gb=1000",
    )
    plain = plan_json(*common)
    ddp = plan_json(*common, "plan.world_size=2")
    fsdp = plan_json(*common, "plan.world_size=2", "train.strategy=fsdp")
    assert "per_rank" not in plain
    # ddp: every rank holds everything
    assert ddp["per_rank"]["parts"] == ddp["parts"] == plain["parts"]
    assert ddp["per_rank"]["total_bytes"] == ddp["total_bytes"]
    assert (ddp["per_rank"]["strategy"], ddp["per_rank"]["world_size"]) == ("ddp", 2)
    # fsdp: half the base, the gathered layers and root on top, the same activations counted at their live
    # share (a sharded CPU run returns freed blocks at once)
    from ppo_cli.plan.estimate import LIVE_SHARE_FREES_RETURNED as live

    rank, whole = fsdp["per_rank"]["parts"], fsdp["parts"]
    assert fsdp["total_bytes"] == plain["total_bytes"]  # the top level stays one unsharded process
    assert rank["base weights"] == -(-whole["base weights"] // 2)
    assert rank["FSDP gathered weights"] > 0
    assert rank["activations"] == int(whole["activations"] * live)
    assert rank["logits"] == int(whole["logits"] * live)
    assert fsdp["per_rank"]["total_bytes"] == sum(rank.values())
    assert fsdp["fits"] is fsdp["per_rank"]["fits"] is True


def test_plan_fsdp_of_one_process_equals_ddp(tiny):
    common = ("train-rm", f"model.name_or_path={tiny['model']}", "train.device=cpu")
    ddp = plan_json(*common)
    one = plan_json(*common, "train.strategy=fsdp")
    assert one["per_rank"]["parts"] == one["parts"] == ddp["parts"]
    assert one["per_rank"]["total_bytes"] == ddp["total_bytes"]
    assert one["per_rank"]["world_size"] == 1


def test_plan_table_says_per_rank(tiny):
    result = run_cli_in_process("plan", "train-sft", f"model.name_or_path={tiny['model']}", "train.device=cpu",
                                "train.strategy=fsdp", "plan.world_size=2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "peak memory per rank (fsdp over 2 ranks) on cpu" in text
    assert "FSDP gathered weights" in text and "one process, unsharded" in text


@pytest.mark.parametrize(
    "args, needle",
    [
        (("train-sft", "model.name_or_path=/tmp", "plan.world_size=0"), "plan.world_size=0"),
        (("train-ppo", "model.name_or_path=/tmp", "reward_fn=m:f", "train.strategy=fsdp",
          "generation.engine=vllm"), "cannot sample for train.strategy=fsdp"),
    ],
)  # fmt: skip
def test_plan_fsdp_mistakes_exit_2(args, needle):
    result = run_cli_in_process("plan", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr, result.stderr


def test_fsdp_on_cpu_counts_the_live_share_of_activations_and_logits():
    """A sharded CPU run unmaps freed blocks at once (models/devices.py): its activations and logits count
    at LIVE_SHARE_FREES_RETURNED of the heap-kept figures; nothing else changes."""
    from ppo_cli.plan.estimate import LIVE_SHARE_FREES_RETURNED

    deep = dataclasses.replace(TOY, num_layers=4)
    run = RunShape(stage="sft", micro_batch=2, seq_len=4, weight_bytes=4, act_bytes=4, lora_r=2,
                   lora_targets=["q_proj"])  # fmt: skip
    whole = estimate(deep, run)
    kept = shard_parts(deep, run, whole, Sharding(world_size=2))
    returned = shard_parts(deep, run, whole, Sharding(world_size=2, frees_returned=True))
    for name in ("activations", "logits"):
        assert returned[name] == int(whole[name] * LIVE_SHARE_FREES_RETURNED) < kept[name]
    same = set(kept) - {"activations", "logits", "whole base while loading"}
    assert {k: returned[k] for k in same} == {k: kept[k] for k in same}
