"""Tokenizer, model and data built together into one folder, and not rebuilt when an identical build is there."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from ppo_cli.tiny.data import write_task_data
from ppo_cli.tiny.models import build_tiny_model
from ppo_cli.tiny.tokenizer import build_tokenizer

# Bump when the generated artefacts change, so that cached builds from older code are rebuilt.
BUILD_VERSION = 1
_STAMP = "tiny_build.json"
_DATA_NAMES = ("sft", "sft_eval", "prefs", "prefs_eval", "prompts", "prompts_eval", "sft_messages")


def _build_args(arch: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The full argument set of a build, defaults filled in, so equal builds compare equal however called."""
    params = inspect.signature(build_tiny_model).bind("<out_dir>", arch=arch, **model_kwargs)
    params.apply_defaults()
    args = dict(params.arguments)
    del args["out_dir"], args["tokenizer"]
    return {"version": BUILD_VERSION, **args}


def build_all(out_dir: str | Path, arch: str = "llama", **model_kwargs: Any) -> dict[str, Path]:
    """Build tokenizer + model (out_dir/model) + data (out_dir/data); return their paths.

    Returns {"root", "model", "data", and one key per data file (see write_task_data)}. If out_dir holds a
    finished build with the same arguments, nothing is rebuilt. `model_kwargs` go to build_tiny_model
    (hidden_size, num_layers, num_heads, seed, pretrain_steps, vocab_multiple).
    """
    if "tokenizer" in model_kwargs:
        raise TypeError("build_all builds its own tokenizer; do not pass one")
    out_dir = Path(out_dir)
    model_dir, data_dir = out_dir / "model", out_dir / "data"
    paths: dict[str, Path] = {"root": out_dir, "model": model_dir, "data": data_dir}
    paths.update({name: data_dir / f"{name}.jsonl" for name in _DATA_NAMES})

    args = _build_args(arch, model_kwargs)
    stamp = out_dir / _STAMP
    if _is_cached(stamp, args, paths):
        return paths

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    build_tiny_model(model_dir, arch=arch, tokenizer=build_tokenizer(), **model_kwargs)
    write_task_data(data_dir)
    stamp.write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")  # written last: marks the build done
    return paths


def _is_cached(stamp: Path, args: dict[str, Any], paths: dict[str, Path]) -> bool:
    """True if a finished build with exactly `args` is already on disk."""
    if not stamp.is_file() or not (paths["model"] / "config.json").is_file():
        return False
    try:
        if json.loads(stamp.read_text()) != args:
            return False
    except json.JSONDecodeError:
        return False
    return all(paths[name].is_file() for name in _DATA_NAMES)
