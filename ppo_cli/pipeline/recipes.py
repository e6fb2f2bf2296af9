"""Recipes: folders of recipes/ (./recipes/NAME before the shipped ones), their recipe.yaml and hooks."""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ppo_cli.errors import UserError
from ppo_cli.paths import recipes_dir

STAGES = ("sft", "rm", "ppo")


RECIPE_FILE = "recipe.yaml"


# Config group under which recipes are composed: recipes/NAME/<stage>.yaml is option NAME/<stage>.
RECIPE_GROUP = "recipes"


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    # The stages this recipe has, in pipeline order (recipe.yaml `stages`; default all three). Without
    # "rm", the ppo stage is scored by a reward function (its ppo.yaml names reward_fn).
    stages: tuple[str, ...] = STAGES


def recipe_roots() -> list[Path]:
    """Folders that hold a recipes/ folder, in lookup order: the working directory, then ppo-cli's own."""
    roots = [Path.cwd(), recipes_dir().parent]
    unique: list[Path] = []
    for root in roots:
        if (root / RECIPE_GROUP).is_dir() and root.resolve() not in [r.resolve() for r in unique]:
            unique.append(root)
    return unique


def _declared_stages(path: Path) -> tuple[str, ...]:
    """The stages recipe.yaml names, or all three without it; none when it is malformed (the folder is
    then listed as a recipe, and `find_recipe` reports what is wrong with it)."""
    file = path / RECIPE_FILE
    if not file.is_file():
        return STAGES
    try:
        return recipe_stages(path, OmegaConf.load(file).get("stages"))
    except Exception:  # noqa: BLE001 - listing recipes must not fail
        return ()


def _is_recipe(path: Path) -> bool:
    return path.is_dir() and all((path / f"{stage}.yaml").is_file() for stage in _declared_stages(path))


def recipe_stages(path: Path, value) -> tuple[str, ...]:
    """recipe.yaml's `stages`: distinct stages among sft, rm, ppo, kept in pipeline order."""
    if value is None:
        return STAGES
    stages = [str(s) for s in value] if OmegaConf.is_list(value) else None
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        raise UserError(
            f"{path / RECIPE_FILE}: stages={value} must list distinct stages among {list(STAGES)} "
            "(e.g. [sft, ppo] for a recipe whose ppo stage is scored by a reward function)."
        )
    return tuple(s for s in STAGES if s in stages)


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
            known = {"description", "setup", "report", "cpu_threads", "stages"}
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
                stages=recipe_stages(path, meta.get("stages")),
            )
    raise UserError(
        f"unknown recipe '{name}'. Available recipes: {listing} (folders of {RECIPE_GROUP}/ in the working "
        f"directory or in {recipes_dir()}, each with sft.yaml, rm.yaml and ppo.yaml, or the files of the "
        "stages its recipe.yaml lists)."
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


def apply_cpu_threads(recipe: Recipe) -> None:
    """The recipe's cpu_threads (tiny models run faster on one thread, and much faster on a busy machine),
    unless the user chose with OMP_NUM_THREADS."""
    import os

    if recipe.cpu_threads and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(recipe.cpu_threads))
