"""`reward_fn=package.module:function(prompts, completions) -> list[float]`: a Python reward function,
called once per batch in TRL's form (strings, or conversations for conversation prompts:
`reward_function_inputs`)."""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from ppo_cli.errors import UserError


def load_reward_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    if ":" not in spec:
        raise UserError(f"reward_fn={spec}: expected the form package.module:function.")
    module_name, func_name = spec.split(":", 1)
    # Like `python -m`, a module in the current directory is found (console scripts do not put it on the path).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise UserError(
            f"reward_fn={spec}: cannot import module '{module_name}' ({type(exc).__name__}: {exc})."
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"reward_fn={spec}: module '{module_name}' has no function '{func_name}'.")
    return func


def reward_function_inputs(prompts: list[Any], completions: list[str]) -> tuple[list[Any], list[Any]]:
    """TRL's reward-function convention: a text prompt and its completion stay strings; a conversation
    prompt stays its list of {role, content} messages and its completion becomes
    `[{"role": "assistant", "content": text}]`, so a function written for TRL's GRPOTrainer works here."""
    shaped = [
        c if isinstance(p, str) else [{"role": "assistant", "content": c}]
        for p, c in zip(prompts, completions)
    ]
    return list(prompts), shaped


def call_reward_function(
    func: Callable, spec: str, prompts: list[Any], completions: list[str]
) -> torch.Tensor:
    """Call the user's function once for the batch, `func(prompts, completions)` in TRL's form (see
    reward_function_inputs), and check it returned one finite number per completion."""
    try:
        result = func(*reward_function_inputs(prompts, completions))
    except Exception as exc:  # noqa: BLE001 - report the user's function failing, not our traceback
        raise UserError(f"reward_fn={spec} raised {type(exc).__name__}: {exc}") from exc
    try:
        values = [float(v) for v in result]
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"reward_fn={spec} must return a list of floats, got {type(result).__name__}."
        ) from exc
    if len(values) != len(completions):
        raise UserError(f"reward_fn={spec} returned {len(values)} scores for {len(completions)} completions.")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(
            f"reward_fn={spec} returned a non-finite score ({values[bad[0]]}) for completion {bad[0]}."
        )
    return torch.tensor(values, dtype=torch.float32)
