"""`ppo-cli pipeline`: runs a plan's stages in this process, one after the other, and reports."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ppo_cli.app import hydra_app
from ppo_cli.dist import barrier, broadcast_object, init_distributed
from ppo_cli.errors import UserError
from ppo_cli.logger import make_console
from ppo_cli.pipeline.plan import Plan, is_complete, make_plan, record_plan, resume_command
from ppo_cli.pipeline.recipes import apply_cpu_threads, available_recipes, load_hook
from ppo_cli.ppo.final_eval import final_eval_missing

STAGE_MODULES = {"sft": "ppo_cli.sft.train", "rm": "ppo_cli.rm.train", "ppo": "ppo_cli.ppo.train"}


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_stage(stage: str, cfg: DictConfig) -> None:
    """Run one stage in this process: its Hydra app called with a composed config (Hydra passes it straight
    to the stage function, which prepares, checks and runs it exactly as `ppo-cli train-<stage>` would)."""
    module = importlib.import_module(STAGE_MODULES[stage])
    module.main(cfg)


def last_metrics(stage_dir: Path) -> dict[str, Any]:
    """The last logged value of every metric in a stage's metrics.jsonl."""
    import json

    path = stage_dir / "metrics.jsonl"
    merged: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                merged.update(json.loads(line))
            except ValueError:
                continue
    return merged


HEADLINE = {
    "sft": ("eval/loss", "loss"),
    "rm": ("eval/accuracy", "accuracy"),
    "ppo": ("objective/scores", "objective/kl"),
}


def held_out_summary(eval_json: Path) -> str:
    """train-ppo's held-out evaluation (eval.prompts), when it ran: reward of policy vs reference, win rate."""
    import json

    if not eval_json.is_file():
        return ""
    result = json.loads(eval_json.read_text())
    return (
        f"; held-out ({result['n']} prompts): reward {result['reference']['reward_mean']:.4g} -> "
        f"{result['policy']['reward_mean']:.4g}, win rate {result['win_rate']:.3f}, KL {result['kl']:.4g}"
    )


def summary_table(plan: Plan, timings: dict[str, tuple[str, float]]):
    from rich.table import Table

    table = Table(title=f"pipeline {plan.recipe.name}: {plan.run_dir}")
    for column in ("stage", "status", "time", "final/", "last metrics"):
        table.add_column(column, overflow="fold")  # a narrow terminal folds paths, never cuts them
    for stage in plan.stages:
        status, seconds = timings.get(stage, ("not run", 0.0))
        out = Path(plan.configs[stage].output_dir)
        metrics = last_metrics(out)
        shown = ", ".join(
            f"{k} {metrics[k]:.4g}" for k in HEADLINE[stage] if isinstance(metrics.get(k), int | float)
        )
        if stage == "ppo":
            shown += held_out_summary(out / "eval.json")
        table.add_row(stage, status, f"{seconds:.0f}s", str(out / "final"), shown)
    return table


def print_plan(plan: Plan) -> None:

    console = make_console()
    for stage in plan.recipe.stages:
        tag = "" if stage in plan.stages else " (not run: its final/ must exist)"
        console.rule(f"[bold]{stage}[/]{tag}")
        console.print(OmegaConf.to_yaml(plan.configs[stage]), end="", markup=False)
    console.rule()
    console.print(f"recipe {plan.recipe.name} ({plan.recipe.path}): every stage composes and validates.")


def execute(plan: Plan, overrides: list[str]) -> dict[str, tuple[str, float]]:
    """Run the plan's stages; returns {stage: (status, seconds)}."""

    console = make_console()
    timings: dict[str, tuple[str, float]] = {}
    for index, stage in enumerate(plan.stages, start=1):
        cfg = plan.configs[stage]
        out = Path(cfg.output_dir)
        header = f"[bold]pipeline {plan.recipe.name}: stage {index}/{len(plan.stages)}: {stage}[/] -> {out}"
        console.rule(header)
        if is_complete(out) and cfg.resume != "never":
            console.print(f"{stage}: {out / 'final'} is complete; skipping.")
            if stage == "ppo" and final_eval_missing(cfg):
                run_stage(
                    stage, cfg.copy()
                )  # stopped during its held-out evaluation: train-ppo only evaluates
            timings[stage] = ("skipped (complete)", 0.0)
            continue
        for needed in ("sft_checkpoint", "reward_checkpoint"):
            path = OmegaConf.select(cfg, needed, default=None)
            if path and str(path).startswith(str(plan.run_dir)) and not Path(path).is_dir():
                raise UserError(
                    f"the {stage} stage needs {needed}={path}, which does not exist: run that stage first."
                )
        start = time.perf_counter()
        try:
            run_stage(stage, cfg.copy())
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if code != 0:
                console.print(
                    f"[bold]pipeline stopped in the {stage} stage (exit code {code}).[/] Continue with:\n  "
                    f"{resume_command(plan, overrides)}",
                    soft_wrap=True,
                )
                raise
        finally:
            free_memory()
        if not is_complete(out):
            raise UserError(f"the {stage} stage ended without writing {out / 'final'}; see its output above.")
        timings[stage] = ("trained", time.perf_counter() - start)
    return timings


def run_pipeline(cfg: DictConfig, overrides: list[str]) -> Plan:
    """The pipeline command: plan, set up, run the stages, report."""

    start = time.perf_counter()  # "finished in" is the whole pipeline's time: setup and report included
    console = make_console()
    setup_args = OmegaConf.to_container(cfg.setup, resolve=True) if cfg.setup else {}
    # stages= as typed; left at its default, the recipe's own stages (a recipe may have no rm stage).
    stages = list(cfg.stages) if _given(overrides, "stages") else None
    if cfg.dry_run:
        plan = make_plan(cfg.recipe, overrides, cfg.output_dir, cfg.resume, stages, setup_args, build=False)
        print_plan(plan)
        return plan
    # Check everything before building or loading anything; then agree on one run directory (torchrun).
    plan = make_plan(cfg.recipe, overrides, cfg.output_dir, cfg.resume, stages, setup_args, build=False)
    dist = init_distributed(plan.configs[plan.stages[0]].train.device)
    run_dir = Path(broadcast_object(str(plan.run_dir), dist))
    if dist.is_main:
        record_plan(plan, overrides)
        console.rule(f"[bold]pipeline {plan.recipe.name}[/]")
        if plan.recipe.description:
            console.print(plan.recipe.description.strip())
        console.print(
            f"run directory: {run_dir}\nto continue it after a stop: {resume_command(plan, overrides)}"
        )
        plan = make_plan(cfg.recipe, overrides, run_dir, cfg.resume, stages, setup_args, build=True)
    barrier(dist)
    if not dist.is_main:
        plan = make_plan(cfg.recipe, overrides, run_dir, cfg.resume, stages, setup_args, build=False)
    apply_cpu_threads(plan.recipe)
    timings = execute(plan, overrides)
    if dist.is_main:
        console.print(summary_table(plan, timings))
        if plan.recipe.report:
            report = load_hook(plan.recipe, plan.recipe.report, "report")
            report(plan.run_dir, plan.configs, **plan.setup_args)
        minutes, seconds = divmod(round(time.perf_counter() - start), 60)
        took = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
        console.print(
            f"pipeline {plan.recipe.name} finished in {took} (setup, stages, report): {plan.run_dir}",
            soft_wrap=True,
        )
    return plan


def _given(overrides: list[str], key: str) -> bool:
    """Whether the command line sets the pipeline's own `key` (stages=..., +stages=..., ++stages=...)."""
    return any(o.lstrip("+").split("=", 1)[0] == key for o in overrides)


def task_overrides() -> list[str]:
    """The overrides of the running Hydra job, as typed."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def prepare(cfg: DictConfig) -> None:
    """Before the required-keys check: a missing recipe is an error that lists the available ones."""
    if OmegaConf.is_missing(cfg, "recipe"):
        known = ", ".join(available_recipes()) or "none found"
        raise UserError(
            f"missing required value for recipe: choose one with recipe=NAME. Available recipes: {known}."
        )


@hydra_app("pipeline", "pipeline", prepare=prepare)
def main(cfg: DictConfig) -> None:
    run_pipeline(cfg, task_overrides())
