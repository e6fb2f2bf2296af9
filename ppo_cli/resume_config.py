"""Continuing a run from its directory: `ppo-cli train-<stage> output_dir=RUN [resume=auto]`.

A run writes its whole resolved config to RUN/config.yaml. When output_dir names such a run of the same
stage, the config of the new invocation starts from that file and the command line is applied on top, so
the resume command a stopped run prints needs nothing but output_dir.

A resumed run continues the same training, so the command line may change only what cannot change the
weights the run ends with, plus its length:

- train.max_steps, train.num_epochs: run longer (or shorter). The learning-rate schedule follows the new
  length from the resumed step on, so the result is not the one a run started with that length would give.
- train.log_every, save_every, eval_every, keep_last, logger.*, sample_every: bookkeeping and display.
- model.gradient_checkpointing: memory only (the recomputed activations are the same).
- data.eval, from one evaluation set to another: evaluation only (when it is null, the evaluation rows
  are held out of data.train, so setting or clearing it changes the training rows and is refused).

Any other difference (model, LoRA shape, data, seed, batch size, learning rate, device, precision, PPO
settings, ...) is refused: continuing with it would give weights that neither setting alone produces.
output_dir and resume always come from the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ppo_cli.errors import UserError
from ppo_cli.schema import declared_fields

# The file that marks a directory as a run and records its stage and settings (ppo_cli.checkpoint uses
# it too; it lives here so that reading a run's config never imports torch).
RUN_MARKER = "config.yaml"
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
    holds a run of another stage, or when the command line changes a key that must stay (see the module
    docstring)."""
    run_dir = Path(str(cfg.output_dir))
    existing = saved_stage(run_dir)
    if existing is None:
        return cfg, {}, []
    if existing != stage:
        raise UserError(
            f"output_dir {run_dir} holds a {existing} run, not a {stage} run; choose another output_dir."
        )
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
    """The line printed when a run continues from its saved config."""
    text = f"continuing the run in {run_dir} with the settings of its {RUN_MARKER}"
    if changed:
        text += " and " + ", ".join(f"{key}={new} (was {old})" for key, (old, new) in changed.items())
        if any(key in RUN_LENGTH_KEYS for key in changed):
            text += "; the learning-rate schedule follows the new length from the resumed step on"
    if dropped:
        text += f"; ignoring {', '.join(dropped)} (no such setting)"
    return text + "."
