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
# One torch thread per process: `make test` runs two workers on two cores, each starting CLI runs; at the
# default (a thread per core) their OpenMP threads outnumber the cores and spin-wait on each other, which
# made a tiny PPO run ~3x slower. Set before torch is imported; the CLI runs started here inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama and the 'positive words' task data (see ppo_cli/tiny/)."""
    from ppo_cli.tiny.cache import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), arch="llama")


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Build a tiny model of another architecture: tiny_factory('gpt2') -> paths."""
    from ppo_cli.tiny.cache import build_all

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


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`ppo-cli ARGS` through the real dispatcher in this process (the imports are paid already), for runs
    that answer or stop early; the real subprocess CLI is exercised by `run_cli`.

    SystemExit is the only way out that counts as an answer; any other exception fails the test with it.
    sys.argv and the signal handlers a stopped run leaves installed are put back."""
    import contextlib
    import io
    import signal

    import transformers

    from ppo_cli.cli import main

    # A real process quiets transformers through environment variables read at its import; here it was
    # imported long ago, so switch its loading bars off directly.
    transformers.utils.logging.disable_progress_bar()
    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved_argv = sys.argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv = saved_argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(["ppo-cli", *args], code, out.getvalue(), err.getvalue())
