"""Every recipe composes and validates through the pipeline's own composition path, and the pipeline's
override routing does what docs/recipes say. Nothing here trains or downloads anything."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ppo_cli import pipeline
from ppo_cli.errors import UserError
from ppo_cli.paths import recipes_dir

SHIPPED = sorted(p.name for p in recipes_dir().iterdir() if p.is_dir())
# Recipes with all three stages (tiny-grpo has no rm stage: its ppo stage is scored by a reward function).
THREE_STAGES = [name for name in SHIPPED if pipeline.find_recipe(name).stages == pipeline.STAGES]


def test_shipped_recipes_are_listed():
    assert {"tiny", "qwen2.5-0.5b-hh", "pythia-1b-tldr"} <= set(SHIPPED)
    assert set(SHIPPED) <= set(pipeline.available_recipes())
    for name in SHIPPED:
        folder = recipes_dir() / name
        assert (folder / "README.md").is_file(), name
        for stage in pipeline.find_recipe(name).stages:
            text = (folder / f"{stage}.yaml").read_text()
            assert text.startswith("# @package _global_"), f"{name}/{stage}.yaml must be a global package"


@pytest.mark.parametrize("name", THREE_STAGES)
def test_recipe_composes_and_validates(name, tmp_path):
    plan = pipeline.make_plan(name, [], run_dir=tmp_path / "run", build=False)
    assert plan.stages == ["sft", "rm", "ppo"]
    sft, rm, ppo = (plan.configs[s] for s in pipeline.STAGES)
    for stage, cfg in plan.configs.items():
        assert cfg.output_dir == str(tmp_path / "run" / stage)
        assert cfg.resume == "auto"
        # only the base model of rm/ppo may be unset: the stage reads it from sft_checkpoint
        missing = set(OmegaConf.missing_keys(cfg))
        assert missing <= ({"model.name_or_path"} if stage != "sft" else set()), (stage, missing)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert sft.model.name_or_path and sft.data.train
    assert rm.sft_checkpoint == ppo.sft_checkpoint == str(tmp_path / "run" / "sft" / "final")
    assert ppo.reward_checkpoint == str(tmp_path / "run" / "rm" / "final") and ppo.reward_fn is None
    assert rm.data.train and ppo.data.train
    assert ppo.train.batch_size % ppo.ppo.num_minibatches == 0
    assert not any((tmp_path / "run").glob("*")), "a plan without build must not write anything"


@pytest.mark.parametrize(
    ("name", "base"),
    [("qwen2.5-0.5b-hh", "Qwen/Qwen2.5-0.5B-Instruct"), ("pythia-1b-tldr", "EleutherAI/pythia-1b-deduped")],
)
def test_real_recipes_use_their_models_and_datasets(name, base, tmp_path):
    plan = pipeline.make_plan(name, [], run_dir=tmp_path, build=False)
    sft, rm, ppo = (plan.configs[s] for s in pipeline.STAGES)
    assert sft.model.name_or_path == base
    assert sft.lora.target_modules == "all-linear"
    assert ppo.generation.max_new_tokens >= 48 and ppo.ppo.missing_eos_penalty
    if name == "pythia-1b-tldr":
        assert (sft.data.train, rm.data.train, ppo.data.train) == (
            "trl-lib/tldr",
            "trl-lib/tldr-preference",
            "trl-lib/tldr",
        )
    else:
        assert rm.data.train == ppo.data.train == "trl-lib/hh-rlhf-helpful-base"
        assert sft.data.train.startswith(str(tmp_path))  # written by the recipe's prepare.py


def test_stage_overrides_are_routed(tmp_path):
    plan = pipeline.make_plan(
        "tiny",
        [
            "sft.train.max_steps=7",
            "all.train.seed=3",
            "ppo.generation.temperature=0.5",
            "rm.train.seed=4",  # per-stage wins over all.*
            "ppo.reward_fn=ppo_cli.tiny.task:positive_reward",
            "sft.lora=default",
        ],
        run_dir=tmp_path,
        build=False,
    )
    sft, rm, ppo = (plan.configs[s] for s in pipeline.STAGES)
    assert sft.train.max_steps == 7 and rm.train.max_steps != 7
    assert (sft.train.seed, rm.train.seed, ppo.train.seed) == (3, 4, 3)
    assert ppo.generation.temperature == 0.5
    # a reward function replaces the RM: the pipeline does not fill reward_checkpoint
    assert ppo.reward_fn == "ppo_cli.tiny.task:positive_reward" and ppo.reward_checkpoint is None
    assert sft.lora.target_modules == "all-linear"  # the recipe file still wins over the group default


def test_user_output_dir_of_a_stage_feeds_the_next(tmp_path):
    plan = pipeline.make_plan("tiny", [f"sft.output_dir={tmp_path / 'elsewhere'}"], run_dir=tmp_path / "run")
    assert plan.configs["sft"].output_dir == str(tmp_path / "elsewhere")
    assert plan.configs["rm"].sft_checkpoint == str(tmp_path / "elsewhere" / "final")


def test_route_overrides_keeps_values_verbatim():
    routed = pipeline.route_overrides(
        [
            "recipe=tiny",
            "+sft.new.key=1",
            "~rm.train.seed",
            "ppo.data.train='a b.jsonl'",
            "all.x=[1,2]",
            "setup.a=1",
        ]
    )
    assert routed == {
        "sft": ["+new.key=1"],
        "rm": ["~train.seed"],
        "ppo": ["data.train='a b.jsonl'"],
        "all": ["x=[1,2]"],
    }


def test_bad_stage_override_names_the_stage_and_key(tmp_path):
    with pytest.raises(UserError, match=r"sft stage.*sft\.train\.max_stepz=3.*max_stepz"):
        pipeline.make_plan("tiny", ["sft.train.max_stepz=3"], run_dir=tmp_path)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(UserError, match=r"unknown recipe 'nope'.*tiny"):
        pipeline.find_recipe("nope")


def test_stages_and_resume_are_checked(tmp_path):
    with pytest.raises(UserError, match="stages"):
        pipeline.make_plan("tiny", [], run_dir=tmp_path, stages=["sft", "dpo"])
    with pytest.raises(UserError, match="resume"):
        pipeline.make_plan("tiny", [], run_dir=tmp_path, resume="/some/checkpoint")
    plan = pipeline.make_plan("tiny", [], run_dir=tmp_path, stages=["ppo", "sft"])
    assert plan.stages == ["sft", "ppo"]  # always in pipeline order


def test_recipe_in_working_directory_wins(tmp_path, monkeypatch):
    own = tmp_path / "recipes" / "mine"
    own.mkdir(parents=True)
    for stage in pipeline.STAGES:
        (own / f"{stage}.yaml").write_text(
            "# @package _global_\nmodel:\n  name_or_path: /models/base\ndata:\n  train: d.jsonl\n"
        )
    monkeypatch.chdir(tmp_path)
    assert "mine" in pipeline.available_recipes()
    plan = pipeline.make_plan("mine", [], run_dir=tmp_path / "run")
    assert plan.configs["sft"].model.name_or_path == "/models/base"
    assert plan.recipe.path.resolve() == own.resolve()


def test_tiny_setup_points_stages_at_the_run_directory(tmp_path):
    plan = pipeline.make_plan("tiny", [], run_dir=tmp_path, build=False)
    root = tmp_path.absolute() / "tiny"
    assert plan.configs["sft"].model.name_or_path == str(root / "model")
    assert plan.configs["sft"].data.train == str(root / "data" / "sft.jsonl")
    assert plan.configs["rm"].data.train == str(root / "data" / "prefs.jsonl")
    assert plan.configs["ppo"].data.train == str(root / "data" / "prompts.jsonl")
    with pytest.raises(UserError, match="unknown setup"):
        pipeline.make_plan("tiny", [], run_dir=tmp_path, setup_args={"pretrain_stepz": 1})


def test_tiny_grpo_composes_without_an_rm_stage(tmp_path):
    assert "tiny-grpo" in SHIPPED and "tiny" in THREE_STAGES and "tiny-grpo" not in THREE_STAGES
    run = tmp_path / "run"
    plan = pipeline.make_plan("tiny-grpo", [], run_dir=run, build=False)
    assert plan.stages == ["sft", "ppo"] and set(plan.configs) == {"sft", "ppo"}
    sft, ppo = plan.configs["sft"], plan.configs["ppo"]
    for stage, cfg in plan.configs.items():
        assert cfg.output_dir == str(run / stage) and cfg.resume == "auto"
        missing = set(OmegaConf.missing_keys(cfg))
        assert missing <= ({"model.name_or_path"} if stage != "sft" else set()), (stage, missing)
        OmegaConf.to_container(cfg, resolve=True)
    # SFT exactly as the tiny recipe's; the base model and data come from the tiny recipe's setup hook
    tiny_sft = pipeline.make_plan("tiny", [], run_dir=run, build=False).configs["sft"]
    assert OmegaConf.to_container(sft) == OmegaConf.to_container(tiny_sft)
    assert sft.model.name_or_path == str(run.absolute() / "tiny" / "model")
    assert ppo.data.train == str(run.absolute() / "tiny" / "data" / "prompts.jsonl")
    # no RM: the task's verifiable score, GRPO's group baseline over 4 samples per prompt
    assert ppo.sft_checkpoint == str(run / "sft" / "final")
    assert ppo.reward_fn == "ppo_cli.tiny.task:positive_reward" and ppo.reward_checkpoint is None
    assert ppo.ppo.advantage_estimator == "grpo" and ppo.generation.samples_per_prompt == 4
    assert ppo.train.batch_size % ppo.ppo.num_minibatches == 0
    # all.* and the stages' own overrides route as for three-stage recipes
    plan = pipeline.make_plan(
        "tiny-grpo", ["all.train.seed=3", "ppo.train.max_steps=2", "sft.train.max_steps=5"], run_dir=run
    )
    assert (plan.configs["sft"].train.seed, plan.configs["ppo"].train.seed) == (3, 3)
    assert (plan.configs["sft"].train.max_steps, plan.configs["ppo"].train.max_steps) == (5, 2)
    plan = pipeline.make_plan("tiny-grpo", [], run_dir=run, stages=["ppo"])
    assert plan.stages == ["ppo"] and plan.configs["ppo"].sft_checkpoint == str(run / "sft" / "final")
    assert not any(run.glob("*")), "a plan without build must not write anything"


def test_tiny_grpo_dry_run_prints_two_stages(tmp_path):
    from conftest import run_cli_in_process

    result = run_cli_in_process(
        "pipeline", "recipe=tiny-grpo", f"output_dir={tmp_path / 'run'}", "dry_run=true"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every stage composes and validates" in " ".join(result.stdout.split())  # however it wraps
    assert "positive_reward" in result.stdout and "advantage_estimator: grpo" in result.stdout
    assert "reward_checkpoint: null" in result.stdout and "rm/final" not in result.stdout
    assert not (tmp_path / "run").exists()


def _two_stage_recipe(root, name, recipe_yaml, ppo_yaml="# @package _global_\n"):
    folder = root / "recipes" / name
    folder.mkdir(parents=True)
    for stage in ("sft", "ppo"):
        (folder / f"{stage}.yaml").write_text(
            "# @package _global_\nmodel:\n  name_or_path: /models/base\ndata:\n  train: d.jsonl\n"
        )
    (folder / "ppo.yaml").write_text(
        "# @package _global_\ndata:\n  train: d.jsonl\n" + ppo_yaml.removeprefix("# @package _global_\n")
    )
    (folder / "recipe.yaml").write_text(recipe_yaml)
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # an rm.* override for a recipe without that stage
        (["rm.train.lr=1e-3"], r"recipe tiny-grpo has no rm stage .*stages \[sft, ppo\].*rm\.train\.lr=1e-3"),
        # running a stage the recipe does not have
        (["stages=[sft,rm]"], r"recipe tiny-grpo has no rm stage"),
        # the ppo stage with its reward function taken away
        (["ppo.reward_fn=null"], r"recipe tiny-grpo has no rm stage.*needs a reward function.*reward_fn"),
    ],
)
def test_tiny_grpo_stage_errors_exit_2(args, message, tmp_path):
    import re

    from conftest import run_cli_in_process

    result = run_cli_in_process("pipeline", "recipe=tiny-grpo", f"output_dir={tmp_path / 'run'}", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(message, " ".join(result.stderr.split())), result.stderr
    assert not (tmp_path / "run").exists()


def test_recipe_stages_are_checked(tmp_path, monkeypatch):
    from conftest import run_cli_in_process

    monkeypatch.chdir(tmp_path)
    # stages [sft, ppo] and a ppo.yaml without reward_fn: the error names the recipe, its file and the key
    folder = _two_stage_recipe(tmp_path, "no-reward", "stages: [sft, ppo]\n")
    assert "no-reward" in pipeline.available_recipes()
    with pytest.raises(UserError, match=r"recipe no-reward has no rm stage.*reward_fn in .*ppo\.yaml"):
        pipeline.make_plan("no-reward", [], run_dir=tmp_path / "run")
    result = run_cli_in_process("pipeline", "recipe=no-reward", "dry_run=true")
    assert result.returncode == 2 and "reward_fn" in result.stderr, result.stdout + result.stderr
    # naming one on the command line is enough
    plan = pipeline.make_plan("no-reward", ["ppo.reward_fn=ppo_cli.tiny.task:positive_reward"], run_dir="r")
    assert plan.stages == ["sft", "ppo"] and plan.configs["ppo"].reward_checkpoint is None
    assert plan.recipe.path.resolve() == folder.resolve()
    # stages naming an unknown stage
    _two_stage_recipe(tmp_path, "bad-stages", "stages: [sft, dpo]\n")
    with pytest.raises(UserError, match=r"recipe\.yaml: stages=.*dpo.*distinct stages among"):
        pipeline.find_recipe("bad-stages")
    result = run_cli_in_process("pipeline", "recipe=bad-stages", "dry_run=true")
    assert result.returncode == 2 and "stages=" in result.stderr, result.stdout + result.stderr
