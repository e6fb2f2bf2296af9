"""`ppo-cli pipeline recipe=NAME [OVERRIDES]`: sft -> rm -> ppo of a recipe in one run directory.

A recipe is a folder `recipes/NAME/` with `sft.yaml`, `rm.yaml`, `ppo.yaml` (each a Hydra config with
`# @package _global_`, composed on top of `conf/train_<stage>.yaml`), a README, and optionally
`recipe.yaml` naming a `setup` hook (builds or downloads what the stages read, returns per-stage overrides)
and a `report` hook (runs after the last stage). recipe.yaml's `stages: [sft, ppo]` makes a recipe without
a reward-model stage (no rm.yaml): its ppo.yaml names a `reward_fn`, and `rm.*` overrides are errors. `./recipes/NAME` is looked up before the shipped recipes.

Overrides, one command line for three stages:

    recipe=NAME output_dir=DIR resume=auto|never stages=[sft,rm] dry_run=true   the pipeline itself
    sft.KEY=VALUE  rm.KEY=VALUE  ppo.KEY=VALUE     one stage: `sft.train.max_steps=10` is train-sft's
                                                   `train.max_steps=10`; also +sft.KEY=V, sft.GROUP=OPTION
                                                   (e.g. sft.lora=all-linear)
    all.KEY=VALUE                                  every stage (applied before the per-stage ones)
    setup.KEY=VALUE                                an argument of the recipe's setup hook

Each stage's config is, in increasing priority: conf/train_<stage>.yaml, recipes/NAME/<stage>.yaml, the
setup hook's overrides, all.*, <stage>.*. Then the pipeline fills what chains the stages, unless the
recipe or the user set it: output_dir = RUN/<stage>, resume, rm/ppo sft_checkpoint = the SFT stage's
final/, ppo reward_checkpoint = the RM stage's final/ (unless reward_fn is set). rm and ppo take their
base model from sft_checkpoint, as when run alone.

Stages run in this process, one after the other (see `run_stage`): the composed config object is what
runs, with no second composition in a subprocess that could disagree with the checks done here. A stage
whose final/ is complete is skipped; an interrupted one resumes from its newest checkpoint
(resume=auto), so rerunning the same command with output_dir=RUN continues a stopped pipeline.
"""

from ppo_cli.pipeline.command import main, run_pipeline, summary_table
from ppo_cli.pipeline.plan import Plan, make_plan, route_overrides
from ppo_cli.pipeline.recipes import STAGES, Recipe, available_recipes, find_recipe, load_hook

__all__ = [
    "STAGES",
    "Plan",
    "Recipe",
    "available_recipes",
    "find_recipe",
    "load_hook",
    "main",
    "make_plan",
    "route_overrides",
    "run_pipeline",
    "summary_table",
]
