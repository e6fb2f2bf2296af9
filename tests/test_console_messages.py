"""What a first-time user reads on the console: the length-limit report, panels and tables at COLUMNS=80,
metric names as metrics.jsonl has them, the warnings' settings, export's last words, a Hub model without
network, the commands' --help, the tiny model's CLI, whole steps on the plots, and the logger/plots split.

In-process and fast (no model is trained): each message is produced by the function that prints it, with
the content a real run gives it (the strings below are copied from runs of the tiny model).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.cells import cell_len

from ppo_cli.data.lengths import LengthReport, fit_examples
from ppo_cli.data.rows import Row
from ppo_cli.errors import UserError
from ppo_cli.logger import RunLogger, describe_base, make_console, plain_progress_line, printable

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BOX = set("│┃╭╮╰╯┌┐└┘┏┓┗┛├┤┡┩┼╇━─")
# Lines printed whole on purpose (soft-wrapped: a terminal folds them, no box breaks): paths to copy and
# the plain progress lines, one per logged step, for grep.
WHOLE_LINES = ("final: ", "plots: ", "ppo step ", "rm step ", "sft step ")


@pytest.fixture
def columns_80(monkeypatch):
    """Output to a pipe (pytest's capture) with COLUMNS=80, as `COLUMNS=80 ppo-cli ... | tee log`."""
    monkeypatch.setenv("COLUMNS", "80")
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def too_wide(text: str, width: int = 80) -> list[str]:
    """The lines wider than `width` cells, except WHOLE_LINES."""
    lines = ANSI.sub("", text).splitlines()
    return [ln for ln in lines if cell_len(ln) > width and not ln.startswith(WHOLE_LINES)]


def rows(source: str, *indices: int) -> list[Row]:
    return [Row({}, source, i) for i in indices]


# ------------------------------------------------------------------------- item 9: the length limit


def words(max_prompt: int):
    """fit_examples' encode for rows {"prompt": n, "completion": m}: n prompt tokens (no label) and m
    completion tokens (labelled), as build_sft_examples encodes them."""

    def encode(row: Row) -> dict[str, list[int]]:
        prompt, completion = row.data["prompt"], row.data["completion"]
        return {"input_ids": [1] * (prompt + completion), "labels": [-100] * prompt + [1] * completion}

    return encode


def sft_rows(source: str, sizes: list[tuple[int, int]]) -> list[Row]:
    return [Row({"prompt": p, "completion": c}, source, i) for i, (p, c) in enumerate(sizes, 1)]


def test_a_prompt_longer_than_max_length_is_named_as_the_reason_it_was_dropped():
    # max_length 8: rows 1-3 are prompts of 10 tokens (dropped), row 4 is cut, row 5 fits.
    data = sft_rows("/data/train.jsonl", [(10, 2), (10, 2), (12, 1), (4, 9), (2, 2)])
    kept, report = fit_examples(
        data,
        words(8),
        ("input_ids", "labels"),
        8,
        "truncate",
        is_useless=lambda e: all(label == -100 for label in e["labels"]),
    )
    assert len(kept) == 2 and (report.truncated, report.dropped, report.no_room) == (1, 3, 3)
    message = report.describe(8)
    assert "3 of 5 examples dropped: the prompt alone is at least data.max_length=8 tokens long" in message
    assert "1 of 5 examples truncated to data.max_length=8 (/data/train.jsonl row 4)" in message, message
    assert "0 of" not in message  # no count of nothing ("0 of 91 truncated and 91 dropped")


def test_each_file_is_named_once_then_its_row_numbers():
    report = LengthReport(total=9)
    for row in rows("/data/a.jsonl", 2, 5, 7) + rows("/data/b.jsonl", 1):
        report.note("truncated", row)  # the first three only are shown
    report.note("too_long", Row({}, "/data/b.jsonl", 4))
    report.note("empty", Row({}, "/data/a.jsonl", 9))
    message = report.describe(16, "pairs")
    assert "4 of 9 pairs truncated to data.max_length=16 (e.g. /data/a.jsonl rows 2, 5, 7)" in message
    # every row of a kind is shown: no "e.g."
    assert "1 of 9 pairs dropped for being longer than data.max_length=16 (data.overflow=drop) " in message
    assert "(/data/b.jsonl row 4)" in message and "(/data/a.jsonl row 9)" in message, message
    assert message.count("/data/a.jsonl") == 2 and ", row " not in message
    two_files = LengthReport(total=3)
    for row in rows("/data/a.jsonl", 1) + rows("/data/b.jsonl", 2, 3):
        two_files.note("truncated", row)
    assert "(/data/a.jsonl row 1; /data/b.jsonl rows 2, 3)" in two_files.describe(4)
    assert LengthReport(total=3).describe(4) is None


def _data_cfg(train: Path, max_length: int):
    return OmegaConf.create(
        {
            "data": {
                "train": str(train),
                "eval": None,
                "eval_fraction": 0.0,
                "split": "train",
                "max_length": max_length,
                "overflow": "truncate",
            },
            "train": {"seed": 0},
        }
    )


def _build(tokenizer, data_rows, max_length, overflow):
    return fit_examples(
        data_rows,
        words(max_length),
        ("input_ids", "labels"),
        max_length,
        overflow,
        is_useless=lambda e: all(label == -100 for label in e["labels"]),
    )


@pytest.mark.parametrize("printer", ["print", "rich"])
def test_load_examples_says_what_was_cut_without_markup(tmp_path, monkeypatch, capsys, printer):
    """train-sft handed `print` a "[yellow]...[/]" string, which print shows as it is; a rich console must
    show a file name with brackets as it is, too."""
    from ppo_cli.supervised import load_examples

    monkeypatch.delenv("COLUMNS", raising=False)
    train = tmp_path / "data[v2]" / "train.jsonl"
    train.parent.mkdir()
    lines = [{"prompt": 10, "completion": 2}] * 3 + [{"prompt": 2, "completion": 2}]
    train.write_text("".join(json.dumps(r) + "\n" for r in lines))
    say = print if printer == "print" else make_console().print
    kept, _ = load_examples(_data_cfg(train, 8), None, _build, say, lambda report, n: "none")
    out = ANSI.sub("", capsys.readouterr().out)
    assert len(kept) == 1
    assert "[yellow]" not in out and "[/]" not in out, out
    assert (
        f"data.train: 3 of 4 examples dropped: the prompt alone is at least data.max_length=8 tokens long, "
        f"leaving no completion token to learn ({train} rows 1, 2, 3)"
    ) in out, out


# ------------------------------------------------------------------------------ item 10: COLUMNS=80

PPO_PANEL = {
    "rollout": "32 prompts x 1 samples x 24 new tokens, T=1.0, sampled by transformers' generate",
    "advantages": "GAE with a critic (value adapter and head); whitened; loss token_mean",
    "ppo": "4 epochs x 2 minibatches",
    "kl penalty": "beta 0.15 (k1 in the reward) at the start, adaptive: target 6 nats per response, horizon "
    "8 episodes",
    "reward scale": "sft_samples: scores / std of the SFT policy's scores (first batch): beta per std of "
    "score per nat; a response without EOS scores -1",
    "device": "cpu",
}
RM_PANEL = {
    "parameters": "8,256 trainable of 172,544 (head: score)",
    "initialised from": "SFT adapter /tmp/tinyw/sft1/final (8 LoRA tensors)",
    "pairs": "1767 train, 92 eval",
    "device": "cpu",
}
COMPLETION = " few boring warm gloomy friendly weak house excellent nice cruel bridge lovely calm"


def stage_cfg(model: dict | None = None):
    return OmegaConf.create(
        {
            "model": {"name_or_path": "/tmp/tinyw/base/model", **(model or {})},
            "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": None},
            "data": {"train": "/tmp/tinyw/base/data/prompts.jsonl"},
            "train": {"batch_size": 32, "grad_accum_steps": 1, "lr": 5e-4},
            "logger": {"progress": True, "plots": True, "wandb": {"enabled": False, "mode": "disabled"}},
        }
    )


@pytest.mark.parametrize("stage,panel", [("ppo", PPO_PANEL), ("rm", RM_PANEL)])
def test_start_panel_samples_and_summary_fit_80_columns(tmp_path, columns_80, capsys, stage, panel):
    logger = RunLogger(
        tmp_path, stage_cfg(), stage, lora="r=16 alpha=32 targets=all-linear (down_proj, gate_proj, k_proj)"
    )
    logger.memory_plan = "0.54 GB peak on cpu (ppo-cli plan train-ppo ... for the parts)"
    logger.start(total_steps=150, summary=panel)
    logger.log(1, {"objective/scores": 0.0237, "objective/kl": 0.0, "val/ratio": 1.0, "loss": 0.7})
    prompts = ["Tell me about a book:", "Describe a festival in a few words:"]
    logger.table(
        "samples at step 1", ["prompt", "completion", "score"], [[p, COMPLETION, 0.04] for p in prompts]
    )
    logger.finish({"steps": 150, "objective/kl_coef": 0.1215}, final_dir=tmp_path / "final")
    out = capsys.readouterr().out
    assert too_wide(out) == [], out
    assert f"ppo-cli train-{stage}" in out and f"{list(panel)[0]} " in out, out


def test_evaluate_tables_fit_80_columns(columns_80, capsys):
    from ppo_cli.evaluation.report import preview, print_results

    side = {"reward_mean": 0.09167, "reward_ci95": [-0.01292, 0.1962], "length_mean": 16.0}
    side |= {"eos_rate": 0.0, "distinct_2": 1.0}
    result = {
        "policy": side,
        "reference": side,
        "win_rate": 0.5,
        "win_rate_ci95": [0.5, 0.5],
        "kl": -0.0007534,
        "kl_ci95": [-0.001688, 0.0001813],
    }
    console = make_console()
    print_results(console, result, "policy vs reference: 64 prompts x 4 samples")
    samples = [
        {
            "sample": 0,
            "prompt": "Describe the mountain in a few words:",
            "policy": {"completion": COMPLETION * 3, "reward": 0.1667},
            "reference": {"completion": COMPLETION, "reward": 0.2},
        }
    ] * 3
    preview(console, samples, 3)
    out = capsys.readouterr().out
    assert too_wide(out) == [], out


def test_the_columns_a_user_sets_are_kept_off_a_terminal(columns_80):
    assert make_console().width == 80


def test_sample_cells_show_control_characters_and_markup_as_text(tmp_path, columns_80, capsys):
    """An untrained model's completion holds any byte: a carriage return or ESC would let the terminal
    break the box; "[/]" is text, not a closing tag."""
    logger = RunLogger(tmp_path, stage_cfg(), "ppo")
    logger.table("samples at step 1", ["prompt", "completion", "score"], [["Hi:", "a\rb\x1b[2Jc [/] d", 0.5]])
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b[2J" not in out
    assert "a\ufffdb\ufffd[2Jc [/] d" in out, out
    assert printable("tab\tand\nnewline kept\x00") == "tab\tand\nnewline kept\ufffd"


def test_generate_preview_shows_a_completion_as_written(columns_80, capsys):
    from ppo_cli.generate import preview

    preview([{"prompt": "Hi:", "completion": "a [/] b\x1b[2J c", "reward": 0.5}], 1, "completions")
    out = capsys.readouterr().out
    assert "a [/] b\ufffd[2J c" in out and too_wide(out) == [], out


# ----------------------------------------------------------------------------------------- item 12


def test_progress_lines_name_metrics_as_metrics_jsonl_does():
    from ppo_cli.logger import _bar_metrics

    shown = _bar_metrics("ppo", {"objective/scores": 0.5, "policy/clipfrac_avg": 0.0, "val/ratio": 1.0})
    assert shown == "scores=0.5 policy/clipfrac_avg=0 val/ratio=1"
    line = plain_progress_line("ppo", 2, 3, shown, 1.0, 0.5)
    assert "val/ratio=1" in line and "val_ratio" not in line


def test_start_panel_says_the_base_is_quantized(tmp_path, columns_80, capsys):
    four = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    assert (
        describe_base(stage_cfg(four).model)
        == "/tmp/tinyw/base/model (4-bit base: nf4, double quant; bitsandbytes)"
    )
    eight = stage_cfg({"load_in_8bit": True}).model
    assert describe_base(eight) == "/tmp/tinyw/base/model (8-bit base: LLM.int8; bitsandbytes)"
    assert describe_base(stage_cfg().model) == "/tmp/tinyw/base/model"
    logger = RunLogger(tmp_path, stage_cfg({**four, "bnb_4bit_compute_dtype": "bfloat16"}), "sft")
    logger.start(total_steps=1)
    out = " ".join(ANSI.sub("", capsys.readouterr().out).replace("│", " ").split())
    assert "4-bit base: nf4, double quant, compute bfloat16; bitsandbytes" in out, out


def test_export_says_where_it_wrote_and_that_the_base_is_unchanged():
    import torch

    from ppo_cli.export import written_lines

    merged = torch.nn.Linear(2, 2)
    merged.dtype = torch.float32  # a transformers model's attribute
    lines = [
        line.plain
        for line in written_lines(
            Path("/out/merged"), Path("/runs/ppo/final"), "/models/base", "CAUSAL_LM", merged
        )
    ]
    assert lines[0] == "ppo-cli export: wrote /out/merged (AutoModelForCausalLM, 6 parameters, float32)"
    assert lines[1] == (
        "  made from: the adapter /runs/ppo/final merged into a copy of the base /models/base (left unchanged)"
    )
    assert lines[2] == "  load it with: AutoModelForCausalLM.from_pretrained('/out/merged')"
    assert not any("into /models/base ->" in line for line in lines)


@pytest.fixture
def hub(monkeypatch):
    """ppo_cli.models.loading with a fresh reachability answer, HF_HUB_OFFLINE and proxies unset."""
    from ppo_cli.models import loading

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", *loading._PROXY_VARS):
        monkeypatch.delenv(name, raising=False)
    loading.hub_unreachable.cache_clear()
    yield loading
    loading.hub_unreachable.cache_clear()


def test_a_hub_name_without_network_fails_at_once_and_says_what_to_do(hub, monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert hub.hub_kwargs("nobody/no-such-model") == {"local_files_only": True}
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        hub.load_tokenizer("nobody/no-such-model")
    assert time.monotonic() - started < 20  # no minute of retries
    message = str(caught.value)
    assert "the Hub is not reachable from this machine (huggingface.co: Name or service not known)" in message
    assert "`hf download nobody/no-such-model`" in message and "HF_HUB_OFFLINE=1" in message, message


def test_hub_check_is_skipped_offline_behind_a_proxy_and_for_local_dirs(hub, monkeypatch, tmp_path):
    import socket

    def must_not_probe(*args, **kwargs):
        raise AssertionError("probed the network")

    monkeypatch.setattr(socket, "getaddrinfo", must_not_probe)
    assert hub.hub_kwargs(str(tmp_path)) == {}  # a local directory: no question of network
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.hub_unreachable() is None and hub.hub_kwargs("org/model") == {}
    hub.hub_unreachable.cache_clear()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_unreachable() is None
    said = str(hub.load_error("model", "org/model", OSError("We couldn't connect")))
    assert "HF_HUB_OFFLINE is set, so only the local Hugging Face cache is looked in" in said, said
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080")
    assert hub.hub_host() == ("mirror.local", 8080)


def test_hub_check_reaches_a_listening_host(hub, monkeypatch):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_unreachable() is None  # the real Hub path: from_pretrained as before
        assert hub.hub_kwargs("org/model") == {}


def test_command_help_opens_with_what_the_command_does():
    from conftest import run_cli_in_process

    result = run_cli_in_process("train-sft", "--help")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first == "ppo-cli train-sft: supervised fine-tuning of a LoRA adapter on a base model", first
    assert "powered by Hydra." not in result.stdout.split("== Config ==")[0]
    assert "usage: ppo-cli train-sft [hydra flags] [key=value ...]" in result.stdout
    assert "  # Peak learning rate (AdamW).\n  lr: 0.0002\n" in result.stdout  # the descriptions stay


def test_tiny_cli_pretrains_by_default_and_explains_each_argument():
    from ppo_cli.tiny.cli import parser, what_is_built
    from ppo_cli.tiny.pretrain import DEMO_PRETRAIN_STEPS

    cli = parser()
    assert cli.parse_args(["out"]).pretrain_steps == DEMO_PRETRAIN_STEPS > 0
    assert all(action.help for action in cli._actions), [a.dest for a in cli._actions if not a.help]
    assert "UNTRAINED" in what_is_built(0) and "pretrained for 300 steps" in what_is_built(300)


def _tiny_hooks():
    spec = importlib.util.spec_from_file_location("tiny_hooks", REPO / "recipes" / "tiny" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_evaluation(ppo_dir: Path) -> None:
    """train-ppo's eval.json and eval.samples.jsonl as `ppo-cli evaluate` writes them (the fields the
    report reads)."""
    side = {"reward_mean": 0.1, "eos_rate": 0.9, "distinct_2": 0.95}
    evaluation = {"n": 2, "samples_per_prompt": 1, "generation": {"temperature": 1.0}, "win_rate": 0.75}
    evaluation |= {"kl": 1.5, "policy": {**side, "reward_mean": 0.4}, "reference": side}
    ppo_dir.mkdir(parents=True)
    (ppo_dir / "eval.json").write_text(json.dumps(evaluation))
    samples = [
        {
            "sample": 0,
            "prompt": p,
            "policy": {"completion": " lovely calm [/] river"},
            "reference": {"completion": " sad road"},
        }
        for p in ("Describe the river:", "How was the road?")
    ]
    (ppo_dir / "eval.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


@pytest.mark.parametrize("estimator,name", [("gae", "PPO"), ("grpo", "GRPO"), ("rloo", "RLOO")])
def test_tiny_report_names_the_method_that_trained_the_policy(tmp_path, columns_80, capsys, estimator, name):
    hooks = _tiny_hooks()
    _fake_evaluation(tmp_path / "ppo")
    configs = {
        "sft": OmegaConf.create({"output_dir": str(tmp_path / "sft")}),
        "ppo": OmegaConf.create(
            {"output_dir": str(tmp_path / "ppo"), "ppo": {"advantage_estimator": estimator}}
        ),
    }
    hooks.report(tmp_path, configs)
    out = " ".join(ANSI.sub("", capsys.readouterr().out).replace("│", " ").split())
    assert f"SFT policy vs {name} policy" in out and f"win rate of the {name} policy" in out, out
    assert f"{name} improved the gold score" in out and "lovely calm [/] river" in out, out
    if name != "PPO":
        assert "PPO" not in out, out


def test_plots_of_a_short_run_have_whole_step_ticks():
    from ppo_cli.plots import PANELS, _draw_panel, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots()
    try:
        rows_ = [{"step": s, "episode": 32 * s, "objective/scores": 0.1 * s} for s in (1, 2, 3)]
        _draw_panel(ax, PANELS["ppo"][0], [("run", rows_)], "ppo", None)
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_plots_import_nothing_of_the_logger_and_neither_imports_matplotlib():
    code = (
        "import sys; import ppo_cli.plots; assert 'ppo_cli.logger' not in sys.modules, 'plots imports logger'; "
        "import ppo_cli.logger; assert 'matplotlib' not in sys.modules, 'matplotlib imported at start-up'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr
