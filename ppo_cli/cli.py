"""`ppo-cli` dispatcher: `ppo-cli SUBCOMMAND [hydra flags] [overrides]`.

Each subcommand is its own Hydra app (its module's `main`). The dispatcher picks the module, checks
the overrides by composing the config once (so mistakes exit 2 before a model loads), and hands the
arguments to Hydra with its flags first, as Hydra 1.3 wants.
"""

from __future__ import annotations

import importlib
import re
import sys

from ppo_cli import __version__

# subcommand -> (module, config name, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train-sft": (
        "ppo_cli.sft.train",
        "train_sft",
        "supervised fine-tuning of a LoRA adapter on a base model",
    ),
    "train-rm": (
        "ppo_cli.rm.train",
        "train_rm",
        "train a reward model (LoRA adapter + scalar score head) on preference pairs",
    ),
    "train-ppo": (
        "ppo_cli.ppo.train",
        "train_ppo",
        "PPO against a reward model or reward function, KL-penalised to the SFT policy",
    ),
    "pipeline": (
        "ppo_cli.pipeline.command",
        "pipeline",
        "run sft -> rm -> ppo of a recipe, each stage's final/ feeding the next",
    ),
    "generate": (
        "ppo_cli.generate",
        "generate",
        "sample completions from any stage's final/ (or a base model) into JSONL",
    ),
    "evaluate": (
        "ppo_cli.evaluation.command",
        "evaluate",
        "a policy against its reference on held-out prompts: reward, win rate, KL, length, EOS, distinct-2",
    ),
    "export": ("ppo_cli.export", "export", "merge adapter(s) into a standalone Hugging Face model directory"),
    "plan": (
        "ppo_cli.plan.command",
        "plan",
        "the peak memory a train-* run will need and whether it fits, before it starts",
    ),
    "plot": (
        "ppo_cli.plots",
        "plot",
        "overlay the curves of several runs (a sweep, seeds) into PNGs: ppo-cli plot RUN_DIR ... output=DIR",
    ),
}
# Commands that parse their own arguments (no Hydra app): `plan COMMAND ...` composes COMMAND's config,
# `plot` takes run directories as plain arguments.
OWN_ARGUMENTS = {"plan", "plot"}

# Flags that make Hydra do something other than run one job: no precheck for those.
_NO_PRECHECK_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--multirun",
    "-m",
    "--shell-completion",
    "-sc",
    "--version",
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"ppo-cli {__version__}: SFT -> reward model -> PPO on LoRA adapters, configured with Hydra.",
        "",
        "usage: ppo-cli COMMAND [hydra flags] [key=value ...]",
        "",
        "commands:",
        *(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()),
        "",
        "Every command takes Hydra overrides (key=value, +key=value, ~key, group=option) and Hydra's flags",
        "(--cfg job, --help, -m). `ppo-cli COMMAND --help` lists a command's config and what each key means.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from ppo_cli.app import fail, precheck, split_hydra_args

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0)
    if args[0] in ("--version", "-V"):
        print(__version__)
        sys.exit(0)
    command = args[0]
    if command not in COMMANDS:
        fail(f"unknown command '{command}'. Choose one of: {', '.join(COMMANDS)} (see `ppo-cli --help`).")
    module_name, config_name, _ = COMMANDS[command]
    if command in OWN_ARGUMENTS:
        importlib.import_module(module_name).main(args[1:])
        return
    flags, overrides = split_hydra_args(args[1:])
    cfg = None if _NO_PRECHECK_FLAGS.intersection(flags) else precheck(config_name, overrides, command)
    if {"--help", "-h"}.intersection(flags):
        sys.argv = [f"ppo-cli {command}", *flags, *overrides]
        help_with_descriptions(config_name, command)
    module = importlib.import_module(module_name)
    if cfg is not None and {"--cfg", "-c"}.intersection(flags):
        overrides = [*overrides, *filled_at_run_time(cfg, getattr(module.main, "prepare", None))]
    sys.argv = [f"ppo-cli {command}", *flags, *overrides]
    module.main()
    # The command returned: leave the process group (a torchrun's) while the interpreter is whole (see
    # ppo_cli/dist.py). Only a command that imported ppo_cli.dist can have one; looking it up keeps
    # `--cfg job` and the like from importing torch.
    dist = sys.modules.get("ppo_cli.dist")
    if dist is not None:
        dist.shutdown()


def filled_at_run_time(cfg, prepare) -> list[str]:
    """Overrides setting what the command fills in itself before it runs (train-rm's and train-ppo's
    model.name_or_path, read from sft_checkpoint), so that `--cfg job` shows the value the run will use."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ppo_cli.app import hydra_quote, missing_required
    from ppo_cli.errors import UserError

    if prepare is None:
        return []
    cfg = cfg.copy()
    missing = missing_required(cfg)
    try:
        prepare(cfg)
    except (UserError, OmegaConfBaseException):
        return []  # shown as it was given; running it reports the problem
    still = set(missing_required(cfg))
    return [f"{key}={hydra_quote(str(OmegaConf.select(cfg, key)))}" for key in missing if key not in still]


def help_with_descriptions(config_name: str, command: str) -> None:
    """Hydra's --help under the command's own heading, with each key's description (ppo_cli/config.py's
    comments) above it; exits. Hydra prints it from the config alone, so it runs an app that does nothing
    instead of the command's: --help imports neither the command's module nor torch (seconds)."""
    import contextlib
    import io

    from ppo_cli.app import hydra_app
    from ppo_cli.schema import annotate_config_yaml, field_descriptions, schema_class

    main = hydra_app(config_name, command)(lambda cfg: None)

    captured = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(captured):
        try:
            main()
        except SystemExit as exc:
            code = exc.code
    text = annotate_config_yaml(captured.getvalue(), field_descriptions(schema_class(config_name)))
    # A command whose config writes its own help (pipeline's hydra.help) has no Hydra header to replace.
    print(HYDRA_HEADER.sub(lambda _: command_heading(command), text, count=1), end="")
    sys.exit(code)


# Hydra's own first line ("train is powered by Hydra.", named after the job's module): the command's
# heading replaces it, since what a user wants first is what the command does.
HYDRA_HEADER = re.compile(r"\A[^\n]* is powered by Hydra\.\n+")


def command_heading(command: str) -> str:
    """What `ppo-cli COMMAND --help` opens with: the command's one line and its usage."""
    return (
        f"ppo-cli {command}: {COMMANDS[command][2]}\n\n"
        f"usage: ppo-cli {command} [hydra flags] [key=value ...]\n"
        "Every key below can be set as key=value; above each, what it means, and its default beside it.\n\n"
    )


if __name__ == "__main__":
    main()
