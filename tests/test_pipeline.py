"""`ppo-cli pipeline` end to end on the tiny recipe with very few steps: a run killed during the RM stage
continues where it stopped, and a finished run is skipped stage by stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

RM_STEPS = 12


def pipeline_args(run: Path) -> list[str]:
    return [
        "recipe=tiny",
        f"output_dir={run}",
        # a random-init base (no pretraining) and a small report: plumbing, not quality
        "setup.pretrain_steps=0",
        "setup.report_prompts=4",
        "setup.report_samples=1",
        "all.logger.progress=false",
        "all.logger.plots=false",
        "all.train.batch_size=8",
        "sft.train.max_steps=3",
        "all.data.eval=null",
        "all.data.eval_fraction=0",
        f"rm.train.max_steps={RM_STEPS}",
        "rm.train.save_every=1",
        "rm.train.log_every=1",
        "ppo.train.max_steps=2",
        "ppo.ppo.num_minibatches=1",
        "ppo.ppo.epochs=1",
        "ppo.generation.max_new_tokens=6",
        "ppo.sample_every=0",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def _checkpoints(stage_dir: Path) -> list[Path]:
    return sorted(p for p in (stage_dir / "checkpoints").glob("step-*") if (p / "manifest.json").is_file())


def _train_steps(stage_dir: Path) -> list[int]:
    """Steps of the training-metric lines of metrics.jsonl (eval-only lines left out)."""
    lines = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "loss" in line]


def test_pipeline_resumes_after_a_kill_and_skips_finished_stages(cli, tmp_path):
    run = tmp_path / "run"
    args = pipeline_args(run)

    # 1. Kill the pipeline (SIGKILL: no chance to clean up) once the RM stage has written a checkpoint.
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppo_cli", "pipeline", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 400
    try:
        while not _checkpoints(run / "rm") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the pipeline ended before it could be killed:\n{proc.stdout.read()}"
        assert _checkpoints(run / "rm"), "no RM checkpoint appeared in time"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        first_output = proc.communicate(timeout=60)[0]
    assert (run / "sft" / "final" / "ppo_cli.json").is_file(), first_output
    assert not (run / "rm" / "final").exists() and not (run / "ppo").exists()
    assert (run / "pipeline.yaml").is_file() and (run / "tiny" / "model" / "config.json").is_file()
    killed_at = int(_checkpoints(run / "rm")[-1].name.split("-")[1])

    # 2. The same command continues: SFT is skipped, the RM resumes from its checkpoint, PPO and the report run.
    second = cli("pipeline", *args, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "sft/final is complete; skipping" in second.stdout
    assert "resumed at" in second.stdout
    for stage in ("sft", "rm", "ppo"):
        assert (run / stage / "final" / "ppo_cli.json").is_file()
    # every step logged once: what the killed run logged after its last checkpoint was dropped on resume
    assert killed_at < RM_STEPS and _train_steps(run / "rm") == list(range(1, RM_STEPS + 1))
    # The report is train-ppo's held-out evaluation (eval.prompts, set by the recipe) plus the gold metric.
    report = json.loads((run / "report.json").read_text())
    evaluation = json.loads((run / "ppo" / "eval.json").read_text())
    assert {"gold_score", "rm_reward", "kl_to_sft"} <= set(report["ppo"]) and report["sft"]["kl_to_sft"] == 0
    assert evaluation["n"] == 4 and evaluation["samples_per_prompt"] == 1
    assert report["ppo"]["rm_reward"] == evaluation["policy"]["reward_mean"]
    assert report["sft"]["rm_reward"] == evaluation["reference"]["reward_mean"]
    assert report["ppo"]["kl_to_sft"] == evaluation["kl"] and report["win_rate"] == evaluation["win_rate"]
    assert "gold score" in second.stdout and "SFT" in second.stdout and "PPO" in second.stdout
    assert "held-out (4 prompts)" in second.stdout  # the summary table's ppo row
    rm_final = (run / "rm" / "final" / "adapter_model.safetensors").stat().st_mtime_ns

    # 3. Once more, after losing the evaluation (as a kill during it would): every stage is complete, nothing
    # trains again, and the missing evaluation is made.
    (run / "ppo" / "eval.json").unlink()
    third = cli("pipeline", *args, timeout=600)
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.count("is complete; skipping") == 3
    assert (run / "rm" / "final" / "adapter_model.safetensors").stat().st_mtime_ns == rm_final
    assert json.loads((run / "ppo" / "eval.json").read_text()) == evaluation


def test_unknown_recipe_exits_2_listing_the_recipes(capsys, monkeypatch):
    from ppo_cli import cli

    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the dispatcher hands its arguments to Hydra via sys.argv
    with pytest.raises(SystemExit) as exc:
        cli.main(["pipeline", "recipe=nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "tiny" in err and "pythia-1b-tldr" in err


def test_recipe_without_rm_stage_runs_sft_then_ppo(cli, tmp_path):
    """tiny-grpo (stages [sft, ppo], GRPO on the task's reward function), shortened: no rm/ is made, and
    a rerun skips both complete stages."""
    run = tmp_path / "run"
    args = [
        "recipe=tiny-grpo",
        f"output_dir={run}",
        "setup.pretrain_steps=0",
        "setup.report_prompts=4",
        "setup.report_samples=1",
        "all.logger.progress=false",
        "all.logger.plots=false",
        "all.train.batch_size=8",
        "all.data.eval=null",
        "all.data.eval_fraction=0",
        "sft.train.max_steps=2",
        "ppo.train.max_steps=2",
        "ppo.generation.max_new_tokens=6",
        "ppo.sample_every=0",
    ]
    first = cli("pipeline", *args, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stage 2/2: ppo" in first.stdout
    for stage in ("sft", "ppo"):
        assert (run / stage / "final" / "ppo_cli.json").is_file()
    assert not (run / "rm").exists()
    report = json.loads((run / "report.json").read_text())
    assert "gold_score" in report["ppo"] and "rm_reward" not in report["ppo"]

    again = cli("pipeline", *args, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("is complete; skipping") == 2
