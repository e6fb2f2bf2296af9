"""What a run prints: wide and whole off a terminal (a log file, a pipe, CI), never a cut path, progress as
plain lines there, LoRA targets on one line, a final summary that says how the key metric moved; and no
library warnings caused by how ppo-cli calls transformers and peft.

In-process and fast: RunLogger on a hand-made config, the tiny models for LoRA and checkpointing. The CLI
runs of tests/test_sft.py and tests/test_train_rm.py check the same at 80 columns end to end.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from ppo_cli.logger import RunLogger, make_console, metric_change, summary_rows
from ppo_cli.models import (
    apply_lora,
    describe_lora,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    lora_targets_text,
)

LONG_NAME = "a-run-directory-whose-name-alone-is-longer-than-what-an-eighty-column-table-can-show"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def stage_cfg(progress: bool = False, targets=None):
    return OmegaConf.create(
        {
            "model": {
                "name_or_path": "base",
                "dtype": "float32",
                "trust_remote_code": False,
                "attn_implementation": "sdpa",
                "revision": None,
            },
            "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets},
            "data": {"train": "train.jsonl"},
            "train": {"batch_size": 2, "grad_accum_steps": 1, "lr": 1e-4},
            "logger": {"progress": progress, "plots": True, "wandb": {"enabled": False, "mode": "disabled"}},
        }
    )


def one_line(text: str) -> str:
    """The output without colours, table borders and line breaks."""
    return " ".join(ANSI.sub("", text).replace("│", " ").split())


def short_run(out: Path, progress: bool = False) -> RunLogger:
    """A 4-step SFT-like run: loss logged at steps 2 and 4, eval/loss at 2 and 4; finished."""
    logger = RunLogger(out, stage_cfg(progress), "sft")
    logger.start(total_steps=4, summary={"initialised from": str(out / "sft" / "final")})
    logger.log(2, {"loss": 2.5, "lr": 1e-4, "tokens_per_second": 123456.0})
    logger.log(2, {"eval/loss": 2.75})
    logger.log(4, {"loss": 1.25, "lr": 5e-5, "tokens_per_second": 120000.0})
    logger.log(4, {"eval/loss": 1.5})
    logger.finish({"steps": 4, "eval/loss": 1.5, "note": "kept"}, final_dir=out / "final")
    return logger


# ------------------------------------------------------------------------------ the console's width


def test_console_off_a_terminal_is_wide_unless_columns_is_set(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert make_console().width >= 200  # pytest's captured stdout is not a terminal
    assert make_console().soft_wrap  # plain text lines are not wrapped at all
    monkeypatch.setenv("COLUMNS", "300")
    assert make_console().width == 300
    monkeypatch.setenv("COLUMNS", "80")  # the user's word: a log read in an 80-column terminal
    assert make_console().width == 80 and not make_console().soft_wrap
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal: fit its window
    assert make_console().width == 80


def test_summary_off_a_terminal_keeps_paths_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = tmp_path / LONG_NAME
    out.mkdir()
    short_run(out)
    text = capsys.readouterr().out
    assert str(out / "final") in text.splitlines()[-1], text
    assert str(out / "sft" / "final") in text, text  # the start panel's values too
    assert "…" not in text, text


def test_summary_on_an_80_column_terminal_cuts_nothing(tmp_path, monkeypatch, capsys):
    """On a terminal tables fit the window, so long values fold onto more lines (never '…'); the final
    path, which users copy, is printed whole on a line of its own (the terminal wraps it softly)."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    out = tmp_path / LONG_NAME
    out.mkdir()
    short_run(out)
    text = ANSI.sub("", capsys.readouterr().out)
    assert "…" not in text, text
    assert str(out / "final") in text.splitlines()[-1], text


def test_final_summary_says_how_the_key_metric_moved(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    short_run(tmp_path)
    text = one_line(capsys.readouterr().out)
    assert "loss 2.5 -> 1.25 (step 2 -> 4)" in text, text
    assert "eval/loss 2.75 -> 1.5 (step 2 -> 4)" in text, text
    assert "note kept" in text, text


# ------------------------------------------------------------------------------ the summary (pure)


def test_metric_change_reads_the_first_and_last_logged_values():
    rows = [
        {"step": 1, "loss": 2.0},
        {"step": 3, "eval/accuracy": 0.5},
        {"step": 2, "loss": 1.5, "accuracy": 0.25},
        {"step": 6, "eval/accuracy": 0.875, "loss": float("nan")},
    ]
    assert metric_change(rows, "eval/accuracy") == "0.5 -> 0.875 (step 3 -> 6)"
    assert metric_change(rows, "accuracy") == "0.25 (step 2 only)"
    assert metric_change(rows, "loss") == "2 -> nan (step 1 -> 6)"  # a diverged end shows as such
    assert metric_change(rows, "objective/kl") is None


@pytest.mark.parametrize(
    "stage,keys",
    [
        ("sft", ["loss", "eval/loss"]),
        ("rm", ["accuracy", "eval/accuracy"]),
        ("ppo", ["objective/scores", "objective/kl"]),
    ],
)
def test_summary_rows_put_the_stage_key_metrics_first(stage, keys):
    rows = [{"step": 1, **dict.fromkeys(keys, 1.0)}, {"step": 5, **dict.fromkeys(keys, 0.5)}]
    summary = {"steps": 5, keys[1]: 0.5, "objective/kl_coef": 0.05, "lr": 1e-6}
    assert summary_rows(stage, rows, summary) == [
        ("steps", "5"),
        (keys[0], "1 -> 0.5 (step 1 -> 5)"),
        (keys[1], "1 -> 0.5 (step 1 -> 5)"),
        ("objective/kl_coef", "0.05"),
        ("lr", "1.00e-06"),
    ]


def test_summary_rows_keep_a_key_metric_that_was_never_logged():
    assert summary_rows("rm", [], {"steps": 2, "eval/accuracy": 0.75}) == [
        ("steps", "2"),
        ("eval/accuracy", "0.75"),
    ]


def test_pipeline_summary_on_an_80_column_terminal_folds_paths(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from ppo_cli.pipeline import summary_table

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    run_dir = tmp_path / LONG_NAME
    stages = {s: SimpleNamespace(output_dir=str(run_dir / s)) for s in ("sft", "rm", "ppo")}
    plan = SimpleNamespace(
        recipe=SimpleNamespace(name="tiny"), run_dir=run_dir, stages=list(stages), configs=stages
    )
    Console().print(summary_table(plan, {"sft": ("trained", 12.0)}))
    assert "…" not in ANSI.sub("", capsys.readouterr().out)


# ---------------------------------------------------------------------------- progress off a terminal


def test_progress_off_a_terminal_is_plain_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    short_run(tmp_path, progress=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sft step")]
    assert [ln.split()[2] for ln in lines] == ["2/4", "2/4", "4/4", "4/4"], lines
    assert "sft step 2/4 loss=2.5 lr=1.00e-04 tokens_per_second=1.23e+05 elapsed" in lines[0], lines
    assert "sft step 4/4 eval/loss=1.5 elapsed" in lines[-1] and "eta" in lines[-1], lines


# -------------------------------------------------------------------------------------- LoRA targets


def test_lora_targets_text_is_one_compact_line():
    assert lora_targets_text(None, {"v_proj", "q_proj"}, "llama") == "peft default for llama (q_proj, v_proj)"
    assert lora_targets_text("all-linear", ["c_proj", "c_attn", "c_fc"], "gpt2") == (
        "all-linear (c_attn, c_fc, c_proj)"
    )
    many = [f"proj_{i}" for i in range(14)]
    assert lora_targets_text(many, set(many), "llama") == ", ".join(sorted(many))
    layers = [f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ("q_proj", "k_proj")]
    assert lora_targets_text("all-linear", layers, "llama") == "all-linear (k_proj, q_proj)"
    assert lora_targets_text(None, None, None) == "peft default for the architecture"
    assert lora_targets_text(".*attn.*", ".*attn.*", "gpt2") == ".*attn.*"


@pytest.fixture(scope="module")
def gpt2(tiny_factory) -> str:
    return str(tiny_factory("gpt2")["model"])


def _causal_lm(base: str):
    tokenizer = load_tokenizer(base)
    return load_causal_lm(stage_cfg().model, tokenizer, torch.device("cpu"), name_or_path=base)


def test_describe_lora_reads_the_adapter_the_model_has(tiny, gpt2):
    llama = apply_lora(_causal_lm(str(tiny["model"])), stage_cfg().lora)
    assert describe_lora(llama, asked=None) == "r=4 alpha=8 targets=peft default for llama (q_proj, v_proj)"
    lora = stage_cfg(targets="all-linear").lora
    model = apply_lora(_causal_lm(gpt2), lora)
    assert describe_lora(model, asked="all-linear") == "r=4 alpha=8 targets=all-linear (c_attn, c_fc, c_proj)"
    assert describe_lora(_causal_lm(gpt2), asked=None) == "off (full fine-tuning)"


# ------------------------------------------------------------------------ warnings our calls caused


def _recorded(call) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_lora_on_gpt2_conv1d_layers_sets_fan_in_fan_out(gpt2, targets):
    """GPT-2's layers are transformers' Conv1D (weights stored (in, out)): LoRA must be told, or peft
    warns on every layer and corrects the flag itself."""
    model, caught = _recorded(lambda: apply_lora(_causal_lm(gpt2), stage_cfg(targets=targets).lora))
    assert not [w for w in caught if "fan_in_fan_out" in w], caught
    assert model.peft_config["default"].fan_in_fan_out is True


def test_ppo_roles_on_gpt2_raise_no_fan_in_fan_out_warning(gpt2, tmp_path):
    """Fresh policy and value adapters, and ones copied from an SFT adapter."""
    from ppo_helpers import build_tiny_roles

    apply_lora(_causal_lm(gpt2), stage_cfg().lora).save_pretrained(tmp_path, save_embedding_layers=False)
    for sft in (None, tmp_path):
        _, caught = _recorded(lambda sft=sft: build_tiny_roles(gpt2, sft, None, targets=None))
        assert not [w for w in caught if "fan_in_fan_out" in w], (sft, caught)


def test_gradient_checkpointing_uses_the_current_api(tiny):
    model = apply_lora(_causal_lm(str(tiny["model"])), stage_cfg().lora)
    _, caught = _recorded(lambda: enable_gradient_checkpointing(model))
    assert not [w for w in caught if "checkpointing" in w], caught
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers before the rename
        checkpointing = model.is_gradient_checkpointing
    assert checkpointing is True
