"""`ppo-cli pipeline recipe=NAME [OVERRIDES]`: sft -> rm -> ppo of a recipe in one run directory.

A recipe is a folder `recipes/NAME/` with `sft.yaml`, `rm.yaml`, `ppo.yaml` (each a Hydra config with
`# @package _global_`, composed on top of `conf/train_<stage>.yaml`), a README, and optionally
`recipe.yaml` naming a `setup` hook (builds or downloads what the stages read, returns per-stage overrides)
and a `report` hook (runs after the last stage). `./recipes/NAME` is looked up before the shipped recipes.

Overrides, one command line for three stages:

    recipe=NAME output_dir=DIR resume=auto|never stages=[sft,rm] dry_run=true   the pipeline itself
    sft.KEY=VALUE  rm.KEY=VALUE  ppo.KEY=VALUE     one stage: `sft.train.max_steps=10` is train-sft's
                                                   `train.max_steps=10`; also +sft.KEY=V, sft.GROUP=OPTION
                                                   (e.g. sft.lora=all-linear)
    all.KEY=VALUE                                  every stage (applied before the per-stage ones)
    setup.KEY=VALUE                                an argument of the recipe's setup hook

Each stage's config is, in increasing priority: conf/train_<stage>.yaml, recipes/NAME/<stage>.yaml, the
setup hook's overrides, all.*, <stage>.*. Then the pipeline fills what chains the stages, unless the
recipe or the user set it: output_dir = RUN/<stage>, resume, rm/ppo sft_checkpoint = the SFT stage's
final/, ppo reward_checkpoint = the RM stage's final/ (unless reward_fn is set). rm and ppo take their
base model from sft_checkpoint, as when run alone.

Stages run in this process, one after the other (see `run_stage`): the composed config object is what
runs, with no second composition in a subprocess that could disagree with the checks done here. A stage
whose final/ is complete is skipped; an interrupted one resumes from its newest checkpoint
(resume=auto), so rerunning the same command with output_dir=RUN continues a stopped pipeline.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import inspect
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ppo_cli.app import describe_composition_error, hydra_app, missing_required, reject_unknown_keys
from ppo_cli.errors import UserError
from ppo_cli.paths import conf_dir, recipes_dir

STAGES = ("sft", "rm", "ppo")
STAGE_MODULES = {"sft": "ppo_cli.train_sft", "rm": "ppo_cli.train_rm", "ppo": "ppo_cli.train_ppo"}
RECIPE_FILE = "recipe.yaml"
PLAN_FILE = "pipeline.yaml"
PRODUCT_FILE = "ppo_cli.json"
# Config group under which recipes are composed: recipes/NAME/<stage>.yaml is option NAME/<stage>.
RECIPE_GROUP = "recipes"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ROUTED = re.compile(r"^(~|\+\+|\+)?(sft|rm|ppo|all)\.(.+)$", re.DOTALL)
# Keys a stage may leave unset because the stage fills them itself at run time from sft_checkpoint.
_FILLED_AT_RUN_TIME = {"model.name_or_path"}


# ---------------------------------------------------------------------------------------------
# Recipes


@dataclass
class Recipe:
    name: str
    # recipes/NAME/
    path: Path
    # The folder holding recipes/ (added to Hydra's search path).
    root: Path
    description: str = ""
    # "package.module:function" or "file.py:function" (relative to the recipe folder).
    setup: str | None = None
    report: str | None = None
    # torch's CPU threads while the stages run (null = torch's default; OMP_NUM_THREADS, if set, wins).
    cpu_threads: int | None = None


def recipe_roots() -> list[Path]:
    """Folders that hold a recipes/ folder, in lookup order: the working directory, then ppo-cli's own."""
    roots = [Path.cwd(), recipes_dir().parent]
    unique: list[Path] = []
    for root in roots:
        if (root / RECIPE_GROUP).is_dir() and root.resolve() not in [r.resolve() for r in unique]:
            unique.append(root)
    return unique


def _is_recipe(path: Path) -> bool:
    return path.is_dir() and all((path / f"{stage}.yaml").is_file() for stage in STAGES)


def available_recipes() -> list[str]:
    names: list[str] = []
    for root in recipe_roots():
        for child in sorted((root / RECIPE_GROUP).iterdir()):
            if _is_recipe(child) and child.name not in names:
                names.append(child.name)
    return names


def find_recipe(name: str) -> Recipe:
    known = available_recipes()
    listing = ", ".join(known) if known else "none found"
    if not _NAME.match(name or ""):
        raise UserError(f"recipe={name} is not a recipe name (letters, digits, . _ -). Available: {listing}.")
    for root in recipe_roots():
        path = root / RECIPE_GROUP / name
        if _is_recipe(path):
            meta = (
                OmegaConf.load(path / RECIPE_FILE) if (path / RECIPE_FILE).is_file() else OmegaConf.create()
            )
            known = {"description", "setup", "report", "cpu_threads"}
            unknown = set(meta.keys()) - known
            if unknown:
                raise UserError(
                    f"{path / RECIPE_FILE}: unknown keys {sorted(unknown)} (known: {sorted(known)})."
                )
            return Recipe(
                name=name,
                path=path,
                root=root,
                description=str(meta.get("description") or ""),
                setup=meta.get("setup"),
                report=meta.get("report"),
                cpu_threads=meta.get("cpu_threads"),
            )
    raise UserError(
        f"unknown recipe '{name}'. Available recipes: {listing} (folders of {RECIPE_GROUP}/ in the working "
        f"directory or in {recipes_dir()}, each with sft.yaml, rm.yaml and ppo.yaml)."
    )


def load_hook(recipe: Recipe, spec: str, what: str):
    """A recipe hook: `package.module:function`, or `file.py:function` next to the recipe's configs."""
    if ":" not in spec:
        raise UserError(
            f"{recipe.path / RECIPE_FILE}: {what}={spec} must be module:function or file.py:function."
        )
    target, func_name = spec.split(":", 1)
    if target.endswith(".py"):
        file = recipe.path / target
        if not file.is_file():
            raise UserError(f"{recipe.path / RECIPE_FILE}: {what} file {file} not found.")
        module_spec = importlib.util.spec_from_file_location(
            f"ppo_cli_recipe_{recipe.name}_{file.stem}", file
        )
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{recipe.path / RECIPE_FILE}: {what}={spec}: no function '{func_name}'.")
    return func


# ---------------------------------------------------------------------------------------------
# Overrides and composition


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
    # The composed config of each of the three stages (also of those not run: their output_dir and
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
    """Find the recipe, run its setup hook (building its assets when `build`), compose and check the three
    stage configs. Raises UserError for anything wrong, before any model loads."""
    recipe = find_recipe(recipe_name)
    stages = list(STAGES if stages is None else stages)
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages or len(set(stages)) != len(stages):
        raise UserError(f"stages={stages}: choose distinct stages among {list(STAGES)}.")
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

    configs: dict[str, DictConfig] = {}
    for stage in STAGES:
        stage_overrides = [*setup_overrides.get(stage, []), *routed["all"], *routed[stage]]
        shown = [o for o in overrides if _ROUTED.match(o) and _ROUTED.match(o).group(2) in ("all", stage)]
        cfg = compose_stage(recipe, stage, stage_overrides, shown)
        user_keys = _override_keys([*routed["all"], *routed[stage]])
        if "output_dir" not in user_keys:
            cfg.output_dir = str(run_dir / stage)
        if "resume" not in user_keys:
            cfg.resume = resume
        if stage in ("rm", "ppo") and not cfg.sft_checkpoint:
            cfg.sft_checkpoint = str(Path(configs["sft"].output_dir) / "final")
        if stage == "ppo" and not cfg.reward_checkpoint and not cfg.reward_fn:
            cfg.reward_checkpoint = str(Path(configs["rm"].output_dir) / "final")
        configs[stage] = cfg
    for stage in stages:
        check_stage(recipe, stage, configs[stage])
    return Plan(recipe, run_dir, stages, configs, setup_args)


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


# ---------------------------------------------------------------------------------------------
# Running


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / "final" / PRODUCT_FILE).is_file()


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


def resume_command(plan: Plan, overrides: list[str]) -> str:
    """The command that continues this run (shell-quoted)."""
    import shlex

    kept = [o for o in overrides if not o.startswith(("output_dir=", "recipe="))]
    args = [f"recipe={plan.recipe.name}", f"output_dir={plan.run_dir}", *kept]
    return "ppo-cli pipeline " + " ".join(shlex.quote(a) for a in args)


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
        table.add_row(stage, status, f"{seconds:.0f}s", str(out / "final"), shown)
    return table


def print_plan(plan: Plan) -> None:
    from ppo_cli.logger import make_console

    console = make_console()
    for stage in STAGES:
        tag = "" if stage in plan.stages else " (not run: its final/ must exist)"
        console.rule(f"[bold]{stage}[/]{tag}")
        console.print(OmegaConf.to_yaml(plan.configs[stage]), end="", markup=False)
    console.rule()
    console.print(f"recipe {plan.recipe.name} ({plan.recipe.path}): every stage composes and validates.")


def execute(plan: Plan, overrides: list[str]) -> dict[str, tuple[str, float]]:
    """Run the plan's stages; returns {stage: (status, seconds)}."""
    from ppo_cli.logger import make_console

    console = make_console()
    timings: dict[str, tuple[str, float]] = {}
    for index, stage in enumerate(plan.stages, start=1):
        cfg = plan.configs[stage]
        out = Path(cfg.output_dir)
        header = f"[bold]pipeline {plan.recipe.name}: stage {index}/{len(plan.stages)}: {stage}[/] -> {out}"
        console.rule(header)
        if is_complete(out) and cfg.resume != "never":
            console.print(f"{stage}: {out / 'final'} is complete; skipping.")
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


def apply_cpu_threads(recipe: Recipe) -> None:
    """The recipe's cpu_threads (tiny models run faster on one thread, and much faster on a busy machine),
    unless the user chose with OMP_NUM_THREADS."""
    import os

    if recipe.cpu_threads and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(recipe.cpu_threads))


def run_pipeline(cfg: DictConfig, overrides: list[str]) -> Plan:
    """The pipeline command: plan, set up, run the stages, report."""
    from ppo_cli.dist import barrier, broadcast_object, init_distributed
    from ppo_cli.logger import make_console

    console = make_console()
    setup_args = OmegaConf.to_container(cfg.setup, resolve=True) if cfg.setup else {}
    stages = list(cfg.stages)
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
    start = time.perf_counter()
    timings = execute(plan, overrides)
    if dist.is_main:
        console.print(summary_table(plan, timings))
        if plan.recipe.report:
            report = load_hook(plan.recipe, plan.recipe.report, "report")
            report(plan.run_dir, plan.configs, **plan.setup_args)
        console.print(
            f"pipeline {plan.recipe.name} finished in {time.perf_counter() - start:.0f}s: {plan.run_dir}"
        )
    return plan


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


if __name__ == "__main__":
    sys.exit(main())
