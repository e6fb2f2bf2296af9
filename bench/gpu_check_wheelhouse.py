#!/usr/bin/env python
"""`make wheelhouse`: on a machine with internet, the wheels `make gpu-check` needs on a CUDA machine that has
none, into wheelhouse/ (git-ignored; copy it beside the repository there).

What: ppo-cli's dependencies (pyproject.toml) with their own, plus pytest (the cuda tests), hatchling (to
install the project itself) and trl==1.12.0 (the speed baseline), for CPython 3.10-3.12 on manylinux x86-64.
Left out: torch and what only torch needs (the CUDA libraries nvidia-*, triton, sympy, networkx, jinja2): the
GPU machine's own torch is used, it brought those, and they are gigabytes. numpy stays in: pandas and pyarrow
(datasets') may need a newer one than the machine has.

How: for each Python version pip resolves the whole set without downloading it (--dry-run --report), then
downloads exactly the resolved wheels with --no-deps, so nothing left out is ever fetched. Where an
interpreter of that version is on PATH it resolves (environment markers such as `tomli; python_version <
"3.11"` are evaluated by the interpreter that runs pip); otherwise this one does, with the known backports
of 3.10 added. antlr4-python3-runtime (omegaconf's parser) has no wheel on PyPI: pip wheel builds it once
(pure Python).

    python bench/gpu_check_wheelhouse.py [--dest wheelhouse] [--python 3.10 3.11 3.12]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLATFORMS = [
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
]
# hatchling builds the project's editable install with `editables` (a build dependency, not in any metadata).
EXTRA = ["pytest", "hatchling>=1.21", "editables~=0.3", "trl==1.12.0"]
# Sdist-only on PyPI: built into a wheel first, then found by the resolver in the wheelhouse.
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3"]
# What the GPU machine's torch (and transformers) already brought.
LEFT_OUT = {
    "torch",
    "triton",
    "pytorch-triton",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
}
LEFT_OUT_PREFIXES = ("nvidia-", "cuda-")
# Backports that Python < 3.11 needs, added when a 3.11+ interpreter resolves for 3.10 (markers are its own).
BACKPORTS_310 = ["tomli", "exceptiongroup", "async-timeout"]


def project_dependencies() -> list[str]:
    """[project] dependencies of pyproject.toml, read with a regex: tomllib is 3.11+ and tomli may be absent."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    return re.findall(r'^\s*"([^"]+)",', block.group(1), re.M)


def left_out(name: str) -> bool:
    name = name.lower().replace("_", "-")
    return name in LEFT_OUT or name.startswith(LEFT_OUT_PREFIXES)


def target_flags(version: str) -> list[str]:
    """pip's flags for wheels of CPython `version` on manylinux x86-64 (binary only: no build here)."""
    tag = version.replace(".", "")
    flags = ["--only-binary=:all:", "--implementation", "cp", "--python-version", version]
    flags += ["--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def build_sdist_only(dest: Path) -> None:
    """Wheels of the pure-Python packages PyPI has as sdists only."""
    for requirement in SDIST_ONLY:
        name = requirement.split("==")[0].replace("-", "_")
        if not list(dest.glob(f"{name}-*.whl")):
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dest), requirement]
            subprocess.run(cmd, check=True)


def interpreter(version: str) -> str | None:
    """A working `python{version}` with pip on PATH (a pyenv shim of an inactive version does not run)."""
    python = shutil.which(f"python{version}")
    if python is None:
        return None
    probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True)
    return python if probe.returncode == 0 and f"python {version})" in probe.stdout else None


def resolve(version: str, requirements: list[str], dest: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution pip resolves for CPython `version`, nothing downloaded."""
    python = interpreter(version)
    if python is None:
        python = sys.executable
        if version == "3.10" and sys.version_info >= (3, 11):
            requirements = [*requirements, *BACKPORTS_310]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            python,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
        ]
        cmd += ["--target", str(Path(tmp) / "target"), "--find-links", str(dest), *target_flags(version)]
        subprocess.run([*cmd, *requirements], check=True)
        installs = json.loads(report.read_text())["install"]
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in installs]


def download(version: str, pins: list[str], dest: Path) -> None:
    """The resolved wheels themselves, without resolving again (--no-deps)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest)]
    cmd += ["--find-links", str(dest), *target_flags(version)]
    subprocess.run([*cmd, *pins], check=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=REPO / "wheelhouse")
    ap.add_argument("--python", nargs="+", default=["3.10", "3.11", "3.12"], help="CPython versions")
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    build_sdist_only(args.dest)
    requirements = project_dependencies() + EXTRA
    for version in args.python:
        resolved = resolve(version, requirements, args.dest)
        pins = sorted(f"{name}=={v}" for name, v in resolved if not left_out(name))
        print(f"Python {version}: {len(pins)} wheels ({len(resolved) - len(pins)} left out: torch's stack)")
        download(version, pins, args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{args.dest}: {len(wheels)} wheels, {size:.0f} MiB")


if __name__ == "__main__":
    main()
