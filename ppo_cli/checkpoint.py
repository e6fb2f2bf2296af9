"""Resumable checkpoints and the run directory, shared by every stage.

Layout of one checkpoint, `output_dir/checkpoints/step-NNNNNN/`:

    trainable.safetensors   every trainable tensor, by parameter name (adapters, heads, full weights)
    state.pt                optimizer, scheduler and other torch state dicts (loaded with weights_only)
    trainer_state.json      step, data position, RNG states (one per rank), stage-specific counters
    manifest.json           size and sha256 of each file above; written last

A checkpoint is written into a temporary sibling directory, every file fsync'ed, the manifest last,
then renamed into place; an old checkpoint is renamed out of the set before it is deleted. A crash at
any moment leaves either the old set of checkpoints or the new one, never a directory that `resume=auto`
would pick half-written or half-deleted. Loading re-checks the manifest,
so a checkpoint damaged later (disk, copy) is skipped with a warning in favour of an older one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ppo_cli.errors import UserError
from ppo_cli.fsdp import copy_full_into
from ppo_cli.resume_config import RUN_MARKER, saved_stage

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAINABLE = "trainable.safetensors"
STATE = "state.pt"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# RNG states: captured as JSON-friendly values / tensors so that nothing needs pickle to restore.


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": _to_jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        # One state per device; a machine with fewer devices than the one that saved restores its own.
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# The RNG states that are tensors (torch's, and one per CUDA device) go to state.pt; the rest to JSON.
_RNG_TENSORS = ("torch", "cuda")


def split_rng(rng: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `capture_rng()` dict as (its JSON part for trainer_state.json, its tensors for state.pt under
    `rng_<name>`)."""
    plain = {k: v for k, v in rng.items() if k not in _RNG_TENSORS}
    return plain, {f"rng_{k}": rng[k] for k in _RNG_TENSORS}


def join_rng(plain: dict[str, Any], objects: dict[str, Any]) -> dict[str, Any]:
    """The `capture_rng()` dict back from a checkpoint's two parts (`split_rng`). A checkpoint written
    without the CUDA states (by an older ppo-cli) restores the others."""
    return {**plain, "torch": objects["rng_torch"], "cuda": objects.get("rng_cuda", [])}


# Every rank samples from its own RNG stream (seed + rank * SEED_STRIDE), so a checkpoint holds each
# rank's state: rank 0's where a 1-rank checkpoint has it ("rng" in trainer_state.json, rng_torch / rng_cuda
# in state.pt), the other ranks' in a list beside each, under this key. A 1-rank checkpoint has no list, and
# reads as one written before the list existed.
RNG_OTHER_RANKS = "rng_other_ranks"


def split_rng_ranks(states: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every rank's `capture_rng()` dict, in rank order, as (entries of trainer_state.json, entries of
    state.pt)."""
    (plain, tensors), *others = [split_rng(rng) for rng in states]
    if not others:
        return {"rng": plain}, tensors
    return (
        {"rng": plain, RNG_OTHER_RANKS: [p for p, _ in others]},
        {**tensors, RNG_OTHER_RANKS: [t for _, t in others]},
    )


def saved_rng_ranks(state: dict[str, Any]) -> int:
    """How many ranks' RNG states a checkpoint's trainer_state.json holds."""
    return 1 + len(state.get(RNG_OTHER_RANKS, []))


def rank_rng(state: dict[str, Any], objects: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank `rank`'s `capture_rng()` dict back from a checkpoint (`split_rng_ranks`)."""
    if rank == 0:
        return join_rng(state["rng"], objects)
    return join_rng(state[RNG_OTHER_RANKS][rank - 1], objects[RNG_OTHER_RANKS][rank - 1])


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_jsonable(v) for v in value]
    return value


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Writing and reading one checkpoint.


@dataclass
class Checkpoint:
    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    objects: dict[str, Any]
    state: dict[str, Any]


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, by name (adapters, heads, or all weights when full FT)."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = expected - tensors.keys()
    unexpected = tensors.keys() - expected
    if missing or unexpected:
        raise UserError(
            f"checkpoint {what} does not match this run's trainable parameters "
            f"({len(missing)} missing, e.g. {sorted(missing)[:2]}; {len(unexpected)} unexpected, e.g. "
            f"{sorted(unexpected)[:2]}): it was written by another stage, model or LoRA shape. "
            "Use another output_dir or resume=never with a fresh output_dir."
        )
    for name, tensor in tensors.items():
        copy_full_into(params[name], tensor)  # an FSDP shard takes its part of the full tensor


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    objects: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / TRAINABLE)
        torch.save(objects, tmp / STATE)
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **state}, indent=1, default=_json_default))
        files = [TRAINABLE, STATE, TRAINER_STATE]
        for name in files:
            _fsync_file(tmp / name)
        manifest = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # a re-save of the same step (e.g. resumed run) replaces it
        _fsync_dir(root)
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not write checkpoint {final} ({describe_write_error(exc, root)}); the previous "
            "checkpoints are intact. Free disk space or choose another output_dir, then resume with "
            "resume=auto."
        ) from exc
    prune_checkpoints(output_dir, keep_last)
    return final


# What a full or failing disk raises: OSError from Python's own writes, SafetensorError from safetensors
# ("I/O error: No space left on device (os error 28)"), RuntimeError from torch.save's zip writer
# ("[enforce fail at inline_container.cc] . unexpected pos ...").
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def describe_write_error(exc: BaseException, where: Path) -> str:
    """A short reason for a failed write, with the free space left where it was writing."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return reason
    return f"{reason}; {free / 2**20:.1f} MiB free there"


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    for name, meta in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, expected {meta['bytes']}"
        if _sha256(file) != meta["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest intact checkpoint; damaged ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} cannot be resumed: {problem}.")
    state = json.loads((path / TRAINER_STATE).read_text())
    try:
        # weights_only: tensors and plain containers only, so a checkpoint can never run code on load.
        objects = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise UserError(
            f"checkpoint {path}: {STATE} was refused by torch.load(weights_only=True), which loads only "
            "tensors and plain containers and never runs code from a checkpoint; ppo-cli does not write "
            "such files, so this checkpoint was not written by ppo-cli or was tampered with."
        ) from exc
    trainable = load_file(path / TRAINABLE)
    return Checkpoint(path=path, step=int(state["step"]), trainable=trainable, objects=objects, state=state)


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(_set_aside(path), ignore_errors=True)
    root = Path(output_dir) / CHECKPOINTS
    for old in root.glob(f"{_SET_ASIDE}step-*"):  # a delete that a crash interrupted
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        # Leftovers of a crashed write by a process that is gone.
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


# Deleting a directory is one unlink per file: a crash halfway would leave a step-NNNNNN directory with
# some files gone. One rename first takes it out of the set of checkpoints, so a crash leaves a
# .deleting-* leftover (swept at the next prune) and never a half-deleted checkpoint.
_SET_ASIDE = ".deleting-"


def _set_aside(path: Path) -> Path:
    aside = path.with_name(f"{_SET_ASIDE}{path.name}-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside


def replace_dir(src: Path, dst: Path) -> None:
    """Rename directory `src` to `dst`, replacing a `dst` that exists without ever leaving it half-deleted
    (rename cannot replace a non-empty directory, and deleting one in place is not atomic)."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = _set_aside(dst)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# The run directory: refuse to mix runs, find what to resume.


def resolve_resume(output_dir: Path, resume: str, stage: str) -> Path | None:
    """Decide which checkpoint (if any) this run continues from, refusing to overwrite another run.

    - resume=never: output_dir must not hold a run already.
    - resume=auto: continue from the newest intact checkpoint of the same stage, if any.
    - resume=PATH: that checkpoint directory.
    """
    output_dir = Path(output_dir)
    existing = saved_stage(output_dir)
    if existing is not None and existing != stage:
        raise UserError(
            f"output_dir {output_dir} holds a {existing} run, not a {stage} run; choose another output_dir."
        )
    if resume == "never":
        if existing is not None or list_checkpoints(output_dir):
            raise UserError(
                f"output_dir {output_dir} already holds a {stage} run and resume=never: nothing was "
                "overwritten. Choose another output_dir, or pass resume=auto to continue it."
            )
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    forms = "resume takes auto, never, or a checkpoint directory OUTPUT_DIR/checkpoints/step-NNNNNN"
    path = Path(resume).expanduser()
    if not resume or not path.is_dir():
        raise UserError(f"resume={resume}: no such checkpoint directory ({forms}).")
    if not _STEP_DIR.match(path.name) and not (path / MANIFEST).is_file():
        if (path / CHECKPOINTS).is_dir() or (path / RUN_MARKER).is_file():
            hint = f"it is a run directory: continue it with output_dir={path} resume=auto"
        elif path.name == "final":
            hint = (
                "a stage's final/ feeds the next stage (sft_checkpoint=, reward_checkpoint=) and cannot "
                "be resumed"
            )
        else:
            hint = forms
        raise UserError(f"resume={resume} is not a checkpoint; {hint}.")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise UserError(f"resume={resume}: the checkpoint is not usable: {problem}.")
    owner = saved_stage(path.parent.parent) if path.parent.name == CHECKPOINTS else None
    if owner is not None and owner != stage:
        raise UserError(f"resume={resume} is a checkpoint of a {owner} run, not of a {stage} run.")
    return path
