#!/usr/bin/env python
"""`make bench-rm`: reward-model accuracy of `ppo-cli train-rm` against a plain loop and TRL 1.16's
`RewardTrainer`, on locally built preference tasks (bench/tasks.py), several seeds each.

Every method trains on the same pairs with the same budget (`--steps` optimizer steps of `--batch-size`
pairs) and is judged the same way: its saved adapter is loaded with plain transformers + peft
(`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), dir)`),
each held-out sequence prompt + answer + EOS is scored at its last non-pad token, and the accuracy is the
share of held-out pairs whose chosen answer scores higher (a tie counts one half).

Methods (`--methods`, comma-separated; default: the first three):
- train-rm: `ppo-cli train-rm` with its defaults, from the task's SFT adapter (the pipeline's way); the
  command line sets only the data (data.eval_fraction=0: every pair trains, the judge evaluates), the
  seed, the budget, and where and how quietly to write (train.save_every=0, logger.progress=false).
- plain: a plain loop (bench/rm_baselines.py): fresh LoRA r16 on every linear layer, AdamW at a constant
  1e-4, no clipping.
- trl: TRL 1.16's RewardTrainer with its defaults, the same LoRA; runs with the Python of a separate
  virtual environment (`--trl-python`, default $TRL_PYTHON or bench/results/trl116-venv/bin/python, which
  `make trl-venv` creates), skipped with a note when it is missing.
- train-rm variants (CANDIDATES below): train-rm with a few defaults changed, to choose them.

Runs are cached under bench/results/rm_bench/runs/ (a finished run is not repeated; --force redoes
them); the table goes to the console and to bench/results/rm_bench/table.md + summary.json.

    python bench/rm_bench.py [--tasks sentiment,letter_noisy,format_length] [--seeds 0,1,2]
                             [--methods train-rm,plain,trl] [--steps 600] [--batch-size 16] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import tasks as task_builders  # noqa: E402  (bench/tasks.py, next to this file)

RESULTS = HERE / "results" / "rm_bench"
DEFAULT_TRL_PYTHON = str(HERE / "results" / "trl116-venv" / "bin" / "python")  # `make trl-venv`

# train-rm's defaults before this benchmark chose new ones (kept as a row of the table).
PREVIOUS_DEFAULTS = (
    "train.lr=1e-4",
    "train.lr_scheduler=cosine",
    "train.warmup_ratio=0.03",
    "train.max_grad_norm=1.0",
    "lora.dropout=0.05",
)


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # cli (ppo-cli train-rm), plain, trl
    overrides: tuple[str, ...] = ()
    # cli only: start from the task's SFT adapter (sft) or a fresh LoRA on the base (fresh).
    start: str = "sft"
    # cli only: score-head initialisation instead of train-rm's own (None), see _head_init.
    head_init: str | None = None
    # cli only: False = train-rm's own budget (its num_epochs and batch_size) instead of --steps/--batch-size.
    fixed_budget: bool = True
    note: str = field(default="", compare=False)


BASELINES = {
    "train-rm": Method("train-rm", "cli", note="`train-rm`, its defaults (from the SFT adapter)"),
    "plain": Method("plain", "plain", note="plain loop: fresh LoRA, AdamW 1e-4 constant, no clipping"),
    "trl": Method("trl", "trl", note="TRL 1.16 `RewardTrainer`, its defaults, fresh LoRA"),
}

# Variants of train-rm's defaults. Each is the previous defaults plus the listed changes.
_CONST = ("train.lr_scheduler=constant", "train.warmup_ratio=0")
_FRESH_LORA = ("lora=all-linear",)
CANDIDATES = {
    m.name: m
    for m in (
        Method("previous", "cli", PREVIOUS_DEFAULTS, note="`train-rm`, previous defaults (cosine from 1e-4)"),
        Method("const", "cli", PREVIOUS_DEFAULTS + _CONST),
        Method("const-lr3e-4", "cli", PREVIOUS_DEFAULTS + _CONST + ("train.lr=3e-4",)),
        Method("const-lr5e-5", "cli", PREVIOUS_DEFAULTS + _CONST + ("train.lr=5e-5",)),
        Method("cosine-lr3e-4", "cli", PREVIOUS_DEFAULTS + ("train.lr=3e-4",)),
        Method("const-fresh", "cli", PREVIOUS_DEFAULTS + _CONST + _FRESH_LORA, start="fresh"),
        Method("const-drop0", "cli", PREVIOUS_DEFAULTS + _CONST + ("lora.dropout=0",)),
        Method("const-noclip", "cli", PREVIOUS_DEFAULTS + _CONST + ("train.max_grad_norm=0",)),
        Method("const-headhf", "cli", PREVIOUS_DEFAULTS + _CONST, head_init="hf"),
        Method("const-headzero", "cli", PREVIOUS_DEFAULTS + _CONST, head_init="zero"),
        Method("const-lr1e-3", "cli", PREVIOUS_DEFAULTS + _CONST + ("train.lr=1e-3",)),
        Method("cosine-lr1e-3", "cli", PREVIOUS_DEFAULTS + ("train.lr=1e-3",)),
        Method(
            "const-lr3e-4-fp32",
            "cli",
            PREVIOUS_DEFAULTS + _CONST + ("train.lr=3e-4", "train.mixed_precision=no"),
        ),
        Method("own-budget", "cli", fixed_budget=False, note="train-rm defaults, its own epochs and batch"),
        Method("own-budget-2ep", "cli", ("train.num_epochs=2",), fixed_budget=False),
        Method("const-lr3e-4-drop0", "cli", PREVIOUS_DEFAULTS + _CONST + ("train.lr=3e-4", "lora.dropout=0")),
        Method(
            "const-lr3e-4-fresh",
            "cli",
            PREVIOUS_DEFAULTS + _CONST + _FRESH_LORA + ("train.lr=3e-4",),
            start="fresh",
        ),
    )
}
METHODS = {**BASELINES, **CANDIDATES}


# ---------------------------------------------------------------------------------------------------
# The judge


def encode(tokenizer, prompt: str, answer: str) -> list[int]:
    """prompt + answer + EOS, as every method trains on it."""
    return tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id]


def pair_accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs whose chosen answer scores higher; a tie counts one half."""
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    return wins / max(1, len(chosen))


def judge(base: str | Path, adapter: str | Path, rows: list[dict], batch_size: int = 64) -> float:
    """Held-out pair accuracy of the RM adapter in `adapter`, loaded with plain transformers + peft and
    scored at the last non-pad token of each right-padded sequence."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    sequences = [encode(tok, r["prompt"], r[side]) for side in ("chosen", "rejected") for r in rows]
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return pair_accuracy(scores[: len(rows)], scores[len(rows) :])


# ---------------------------------------------------------------------------------------------------
# Training runs


def _run(cmd: list[str], log: Path, threads: int) -> float:
    """Run `cmd` with its output in `log`; returns the wall time. A failure raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({result.returncode}):\n{tail}")
    return seconds


def train_rm_command(method: Method, paths: dict[str, Path], out: Path, seed: int, steps: int, batch: int):
    start = (
        [f"sft_checkpoint={paths['sft']}"]
        if method.start == "sft"
        else [f"model.name_or_path={paths['base']}"]
    )
    overrides = [
        *start,
        f"data.train={paths['train']}",
        "data.eval_fraction=0",  # every pair trains, as in the baselines; the judge evaluates
        f"train.seed={seed}",
        *([f"train.max_steps={steps}", f"train.batch_size={batch}"] if method.fixed_budget else []),
        "train.save_every=0",
        "logger.progress=false",
        f"output_dir={out}",
        "resume=never",
        *method.overrides,
    ]
    if method.head_init is None:
        return [sys.executable, "-m", "ppo_cli", "train-rm", *overrides]
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--train-rm-head",
        method.head_init,
        "--",
        *overrides,
    ]


def train_rm_defaults() -> dict:
    """What train-rm does when the command line does not say: its composed defaults (train.*, lora.*,
    center_rewards_coef) and a hash of the code that initialises and trains the RM. Part of the cache key
    of every train-rm run, so that a changed default is measured again."""
    import hashlib
    import inspect

    from omegaconf import OmegaConf

    from ppo_cli.app import precheck
    from ppo_cli.reward.scoring import init_score_head
    from ppo_cli.rm import train as train_rm

    cfg = precheck("train_rm", [], "train-rm")
    code = "".join(
        inspect.getsource(f) for f in (init_score_head, train_rm.build_reward_model, train_rm.rm_loss)
    )
    return {
        "train": OmegaConf.to_container(cfg.train),
        "lora": OmegaConf.to_container(cfg.lora),
        "center_rewards_coef": cfg.center_rewards_coef,
        "code": hashlib.sha256(code.encode()).hexdigest()[:16],
    }


def train_one(method: Method, task: str, seed: int, args) -> dict | None:
    """Train (or find cached) one RM and judge it; None when the method cannot run here."""
    run_dir = RESULTS / "runs" / method.name / task / f"seed{seed}"
    result_file = run_dir / "result.json"
    budget = {"steps": args.steps, "batch_size": args.batch_size, "method": repr(method)}
    if method.kind == "cli":
        budget["train_rm_defaults"] = args.train_rm_defaults
    if result_file.is_file() and not args.force:
        cached = json.loads(result_file.read_text())
        if cached.get("budget") == budget:
            return cached
    if method.kind == "trl" and not Path(args.trl_python).is_file():
        return None
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    paths = task_builders.task_paths(args.root, task)
    log = run_dir / "train.log"
    if method.kind == "cli":
        out = run_dir / "run"
        cmd = train_rm_command(method, paths, out, seed, args.steps, args.batch_size)
        adapter = out / "final"
    else:
        python = sys.executable if method.kind == "plain" else args.trl_python
        adapter = run_dir / "final"
        cmd = [python, str(HERE / "rm_baselines.py"), method.kind, str(paths["base"]), str(paths["train"])]
        cmd += [str(adapter), f"--seed={seed}", f"--steps={args.steps}", f"--batch-size={args.batch_size}"]
    seconds = _run(cmd, log, args.threads)
    rows = task_builders.read_jsonl(paths["eval"])
    accuracy = judge(paths["base"], adapter, rows)
    result = {"accuracy": accuracy, "seconds": round(seconds, 1), "budget": budget}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    for heavy in (run_dir / "run" / "checkpoints", run_dir / "final" / "trainer"):
        shutil.rmtree(heavy, ignore_errors=True)  # optimizer states: not needed once judged
    return result


# ---------------------------------------------------------------------------------------------------
# train-rm with another head initialisation (a bench-only probe; train-rm has no key for it)


def _head_init(kind: str):
    import torch

    def init(linear: torch.nn.Linear) -> None:
        with torch.no_grad():
            if kind == "zero":
                linear.weight.zero_()
            elif kind == "hf":  # transformers' _init_weights for Llama: N(0, 0.02)
                torch.nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            else:
                raise ValueError(kind)
            if linear.bias is not None:
                linear.bias.zero_()

    return init


def train_rm_with_head_init(kind: str, overrides: list[str]) -> None:
    from ppo_cli import cli
    from ppo_cli.rm import train as train_rm

    train_rm.init_score_head = _head_init(kind)
    sys.argv = ["ppo-cli", "train-rm", *overrides]
    cli.main(["train-rm", *overrides])


# ---------------------------------------------------------------------------------------------------
# The table


def summarise(results: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    """{method: {task: {mean, median, accuracies, seconds}}}."""
    out: dict[str, dict[str, dict]] = {}
    for method, by_task in results.items():
        out[method] = {}
        for task, runs in by_task.items():
            accs = [r["accuracy"] for r in runs]
            out[method][task] = {
                "mean": statistics.mean(accs),
                "median": statistics.median(accs),
                "accuracies": [round(a, 4) for a in accs],
                "seconds": statistics.mean(r["seconds"] for r in runs),
            }
    return out


def markdown_table(summary: dict, task_names: list[str], seeds: list[int], notes: dict[str, str]) -> str:
    head = "| method | " + " | ".join(f"{t} mean (median)" for t in task_names) + " | s/run |"
    lines = [head, "|---|" + "---:|" * (len(task_names) + 1)]
    for method, by_task in summary.items():
        cells = []
        for task in task_names:
            s = by_task.get(task)
            cells.append(f"{s['mean']:.3f} ({s['median']:.3f})" if s else "skipped")
        seconds = [s["seconds"] for s in by_task.values()]
        wall = f"{statistics.mean(seconds):.0f}" if seconds else ""
        lines.append(f"| {notes.get(method, method)} | " + " | ".join(cells) + f" | {wall} |")
    lines.append("")
    lines.append(f"Seeds {', '.join(map(str, seeds))}; per-seed accuracies in summary.json.")
    return "\n".join(lines)


def run_all(methods: list[Method], task_names: list[str], seeds: list[int], args) -> dict:
    """Every (method, task, seed) run, `args.jobs` at a time: {key: result, "skipped" or "failed"}."""
    from concurrent.futures import ThreadPoolExecutor

    def one(key: tuple[Method, str, int]) -> dict | str:
        method, task, seed = key
        try:
            result = train_one(method, task, seed, args)
        except RuntimeError as exc:  # one failed run must not lose the others
            print(f"{method.name} {task} seed {seed} FAILED: {exc}", flush=True)
            return "failed"
        if result is None:
            return "skipped"
        print(f"{method.name:>20} {task:>14} seed {seed}: accuracy {result['accuracy']:.3f} "
              f"({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        return result

    keys = [(m, t, s) for m in methods for t in task_names for s in seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, keys))
    return {(m.name, t, s): r for (m, t, s), r in zip(keys, results, strict=True)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-rm-head"]:
        train_rm_with_head_init(argv[1], argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The three preference-data tasks (bench/tasks.py's long_answer is the quality benchmark's third task).
    parser.add_argument("--tasks", default="sentiment,letter_noisy,format_length")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="train-rm,plain,trl", help=f"from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training run")
    parser.add_argument(
        "--jobs", type=int, default=1, help="training runs at a time (2 on an idle 2-core box)"
    )
    parser.add_argument("--root", type=Path, default=task_builders.DEFAULT_ROOT, help="task cache")
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", DEFAULT_TRL_PYTHON))
    parser.add_argument("--force", action="store_true", help="redo cached runs")
    args = parser.parse_args(argv)
    task_names = args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [METHODS[m] for m in args.methods.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    from ppo_cli.app import quiet_libraries

    quiet_libraries()
    args.train_rm_defaults = train_rm_defaults()
    started = time.perf_counter()
    for name in task_names:
        task_builders.build_task(task_builders.TASKS[name], args.root)
    print(f"tasks ready ({time.perf_counter() - started:.0f} s)", flush=True)

    runs = run_all(methods, task_names, seeds, args)
    results: dict[str, dict[str, list[dict]]] = {}
    skipped = sorted({m for (m, _, _), r in runs.items() if r == "skipped"})
    failed = [f"{m}/{t}/seed{s}" for (m, t, s), r in runs.items() if r == "failed"]
    for method in methods:
        results[method.name] = {}
        for task in task_names:
            done = [runs[(method.name, task, seed)] for seed in seeds]
            done = [r for r in done if isinstance(r, dict)]
            if done:
                results[method.name][task] = done
    summary = summarise(results)
    notes = {m.name: m.note or m.name for m in methods}
    table = markdown_table(summary, task_names, seeds, notes)
    if skipped:
        table += (
            f"\nSkipped: {', '.join(sorted(set(skipped)))} (no TRL environment at {args.trl_python}; "
            "`make trl-venv` creates it)."
        )
    if failed:
        table += f"\nFailed runs: {', '.join(failed)} (see their train.log)."
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "table.md").write_text(table + "\n")
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
