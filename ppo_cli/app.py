"""Glue between Hydra and the stages: one Hydra app per subcommand, and clean errors.

Every subcommand module calls `hydra_app(config_name)(run)` to get its `main()`. Hydra composes the
config; `run(cfg)` gets it fully resolved. Anything the user got wrong surfaces as one paragraph on
stderr with exit code 2 and no traceback: composition errors (unknown key, wrong type, missing config
group option) and keys added with `+` that the schema does not declare are caught by `precheck` before
Hydra runs the job, and `UserError`s raised by a stage are caught around `run`. A train-* command whose
output_dir holds a run of its stage continues it from the run's config.yaml (ppo_cli/resume_config.py).
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ppo_cli.errors import EXIT_USAGE, UserError
from ppo_cli.paths import conf_dir


def fail(message: str, command: str | None = None) -> None:
    """Print `message` as one paragraph on stderr and exit with code 2."""
    prefix = f"ppo-cli {command}: error: " if command else "ppo-cli: error: "
    text = " ".join(message.split())
    try:
        from rich.console import Console
        from rich.markup import escape

        # The message is text, not markup: "[truncate, drop]" must print as it is.
        Console(stderr=True, soft_wrap=True, highlight=False).print(
            f"[bold red]{prefix}[/]{escape(text)}", markup=True
        )
    except Exception:  # noqa: BLE001 - printing the error must never raise another one
        print(prefix + text, file=sys.stderr)
    sys.exit(EXIT_USAGE)


def config_name_of(command: str) -> str:
    """The config a subcommand composes: train-sft -> train_sft."""
    return command.replace("-", "_")


def unknown_key_message(key: str, command: str, key_prefix: str = "") -> str:
    """An unknown key, with the nearest key of the schema (never Hydra's advice to add it with `+`: a key
    the schema does not declare is read by nothing, so adding it would be silently ignored)."""
    from ppo_cli.schema import did_you_mean, schema_class, schema_keys

    known = schema_keys(schema_class(config_name_of(command)))
    hint = did_you_mean(key, known).replace(" Did you mean ", f" Did you mean {key_prefix}")
    return (
        f"unknown key {key_prefix}{key}: ppo-cli {command} has no such setting.{hint} "
        f"See every key and its default with `ppo-cli {command} --cfg job`."
    )


def reject_unknown_keys(cfg: DictConfig, command: str, key_prefix: str = "") -> None:
    """Keys added with `+key=value` that the schema does not declare are an error, as a typo without `+` is:
    the run would accept them and ignore them."""
    from ppo_cli.schema import unknown_keys

    unknown = unknown_keys(cfg)
    if unknown:
        raise UserError(unknown_key_message(unknown[0], command, key_prefix))


def _chain(exc: BaseException | None) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and all(exc is not e for e in found):
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def describe_composition_error(exc: BaseException, command: str, key_prefix: str = "") -> str:
    """Turn Hydra/OmegaConf's multi-line composition error into one readable paragraph. `key_prefix` is put
    before the keys it names (the pipeline's `ppo.` for the ppo stage's keys)."""
    import re

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    chain = _chain(exc)
    lines = [line.strip() for e in chain for line in str(e).splitlines() if line.strip()]
    overridden = [m.group(1) for m in (re.match(r"Could not override '(.+)'", ln) for ln in lines) if m]
    if overridden and any(isinstance(e, ConfigKeyError | ConfigAttributeError) for e in chain):
        return unknown_key_message(overridden[0], command, key_prefix)
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    choices = next(
        (m for m in (re.search(r"Invalid value '(.*)', expected one of \[(.*)\]", ln) for ln in lines) if m),
        None,
    )
    if choices and full_key:  # a Choice key (ppo_cli/config.py) given a value outside its set
        from ppo_cli.choices import REFUSED_CHOICES

        reason = REFUSED_CHOICES.get((full_key, choices.group(1)))
        if reason:
            return reason
        return (
            f"{key_prefix}{full_key}={choices.group(1)} is not one of {choices.group(2)}. "
            f"See every key and its default with `ppo-cli {command} --help`."
        )
    kept = [
        ln.rstrip(".")
        for ln in lines
        if not ln.startswith(("full_key:", "object_type=", "reference_type=")) and "$VALUE" not in ln
    ]
    message = "; ".join(dict.fromkeys(kept)) + "."  # drop repeated lines, keep order
    key_hint = f" (key: {full_key})" if full_key and full_key not in message else ""
    return (
        f"invalid configuration{key_hint}: {message} "
        f"See every key and its default with `ppo-cli {command} --cfg job`."
    )


def hydra_quote(value: str) -> str:
    """`value` as a quoted string of Hydra's override grammar. Inside quotes Hydra unescapes only the
    backslashes before a quote or at the end, so exactly those are doubled."""
    import re

    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    return f"'{escaped}'"


def missing_required(cfg: DictConfig) -> list[str]:
    """Keys still set to ??? (required and not given), Hydra's own keys excluded."""
    return sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))


def check_required(cfg: DictConfig) -> None:
    missing = missing_required(cfg)
    if missing:
        examples = {
            "model.name_or_path": "model.name_or_path=Qwen/Qwen2.5-0.5B",
            "data.train": "data.train=train.jsonl",
        }
        hints = ", ".join(examples.get(k, f"{k}=...") for k in missing)
        raise UserError(
            f"missing required value for {', '.join(missing)}: set it on the command line, e.g. {hints}."
        )


def precheck(config_name: str, overrides: list[str], command: str) -> DictConfig:
    """Compose the config like Hydra will, so that override mistakes exit 2 before anything runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ppo_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as exc:  # noqa: BLE001 - every composition failure is a user error
        fail(describe_composition_error(exc, command), command)
    finally:
        GlobalHydra.instance().clear()
    try:
        reject_unknown_keys(cfg, command)
    except UserError as exc:
        fail(str(exc), command)
    return cfg


def _interpolations(node: object, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, raw value) of every value in `node` (unresolved) that holds an interpolation."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return [(prefix, node)] if isinstance(node, str) and "${" in node else []
    found = []
    for key, value in items:
        found.extend(_interpolations(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def resolve_or_fail(cfg: DictConfig, command: str) -> None:
    """Resolve every interpolation in place; one that cannot resolve (${oc.env:UNSET}, ${no.such.key}) is a
    one-paragraph error naming its key."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        culprit = "the configuration"
        for key, value in _interpolations(raw):
            try:
                OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            except OmegaConfBaseException:
                culprit = f"{key}={value}"
                break
        fail(
            f"cannot resolve {culprit}: {reason.rstrip('.')}. "
            f"See every key and its default with `ppo-cli {command} --cfg job`.",
            command,
        )


def quiet_libraries() -> None:
    """Keep the console for our own output: no per-file loading bars or library chatter."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
    warnings.filterwarnings("ignore", message=".*mean_resizing.*")
    # FSDP2 warns when a sharded module returns a view (an in-place op on it would skip the gather before
    # backward). PPO's passes return slices (logits[:, :-1], values) that nothing modifies in place; the
    # two-rank tests compare every gradient with one process, which a skipped gather would break.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # Environment switches rather than imports: an error exit must not pay for importing transformers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")


def command_line_overrides() -> list[str] | None:
    """The overrides of the running Hydra job as typed; None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    # Unresolved: Hydra keeps them in a config, where `data.train=${oc.env:X}` would resolve on reading.
    return OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)


def continue_saved_run(cfg: DictConfig, command: str, overrides: list[str]) -> DictConfig:
    """A train-* command whose output_dir holds a run of its stage starts from the run's config.yaml, with
    the command line on top (see ppo_cli/resume_config.py); any other command's config is returned as is."""
    import os

    from ppo_cli.resume_config import describe_changes, merge_saved_config

    if not command.startswith("train-"):
        return cfg
    merged, changed, dropped = merge_saved_config(cfg, command.removeprefix("train-"), overrides)
    if merged is not cfg and os.environ.get("RANK", "0") == "0":
        print(f"ppo-cli {command}: {describe_changes(merged.output_dir, changed, dropped)}")
    return merged


def hydra_app(
    config_name: str, command: str, prepare: Callable[[DictConfig], None] | None = None
) -> Callable[[Callable[[DictConfig], object]], Callable[..., None]]:
    """Decorator: `run(cfg)` becomes a Hydra app whose user errors exit 2 with one paragraph.

    From the command line (`main()`), Hydra composes the config and a train-* command continues the run in
    output_dir from its saved config. `main(cfg)` runs an already composed config as it is (the pipeline).
    `prepare(cfg)` runs before the required-keys check: it may fill values the user left unset (e.g. the
    base model, read from an SFT checkpoint); it is also `main.prepare`, for `--cfg job` to show them.
    """
    import hydra

    from ppo_cli.config import register_configs

    register_configs()

    def decorate(run: Callable[[DictConfig], object]) -> Callable[..., None]:
        def checked_run(cfg: DictConfig, overrides: list[str] | None) -> None:
            quiet_libraries()
            try:
                reject_unknown_keys(cfg, command)  # `-m` runs skip the dispatcher's precheck
                # Resolve once: ${now:...} in output_dir must not change between reads.
                resolve_or_fail(cfg, command)
                if overrides is not None:
                    cfg = continue_saved_run(cfg, command, overrides)
                if prepare is not None:
                    prepare(cfg)
                check_required(cfg)
                run(cfg)
            except UserError as exc:
                fail(str(exc), command)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # metrics.jsonl, config.yaml, ...: checkpoints and final/ report their own write errors.
                fail(
                    f"{exc.strerror} while writing {exc.filename or 'the run'}: free disk space, then rerun "
                    "with resume=auto (complete checkpoints are never damaged by a failed write).",
                    command,
                )
            except KeyboardInterrupt:
                print(f"\nppo-cli {command}: interrupted.", file=sys.stderr)
                sys.exit(130)

        @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
        @functools.wraps(run)  # Hydra names the job after the task function's module
        def from_command_line(cfg: DictConfig) -> None:
            checked_run(cfg, command_line_overrides())

        @functools.wraps(run)
        def main(cfg: DictConfig | None = None) -> None:
            if cfg is None:
                from_command_line()
            else:
                checked_run(cfg, None)

        main.prepare = prepare
        return main

    return decorate


_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def split_hydra_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's flags (with their values) from the overrides, keeping each group's order."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flags.append(arg)
            if (
                arg in _FLAGS_WITH_VALUE
                and i + 1 < len(args)
                or arg in ("--info", "-i")
                and i + 1 < len(args)
                and not args[i + 1].startswith("-")
                and "=" not in args[i + 1]
            ):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides
