"""The command line: help, Hydra flags and overrides, multirun, and one-paragraph errors (exit 2, no traceback)
for every kind of user mistake."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppo_cli.cli import COMMANDS

REPO = Path(__file__).resolve().parent.parent

SUBCOMMANDS = ["train-sft", "train-rm", "train-ppo", "pipeline", "generate", "export"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def run_many(commands: list[list[str]], cwd: Path | None = None, timeout: float = 300):
    """Run several `python -m ppo_cli ...` commands at once (they are mostly start-up time); in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ppo_cli", *args],
            cwd=cwd or REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for args in commands
    ]
    results = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str, command: str = "train-sft") -> str:
    """Exit 2, no traceback, and exactly one paragraph on stderr that names every needle."""
    everything = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{everything}"
    assert "Traceback" not in everything, everything
    paragraph = result.stderr.strip()
    assert paragraph.startswith(f"ppo-cli {command}: error: " if command else "ppo-cli: error: "), everything
    assert "\n" not in paragraph, f"more than one paragraph on stderr:\n{paragraph}"
    for needle in needles:
        assert needle in paragraph, f"{needle!r} not in: {paragraph}"
    return paragraph


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root with its modification time and bytes (to prove nothing was touched)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------- help


def _check_top_help(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in SUBCOMMANDS:
        described = [ln for ln in lines if ln.strip().startswith(name + " ")]
        assert len(described) == 1, f"{name} is not listed once with a description:\n{result.stdout}"
        assert len(described[0].split(name, 1)[1].strip()) > 10  # a real one-line description


def test_help_lists_all_subcommands():
    assert list(COMMANDS) == SUBCOMMANDS
    script = shutil.which("ppo-cli") or str(Path(sys.executable).parent / "ppo-cli")
    _check_top_help(subprocess.run([script, "--help"], capture_output=True, text=True, env=_env(), cwd=REPO))
    module, bare = run_many([["--help"], []])
    _check_top_help(module)
    _check_top_help(bare)  # no command at all: the same overview


def test_subcommand_help_shows_its_config():
    result = run_many([["train-sft", "--help"]])[0]
    assert result.returncode == 0, result.stderr
    assert "Configuration groups" in result.stdout
    assert "name_or_path: ???" in result.stdout  # the required key, shown as missing
    assert "lora: all-linear, default, full" in result.stdout


# ------------------------------------------------------------------------------------- composition


def test_cfg_job_after_the_subcommand_prints_the_composed_config():
    before, after, extra = run_many(
        [
            [
                "train-sft",
                "--cfg",
                "job",
                "model.name_or_path=some/model",
                "data.train=a.jsonl",
                "train.seed=7",
            ],
            [
                "train-sft",
                "model.name_or_path=some/model",
                "data.train=a.jsonl",
                "train.seed=7",
                "--cfg",
                "job",
            ],
            ["train-sft", "model.name_or_path=x", "data.train=y", "+new.key=1", "lora=full", "--cfg", "job"],
        ]
    )
    for result in (before, after):
        assert result.returncode == 0, result.stderr
        cfg = yaml.safe_load(result.stdout)
        assert cfg["model"]["name_or_path"] == "some/model"
        assert cfg["data"]["train"] == "a.jsonl"
        assert cfg["train"]["seed"] == 7
        assert cfg["train"]["lr"] == 2.0e-4  # conf/train_sft.yaml over the schema's default
        assert cfg["lora"]["enabled"] is True and cfg["resume"] == "auto"
        assert "hydra" not in cfg
    assert yaml.safe_load(before.stdout) == yaml.safe_load(after.stdout)

    assert extra.returncode == 0, extra.stderr
    cfg = yaml.safe_load(extra.stdout)
    assert cfg["new"] == {"key": 1}  # `+` adds a key the schema does not have
    assert cfg["lora"]["enabled"] is False  # config group option


PRECHECK_ERRORS = {
    "unknown key": (["train.foo=1"], ["train.foo", "+train.foo=1"]),
    "unknown nested key": (["lora.rank=8"], ["lora.rank"]),
    "new key without +": (["new.key=1"], ["new"]),
    "wrong type": (["train.lr=abc"], ["train.lr", "abc"]),
    "wrong type int": (["train.max_steps=1.5"], ["train.max_steps", "1.5"]),
    "unknown group option": (["model=nope"], ["model/nope", "qwen2.5-0.5b"]),
}


def test_config_errors_are_one_paragraph_exit_2(tiny):
    base = [f"model.name_or_path={tiny['model']}", f"data.train={tiny['sft']}"]
    cases = list(PRECHECK_ERRORS.items())
    results = run_many([["train-sft", *base, *overrides] for _, (overrides, _) in cases])
    for (name, (_, needles)), result in zip(cases, results):
        paragraph = assert_usage_error(result, *needles)
        assert "ppo-cli train-sft --cfg job" in paragraph, name  # says where to see the valid keys


def test_unknown_command_and_missing_required_value(tmp_path):
    unknown, missing = run_many(
        [
            ["train-sfx", "model.name_or_path=x"],
            ["train-sft", "data.train=x.jsonl", f"output_dir={tmp_path / 'run'}"],
        ]
    )
    assert_usage_error(unknown, "unknown command 'train-sfx'", *SUBCOMMANDS, command="")
    paragraph = assert_usage_error(missing, "missing required value", "model.name_or_path")
    assert "data.train" not in paragraph  # names only what is missing
    assert not (tmp_path / "run").exists()  # nothing was created


# ------------------------------------------------------------------------------ data and output_dir


def _fake_run(root: Path, stage: str) -> Path:
    """A finished-looking run directory of `stage` (what resume=never and stage checks must not touch)."""
    (root / "checkpoints" / "step-000002").mkdir(parents=True)
    (root / "final").mkdir()
    (root / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  name_or_path: base\n")
    (root / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    (root / "checkpoints" / "step-000002" / "manifest.json").write_text("{}")
    (root / "final" / "ppo_cli.json").write_text(json.dumps({"stage": stage}))
    (root / "final" / "adapter_config.json").write_text("{}")
    return root


def test_data_and_output_dir_errors(tiny, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": oops}\n')
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"prompt": "a", "completion": " b"}\n' * 2 + '{"prompt": "a", "answer": " b"}\n')
    rm_run = _fake_run(tmp_path / "rm_run", "rm")
    sft_run = _fake_run(tmp_path / "sft_run", "sft")
    before = {run: snapshot(run) for run in (rm_run, sft_run)}

    model = f"model.name_or_path={tiny['model']}"
    train = f"data.train={tiny['sft']}"
    out = f"output_dir={tmp_path / 'out'}"
    missing_file, not_json, missing_field, missing_eval, other_stage, never = run_many(
        [
            ["train-sft", model, f"data.train={tmp_path / 'absent.jsonl'}", out],
            ["train-sft", model, f"data.train={bad_json}", out],
            ["train-sft", model, f"data.train={no_field}", out],
            ["train-sft", model, train, f"data.eval={tmp_path / 'absent_eval.jsonl'}", out],
            ["train-sft", model, train, f"output_dir={rm_run}"],
            ["train-sft", model, train, f"output_dir={sft_run}", "resume=never"],
        ]
    )
    assert_usage_error(missing_file, "data.train", str(tmp_path / "absent.jsonl"), "not found")
    assert_usage_error(not_json, str(bad_json), "line 2", "not valid JSON")
    assert_usage_error(missing_field, str(no_field), "row 3", "'completion'")
    assert_usage_error(missing_eval, "data.eval", "absent_eval.jsonl", "not found")
    assert_usage_error(other_stage, str(rm_run), "rm run", "sft run")
    assert_usage_error(never, str(sft_run), "resume=never", "resume=auto")
    assert not (tmp_path / "out").exists()  # a data error leaves no half-made run behind
    for run, files in before.items():
        assert snapshot(run) == files, f"{run} was modified"


# ------------------------------------------------------------------------------------------ multirun


def test_multirun_runs_one_job_per_value(tiny, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(Path(tiny["sft_eval"]).read_text().splitlines(keepends=True)[:4]))
    result = run_many(
        [
            [
                "train-sft",
                "-m",
                f"model.name_or_path={tiny['model']}",
                f"data.train={tiny['sft']}",
                f"data.eval={eval_file}",
                "train.max_steps=1",
                "train.batch_size=2",
                "train.seed=1,2",
                f"output_dir={tmp_path}/runs/${{train.seed}}",
                "logger.progress=false",
            ]
        ],
        cwd=tmp_path,
    )[0]
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["1", "2"]
    adapters = []
    for seed in (1, 2):
        run = tmp_path / "runs" / str(seed)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["train"]["seed"] == seed and cfg["output_dir"] == str(run)
        assert (run / "final" / "adapter_model.safetensors").is_file()
        assert (run / "checkpoints" / "step-000001" / "manifest.json").is_file()
        adapters.append((run / "final" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] != adapters[1]  # each job trained with its own seed


@pytest.mark.parametrize("flag", ["--cfg", "-c"])
def test_precheck_still_runs_with_cfg_flag(flag):
    result = run_many([["train-sft", flag, "job", "train.foo=1"]])[0]
    assert_usage_error(result, "train.foo")
