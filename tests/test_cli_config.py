"""The command line: help, Hydra flags and overrides, multirun, and one-paragraph errors (exit 2, no traceback)
for every kind of user mistake."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli_in_process

from ppo_cli.cli import COMMANDS

REPO = Path(__file__).resolve().parent.parent

SUBCOMMANDS = [
    "train-sft",
    "train-rm",
    "train-ppo",
    "pipeline",
    "generate",
    "evaluate",
    "export",
    "plan",
    "plot",
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def run_many(commands: list[list[str]], cwd: Path | None = None, timeout: float = 300):
    """Run several `python -m ppo_cli ...` commands at once (they are mostly start-up time); in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ppo_cli", *args],
            cwd=cwd or REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for args in commands
    ]
    results = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str, command: str = "train-sft") -> str:
    """Exit 2, no traceback, and exactly one paragraph on stderr that names every needle."""
    everything = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{everything}"
    assert "Traceback" not in everything, everything
    paragraph = result.stderr.strip()
    assert paragraph.startswith(f"ppo-cli {command}: error: " if command else "ppo-cli: error: "), everything
    assert "\n" not in paragraph, f"more than one paragraph on stderr:\n{paragraph}"
    for needle in needles:
        assert needle in paragraph, f"{needle!r} not in: {paragraph}"
    return paragraph


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root with its modification time and bytes (to prove nothing was touched)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------- help


def _check_top_help(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in SUBCOMMANDS:
        described = [ln for ln in lines if ln.strip().startswith(name + " ")]
        assert len(described) == 1, f"{name} is not listed once with a description:\n{result.stdout}"
        assert len(described[0].split(name, 1)[1].strip()) > 10  # a real one-line description


def test_help_lists_all_subcommands():
    assert list(COMMANDS) == SUBCOMMANDS
    script = shutil.which("ppo-cli") or str(Path(sys.executable).parent / "ppo-cli")
    _check_top_help(subprocess.run([script, "--help"], capture_output=True, text=True, env=_env(), cwd=REPO))
    module, bare = run_many([["--help"], []])
    _check_top_help(module)
    _check_top_help(bare)  # no command at all: the same overview


def test_subcommand_help_shows_its_config():
    result = run_many([["train-sft", "--help"]])[0]
    assert result.returncode == 0, result.stderr
    assert "Configuration groups" in result.stdout
    assert "name_or_path: ???" in result.stdout  # the required key, shown as missing
    assert "lora: all-linear, default, full" in result.stdout
    # each key's description (its comment in ppo_cli/config.py) right above it
    assert "\n  # Peak learning rate (AdamW).\n  lr: 0.0002\n" in result.stdout, result.stdout
    assert "\n# The base model (group model=NAME: a preset of conf/model/).\nmodel:\n" in result.stdout


@pytest.mark.parametrize("command", ["train-sft", "train-rm", "train-ppo"])
def test_subcommand_help_imports_no_torch(command):
    """--help comes from the config alone: it neither imports the command's module nor torch (seconds)."""
    code = (
        "import sys\nfrom ppo_cli.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ppo_cli.ppo.train') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "Configuration groups" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("config_name", sorted({config for _, config, _ in COMMANDS.values()}))
def test_every_schema_field_has_a_description(config_name):
    from ppo_cli.schema import field_descriptions, schema_class, schema_keys

    schema = schema_class(config_name)
    described = field_descriptions(schema)
    assert [k for k in schema_keys(schema) if k not in described] == [], "add a comment above these fields"


# ------------------------------------------------------------------------------------- composition


def test_cfg_job_after_the_subcommand_prints_the_composed_config():
    before, after, extra = run_many(
        [
            [
                "train-sft",
                "--cfg",
                "job",
                "model.name_or_path=some/model",
                "data.train=a.jsonl",
                "train.seed=7",
            ],
            [
                "train-sft",
                "model.name_or_path=some/model",
                "data.train=a.jsonl",
                "train.seed=7",
                "--cfg",
                "job",
            ],
            ["train-sft", "model.name_or_path=x", "data.train=y", "lora=full", "--cfg", "job"],
        ]
    )
    for result in (before, after):
        assert result.returncode == 0, result.stderr
        cfg = yaml.safe_load(result.stdout)
        assert cfg["model"]["name_or_path"] == "some/model"
        assert cfg["data"]["train"] == "a.jsonl"
        assert cfg["train"]["seed"] == 7
        assert cfg["train"]["lr"] == 2.0e-4  # conf/train_sft.yaml over the schema's default
        assert cfg["lora"]["enabled"] is True and cfg["resume"] == "auto"
        assert "hydra" not in cfg
    assert yaml.safe_load(before.stdout) == yaml.safe_load(after.stdout)

    assert extra.returncode == 0, extra.stderr
    cfg = yaml.safe_load(extra.stdout)
    assert cfg["lora"]["enabled"] is False  # config group option


PRECHECK_ERRORS = {
    "unknown key": (["train.foo=1"], ["unknown key train.foo"]),
    "unknown nested key": (["lora.rank=8"], ["lora.rank"]),
    "new key without +": (["new.key=1"], ["new"]),
    "wrong type": (["train.lr=abc"], ["train.lr", "abc"]),
    "wrong type int": (["train.max_steps=1.5"], ["train.max_steps", "1.5"]),
    "unknown group option": (["model=nope"], ["model/nope", "qwen2.5-0.5b"]),
}


def test_config_errors_are_one_paragraph_exit_2(tiny):
    base = [f"model.name_or_path={tiny['model']}", f"data.train={tiny['sft']}"]
    cases = list(PRECHECK_ERRORS.items())
    results = run_many([["train-sft", *base, *overrides] for _, (overrides, _) in cases])
    for (name, (_, needles)), result in zip(cases, results):
        paragraph = assert_usage_error(result, *needles)
        assert "ppo-cli train-sft --cfg job" in paragraph, name  # says where to see the valid keys
        assert "To append" not in paragraph, name  # Hydra's `+` advice would add a key nothing reads


def test_unknown_command_and_missing_required_value(tmp_path):
    unknown, missing = run_many(
        [
            ["train-sfx", "model.name_or_path=x"],
            ["train-sft", "data.train=x.jsonl", f"output_dir={tmp_path / 'run'}"],
        ]
    )
    assert_usage_error(unknown, "unknown command 'train-sfx'", *SUBCOMMANDS, command="")
    paragraph = assert_usage_error(missing, "missing required value", "model.name_or_path")
    assert "data.train" not in paragraph  # names only what is missing
    assert not (tmp_path / "run").exists()  # nothing was created


# ------------------------------------------------------------------------------ data and output_dir


def _fake_run(root: Path, stage: str) -> Path:
    """A finished-looking run directory of `stage` (what resume=never and stage checks must not touch)."""
    (root / "checkpoints" / "step-000002").mkdir(parents=True)
    (root / "final").mkdir()
    (root / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  name_or_path: base\n")
    (root / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    (root / "checkpoints" / "step-000002" / "manifest.json").write_text("{}")
    (root / "final" / "ppo_cli.json").write_text(json.dumps({"stage": stage}))
    (root / "final" / "adapter_config.json").write_text("{}")
    return root


def test_data_and_output_dir_errors(tiny, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": oops}\n')
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"prompt": "a", "completion": " b"}\n' * 2 + '{"prompt": "a", "answer": " b"}\n')
    rm_run = _fake_run(tmp_path / "rm_run", "rm")
    sft_run = _fake_run(tmp_path / "sft_run", "sft")
    before = {run: snapshot(run) for run in (rm_run, sft_run)}

    model = f"model.name_or_path={tiny['model']}"
    train = f"data.train={tiny['sft']}"
    out = f"output_dir={tmp_path / 'out'}"
    missing_file, not_json, missing_field, missing_eval, other_stage, never = run_many(
        [
            ["train-sft", model, f"data.train={tmp_path / 'absent.jsonl'}", out],
            ["train-sft", model, f"data.train={bad_json}", out],
            ["train-sft", model, f"data.train={no_field}", out],
            ["train-sft", model, train, f"data.eval={tmp_path / 'absent_eval.jsonl'}", out],
            ["train-sft", model, train, f"output_dir={rm_run}"],
            ["train-sft", model, train, f"output_dir={sft_run}", "resume=never"],
        ]
    )
    assert_usage_error(missing_file, "data.train", str(tmp_path / "absent.jsonl"), "not found")
    assert_usage_error(not_json, str(bad_json), "line 2", "not valid JSON")
    assert_usage_error(missing_field, str(no_field), "row 3", "'completion'")
    assert_usage_error(missing_eval, "data.eval", "absent_eval.jsonl", "not found")
    assert_usage_error(other_stage, str(rm_run), "rm run", "sft run")
    assert_usage_error(never, str(sft_run), "resume=never", "resume=auto")
    assert not (tmp_path / "out").exists()  # a data error leaves no half-made run behind
    for run, files in before.items():
        assert snapshot(run) == files, f"{run} was modified"


# ------------------------------------------------------------------------------------------ multirun


def test_multirun_runs_one_job_per_value(tiny, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(Path(tiny["sft_eval"]).read_text().splitlines(keepends=True)[:4]))
    result = run_many(
        [
            [
                "train-sft",
                "-m",
                f"model.name_or_path={tiny['model']}",
                f"data.train={tiny['sft']}",
                f"data.eval={eval_file}",
                "train.max_steps=1",
                "train.batch_size=2",
                "train.seed=1,2",
                f"output_dir={tmp_path}/runs/${{train.seed}}",
                "logger.progress=false",
                "logger.plots=false",
            ]
        ],
        cwd=tmp_path,
    )[0]
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["1", "2"]
    adapters = []
    for seed in (1, 2):
        run = tmp_path / "runs" / str(seed)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["train"]["seed"] == seed and cfg["output_dir"] == str(run)
        assert (run / "final" / "adapter_model.safetensors").is_file()
        assert (run / "checkpoints" / "step-000001" / "manifest.json").is_file()
        adapters.append((run / "final" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] != adapters[1]  # each job trained with its own seed


@pytest.mark.parametrize("flag", ["--cfg", "-c"])
def test_precheck_still_runs_with_cfg_flag(flag):
    result = run_many([["train-sft", flag, "job", "train.foo=1"]])[0]
    assert_usage_error(result, "train.foo")


# ----------------------------------------------------------------- in-process: errors before any model


def run_here(*args: str) -> subprocess.CompletedProcess:
    """`ppo-cli ARGS` through the dispatcher in this process (for answers that come before any model loads)."""
    return run_cli_in_process(*args)


def test_typo_suggests_the_near_key_instead_of_adding_it():
    paragraph = assert_usage_error(
        run_here("train-ppo", "ppo.kl_coeff=0.1"),
        "ppo.kl_coeff",
        "Did you mean ppo.kl_coef?",
        command="train-ppo",
    )
    assert "+ppo" not in paragraph  # `+ppo.kl_coeff=0.1` would run with kl_coef unchanged


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_a_key_the_schema_does_not_declare_cannot_be_added_with_plus(tmp_path, multirun):
    """`+key=value` adds a key to the composed config; one the schema does not declare is read by nothing.
    A multirun skips the dispatcher's check: each job checks its own config before loading anything."""
    out = tmp_path / "run"
    flags = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if multirun else []
    result = run_here(
        "train-ppo",
        *flags,
        "+ppo.kl_coeff=0.1",
        "model.name_or_path=some/model",
        "data.train=prompts.jsonl",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        f"output_dir={out}",
    )
    paragraph = assert_usage_error(
        result, "unknown key ppo.kl_coeff", "Did you mean ppo.kl_coef?", command="train-ppo"
    )
    assert "+ppo" not in paragraph
    assert not out.exists()


def test_pipeline_stage_keys_are_checked_and_its_open_dicts_stay_open(tmp_path):
    from ppo_cli import pipeline
    from ppo_cli.app import precheck
    from ppo_cli.errors import UserError
    from ppo_cli.schema import unknown_keys

    with pytest.raises(UserError) as info:
        pipeline.make_plan("tiny", ["+ppo.ppo.kl_coeff=0.1"], run_dir=tmp_path / "run", build=False)
    message = str(info.value)
    assert "unknown key ppo.ppo.kl_coeff" in message and "Did you mean ppo.ppo.kl_coef?" in message, message
    # sft.*, all.*, setup.* are open: any key goes there (the stage or the setup hook checks it)
    cfg = precheck(
        "pipeline", ["recipe=tiny", "+setup.pretrain_steps=5", "+sft.train.max_steps=3"], "pipeline"
    )
    assert unknown_keys(cfg) == [] and cfg.setup.pretrain_steps == 5


def _fake_sft_product(root: Path, base: str) -> Path:
    root.mkdir()
    (root / "ppo_cli.json").write_text(json.dumps({"stage": "sft", "base_model": base}))
    (root / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return root


@pytest.mark.parametrize("command", ["train-rm", "train-ppo"])
def test_cfg_job_shows_the_base_model_read_from_sft_checkpoint(tmp_path, command):
    sft = _fake_sft_product(tmp_path / "sft", "org/tiny-base")
    result = run_here(command, f"sft_checkpoint={sft}", "data.train=x.jsonl", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["name_or_path"] == "org/tiny-base"


# ------------------------------------------------------------------- continuing a run from its output_dir

# stage -> (the command line that started the run, a change that a resumed run must refuse)
STARTED_WITH = {
    "sft": (
        ["model.name_or_path=/no/such/model", "data.train=sft.jsonl", "train.lr=0.001"],
        "data.train=b.jsonl",
    ),
    "rm": (["sft_checkpoint=/x/sft/final", "model.name_or_path=org/base", "data.train=p.jsonl"], "lora.r=4"),
    "ppo": (
        ["sft_checkpoint=/x/sft/final", "model.name_or_path=org/base", "data.train=p.jsonl", "reward_fn=m:f"],
        "ppo.kl_coef=0.2",
    ),
}


def saved_run(root: Path, stage: str, *overrides: str) -> Path:
    """A run directory as a started run leaves it: config.yaml holds the stage and the resolved config, and
    a checkpoint to continue (a directory without one starts afresh: tests/test_run_dirs.py)."""
    from omegaconf import OmegaConf

    from ppo_cli.app import precheck

    run = root / f"{stage}-run"
    root.mkdir(exist_ok=True)
    cfg = precheck(f"train_{stage}", [f"output_dir={run}", *overrides], f"train-{stage}")
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "manifest.json").write_text("{}")
    OmegaConf.save(
        OmegaConf.create({"stage": stage, **OmegaConf.to_container(cfg, resolve=True)}), run / "config.yaml"
    )
    return run


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_output_dir_of_a_run_starts_from_its_saved_config(tmp_path, stage):
    from omegaconf import OmegaConf

    from ppo_cli.app import missing_required, precheck
    from ppo_cli.errors import UserError
    from ppo_cli.resume_config import merge_saved_config

    started, refused = STARTED_WITH[stage]
    run = saved_run(tmp_path, stage, *started, "train.max_steps=6")
    saved = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    saved.pop("stage")

    def merge(*overrides: str):
        args = [f"output_dir={run}", *overrides]
        return merge_saved_config(precheck(f"train_{stage}", args, f"train-{stage}"), stage, args)

    merged, changed, dropped = merge("resume=auto")
    assert OmegaConf.to_container(merged) == saved and not changed and not dropped
    assert missing_required(merged) == []  # the required values come from the saved config

    merged, changed, _ = merge("train.max_steps=9", "logger.progress=false")
    assert merged.train.max_steps == 9 and merged.data.train == saved["data"]["train"]
    assert changed == {"train.max_steps": (6, 9), "logger.progress": (True, False)}
    merge(*started)  # the original command line again: the same values are no change

    with pytest.raises(UserError) as info:
        merge(refused, "train.max_steps=9")
    key, value = refused.split("=")
    message = str(info.value)
    assert f"{refused} (the run has {key}=" in message and f"Leave {key} out" in message, message

    cfg, changed, _ = merge("resume=never")  # not continued: the run directory refuses it later
    assert OmegaConf.is_missing(cfg.data, "train") and not changed


def test_saved_config_of_another_stage_or_an_older_version(tmp_path):
    from omegaconf import OmegaConf

    from ppo_cli.app import precheck
    from ppo_cli.errors import UserError
    from ppo_cli.resume_config import merge_saved_config

    run = saved_run(tmp_path, "sft", *STARTED_WITH["sft"][0])
    cfg = precheck("train_rm", [f"output_dir={run}"], "train-rm")
    with pytest.raises(UserError, match="holds a sft run, not a rm run"):
        merge_saved_config(cfg, "rm", [f"output_dir={run}"])
    # a key an older version let through (`+lora.rank=8`) is dropped: it had no effect on the run
    saved = OmegaConf.load(run / "config.yaml")
    saved.lora.rank = 8
    OmegaConf.save(saved, run / "config.yaml")
    merged, _, dropped = merge_saved_config(
        precheck("train_sft", [f"output_dir={run}"], "train-sft"), "sft", []
    )
    assert dropped == ["lora.rank"] and "rank" not in merged.lora


def test_resume_command_needs_only_output_dir(tmp_path):
    """From the command line: the required values come from config.yaml (the run then fails on the model it
    names, not on a missing value), and a change that would break the run is one paragraph, exit 2."""
    run = saved_run(tmp_path, "sft", *STARTED_WITH["sft"][0])
    result = run_here("train-sft", f"output_dir={run}", "resume=auto", "logger.progress=false")
    assert_usage_error(result, "/no/such/model", "no such directory")
    assert f"continuing the run in {run} with the settings of its config.yaml" in result.stdout
    changed = run_here("train-sft", f"output_dir={run}", "train.lr=0.5")
    assert_usage_error(changed, f"output_dir {run}", "train.lr=0.5 (the run has train.lr=0.001)")


def test_resume_may_swap_the_eval_set_but_not_hold_out_training_rows(tmp_path):
    """data.eval=null holds evaluation rows out of data.train: setting or clearing it changes the training
    rows; one evaluation file for another changes only the evaluation."""
    from ppo_cli.app import precheck
    from ppo_cli.errors import UserError
    from ppo_cli.resume_config import merge_saved_config

    held_out = saved_run(tmp_path / "a", "sft", *STARTED_WITH["sft"][0])
    with_eval = saved_run(tmp_path / "b", "sft", *STARTED_WITH["sft"][0], "data.eval=first.jsonl")

    def merge(run: Path, *overrides: str):
        args = [f"output_dir={run}", *overrides]
        return merge_saved_config(precheck("train_sft", args, "train-sft"), "sft", args)

    assert merge(with_eval, "data.eval=second.jsonl")[0].data.eval == "second.jsonl"
    for run, change in ((held_out, "data.eval=second.jsonl"), (with_eval, "data.eval=null")):
        with pytest.raises(UserError, match="data.eval"):
            merge(run, change)


@pytest.mark.parametrize("path", ["runs/ppo_int", "/tmp/my runs/a,b=c's"])
def test_printed_resume_command_survives_the_shell_and_hydra(path):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ppo_cli.run import resume_command

    command = resume_command("ppo", Path(path))
    assert command.startswith("ppo-cli train-ppo ") and command.endswith(" resume=auto")
    overrides = OverridesParser.create().parse_overrides(shlex.split(command)[2:])
    assert [(o.key_or_group, o.value()) for o in overrides] == [("output_dir", path), ("resume", "auto")]


@pytest.mark.parametrize(
    ("command", "key", "choices"),
    [
        ("train-sft", "data.overflow", "truncate, drop"),
        ("train-sft", "train.lr_scheduler", "cosine, linear, constant"),
        ("train-rm", "train.mixed_precision", "auto, bf16, no"),
        ("train-rm", "model.dtype", "auto, float32, bfloat16, float16"),
        ("train-ppo", "ppo.kl_controller", "adaptive, fixed"),
        ("train-ppo", "ppo.reward_normalization", "sft_samples, sft_mean, rm_stats, whiten, none"),
        ("generate", "data.overflow", "truncate, drop"),
    ],
)
def test_a_value_outside_a_keys_choices_fails_at_composition(command, key, choices):
    """Option keys are Choice enums: a bad value is refused when the config composes (exit 2, one
    paragraph naming the key and its choices), before any file is read or model loaded."""
    required = {"generate": ["checkpoint=nowhere", "output=out.jsonl", "data.prompts=nowhere.jsonl"]}.get(
        command, ["model.name_or_path=nowhere", "data.train=nowhere.jsonl"]
    )
    result = run_cli_in_process(command, *required, f"{key}=bogus")
    assert result.returncode == 2
    assert f"{key}=bogus is not one of {choices}." in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_choice_values_print_and_compare_as_plain_strings():
    from omegaconf import OmegaConf

    from ppo_cli.config import PPOConfig, RewardNormalization
    from ppo_cli.rlhf import REWARD_NORMALIZATIONS

    ppo = OmegaConf.structured(PPOConfig)
    assert ppo.kl_controller == "adaptive" and f"{ppo.kl_controller}" == "adaptive"
    assert "kl_controller: adaptive" in OmegaConf.to_yaml(ppo)
    assert {m.value for m in RewardNormalization} == set(REWARD_NORMALIZATIONS)
