"""`ppo-cli generate` and `ppo-cli export` on adapters shaped like the stages' final/ directories.

The adapters are made here with peft (random, non-zero LoRA weights) rather than trained, which keeps the
tests fast; test_pipeline.py runs the real stages end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ppo_cli import export, generate
from ppo_cli.config import register_configs
from ppo_cli.errors import UserError
from ppo_cli.models import load_causal_lm, load_sequence_classifier, load_tokenizer, write_product_info
from ppo_cli.paths import conf_dir
from ppo_cli.tiny import task as tiny_module

CPU = torch.device("cpu")


def config(name: str, overrides: list[str]) -> DictConfig:
    """The command's config exactly as `ppo-cli NAME OVERRIDES` composes it."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name=name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _model_cfg() -> DictConfig:
    return config("generate", ["checkpoint=x", "output=y"]).model


def make_adapter(base: Path, out: Path, task: str, stage: str, seed: int = 0) -> Path:
    """A final/ like a stage writes: peft adapter (random non-zero LoRA), tokenizer with its pad token,
    ppo_cli.json. An exact-vocab base is resized for the pad token, so the adapter saves the embeddings."""
    tokenizer = load_tokenizer(str(base))
    model_cfg = _model_cfg()
    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        model = load_sequence_classifier(model_cfg, tokenizer, CPU, name_or_path=str(base))
        modules_to_save = ["score"]
    else:
        model = load_causal_lm(model_cfg, tokenizer, CPU, name_or_path=str(base))
        modules_to_save = None
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        task_type=task,
        init_lora_weights=False,  # random A and B: the adapter changes the logits
        modules_to_save=modules_to_save,
    )
    model = get_peft_model(model, lora)
    model.save_pretrained(str(out), save_embedding_layers=True)  # what peft's 'auto' picks here, unwarned
    tokenizer.save_pretrained(str(out))
    write_product_info(out, stage, str(base), lora=True)
    return out


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sft": make_adapter(tiny["model"], root / "sft", "CAUSAL_LM", "sft"),
        "rm": make_adapter(tiny["model"], root / "rm", "SEQ_CLS", "rm", seed=1),
    }


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "right"
    return tokenizer(
        ["Describe the river: good happy table.", "How was the dog? sad", "Comment on the sky:"],
        return_tensors="pt",
        padding=True,
    )


# ---------------------------------------------------------------------------------------------------- export


def test_export_causal_lm_logits_equal_base_plus_adapter(tiny, adapters, tmp_path):
    out = export.run(config("export", [f"checkpoint={adapters['sft']}", f"output={tmp_path / 'merged'}"]))
    tokenizer = load_tokenizer(str(adapters["sft"]))
    assert len(tokenizer) > AutoModelForCausalLM.from_pretrained(tiny["model"]).config.vocab_size  # resized
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))  # peft restores the trained embeddings over this
    reference = PeftModel.from_pretrained(base, str(adapters["sft"])).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected, got = reference(**batch).logits, merged(**batch).logits
    assert (expected - got).abs().max().item() < 1e-5
    # the adapter matters: the merged model is not the base
    fresh = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    with torch.no_grad():
        base_logits = fresh(input_ids=batch["input_ids"][:1, :5]).logits
    assert (base_logits - got[:1, :5, : base_logits.shape[-1]]).abs().max().item() > 1e-3
    # standalone: tokenizer beside the weights, pad token kept, generation config present
    loaded_tok = load_tokenizer(str(out))
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id == merged.config.pad_token_id
    assert (Path(out) / "generation_config.json").is_file()
    info = json.loads((Path(out) / "export_info.json").read_text())
    assert info["stage"] == "sft" and info["task_type"] == "CAUSAL_LM"


def test_export_reward_model_is_a_sequence_classifier(tiny, adapters, tmp_path):
    out = export.run(config("export", [f"checkpoint={adapters['rm']}", f"output={tmp_path / 'rm'}"]))
    tokenizer = load_tokenizer(str(adapters["rm"]))
    base = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=1)
    base.resize_token_embeddings(len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    reference = PeftModel.from_pretrained(base, str(adapters["rm"])).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
    batch = _batch(tokenizer)  # right-padded: the score is read at the last non-pad token
    with torch.no_grad():
        expected, got = reference(**batch).logits, merged(**batch).logits
    assert got.shape == (3, 1)
    assert (expected - got).abs().max().item() < 1e-5


def test_export_refuses_a_non_empty_output(adapters, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        export.run(config("export", [f"checkpoint={adapters['sft']}", f"output={tmp_path / 'taken'}"]))
    assert (tmp_path / "taken" / "file").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    export.run(config("export", [f"checkpoint={adapters['sft']}", f"output={tmp_path / 'empty'}"]))
    assert (tmp_path / "empty" / "config.json").is_file()


def run_cli_in_process(*args: str) -> int:
    """`ppo-cli ARGS` through the real dispatcher and Hydra app, in this process; returns the exit code."""
    import sys

    from ppo_cli import cli

    argv = sys.argv[:]  # the dispatcher hands its arguments to Hydra through sys.argv
    try:
        cli.main(list(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.argv = argv
    return 0


def test_export_cli_refuses_overwrite_and_non_adapters(tiny, adapters, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    code = run_cli_in_process("export", f"checkpoint={adapters['sft']}", f"output={tmp_path / 'taken'}")
    assert code == 2 and "not empty" in capsys.readouterr().err
    code = run_cli_in_process("export", f"checkpoint={tiny['model']}", f"output={tmp_path / 'x'}")
    assert code == 2 and "no peft adapter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------------------- generate


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_cli_writes_rows_with_rewards(cli, tiny, adapters, tmp_path):
    out = tmp_path / "samples.jsonl"
    args = [
        f"checkpoint={adapters['sft']}",
        f"data.prompts={tiny['prompts_eval']}",
        f"output={out}",
        "data.limit=12",
        "batch_size=5",
        "generation.max_new_tokens=6",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
    ]
    result = cli("generate", *args)
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    prompts = [json.loads(line)["prompt"] for line in tiny["prompts_eval"].read_text().splitlines()[:12]]
    assert [r["prompt"] for r in rows] == prompts  # every prompt, in the input order
    assert all(set(r) == {"prompt", "completion", "reward"} for r in rows)
    assert all(isinstance(r["completion"], str) for r in rows)
    assert all(r["reward"] == pytest.approx(tiny_module.gold_score(r["completion"])) for r in rows)
    assert "wrote 12 rows" in result.stdout and "reward" in result.stdout


def test_generate_rows_without_reward_and_with_a_reward_model(tiny, adapters, tmp_path):
    base = [f"checkpoint={adapters['sft']}", f"data.prompts={tiny['prompts_eval']}", "data.limit=6"]
    rows = generate.run(
        config("generate", [*base, f"output={tmp_path / 'a.jsonl'}", "generation.max_new_tokens=5"])
    )
    assert len(rows) == 6 and all(set(r) == {"prompt", "completion"} for r in rows)
    scored = generate.run(
        config(
            "generate",
            [
                *base,
                f"output={tmp_path / 'b.jsonl'}",
                f"reward_checkpoint={adapters['rm']}",
                "generation.max_new_tokens=5",
            ],
        )
    )
    assert all(isinstance(r["reward"], float) for r in scored)
    assert len({round(r["reward"], 6) for r in scored}) > 1


def test_generate_greedy_is_deterministic_and_respects_overwrite(tiny, adapters, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    args = [
        f"checkpoint={adapters['sft']}",
        f"data.prompts={tiny['prompts_eval']}",
        f"output={out}",
        "data.limit=7",
        "generation.temperature=0",
        "generation.max_new_tokens=6",
        "batch_size=3",
    ]
    first = generate.run(config("generate", args))
    assert run_cli_in_process("generate", *args) == 2  # the file exists now
    assert "overwrite=true" in capsys.readouterr().err
    second = generate.run(config("generate", [*args, "overwrite=true", "batch_size=7"]))
    # greedy: batching and left padding do not change the completions
    assert [r["completion"] for r in first] == [r["completion"] for r in second]


def test_generate_conversational_prompts_get_conversational_completions(tiny, tmp_path):
    prompts = tmp_path / "chat.jsonl"
    rows = [json.loads(line) for line in tiny["sft_messages"].read_text().splitlines()[:4]]
    prompts.write_text("".join(json.dumps({"messages": r["messages"][:-1]}) + "\n" for r in rows))
    out = generate.run(
        config(
            "generate",
            [
                f"checkpoint={tiny['model']}",
                f"data.prompts={prompts}",
                f"output={tmp_path / 'o.jsonl'}",
                "generation.max_new_tokens=4",
            ],
        )
    )
    for row, source in zip(out, rows):
        assert row["prompt"] == source["messages"][:-1]
        assert row["completion"][0]["role"] == "assistant" and isinstance(
            row["completion"][0]["content"], str
        )


def test_generate_refuses_a_reward_model_as_policy(tiny, adapters, tmp_path):
    with pytest.raises(UserError, match="SEQ_CLS"):
        generate.run(
            config(
                "generate",
                [
                    f"checkpoint={adapters['rm']}",
                    f"data.prompts={tiny['prompts_eval']}",
                    f"output={tmp_path / 'o'}",
                ],
            )
        )


def test_sequence_logprobs_match_a_plain_forward(tiny, adapters):
    policy = generate.load_policy(str(adapters["sft"]), _model_cfg(), CPU)
    prompts = [
        policy.tokenizer("Describe the river:")["input_ids"],
        policy.tokenizer("How was it?")["input_ids"],
    ]
    samples = generate.sample(policy, prompts, max_new_tokens=5, temperature=1.0, batch_size=2, seed=3)
    batched = generate.sequence_logprobs(policy, samples.prompt_ids, samples.response_ids, 1.0, batch_size=2)
    for i, (p, r) in enumerate(zip(samples.prompt_ids, samples.response_ids)):
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(r)[:, None]).sum()
        assert batched[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_generate_ignores_the_models_generation_config(tiny, tmp_path, monkeypatch):
    """A base whose generation_config.json sets top_k=1, penalties, forced tokens, ... still samples from
    plain softmax(z / T): nothing of that file reaches generate, which builds no logits processor at T=1."""
    from ppo_helpers import hostile_base, leaked_generation_fields, record_generation

    base, hostile = hostile_base(tiny["model"], tmp_path / "base")
    policy = generate.load_policy(str(base), _model_cfg(), CPU)
    seen = record_generation(policy.model, monkeypatch)
    prompt = policy.tokenizer("Describe the river:")["input_ids"]
    samples = generate.sample(policy, [prompt] * 16, max_new_tokens=8, temperature=1.0, batch_size=16)
    assert leaked_generation_fields(seen["config"], hostile) == {}
    assert [type(p).__name__ for p in seen["processors"]] == []
    assert len(set(map(tuple, samples.response_ids))) > 1, samples.response_ids
    # The model keeps its own generation config (an export of it must still carry the file's values).
    assert policy.model.generation_config.top_k == hostile["top_k"]
