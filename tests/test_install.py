"""A regular (non-editable) `pip install` of the project works from anywhere: conf/ and recipes/ ship inside
the package, and the CLI composes its configs from there."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def project_files() -> list[str]:
    """What a clone of this working tree holds: tracked files plus new files git does not ignore."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in listed.split("\0") if f and (REPO / f).is_file()]


def shipped(folder: Path) -> list[str]:
    """Files under an installed folder, without the bytecode pip compiles at install time."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


def make_child_venv(venv: Path) -> Path:
    """A fresh venv that sees the packages of the interpreter running the tests, whether that is a system
    Python or itself a venv (`--system-site-packages` would inherit the *base* interpreter's packages, which
    inside a virtualenv lack the project's dependencies). Returns its bin/ folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    child_python = venv / "bin" / "python"
    child_site = subprocess.run(
        [str(child_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # addsitedir (unlike a bare path line) also runs the parent's .pth files, as a system site dir would;
    # it appends, so the child's own site-packages still wins for what is installed there.
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    (Path(child_site) / "_parent_env.pth").write_text(lines)
    return venv / "bin"


def test_child_venv_sees_this_interpreters_packages(tmp_path):
    bin_dir = make_child_venv(tmp_path / "venv")
    probe = subprocess.run(
        [str(bin_dir / "python"), "-c", "import omegaconf, torch, sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == tmp_path / "venv"


def test_wheel_install_finds_conf_and_recipes(tmp_path):
    # Build from a copy holding only the project's files, as a fresh clone would (no empty folders, no outputs).
    src = tmp_path / "src"
    files = project_files()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)

    venv = tmp_path / "venv"
    bin_dir = make_child_venv(venv)
    pip = [
        str(bin_dir / "python"),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
    ]
    if importlib.util.find_spec("hatchling") is not None:
        pip.append("--no-build-isolation")  # else pip fetches the build backend (hatchling) by itself
    install = subprocess.run([*pip, str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr

    elsewhere = tmp_path / "elsewhere"  # not the repository: nothing may be found relative to the cwd
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            "import json, ppo_cli; from ppo_cli import paths; "
            "print(json.dumps([ppo_cli.__file__, str(paths.conf_dir()), str(paths.recipes_dir())]))",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=True,
    )
    init, conf, recipes = (Path(p) for p in json.loads(probe.stdout))
    package = init.parent
    assert package.parent.name == "site-packages" and venv in package.parents, f"imported from {init}"
    assert conf == package / "conf", conf
    assert (conf / "train_sft.yaml").is_file() and (conf / "model").is_dir()
    assert shipped(conf) == sorted(f[len("conf/") :] for f in files if f.startswith("conf/"))
    assert recipes == package / "recipes", f"recipes/ did not ship inside the package: {recipes}"
    assert shipped(recipes) == sorted(f[len("recipes/") :] for f in files if f.startswith("recipes/"))

    cli = subprocess.run(
        [str(bin_dir / "ppo-cli"), "train-sft", "model.name_or_path=x", "data.train=y", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    cfg = yaml.safe_load(cli.stdout)
    assert cfg["model"]["name_or_path"] == "x" and cfg["train"]["lr"] == 2.0e-4
