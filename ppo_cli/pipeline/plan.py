"""The pipeline's plan: one command line routed to three stage configs, composed and checked before
anything runs, and the run directory that chains the stages."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ppo_cli.app import describe_composition_error, missing_required, reject_unknown_keys
from ppo_cli.errors import UserError
from ppo_cli.models.products import PRODUCT_FILE
from ppo_cli.paths import conf_dir
from ppo_cli.pipeline.recipes import RECIPE_FILE, RECIPE_GROUP, STAGES, Recipe, find_recipe, load_hook
from ppo_cli.resume_config import (
    PIPELINE_MARKER,
    pipeline_resume_command,
    run_description,
    saved_stage,
)

PLAN_FILE = PIPELINE_MARKER  # marks a directory as a pipeline's (train-* refuses it as an output_dir)


_ROUTED = re.compile(r"^(~|\+\+|\+)?(sft|rm|ppo|all)\.(.+)$", re.DOTALL)


# Keys a stage may leave unset because the stage fills them itself at run time from sft_checkpoint.
_FILLED_AT_RUN_TIME = {"model.name_or_path"}


def route_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """Split the pipeline's command-line overrides into per-stage ones ('all' for every stage).

    `sft.train.max_steps=10` -> sft: `train.max_steps=10`; `+ppo.foo=1` -> ppo: `+foo=1`. The value is
    kept verbatim (quoting and all). Other overrides (recipe=, output_dir=, setup.*) are the pipeline's.
    """
    routed: dict[str, list[str]] = {name: [] for name in (*STAGES, "all")}
    for line in overrides:
        match = _ROUTED.match(line)
        if match:
            prefix, target, rest = match.groups()
            routed[target].append(f"{prefix or ''}{rest}")
    return routed


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_stage(
    recipe: Recipe, stage: str, overrides: list[str], shown: list[str] | None = None
) -> DictConfig:
    """conf/train_<stage>.yaml + recipes/NAME/<stage>.yaml + overrides, as Hydra composes it. `shown` are
    the overrides as the user typed them, for the error message."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ppo_cli.config import register_configs

    register_configs()
    hydra_overrides = [
        f"hydra.searchpath=[{_quote('file://' + str(recipe.root.resolve()))}]",
        f"+{RECIPE_GROUP}={recipe.name}/{stage}",
        *overrides,
    ]
    given = f" with {' '.join(shown)}" if shown else ""
    where = f"the {stage} stage of recipe {recipe.name} ({recipe.path / (stage + '.yaml')}{given})"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=f"train_{stage}", overrides=hydra_overrides)
    except Exception as exc:  # noqa: BLE001 - every composition failure is a user error
        message = describe_composition_error(exc, f"train-{stage}", key_prefix=f"{stage}.")
        raise UserError(f"{where} does not compose: {message}") from exc
    finally:
        GlobalHydra.instance().clear()
    try:
        reject_unknown_keys(cfg, f"train-{stage}", key_prefix=f"{stage}.")
    except UserError as exc:
        raise UserError(f"{where} does not compose: {exc}") from exc
    return cfg


def _override_keys(overrides: list[str]) -> set[str]:
    keys = set()
    for line in overrides:
        key = line.lstrip("~+").split("=", 1)[0].split("@", 1)[0]
        keys.add(key)
    return keys


@dataclass
class Plan:
    recipe: Recipe
    run_dir: Path
    stages: list[str]
    # The composed config of each of the recipe's stages (also of those not run: their output_dir and
    # final/ are what later stages read).
    configs: dict[str, DictConfig]
    setup_args: dict[str, Any]


def default_run_dir(recipe_name: str) -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return Path("outputs") / "pipeline" / f"{recipe_name}-{stamp}"


def make_plan(
    recipe_name: str,
    overrides: list[str],
    run_dir: str | Path | None = None,
    resume: str = "auto",
    stages: list[str] | None = None,
    setup_args: dict[str, Any] | None = None,
    build: bool = False,
) -> Plan:
    """Find the recipe, run its setup hook (building its assets when `build`), compose and check the
    recipe's stage configs (`stages` None = all of them). Raises UserError for anything wrong, before any
    model loads."""
    recipe = find_recipe(recipe_name)
    stages = list(recipe.stages if stages is None else stages)
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages or len(set(stages)) != len(stages):
        raise UserError(f"stages={stages}: choose distinct stages among {list(STAGES)}.")
    absent = [s for s in stages if s not in recipe.stages]
    if absent:
        raise UserError(
            f"stages={stages}: recipe {recipe.name} has no {', '.join(absent)} stage ({_stages_of(recipe)})."
        )
    stages = [s for s in STAGES if s in stages]  # always in pipeline order
    if resume not in ("auto", "never"):
        raise UserError(f"resume={resume} is not one of auto, never (the pipeline resumes per stage).")
    run_dir = Path(run_dir) if run_dir else default_run_dir(recipe.name)
    setup_args = dict(setup_args or {})
    setup_overrides: dict[str, list[str]] = {}
    if recipe.setup:
        hook = load_hook(recipe, recipe.setup, "setup")
        try:
            inspect.signature(hook).bind(run_dir, build=build, **setup_args)
        except TypeError as exc:
            raise UserError(
                f"recipe {recipe.name}: setup.* arguments {setup_args} not accepted: {exc}"
            ) from exc
        setup_overrides = hook(run_dir, build=build, **setup_args) or {}
    elif setup_args:
        raise UserError(
            f"recipe {recipe.name} has no setup hook, so setup.* overrides {setup_args} mean nothing."
        )
    routed = route_overrides(overrides)
    for stage in STAGES:
        if routed[stage] and stage not in recipe.stages:
            given = " ".join(o for o in overrides if _ROUTED.match(o) and _ROUTED.match(o).group(2) == stage)
            raise UserError(
                f"recipe {recipe.name} has no {stage} stage ({_stages_of(recipe)}), so {given} means nothing."
            )

    configs: dict[str, DictConfig] = {}
    for stage in recipe.stages:
        stage_overrides = [*setup_overrides.get(stage, []), *routed["all"], *routed[stage]]
        shown = [o for o in overrides if _ROUTED.match(o) and _ROUTED.match(o).group(2) in ("all", stage)]
        cfg = compose_stage(recipe, stage, stage_overrides, shown)
        user_keys = _override_keys([*routed["all"], *routed[stage]])
        if "output_dir" not in user_keys:
            cfg.output_dir = str(run_dir / stage)
        if "resume" not in user_keys:
            cfg.resume = resume
        if stage in ("rm", "ppo") and not cfg.sft_checkpoint and "sft" in configs:
            cfg.sft_checkpoint = str(Path(configs["sft"].output_dir) / "final")
        if stage == "ppo" and not cfg.reward_checkpoint and not cfg.reward_fn:
            if "rm" not in configs:
                raise UserError(
                    f"recipe {recipe.name} has no rm stage ({_stages_of(recipe)}), so its ppo stage needs a "
                    f"reward function: set reward_fn in {recipe.path / 'ppo.yaml'} (or on the command line, "
                    "ppo.reward_fn=module:function)."
                )
            cfg.reward_checkpoint = str(Path(configs["rm"].output_dir) / "final")
        configs[stage] = cfg
    for stage in stages:
        check_stage(recipe, stage, configs[stage])
    check_run_dir(run_dir, {stage: Path(configs[stage].output_dir) for stage in stages})
    return Plan(recipe, run_dir, stages, configs, setup_args)


def _stages_of(recipe: Recipe) -> str:
    """Where a recipe's stages come from, for error messages."""
    return f"{recipe.path / RECIPE_FILE} lists stages [{', '.join(recipe.stages)}]"


def check_stage(recipe: Recipe, stage: str, cfg: DictConfig) -> None:
    """Every required key is set, except those the stage fills from sft_checkpoint at run time."""
    missing = missing_required(cfg)
    if stage in ("rm", "ppo") and cfg.sft_checkpoint:
        missing = [k for k in missing if k not in _FILLED_AT_RUN_TIME]
    if missing:
        hints = ", ".join(f"{stage}.{k}=..." for k in missing)
        raise UserError(
            f"recipe {recipe.name} leaves {', '.join(missing)} of the {stage} stage unset; set them in "
            f"{recipe.path / (stage + '.yaml')} or on the command line ({hints})."
        )


def check_run_dir(run_dir: Path, stage_dirs: dict[str, Path]) -> None:
    """A pipeline's directory holds its pipeline.yaml, the recipe's assets and a directory per stage. Refuse
    one that is not a pipeline's but holds a stage's run: the pipeline would write its stages beside that
    run, or take it for one of its stages and continue it with the recipe's settings."""
    if (run_dir / PLAN_FILE).is_file():
        return  # this pipeline's directory: rerunning continues it (record_plan checks the recipe)
    stage = saved_stage(run_dir)
    if stage is not None:
        what, hint = run_description(run_dir, stage)
        raise UserError(
            f"output_dir {run_dir} holds {what} ({run_dir / 'config.yaml'}), not a pipeline: the pipeline "
            f"would write its stages into it beside that run. Choose another output_dir for the "
            f"pipeline{hint}"
        )
    for stage, stage_dir in stage_dirs.items():
        existing = saved_stage(stage_dir)
        if stage_dir == run_dir / stage and existing is not None:
            what, hint = run_description(stage_dir, existing)
            raise UserError(
                f"output_dir {run_dir} is not a pipeline's directory (it has no {PLAN_FILE}), but "
                f"{stage_dir} holds {what}, which the pipeline would take for its {stage} stage. Choose "
                f"another output_dir for the pipeline{hint}"
            )


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / "final" / PRODUCT_FILE).is_file()


def resume_command(plan: Plan, overrides: list[str]) -> str:
    """The command that continues this run (shell-quoted)."""
    return pipeline_resume_command(plan.recipe.name, plan.run_dir, overrides)


def record_plan(plan: Plan, overrides: list[str]) -> None:
    """RUN/pipeline.yaml: the recipe and overrides of the run; a rerun must use the same recipe."""
    path = plan.run_dir / PLAN_FILE
    if path.is_file():
        previous = OmegaConf.load(path)
        if previous.get("recipe") != plan.recipe.name:
            raise UserError(
                f"output_dir={plan.run_dir} holds a pipeline of recipe {previous.get('recipe')}, not "
                f"{plan.recipe.name}; choose another output_dir."
            )
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"recipe": plan.recipe.name, "recipe_dir": str(plan.recipe.path), "overrides": overrides}
    OmegaConf.save(OmegaConf.create(record), path)
