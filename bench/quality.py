#!/usr/bin/env python
"""`make quality`: does PPO with ppo-cli's defaults improve the policy, and how does it compare with TRL?

For each local task of bench/tasks.py (a small pretrained Llama, an SFT adapter made by `ppo-cli
train-sft`, on-policy preference pairs labelled by a gold scorer):

1. reward models: `ppo-cli train-rm` with its defaults, from the SFT adapter; TRL 1.16's RewardTrainer
   with its defaults (bench/rm_baselines.py) on the same pairs, same number of steps and batch size;
2. PPO, 80 steps x 32 prompts at lr 1e-3, everything else each side's defaults, twice per side: with the
   gold scorer itself as the reward (ppo-cli: `reward_fn=`), and against that side's reward model;
   ppo-cli = `ppo-cli train-ppo`, TRL = TRL 1.12's `trl.experimental.ppo.PPOTrainer` (bench/trl_ppo.py)
   with kl_coef 0.05, stop_token="eos", no missing-EOS penalty;
3. the judge (bench/judge.py, plain transformers + peft): on held-out prompts, `--samples` responses per
   prompt at the training temperature; gold lift over the SFT policy, final KL to it, the reward model's
   win rate against the SFT policy's responses (the RM the policy trained against; for gold-trained
   policies, that side's RM), EOS rate, distinct-2; and each RM's held-out pair accuracy.

Tasks not built yet are built first (bench/tasks.py, two at once); then two runs go at once, one thread
each, TRL's first (they are the longest). Every run is cached under bench/results/quality/runs/<task>/
<task build>-<ppo-cli defaults>[-seed<N>]/ (a rebuilt task or changed defaults start afresh; --force redoes
runs); the table goes to the console and to bench/results/quality/results.md (+ results.json, samples/).

`--seeds 0,1,2` (`make quality`; default 0, `--seed N` is the same option) runs every job once per seed, in
one queue: the reward models, PPO and the critic-free rows with train.seed / --seed = N, each seed's runs
in a directory of its own (seed 0 in the one from before --seeds, so its cached runs stay valid); each
task is built once, for every seed. Each seed's policies are judged with that seed; the tables give, per
row, the mean over seeds and the range (min..max) of gold lift and final KL, the mean of the other
columns, and the number of seeds (aggregate_seeds); results.json keeps every seed's results too.

Tasks: sentiment and format_length (the defaults), and long_answer, a verifiable task where truncation
matters (gold 0 unless the answer is one sentence finished by its only ".", else min(words, 24) / 24; 24
words take ~49 of the 64 response tokens: bench/tasks.py).

    python bench/quality.py [--tasks sentiment,format_length] [--seeds 0] [--steps 80] [--batch-size 32]
                            [--lr 1e-3] [--samples 4] [--skip-trl] [--skip-trl-ppo] [--variant NAME=OVERRIDE,OVERRIDE ...]
                            [--estimators gae,grpo,... [--samples-per-prompt 4] [--trl-grpo-lr LR,...]]
                            [--trl-rm-python PY] [--trl-ppo-python PY] [--root DIR] [--results DIR]

`--variant NAME=A,B` adds ppo-cli rows with train-ppo overrides A and B (used to choose the defaults, e.g.
`--variant beta0.15=ppo.kl_coef=0.15`); `--no-defaults` leaves out the rows of the defaults. TRL's rows
are skipped with a note when its environments are missing (bench/README.md).

`--estimators gae,grpo,rloo,reinforce_plus_plus,grpo_dapo,gspo` adds a second table, on the gold reward and
one episode budget (`--batch-size` episodes per step): `ppo-cli train-ppo ppo.advantage_estimator=E
generation.samples_per_prompt=K train.batch_size=B/K` for each critic-free E (K = `--samples-per-prompt`,
4), GAE-PPO with B prompts x 1 sample (the defaults' gold row), and TRL 1.16's GRPOTrainer with its own
defaults and B/K prompts x K samples (bench/trl_grpo.py; `--trl-grpo-lr 1e-3,3e-4` for several learning
rates, default --lr). Two named grpo variants (ESTIMATOR_ROWS): `grpo_dapo`, DAPO as its released recipe
runs it (ppo.clip_range_high=0.28, ppo.loss_aggregation=token_mean, ppo.overlong_penalty=1.0 over the
default buffer, a fifth of the 64 tokens; no overlong filtering, no dynamic sampling, ppo-cli's KL
controller kept), and `gspo` (ppo.ratio_level=sequence with GSPO's clip ranges, ppo.clip_range=3e-4 and
ppo.clip_range_high=4e-4; grpo's per-sequence aggregation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import quality_tasks  # noqa: E402  (bench/quality_tasks.py)
import tasks as task_builders  # noqa: E402  (bench/tasks.py)

RESULTS = HERE / "results" / "quality"
DEFAULT_TASKS = "sentiment,format_length"
# The virtual environments `make trl-venv` (trl==1.16, its RewardTrainer) and `make trl112-venv`
# (trl==1.12.0, the last release with its PPOTrainer) create.
TRL_RM_PYTHON = os.environ.get("TRL_PYTHON", str(HERE / "results" / "trl116-venv" / "bin" / "python"))
TRL_PPO_PYTHON = os.environ.get("TRL_PPO_PYTHON", str(HERE / "results" / "trl112-venv" / "bin" / "python"))
# `--estimators`: GAE-PPO (the defaults' gold row, `gae`) and the critic-free rows, each with its train-ppo
# overrides (on top of generation.samples_per_prompt=K, train.batch_size=B/K). A row's name is also its
# runs' directory name, so the first three keep the runs cached before the DAPO and GSPO rows came.
ESTIMATOR_ROWS: dict[str, list[str]] = {
    "grpo": ["ppo.advantage_estimator=grpo"],
    "rloo": ["ppo.advantage_estimator=rloo"],
    "reinforce_plus_plus": ["ppo.advantage_estimator=reinforce_plus_plus"],
    # DAPO (Yu et al. 2025) as its released verl recipe runs it: clip-higher 0.2/0.28, token-level loss
    # (ppo-cli's grpo aggregates per sequence by default), the soft overlong penalty (factor 1.0, buffer a
    # fifth of the response cap: ppo.overlong_buffer's default), no overlong filtering. Not here: dynamic
    # sampling (no such option) and DAPO's beta = 0 (the KL controller stays, as on every ppo-cli row).
    "grpo_dapo": [
        "ppo.advantage_estimator=grpo",
        "ppo.clip_range_high=0.28",
        "ppo.loss_aggregation=token_mean",
        "ppo.overlong_penalty=1.0",
    ],
    # GSPO (Zheng et al. 2025): the sequence-level ratio (GSPO-token) with the paper's clip ranges, 3e-4 below
    # and 4e-4 above (docs/ppo-details.md: ppo.clip_range is not rescaled with the level); grpo's
    # seq_mean_token_mean aggregation is GSPO's per-response average.
    "gspo": [
        "ppo.advantage_estimator=grpo",
        "ppo.ratio_level=sequence",
        "ppo.clip_range=3e-4",
        "ppo.clip_range_high=4e-4",
    ],
}
ESTIMATORS = ("gae", *ESTIMATOR_ROWS)
DEFAULT_ESTIMATORS = "gae,grpo,rloo,reinforce_plus_plus,grpo_dapo,gspo"
# Metrics whose range over seeds the tables show beside the mean (gold lift, the judge's final KL).
SPREAD_KEYS = ("gold_lift", "kl")
# What the judge samples: the rollouts' settings of train-ppo's defaults (and TRL's run).
MAX_NEW_TOKENS = 64
TEMPERATURE = 0.7


# ---------------------------------------------------------------------------------------------------
# Jobs: commands with dependencies, run in two lanes


@dataclass
class Job:
    name: str
    lane: str  # "cli" or "trl"
    cmd: list[str]
    done: Path  # exists when the job's product is complete (cached)
    log: Path
    after: list[str] = field(default_factory=list)
    seconds: float | None = None
    cached: bool = False

    @property
    def seconds_file(self) -> Path:
        """Where a finished job's seconds are kept, so that a cached job still has them."""
        return self.log.with_suffix(".seconds")


def run_jobs(jobs: list[Job], threads: int, force: bool, workers: int = 2) -> None:
    """Run every job whose product is missing, `workers` at a time (two cores: two one-thread runs).

    Each worker takes the first job, in TRL-first order (TRL's runs are the longest), whose dependencies
    are done. A failure stops the whole run with the job's log tail."""
    finished: set[str] = set()
    failed: list[str] = []
    lock = threading.Condition()
    for job in jobs:
        if job.done.exists() and not force:
            job.cached = True
            finished.add(job.name)
            if job.seconds_file.is_file():
                job.seconds = float(job.seconds_file.read_text())
    todo = sorted((j for j in jobs if not j.cached), key=lambda j: j.lane != "trl")
    known = {j.name for j in jobs}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"

    def ready() -> Job | None:
        return next((j for j in todo if all(a in finished for a in j.after if a in known)), None)

    def worker() -> None:
        while True:
            with lock:
                lock.wait_for(lambda: failed or not todo or ready() is not None)
                if failed or not todo:
                    return
                job = ready()
                todo.remove(job)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            print(f"{job.name} ...", flush=True)
            start = time.perf_counter()
            with job.log.open("w") as f:
                rc = subprocess.run(job.cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            job.seconds = time.perf_counter() - start
            with lock:
                if rc != 0 or not job.done.exists():
                    failed.append(job.name)
                    tail = "\n".join(job.log.read_text().splitlines()[-30:])
                    print(f"{job.name} FAILED ({rc}), log {job.log}:\n{tail}", flush=True)
                else:
                    print(f"{job.name} done in {job.seconds:.0f} s", flush=True)
                    job.seconds_file.write_text(f"{job.seconds:.1f}\n")
                    finished.add(job.name)
                lock.notify_all()

    pool = [threading.Thread(target=worker) for _ in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failed:
        raise SystemExit(f"quality: {', '.join(failed)} failed")


# ---------------------------------------------------------------------------------------------------
# The runs of one task


def build_tasks(names: list[str], root: Path, threads: int, workers: int = 2) -> None:
    """Build the tasks not cached yet, each in its own process, `workers` at once (two cores: two builds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    running: list[subprocess.Popen] = []
    failed = False
    for name in [n for n in names if not quality_tasks.is_built(n, root)]:
        if len(running) >= workers:
            failed |= running.pop(0).wait() != 0
        cmd = [sys.executable, str(HERE / "tasks.py"), "--root", str(root), "--task", name]
        running.append(subprocess.Popen(cmd, env=env))
    if any([p.wait() != 0 for p in running]) or failed:
        raise SystemExit("quality: a task build failed (its output is above)")
    for name in names:  # cached now; fails loudly if a build left nothing behind
        task_builders.build_task(task_builders.TASKS[name], root)


def build_id(task_info: Path) -> str:
    """A short hash of the task build's record: runs made on an older build of a task are not reused."""
    import hashlib

    return hashlib.sha256(task_info.read_bytes()).hexdigest()[:10]


def defaults_id() -> str:
    """A short hash of the files that hold ppo-cli's defaults (ppo_cli/config.py, conf/): runs made
    with other defaults are not reused."""
    import hashlib

    digest = hashlib.sha256()
    for path in [REPO / "ppo_cli" / "config.py", *sorted((REPO / "conf").rglob("*.yaml"))]:  # stage defaults
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def rm_steps(train_pairs: int, batch_size: int, eval_fraction: float) -> int:
    """Optimizer steps of one epoch of train-rm's defaults over the pairs it trains on."""
    return -(-round(train_pairs * (1 - eval_fraction)) // batch_size)


def cli_defaults(stage: str) -> dict:
    """train.batch_size and data.eval_fraction of a stage's composed defaults."""
    from hydra import compose, initialize_config_dir

    from ppo_cli.config import register_configs

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose(stage, overrides=["model.name_or_path=x", "data.train=x", "output_dir=x"])
    return {"batch_size": int(cfg.train.batch_size), "eval_fraction": float(cfg.data.eval_fraction)}


def seed_suffix(seed: int) -> str:
    """What a seed adds to its runs' directory, job names and samples folder: nothing for seed 0 (the
    paths from before --seeds, so their cached runs stay valid), "-seed<N>" otherwise."""
    return "" if seed == 0 else f"-seed{seed}"


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2] (duplicates dropped, order kept)."""
    return list(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))


def task_jobs(task: str, args, variants: dict[str, list[str]], seed: int = 0) -> tuple[list[Job], dict]:
    """The jobs of one task and seed (reward models, PPO rows, critic-free rows, TRL's), and what the judge
    needs of their products."""
    paths = task_builders.task_paths(args.root, task)
    prompts = quality_tasks.prompt_files(task, args.results / "prompts")
    suffix = seed_suffix(seed)
    runs = args.results / "runs" / task / f"{build_id(paths['info'])}-{defaults_id()}{suffix}"
    tag = f"{task}{suffix}"  # job names: "sentiment/rm-ppo-cli", "sentiment-seed1/rm-ppo-cli"
    py = sys.executable
    jobs: list[Job] = []
    products: dict = {"policies": {}, "rms": {}, "paths": paths, "prompts": prompts, "critic_free": {}}

    rm_dir = runs / "rm-ppo-cli"
    # ppo-cli's RM: PPO's reward with --sources rm; judged (accuracy, win rates) where it was trained
    jobs += [] if "rm" not in args.sources else [
        Job(
            f"{tag}/rm-ppo-cli",
            "cli",
            [py, "-m", "ppo_cli", "train-rm", f"sft_checkpoint={paths['sft']}", f"data.train={paths['train']}",
             f"train.seed={seed}", "train.save_every=0", "logger.progress=false", f"output_dir={rm_dir}",
             "resume=never"],
            rm_dir / "final" / "adapter_config.json",
            runs / "logs" / "rm-ppo-cli.log",
        )
    ]  # fmt: skip
    products["rms"]["ppo-cli"] = rm_dir / "final"
    ppo_common = [
        f"sft_checkpoint={paths['sft']}",
        f"data.train={prompts['train']}",
        f"train.max_steps={args.steps}",
        f"train.lr={args.lr}",
        f"train.seed={seed}",
        "train.save_every=0",
        "logger.progress=false",
        "sample_every=0",
        "resume=auto",  # a stopped bench continues its runs from their last checkpoint
    ]
    sources = {
        "gold": ([f"reward_fn={quality_tasks.reward_fn_spec(task)}"], []),
        "rm": ([f"reward_checkpoint={rm_dir / 'final'}"], [f"{tag}/rm-ppo-cli"]),
    }

    def ppo_cli_row(
        variant: str, source: str, overrides: list[str], batch_size: int, main_table: bool
    ) -> str:
        """Add (once) the train-ppo job of a variant and reward source; returns its policy's name."""
        name = f"ppo-cli[{variant}]/{source}"
        if name in products["policies"]:
            products["policies"][name]["main"] |= main_table
            return name
        reward, after = sources[source]
        out = runs / f"ppo-cli-{variant}-{source}"
        job = Job(
            f"{tag}/{name}",
            "cli",
            [py, "-m", "ppo_cli", "train-ppo", *reward, *ppo_common, f"train.batch_size={batch_size}", *overrides,
             f"output_dir={out}"],
            out / "final" / "adapter_config.json",
            runs / "logs" / f"ppo-cli-{variant}-{source}.log",
            after,
        )  # fmt: skip
        jobs.append(job)
        products["policies"][name] = {
            "model": paths["base"], "adapter": out / "final", "rm": "ppo-cli", "source": source,
            "metrics": out / "metrics.jsonl", "job": job, "main": main_table,
        }  # fmt: skip
        return name

    for variant, overrides in variants.items():
        for source in sources:
            if source in args.sources:
                ppo_cli_row(variant, source, overrides, args.batch_size, True)
    # Critic-free estimators against GAE-PPO, gold reward, one budget: --batch-size episodes per step, as
    # --batch-size prompts x 1 sample (GAE) or --batch-size / K prompts x K samples (the others).
    group = args.samples_per_prompt
    for estimator in args.estimators:
        if estimator == "gae":
            name = ppo_cli_row("defaults", "gold", [], args.batch_size, False)
            products["critic_free"]["ppo-cli gae"] = {"policy": name, "rollout": f"{args.batch_size} x 1"}
            continue
        overrides = [*ESTIMATOR_ROWS[estimator], f"generation.samples_per_prompt={group}"]
        name = ppo_cli_row(estimator, "gold", overrides, args.batch_size // group, False)
        products["critic_free"][f"ppo-cli {estimator}"] = {
            "policy": name, "rollout": f"{args.batch_size // group} x {group}"
        }  # fmt: skip

    if not args.skip_trl:
        defaults = cli_defaults("train_rm")
        n_pairs = len(task_builders.read_jsonl(paths["train"]))
        steps = rm_steps(n_pairs, defaults["batch_size"], defaults["eval_fraction"])
        trl_rm = runs / "rm-trl"
        # like ppo-cli's, trained only for PPO against it (--sources rm); judged wherever it exists
        jobs += [] if args.skip_trl_ppo or "rm" not in args.sources else [
            Job(
                f"{tag}/rm-trl",
                "trl",
                [args.trl_rm_python, str(HERE / "rm_baselines.py"), "trl", str(paths["base"]), str(paths["train"]),
                 str(trl_rm), f"--seed={seed}", f"--steps={steps}", f"--batch-size={defaults['batch_size']}"],
                trl_rm / "adapter_config.json",
                runs / "logs" / "rm-trl.log",
            )
        ]  # fmt: skip
        products["rms"]["trl"] = trl_rm  # judged where it exists
        trl_sources = {
            "gold": (["--reward-fn", quality_tasks.reward_fn_spec(task)], []),
            "rm": (["--reward-model", str(trl_rm)], [f"{tag}/rm-trl"]),
        }
        for source, (reward, after) in trl_sources.items():
            if source not in args.sources or args.skip_trl_ppo:
                continue
            out = runs / f"trl-{source}"
            jobs.append(
                Job(
                    f"{tag}/trl/{source}",
                    "trl",
                    [args.trl_ppo_python, str(HERE / "trl_ppo.py"), str(paths["base"]), str(paths["sft"]),
                     str(prompts["train"]), str(out), *reward, f"--steps={args.steps}",
                     f"--batch-size={args.batch_size}", f"--lr={args.lr}", f"--seed={seed}",
                     f"--response-length={MAX_NEW_TOKENS}", f"--temperature={TEMPERATURE}"],
                    out / "done.json",
                    runs / "logs" / f"trl-{source}.log",
                    after,
                )
            )  # fmt: skip
            products["policies"][f"trl/{source}"] = {
                "model": out / "policy", "adapter": None, "rm": "trl", "source": source,
                "metrics": out / "metrics.jsonl", "job": jobs[-1], "main": True,
            }  # fmt: skip
        for grpo_lr in args.trl_grpo_lr if args.estimators else []:
            # TRL 1.16's GRPO beside the critic-free rows: the same prompts x samples per step
            lr_tag = "" if grpo_lr == args.lr else f"-lr{grpo_lr:g}"
            out = runs / f"trl-grpo{lr_tag}-gold"
            jobs.append(
                Job(
                    f"{tag}/trl-grpo{lr_tag}/gold",
                    "trl",
                    [args.trl_rm_python, str(HERE / "trl_grpo.py"), str(paths["base"]), str(paths["sft"]),
                     str(prompts["train"]), str(out), "--reward-fn", quality_tasks.reward_fn_spec(task),
                     f"--steps={args.steps}", f"--batch-size={args.batch_size // group}",
                     f"--num-generations={group}", f"--lr={grpo_lr}", f"--seed={seed}",
                     f"--max-completion-length={MAX_NEW_TOKENS}", f"--temperature={TEMPERATURE}"],
                    out / "done.json",
                    runs / "logs" / f"trl-grpo{lr_tag}-gold.log",
                )
            )  # fmt: skip
            name = f"trl-grpo{lr_tag}/gold"
            products["policies"][name] = {
                "model": out / "policy", "adapter": None, "rm": "trl", "source": "gold",
                "metrics": out / "metrics.jsonl", "job": jobs[-1], "main": False,
            }  # fmt: skip
            label = "TRL 1.16 GRPO" + (f" (lr {grpo_lr:g})" if lr_tag else "")
            products["critic_free"][label] = {
                "policy": name,
                "rollout": f"{args.batch_size // group} x {group}",
            }
    return jobs, products


# ---------------------------------------------------------------------------------------------------
# Judging and the table


def judge_products(task: str, products: dict, args, seed: int = 0) -> dict:
    """Judge one task's policies of one seed (sampled with that seed) and attach what the tables need."""
    import judge

    paths = products["paths"]
    held_out = [r["prompt"] for r in task_builders.read_jsonl(products["prompts"]["eval"])]
    policies = {
        name: (p["model"], p["adapter"])
        for name, p in products["policies"].items()
        if (p["adapter"] or p["model"]).exists()
    }
    rms = {name: path for name, path in products["rms"].items() if path.exists()}
    result = judge.judge_task(
        paths["base"],
        paths["sft"],
        policies,
        rms,
        held_out,
        task_builders.GOLDS[task_builders.TASKS[task].gold],
        n=args.samples,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        seed=seed,
        eval_pairs=task_builders.read_jsonl(paths["eval"]),
        samples_dir=args.results / "samples" / f"{task}{seed_suffix(seed)}",
    )
    for name, p in products["policies"].items():
        if name in result["policies"]:
            result["policies"][name].update(
                {"rm": p["rm"], "source": p["source"], "train_kl": final_train_kl(p["metrics"])}
            )
            if not p["main"]:  # a critic-free comparison's row only
                result["policies"][name]["main"] = False
    if products["critic_free"]:
        result["critic_free"] = {
            label: {**row, "job_seconds": products["policies"][row["policy"]]["job"].seconds}
            for label, row in products["critic_free"].items()
        }
    return result


def final_train_kl(metrics: Path) -> float | None:
    """objective/kl of the last logged training step."""
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "objective/kl" in r]
    return float(rows[-1]["objective/kl"]) if rows else None


def mean_of(values: list) -> object:
    """The mean over seeds of one metric: numbers averaged (None left out; None when all are), dicts key by
    key (rm_win, rm_accuracy, ...), anything else (labels, flags, paths) the first value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in present for k in v)
        return {k: mean_of([v.get(k) for v in present]) for k in keys}
    if isinstance(first, int | float) and not isinstance(first, bool):
        return sum(present) / len(present)
    return first


def span(values: list[float]) -> list[float]:
    """[min, max] of one metric over the seeds that have it."""
    return [min(values), max(values)]


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """One task's judged results of several seeds (each judge_products' dict) as one dict of the same shape:
    every metric the mean over the seeds that have the policy, and on each policy "seeds" (their number)
    and "range" ({metric: [min, max]} of SPREAD_KEYS); RM accuracies are means with their range
    ("rm_accuracy_range"), the critic-free rows' job seconds means."""
    names = dict.fromkeys(name for res in per_seed for name in res["policies"])
    policies = {}
    for name in names:
        rows = [res["policies"][name] for res in per_seed if name in res["policies"]]
        metrics = mean_of(rows)
        metrics["seeds"] = len(rows)
        metrics["range"] = {k: span([r[k] for r in rows]) for k in SPREAD_KEYS}
        policies[name] = metrics
    accuracies = [res.get("rm_accuracy") or {} for res in per_seed]
    out = {"rm_accuracy": mean_of(accuracies) or {}, "policies": policies}
    out["rm_accuracy_range"] = {rm: span([a[rm] for a in accuracies if rm in a]) for rm in out["rm_accuracy"]}
    critic_free = [res["critic_free"] for res in per_seed if "critic_free" in res]
    if critic_free:
        out["critic_free"] = mean_of(critic_free)
    return out


def spread(metrics: dict, key: str, fmt: str) -> str:
    """A table cell: the mean of `key` over seeds and, with several seeds, its range, "+0.412 (+0.380..+0.450)"."""
    text = format(metrics[key], fmt)
    if metrics.get("seeds", 1) > 1:
        lo, hi = metrics["range"][key]
        text += f" ({lo:{fmt}}..{hi:{fmt}})"
    return text


def markdown(results: dict[str, dict], notes: list[str]) -> str:
    """The main table of aggregate_seeds' results: gold lift and final KL as mean (min..max) over seeds, the
    other columns means."""
    lines = [
        "| task | policy | reward | RM held-out acc. | gold lift | final KL | RM win rate | EOS rate | "
        "distinct-2 | words | seeds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, res in results.items():
        sft = res["policies"]["sft"]
        lines.append(
            f"| {task} | SFT | | | gold {sft['gold']:.3f} | 0 | | {sft['eos']:.2f} | {sft['distinct2']:.2f} | "
            f"{sft['words']:.1f} | {sft.get('seeds', 1)} |"
        )
        for name, m in res["policies"].items():
            if name == "sft" or not m.get("main", True):
                continue
            gold = m["source"] == "gold"
            acc = "" if gold else rm_accuracy_cell(res, m["rm"])
            reward = "gold" if gold else f"{m['rm']} RM"
            label = name.rsplit("/", 1)[0].replace("[defaults]", "")
            lines.append(
                f"| {task} | {label} | {reward} | {acc} | {spread(m, 'gold_lift', '+.3f')} | {spread(m, 'kl', '.1f')} | "
                f"{win(m)} | {m['eos']:.2f} | {m['distinct2']:.2f} | {m['words']:.1f} | "
                f"{m.get('seeds', 1)} |"
            )
    return "\n".join(lines + [""] + notes)


def rm_accuracy_cell(results: dict, rm: str) -> str:
    """An RM's held-out accuracy, mean and (when its seeds differ) range, "0.712 (0.690..0.731)"."""
    text = f"{results['rm_accuracy'][rm]:.3f}"
    lo, hi = results["rm_accuracy_range"][rm]
    return text if lo == hi else f"{text} ({lo:.3f}..{hi:.3f})"


def win(policy: dict) -> str:
    """A policy's win rate in its RM's eyes, blank where that RM was not trained (--sources gold)."""
    rate = policy["rm_win"].get(policy["rm"])
    return "" if rate is None else f"{rate:.3f}"


def critic_free_markdown(results: dict[str, dict], note: str) -> str:
    """The critic-free estimators beside GAE-PPO and TRL's GRPO, all on the gold reward (aggregate_seeds'
    results: gold lift and final KL as mean (min..max) over seeds, the other columns means)."""
    lines = [
        "| task | trainer | prompts x samples per step | gold lift | final KL | training s | EOS rate | "
        "distinct-2 | words | seeds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, res in results.items():
        if "critic_free" not in res:
            continue
        sft = res["policies"]["sft"]
        lines.append(
            f"| {task} | SFT | | gold {sft['gold']:.3f} | 0 | | {sft['eos']:.2f} | {sft['distinct2']:.2f} | "
            f"{sft['words']:.1f} | {sft.get('seeds', 1)} |"
        )
        for label, row in res["critic_free"].items():
            m = res["policies"].get(row["policy"])
            if m is None:  # not trained (a TRL environment missing)
                continue
            seconds = "" if row["job_seconds"] is None else f"{row['job_seconds']:.0f}"
            lines.append(
                f"| {task} | {label} | {row['rollout']} | {spread(m, 'gold_lift', '+.3f')} | {spread(m, 'kl', '.1f')} | "
                f"{seconds} | {m['eos']:.2f} | {m['distinct2']:.2f} | {m['words']:.1f} | {m.get('seeds', 1)} |"
            )
    return "\n".join(lines + ["", note])


def variants_note(estimators: list[str]) -> str:
    """The overrides of the named grpo variants among `estimators` (grpo_dapo, gspo), for the table's note."""
    note = ""
    for name in estimators:
        overrides = ESTIMATOR_ROWS.get(name, [])
        if overrides and overrides != [f"ppo.advantage_estimator={name}"]:  # a variant, not an estimator
            note += f" {name} = {' '.join(overrides)}."
    return note


def parse_variants(items: list[str], defaults_row: bool) -> dict[str, list[str]]:
    variants = {"defaults": []} if defaults_row else {}
    for item in items:
        name, _, overrides = item.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    return variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: seeds, sources, estimators and TRL GRPO learning rates as lists."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"from {', '.join(task_builders.TASKS)}")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--seeds",
        "--seed",
        default="0",
        help="comma-separated: every run and the judge once per seed (0,1,2)",
    )
    parser.add_argument("--samples", type=int, default=4, help="responses per held-out prompt")
    parser.add_argument("--sources", default="gold,rm", help="PPO reward sources: gold, rm")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES")
    parser.add_argument("--no-defaults", action="store_true", help="only the --variant rows of ppo-cli")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument(
        "--skip-trl-ppo",
        action="store_true",
        help="no TRL 1.12 PPO rows and no TRL reward model (their only use here; the slowest jobs); TRL's GRPO stays",
    )
    parser.add_argument(
        "--estimators",
        default="",
        help=f"critic-free comparison on the gold reward: from {', '.join(ESTIMATORS)} (+ TRL 1.16's GRPO); "
        f"make quality: {DEFAULT_ESTIMATORS}",
    )
    parser.add_argument(
        "--samples-per-prompt", type=int, default=4, help="group size of the critic-free rows"
    )
    parser.add_argument("--trl-grpo-lr", default="", help="TRL GRPO learning rates, comma-separated (--lr)")
    parser.add_argument("--trl-rm-python", default=TRL_RM_PYTHON, help="a Python with trl 1.16")
    parser.add_argument("--trl-ppo-python", default=TRL_PPO_PYTHON, help="a Python with trl==1.12.0")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--workers", type=int, default=2, help="runs at once")
    parser.add_argument("--root", type=Path, default=task_builders.DEFAULT_ROOT, help="task cache")
    parser.add_argument("--results", type=Path, default=RESULTS, help="runs, samples and tables")
    parser.add_argument("--out", type=Path, default=None, help="results file (default results.json)")
    parser.add_argument("--force", action="store_true", help="redo cached runs")
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="run no job: judge the runs that finished (a row then counts the seeds it has)",
    )
    args = parser.parse_args(argv)
    args.sources = args.sources.split(",")
    args.seeds = parse_seeds(args.seeds)
    if not args.seeds:
        parser.error("--seeds: at least one seed")
    args.estimators = [e for e in args.estimators.split(",") if e]
    if set(args.estimators) - set(ESTIMATORS):
        parser.error(f"--estimators: choose from {', '.join(ESTIMATORS)}")
    if args.estimators and args.batch_size % args.samples_per_prompt:
        parser.error("--batch-size (episodes per step) must be a multiple of --samples-per-prompt")
    args.trl_grpo_lr = [float(x) for x in args.trl_grpo_lr.split(",") if x] or [args.lr]
    args.tasks = args.tasks.split(",")
    if set(args.tasks) - set(task_builders.TASKS):
        parser.error(f"--tasks: choose from {', '.join(task_builders.TASKS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    task_names = args.tasks
    notes = []
    trl_missing = [p for p in (args.trl_ppo_python, args.trl_rm_python) if not Path(p).is_file()]
    if trl_missing and not args.skip_trl:
        args.skip_trl = True
        notes.append(f"TRL rows skipped: no Python at {', '.join(trl_missing)} (bench/README.md).")

    import torch

    torch.set_num_threads(args.threads)
    from ppo_cli.app import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    build_tasks(task_names, args.root, args.threads, args.workers)
    print(f"tasks ready ({time.perf_counter() - started:.0f} s)", flush=True)

    variants = parse_variants(args.variant, not args.no_defaults)
    jobs, products = [], {}  # products[(seed, task)]
    for seed in args.seeds:
        for task in task_names:
            task_job_list, products[seed, task] = task_jobs(task, args, variants, seed)
            jobs += task_job_list
    if args.no_train:  # judge what finished; a job's seconds where it recorded them
        for job in jobs:
            if job.seconds_file.is_file():
                job.seconds = float(job.seconds_file.read_text())
    else:
        run_jobs(jobs, args.threads, args.force, args.workers)

    per_seed: dict[int, dict[str, dict]] = {seed: {} for seed in args.seeds}
    for seed in args.seeds:
        for task in task_names:
            t = time.perf_counter()
            per_seed[seed][task] = judge_products(task, products[seed, task], args, seed)
            print(f"judged {task}, seed {seed} ({time.perf_counter() - t:.0f} s)", flush=True)
    results = {task: aggregate_seeds([per_seed[seed][task] for seed in args.seeds]) for task in task_names}
    wall = time.perf_counter() - started
    seeds_text = ",".join(map(str, args.seeds))
    notes.append(
        f"{args.steps} PPO steps x {args.batch_size} prompts, lr {args.lr}; judged on "
        f"{len(task_builders.read_jsonl(products[args.seeds[0], task_names[0]]['prompts']['eval']))} held-out "
        f"prompts x {args.samples} samples; seeds {seeds_text} (gold lift and final KL: mean (min..max) over "
        f"seeds, other columns: means; each task built once); wall time {wall / 60:.1f} min."
    )
    table = markdown(results, notes)
    if args.estimators:
        group = args.samples_per_prompt
        table += "\n\n" + critic_free_markdown(
            results,
            f"Critic-free estimators on the gold reward, {args.steps} steps x {args.batch_size} episodes "
            f"({args.batch_size // group} prompts x {group} samples; GAE: {args.batch_size} x 1), lr {args.lr} "
            f"(TRL GRPO: {', '.join(f'{x:g}' for x in args.trl_grpo_lr)}); training s = the job's wall "
            "seconds, mean over seeds (model loading included, two jobs at once)."
            + variants_note(args.estimators),
        )
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.out or args.results / "results.json"
    timings = {j.name: (None if j.cached else round(j.seconds or 0, 1)) for j in jobs}
    report = {"results": results, "per_seed": per_seed, "seeds": args.seeds, "seconds": timings}
    out.write_text(json.dumps({**report, "wall_s": round(wall)}, indent=2) + "\n")
    (out.with_suffix(".md")).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
