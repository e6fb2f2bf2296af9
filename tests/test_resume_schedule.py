"""A run resumed with a longer train.max_steps follows the new length from its first resumed step: the
learning-rate schedule (train-sft, train-ppo; train-rm shares the loop) and the adaptive KL controller's
horizon (train-ppo).

The schedule cases run 2 steps with max_steps=2, remove final/ (as if the run had been killed between its
last checkpoint and final/), then resume from the step-2 checkpoint with max_steps=4. Linear decay
from 1e-3, no warmup: a 2-step schedule gives 1e-3, 5e-4; a 4-step one 1e-3, 7.5e-4, 5e-4, 2.5e-4, so
the resumed steps 3 and 4 must log 5e-4 and 2.5e-4 (the old schedule's rate after step 2 is 0).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_cli_in_process
from ppo_helpers import build_tiny_roles, make_trainer, ppo_config, read_metrics, tiny_adapters

from ppo_cli import checkpoint as ckpt
from ppo_cli import rlhf

LR_ARGS = ["train.lr=1e-3", "train.lr_scheduler=linear", "train.warmup_ratio=0", "train.log_every=1"]
EXPECTED_LR = [1e-3, 5e-4, 5e-4, 2.5e-4]


def run_then_extend(args: list[str], output_dir: Path) -> None:
    """`args` with max_steps=2, final/ removed, then resumed with max_steps=4."""
    for steps in (2, 4):
        result = run_cli_in_process(*args, f"train.max_steps={steps}", "resume=auto")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        if steps == 2:
            shutil.rmtree(output_dir / "final")
    assert "resumed at" in result.stdout and "step 2" in result.stdout


def logged_lr(output_dir: Path) -> list[float]:
    return [m["lr"] for m in read_metrics(output_dir) if "lr" in m]


@pytest.mark.parametrize(
    ("warmup", "expected"),
    [
        (0, EXPECTED_LR),
        # A warmup is a share of the run: 1 step of 2 (rates 0, 1e-3), then 2 of 4 (0, 5e-4, 1e-3, 5e-4).
        (0.5, [0.0, 1e-3, 1e-3, 5e-4]),
    ],
)
def test_sft_resumed_longer_follows_the_new_schedule_at_once(tiny, tmp_path, warmup, expected):
    out = tmp_path / "sft"
    args = [
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['sft']}",
        "data.eval_fraction=0",
        f"output_dir={out}",
        "train.batch_size=2",
        "train.eval_every=0",
        "logger.progress=false",
        "logger.plots=false",
        *LR_ARGS,
        f"train.warmup_ratio={warmup}",
    ]
    run_then_extend(args, out)
    assert logged_lr(out) == pytest.approx(expected, rel=1e-12)


def test_ppo_resumed_longer_follows_the_new_schedule_at_once(tiny, tmp_path):
    out = tmp_path / "ppo"
    args = [
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['prompts']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        f"output_dir={out}",
        "train.batch_size=4",
        "generation.max_new_tokens=4",
        "ppo.epochs=1",
        "sample_every=0",
        "logger.progress=false",
        "logger.plots=false",
        *LR_ARGS,
    ]
    run_then_extend(args, out)
    assert logged_lr(out) == pytest.approx(EXPECTED_LR, rel=1e-12)


def test_ppo_resumed_longer_keeps_the_kl_horizon_of_its_new_length(tiny, tmp_path):
    """The adaptive controller's horizon is a share of the run's episodes: a run resumed with a longer
    train.max_steps uses the horizon of its new length (the one its start-up panel shows), and only
    beta comes back from the checkpoint. (The horizon's floor of two steps' worth hides the change
    below 20 steps, so this test resumes a checkpoint in-process rather than running that long.)"""
    adapters = tiny_adapters(tiny)

    def trainer(max_steps: int):
        roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], adapters["rm"])
        overrides = (f"train.max_steps={max_steps}", "ppo.kl_controller=adaptive", "ppo.kl_horizon=null")
        cfg = ppo_config(tiny["model"], tiny["prompts"], tmp_path / "run", *overrides)
        return make_trainer(cfg, roles, tokenizer)

    short = trainer(25)
    short.kl_ctl.value = 0.123  # as if the controller had moved
    short.loop.save()
    longer = trainer(40)
    longer.run.resume_from = ckpt.latest_checkpoint(tmp_path / "run")
    longer.loop.restore()
    per_step = longer.episodes_per_step
    assert short.kl_ctl.horizon == rlhf.run_kl_horizon(25 * per_step, per_step)
    assert longer.kl_ctl.horizon == rlhf.run_kl_horizon(40 * per_step, per_step) > short.kl_ctl.horizon
    assert longer.kl_ctl.value == 0.123
