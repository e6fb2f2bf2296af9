"""Continuing a run from its directory: `ppo-cli train-<stage> output_dir=RUN [resume=auto]`.

A run writes its whole resolved config to RUN/config.yaml. When output_dir names such a run of the same
stage, the config of the new invocation starts from that file and the command line is applied on top, so
the resume command a stopped run prints needs nothing but output_dir.

A resumed run continues the same training, so the command line may change only what cannot change the
weights the run ends with, plus its length:

- train.max_steps, train.num_epochs: run longer (or shorter). The learning-rate schedule follows the new
  length from the resumed step on, so the result is not the one a run started with that length would give.
- train.log_every, save_every, eval_every, keep_last, logger.*, sample_every: bookkeeping and display.
- model.gradient_checkpointing, train.fsdp.reshard_after_forward: memory only (the recomputed
  activations, the gathered weights are the same).
- data.eval, from one evaluation set to another: evaluation only (when it is null, the evaluation rows
  are held out of data.train, so setting or clearing it changes the training rows and is refused).

Any other difference (model, LoRA shape, data, seed, batch size, learning rate, device, precision, PPO
settings, ...) is refused: continuing with it would give weights that neither setting alone produces.
output_dir and resume always come from the command line.

With resume=auto, a run directory with nothing to continue (no checkpoint and no final/: the run failed or
was killed before its first checkpoint) starts afresh with the command line on top of its config.yaml, any
setting changed; what the earlier attempt logged (metrics.jsonl, plots/, ...) is first moved with its
config.yaml into RUN/attempt-N/, so that nothing is lost (see `start_afresh`).

A directory holds one thing: a stage's run, or a pipeline (its pipeline.yaml, with one directory per stage
inside). A stage refuses an output_dir that holds a run of another stage or a pipeline (`check_output_dir`),
and the pipeline one that holds a stage's run (ppo_cli/pipeline/plan.py).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ppo_cli.errors import UserError
from ppo_cli.schema import declared_fields

# The file that marks a directory as a run and records its stage and settings (ppo_cli.checkpoint uses
# it too; it lives here so that reading a run's config never imports torch).
RUN_MARKER = "config.yaml"
# The file `ppo-cli pipeline` writes in its run directory (recipe and overrides); its stages run in
# RUN/<stage>/ (ppo_cli/pipeline/plan.py).
PIPELINE_MARKER = "pipeline.yaml"
# Kept here without importing them, as their modules import torch: ppo_cli.checkpoint.CHECKPOINTS, its
# step-NNNNNN directories and their MANIFEST (written last), ppo_cli.models.products.PRODUCT_FILE.
_CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-\d{6,}$")
_MANIFEST = "manifest.json"
_FINAL = "final"
_PRODUCT_FILE = "ppo_cli.json"
# What an attempt logs beside its config.yaml (ppo_cli/logger.py, plots.py, ppo/final_eval.py): moved with
# it into RUN/attempt-N/ when the directory starts afresh.
ATTEMPT_RECORDS = (
    "metrics.jsonl",
    "plots",
    "tensorboard",
    "wandb",
    ".wandb_id",
    "eval.json",
    "eval.samples.jsonl",
)
ATTEMPT_DIR = "attempt-{}"
# Keys (or groups, ending in ".") a resumed run may set to a new value; see the module docstring.
MAY_CHANGE_ON_RESUME = (
    "train.max_steps",
    "train.num_epochs",
    "train.log_every",
    "train.save_every",
    "train.eval_every",
    "train.keep_last",
    "logger.",
    "sample_every",
    "model.gradient_checkpointing",
    "train.fsdp.reshard_after_forward",
)
RUN_LENGTH_KEYS = ("train.max_steps", "train.num_epochs")
# Keys about this invocation, not the training: never taken from the saved config.
INVOCATION_KEYS = ("output_dir", "resume")


def may_change(key: str, old: Any, new: Any) -> bool:
    if key == "data.eval" or key.startswith("data.eval."):
        return bool(old) and bool(new)
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE_ON_RESUME)


def saved_stage(run_dir: Path | str) -> str | None:
    """The stage recorded in run_dir/config.yaml; None when the directory holds no run, "unknown" when
    the file is unreadable (a foreign run)."""
    marker = Path(run_dir) / RUN_MARKER
    if not marker.is_file():
        return None
    try:
        return OmegaConf.load(marker).get("stage")
    except Exception:  # noqa: BLE001 - an unreadable file is a run of unknown stage
        return "unknown"


def resume_command(stage: str, output_dir: Path | str) -> str:
    """The command that continues the run in output_dir: the run's config.yaml supplies every other setting.
    Quoted for the shell, and for Hydra when the path needs it."""
    from ppo_cli.app import hydra_quote

    value = str(output_dir)
    if not re.fullmatch(r"[\w./~+@%:-]+", value):
        value = hydra_quote(value)
    return f"ppo-cli train-{stage} {shlex.quote('output_dir=' + value)} resume=auto"


def pipeline_record(run_dir: Path | str) -> dict | None:
    """RUN/pipeline.yaml of a pipeline's run directory ({} when unreadable); None when there is none."""
    path = Path(run_dir) / PIPELINE_MARKER
    if not path.is_file():
        return None
    try:
        record = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # noqa: BLE001 - an unreadable record still marks the directory as a pipeline's
        return {}
    return record if isinstance(record, dict) else {}


def pipeline_resume_command(recipe: str, run_dir: Path | str, overrides: list[str]) -> str:
    """The command that continues the pipeline in run_dir (shell-quoted)."""
    kept = [o for o in overrides if not o.startswith(("output_dir=", "recipe="))]
    args = [f"recipe={recipe}", f"output_dir={run_dir}", *kept]
    return "ppo-cli pipeline " + " ".join(shlex.quote(a) for a in args)


def is_finished(run_dir: Path | str) -> bool:
    return (Path(run_dir) / _FINAL / _PRODUCT_FILE).is_file()


def nothing_to_continue(run_dir: Path | str) -> bool:
    """No checkpoint and no final/ in run_dir: a run there stopped before its first checkpoint, so starting
    it afresh, with any settings, mixes nothing. A checkpoint is a step directory with its manifest (a write
    that did not finish has none, and resume=auto skips it); a damaged one still counts: it can be repaired."""
    run_dir = Path(run_dir)
    if (run_dir / _FINAL).exists():
        return False
    checkpoints = run_dir / _CHECKPOINTS
    return not checkpoints.is_dir() or not any(
        _STEP_DIR.match(child.name) and (child / _MANIFEST).is_file() for child in checkpoints.iterdir()
    )


def run_description(run_dir: Path | str, stage: str) -> tuple[str, str]:
    """(what the run of `stage` in run_dir is, in words; the end of a sentence that says what to do about it
    instead of writing beside it: the command that continues it when there is one, last, with no full stop
    that could be copied with it)."""
    run_dir = Path(run_dir)
    if stage == "unknown":
        return f"a run whose {RUN_MARKER} cannot be read", "."
    if is_finished(run_dir):
        return f"a {stage} run", f" (that run is finished: its product is {run_dir / _FINAL})."
    return f"a {stage} run", f", or continue that run with: {resume_command(stage, run_dir)}"


def check_output_dir(run_dir: Path | str, stage: str) -> None:
    """Refuse a train-<stage> output_dir that holds a pipeline or a run of another stage: this run's files
    (config.yaml, metrics.jsonl, checkpoints/, final/) would mix with theirs."""
    run_dir = Path(run_dir)
    record = pipeline_record(run_dir)
    if record is not None:
        recipe = record.get("recipe", "?")
        command = pipeline_resume_command(recipe, run_dir, list(record.get("overrides") or []))
        raise UserError(
            f"output_dir {run_dir} holds a pipeline of recipe {recipe} ({run_dir / PIPELINE_MARKER}; its "
            f"{stage} stage runs in {run_dir / stage}), not a {stage} run: a train-{stage} run there would mix "
            f"its files with the pipeline's. Choose another output_dir (output_dir={run_dir / stage} for the "
            f"pipeline's {stage} stage), or continue the pipeline with: {command}"
        )
    existing = saved_stage(run_dir)
    if existing is not None and existing != stage:
        what, hint = run_description(run_dir, existing)
        raise UserError(
            f"output_dir {run_dir} holds {what}, not a {stage} run; choose another output_dir{hint}"
        )


def override_paths(overrides: list[str]) -> list[str]:
    """The config paths a list of Hydra overrides sets (a group choice such as lora=full sets the whole
    `lora` node); Hydra's own settings left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    paths = []
    for override in OverridesParser.create().parse_overrides(overrides):
        path = (override.package or override.key_or_group).replace("/", ".")
        if path != "hydra" and not path.startswith("hydra."):
            paths.append(path)
    return paths


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf of a plain container (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _known_part(saved: dict, template: DictConfig, prefix: str = "") -> tuple[dict, list[str]]:
    """The part of a saved config that the schema (typed nodes of `template`) still declares, and the dotted
    keys it does not (written by an older version): those had no effect on the run, so dropping them keeps
    the continuation exact."""
    declared = declared_fields(template)
    known: dict = {}
    dropped: list[str] = []
    for key, value in saved.items():
        if declared is not None and key not in declared:
            dropped.append(f"{prefix}{key}")
            continue
        child = template._get_node(key) if declared is not None else None
        if isinstance(value, dict) and isinstance(child, DictConfig):
            known[key], more = _known_part(value, child, f"{prefix}{key}.")
            dropped.extend(more)
        else:
            known[key] = value
    return known, dropped


def merge_saved_config(
    cfg: DictConfig, stage: str, overrides: list[str]
) -> tuple[DictConfig, dict[str, tuple[Any, Any]], list[str]]:
    """The config to run when cfg.output_dir holds a run of `stage`: its saved config with the command
    line's `overrides` on top. Returns (config, {key: (saved, new)} of allowed changes, dropped keys);
    `cfg` itself (nothing changed) when output_dir holds no run or resume=never.

    `cfg` is the config Hydra composed from the same overrides, resolved. Raises UserError when output_dir
    holds a pipeline or a run of another stage, or when the command line changes a key that must stay and
    there is a checkpoint to continue (see the module docstring)."""
    run_dir = Path(str(cfg.output_dir))
    _fresh_starts.discard(str(run_dir))  # what an earlier call in this process found is no longer news
    _announced.discard(str(run_dir))
    check_output_dir(run_dir, stage)
    if saved_stage(run_dir) is None:
        return cfg, {}, []
    if cfg.resume == "never":  # refused later with its own message (the directory holds a run)
        return cfg, {}, []
    try:
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / RUN_MARKER), resolve=False)
        saved.pop("stage", None)
        for key in INVOCATION_KEYS:
            saved.pop(key, None)
        known, dropped = _known_part(saved, cfg)
        before = OmegaConf.merge(cfg, known)  # the run as it was started (today's defaults for new keys)
    except OmegaConfBaseException as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UserError(
            f"cannot continue the run in {run_dir}: its {RUN_MARKER} does not fit this version's settings "
            f"({reason.rstrip('.')}). Start a new run in another output_dir."
        ) from exc
    command_line = OmegaConf.create({})
    for path in dict.fromkeys([*override_paths(overrides), *INVOCATION_KEYS]):
        if OmegaConf.select(cfg, path, default=_ABSENT) is _ABSENT:
            continue  # deleted with ~key: the saved value stays
        value = OmegaConf.select(cfg, path)
        OmegaConf.update(command_line, path, _plain(value), merge=False, force_add=True)
    merged = OmegaConf.merge(before, command_line)
    OmegaConf.set_struct(merged, True)
    old = _leaves(OmegaConf.to_container(before, resolve=True))
    new = _leaves(OmegaConf.to_container(merged, resolve=True))
    changed = {
        key: (old.get(key), new.get(key))
        for key in dict.fromkeys([*old, *new])
        if key not in INVOCATION_KEYS and old.get(key) != new.get(key)
    }
    if cfg.resume == "auto" and nothing_to_continue(run_dir):
        _fresh_starts.add(str(run_dir))  # any setting may change: there is no training to continue
        return merged, changed, dropped
    refused = {key: values for key, values in changed.items() if not may_change(key, *values)}
    if refused:
        raise UserError(refusal(run_dir, stage, refused))
    return merged, changed, dropped


_ABSENT = object()


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def refusal(run_dir: Path, stage: str, refused: dict[str, tuple[Any, Any]]) -> str:
    shown = "; ".join(f"{key}={new} (the run has {key}={old})" for key, (old, new) in refused.items())
    allowed = ", ".join(k.rstrip(".") + ("*" if k.endswith(".") else "") for k in MAY_CHANGE_ON_RESUME)
    return (
        f"output_dir {run_dir} holds a {stage} run that this command would continue with other settings: "
        f"{shown}. A resumed run continues the same training from its {RUN_MARKER}, so only {allowed} "
        f"(and data.eval, from one evaluation set to another) may change. Leave {', '.join(refused)} out "
        "to continue the run, or start a new run in another output_dir."
    )


def describe_changes(run_dir: Path, changed: dict[str, tuple[Any, Any]], dropped: list[str]) -> str:
    """The line printed when a run continues from its saved config, or starts afresh from it."""
    key = str(Path(run_dir))
    if key in _fresh_starts:
        _announced.add(key)
        return fresh_start_line(Path(run_dir), changed, dropped)
    text = f"continuing the run in {run_dir} with the settings of its {RUN_MARKER}"
    if changed:
        text += " and " + _changes(changed)
        if any(key in RUN_LENGTH_KEYS for key in changed):
            text += "; the learning-rate schedule follows the new length from the resumed step on"
    return text + _ignored(dropped) + "."


def _changes(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}={new} (was {old})" for key, (old, new) in changed.items())


def _ignored(dropped: list[str]) -> str:
    return f"; ignoring {', '.join(dropped)} (no such setting)" if dropped else ""


# Output dirs that merge_saved_config found nothing to continue in, and those of them whose fresh start
# describe_changes has announced (with the settings it changes): StageRun.start then does not repeat it.
_fresh_starts: set[str] = set()
_announced: set[str] = set()


def _attempt_files(run_dir: Path) -> list[str]:
    """The files of an earlier attempt to keep: its config.yaml with what it logged, when it logged
    anything. A config.yaml alone (the attempt failed before its first log line) is just replaced."""
    records = [name for name in ATTEMPT_RECORDS if (run_dir / name).exists()]
    if not records:
        return []
    return ([RUN_MARKER] if (run_dir / RUN_MARKER).exists() else []) + records


def _attempt_dir(run_dir: Path) -> Path:
    """The first free RUN/attempt-N: earlier attempts kept aside are never overwritten."""
    number = 1
    while (run_dir / ATTEMPT_DIR.format(number)).exists():
        number += 1
    return run_dir / ATTEMPT_DIR.format(number)


def fresh_start_line(
    run_dir: Path, changed: dict[str, tuple[Any, Any]] | None = None, dropped: list[str] | None = None
) -> str:
    """The line that says run_dir starts afresh; `changed` (from the command line) when it starts from the
    settings of its config.yaml."""
    text = f"{run_dir} has no checkpoint: starting afresh"
    if changed is None:
        text += " with the new settings"
    else:
        text += f" with the settings of its {RUN_MARKER}" + (f" and {_changes(changed)}" if changed else "")
    kept = _attempt_files(run_dir)
    if kept:
        text += f"; the previous attempt is kept in {_attempt_dir(run_dir)} ({', '.join(kept)})"
    return text + _ignored(dropped or []) + "."


def start_afresh(run_dir: Path | str) -> str | None:
    """Before a run writes its config.yaml into run_dir from step 0: when run_dir holds an earlier attempt
    with nothing to continue, move what it logged (with its config.yaml) into run_dir/attempt-N, where
    the new run cannot overwrite or delete it (a fresh start removes metrics.jsonl, a tensorboard/ would
    mix both attempts' curves, .wandb_id would append to the old wandb run). Returns the line to print,
    None when run_dir holds no earlier attempt or the command line announced it already."""
    run_dir = Path(run_dir)
    key = str(run_dir)
    announced = key in _announced
    _fresh_starts.discard(key)
    _announced.discard(key)
    if not nothing_to_continue(run_dir):
        return None
    kept = _attempt_files(run_dir)
    if not (run_dir / RUN_MARKER).exists() and not kept:
        return None
    line = fresh_start_line(run_dir)  # before the move: it names where the attempt goes
    if kept:
        target = _attempt_dir(run_dir)
        target.mkdir()
        for name in kept:
            (run_dir / name).rename(target / name)
    return None if announced else line
