"""Run directories (issue 24, items 8 and 11): one directory holds one thing, and a run with nothing to
continue starts afresh.

- `ppo-cli pipeline output_dir=D` refuses a D that holds a stage's run (or whose D/<stage> does, without
  being a pipeline's directory), and `train-<stage> output_dir=D` refuses a D that holds a pipeline: exit 2,
  one paragraph naming D, what it holds and the command that continues it; nothing written.
- A run that stopped before its first checkpoint (a reward function that raised at step 1) reruns with
  corrected settings: it starts afresh and says so; what the earlier attempt logged is moved, with its
  config.yaml, into D/attempt-N. With a checkpoint, a changed setting is still refused.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import run_cli_in_process
from omegaconf import OmegaConf
from ppo_helpers import assert_usage_error

from ppo_cli.errors import UserError

PIPELINE_ARGS = [  # tests/test_pipeline.py's smallest tiny pipeline
    "recipe=tiny",
    "setup.pretrain_steps=0",
    "setup.report_prompts=4",
    "setup.report_samples=1",
    "all.logger.progress=false",
    "all.logger.plots=false",
    "all.train.batch_size=8",
    "sft.train.max_steps=1",
    "all.data.eval=null",
    "all.data.eval_fraction=0",
    "rm.train.max_steps=1",
    "ppo.train.max_steps=1",
    "ppo.ppo.num_minibatches=1",
    "ppo.ppo.epochs=1",
    "ppo.generation.max_new_tokens=6",
    "ppo.sample_every=0",
]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (to prove nothing was written, moved or deleted)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stage_run(root: Path, stage: str) -> Path:
    """A stopped run of `stage`: config.yaml, metrics.jsonl and a checkpoint, no final/."""
    (root / "checkpoints" / "step-000001").mkdir(parents=True)
    (root / "checkpoints" / "step-000001" / "manifest.json").write_text("{}")
    (root / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  name_or_path: base\n")
    (root / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    return root


def sft_args(tiny, out: Path, *extra: str) -> list[str]:
    return [
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['sft']}",
        f"output_dir={out}",
        "data.eval_fraction=0",
        "train.batch_size=2",
        "train.max_steps=1",
        "train.log_every=1",
        "train.save_every=1",
        "logger.progress=false",
        "logger.plots=false",
        *extra,
    ]


# ================================================================================================
# Item 8: a pipeline and a stage's run never share a directory
# ================================================================================================


def test_pipeline_refuses_a_directory_that_holds_a_train_ppo_run(tmp_path):
    run = stage_run(tmp_path / "ppo-run", "ppo")
    before = snapshot(run)
    result = run_cli_in_process("pipeline", f"output_dir={run}", *PIPELINE_ARGS)
    assert_usage_error(
        result,
        "pipeline",
        f"output_dir {run} holds a ppo run ({run}/config.yaml), not a pipeline",
        "Choose another output_dir for the pipeline",
        f"or continue that run with: ppo-cli train-ppo output_dir={run} resume=auto",
    )
    assert snapshot(run) == before  # no pipeline.yaml, no recipe assets, no stage directories


def test_pipeline_refuses_a_directory_whose_stage_directory_holds_a_run(tmp_path):
    """Not a pipeline's directory (no pipeline.yaml), but D/sft holds a train-sft run of its own: the
    pipeline would take it for its sft stage and continue it with the recipe's settings."""
    from ppo_cli.pipeline import make_plan

    root = tmp_path / "d"
    sft = stage_run(root / "sft", "sft")
    (sft / "final").mkdir()
    (sft / "final" / "ppo_cli.json").write_text("{}")
    with pytest.raises(UserError) as info:
        make_plan("tiny", [], run_dir=root)
    message = str(info.value)
    assert f"output_dir {root} is not a pipeline's directory (it has no pipeline.yaml)" in message
    assert f"{sft} holds a sft run, which the pipeline would take for its sft stage" in message
    assert f"(that run is finished: its product is {sft}/final)." in message
    # a pipeline's own directory continues as before
    (root / "pipeline.yaml").write_text("recipe: tiny\noverrides: []\n")
    assert make_plan("tiny", [], run_dir=root).run_dir == root


def test_train_sft_refuses_a_pipeline_directory(tiny, tmp_path):
    run = tmp_path / "pipeline-run"
    (run / "sft").mkdir(parents=True)
    overrides = ["recipe=tiny", f"output_dir={run}", "sft.train.max_steps=1"]
    OmegaConf.save(OmegaConf.create({"recipe": "tiny", "overrides": overrides}), run / "pipeline.yaml")
    before = snapshot(run)
    continue_pipeline = (
        "ppo-cli pipeline recipe=tiny " + shlex.quote(f"output_dir={run}") + " sft.train.max_steps=1"
    )
    needles = [
        f"output_dir {run} holds a pipeline of recipe tiny ({run}/pipeline.yaml; its sft stage runs in {run}/sft)",
        "not a sft run: a train-sft run there would mix its files with the pipeline's",
        f"output_dir={run}/sft for the pipeline's sft stage",
        f"or continue the pipeline with: {continue_pipeline}",
    ]
    assert_usage_error(run_cli_in_process(*sft_args(tiny, run)), "train-sft", *needles)
    # the same answer to a bare resume command, before the settings it lacks are asked for
    assert_usage_error(run_cli_in_process("train-sft", f"output_dir={run}"), "train-sft", *needles)
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == ["pipeline.yaml", "sft"]


def test_stage_of_another_run_names_the_command_that_continues_it(tiny, tmp_path):
    run = stage_run(tmp_path / "rm-run", "rm")
    before = snapshot(run)
    result = run_cli_in_process(*sft_args(tiny, run))
    assert_usage_error(
        result,
        "train-sft",
        f"output_dir {run} holds a rm run, not a sft run; choose another output_dir, or continue that run "
        f"with: ppo-cli train-rm output_dir={run} resume=auto",
    )
    assert snapshot(run) == before


# ================================================================================================
# Item 11: nothing to continue -> start afresh, keeping what the earlier attempt logged
# ================================================================================================


def ppo_args(tiny, out: Path, reward_fn: str) -> list[str]:
    return [
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['prompts']}",
        f"output_dir={out}",
        f"reward_fn={reward_fn}",
        "train.batch_size=4",
        "train.max_steps=1",
        "generation.max_new_tokens=6",
        "ppo.epochs=1",
        "sample_every=0",
        "logger.progress=false",
        "logger.plots=false",
    ]


def test_a_run_whose_reward_function_raised_at_step_1_reruns_with_another_one(tiny, tmp_path):
    out = tmp_path / "run"
    failed = run_cli_in_process(*ppo_args(tiny, out, "ppo_rewards:raises"))
    assert_usage_error(failed, "train-ppo", "reward_fn=ppo_rewards:raises raised RuntimeError")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # nothing to continue

    fixed = run_cli_in_process(*ppo_args(tiny, out, "ppo_cli.tiny.task:positive_reward"))
    assert fixed.returncode == 0, fixed.stdout[-2000:] + fixed.stderr[-3000:]
    line = (
        f"ppo-cli train-ppo: {out} has no checkpoint: starting afresh with the settings of its config.yaml "
        "and reward_fn=ppo_cli.tiny.task:positive_reward (was ppo_rewards:raises)."
    )
    assert [ln for ln in fixed.stdout.splitlines() if "has no checkpoint" in ln] == [line]
    assert OmegaConf.load(out / "config.yaml").reward_fn == "ppo_cli.tiny.task:positive_reward"
    assert (out / "final" / "ppo_cli.json").is_file() and not list(out.glob("attempt-*"))


def test_a_fresh_start_keeps_the_earlier_attempt_and_a_checkpoint_still_refuses_changes(tiny, tmp_path):
    out = tmp_path / "run"
    first = run_cli_in_process(*sft_args(tiny, out, "train.lr=1e-3"))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    # as if killed before its first checkpoint, after logging a step
    for path in (out / "checkpoints", out / "final"):
        shutil.rmtree(path)
    earlier = {name: (out / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}

    again = run_cli_in_process(*sft_args(tiny, out, "train.lr=2e-3"))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    kept = out / "attempt-1"
    assert (
        f"{out} has no checkpoint: starting afresh with the settings of its config.yaml and train.lr=0.002 "
        f"(was 0.001); the previous attempt is kept in {kept} (config.yaml, metrics.jsonl)." in again.stdout
    )
    assert {name: (kept / name).read_bytes() for name in earlier} == earlier
    assert OmegaConf.load(out / "config.yaml").train.lr == 2e-3
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1]

    # now there is a checkpoint to continue: a setting that changes the weights is refused, nothing moves
    before = snapshot(out)
    refused = run_cli_in_process(*sft_args(tiny, out, "train.lr=3e-3"))
    assert_usage_error(refused, "train-sft", f"output_dir {out}", "would continue with other settings")
    assert snapshot(out) == before


def test_fresh_starts_never_overwrite_an_attempt_kept_aside(tmp_path):
    """Called as the pipeline's stages call it (no command-line announcement): the line says what happens,
    and a second earlier attempt goes to attempt-2."""
    from ppo_cli.resume_config import start_afresh

    out = tmp_path / "run"
    (out / "attempt-1").mkdir(parents=True)
    (out / "attempt-1" / "metrics.jsonl").write_text("first\n")
    (out / "config.yaml").write_text("stage: sft\n")
    (out / "metrics.jsonl").write_text("second\n")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events").write_text("second")
    line = start_afresh(out)
    assert line == (
        f"{out} has no checkpoint: starting afresh with the new settings; the previous attempt is kept in "
        f"{out / 'attempt-2'} (config.yaml, metrics.jsonl, tensorboard)."
    )
    assert snapshot(out) == {
        "attempt-1/metrics.jsonl": b"first\n",
        "attempt-2/config.yaml": b"stage: sft\n",
        "attempt-2/metrics.jsonl": b"second\n",
        "attempt-2/tensorboard/events": b"second",
    }
    # a config.yaml alone (the attempt logged nothing) is replaced by the new run's: nothing to keep
    (out / "config.yaml").write_text("stage: sft\n")
    assert start_afresh(out) == f"{out} has no checkpoint: starting afresh with the new settings."
    assert not (out / "attempt-3").exists()
