"""Shared fixtures: a tiny model + task data built once per test session, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama and the 'positive words' task data (see ppo_cli/tiny.py)."""
    from ppo_cli.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), arch="llama")


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Build a tiny model of another architecture: tiny_factory('gpt2') -> paths."""
    from ppo_cli.tiny import build_all

    cache: dict[str, dict[str, Path]] = {}

    def build(arch: str) -> dict[str, Path]:
        if arch not in cache:
            cache[arch] = build_all(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch)
        return cache[arch]

    return build


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m ppo_cli ARGS` in a subprocess, the way a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ppo_cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def cli():
    return run_cli
