"""Where the shipped `conf/` and `recipes/` folders are.

A wheel ships them inside the package (pyproject's force-include); a source checkout or an editable
install has them at the top of the repository, next to the package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    inside = _PACKAGE / name
    return inside if inside.is_dir() else _PACKAGE.parent / name


def conf_dir() -> Path:
    """The folder of Hydra configs (train_sft.yaml, model/, lora/, ...)."""
    return _shipped("conf")


def recipes_dir() -> Path:
    """The folder of end-to-end recipes (one sub-folder per recipe)."""
    return _shipped("recipes")
