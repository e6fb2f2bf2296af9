"""Preference tasks for the reward-model benchmark (`bench/rm_bench.py`), built locally and cached.

Every task is built the way real preference data is made, on a corpus of its own:

1. a small Llama base (2-3M parameters) is pretrained on the corpus (prompt + answer + EOS), so it
   already writes answers of the corpus's kind;
2. `ppo-cli train-sft` adapts it briefly on SFT rows from the same corpus;
3. the SFT policy samples two answers per prompt (on-policy), and a gold scorer, a fixed function of
   the answer's text, labels each pair; ties are dropped, so most pairs differ by one word or one mark
   (small margins);
4. a variant-specific step: clean labels, a share of flipped labels, or a length bias (the chosen
   answer is longer in most training pairs while the gold ignores length).

Held-out pairs come from prompts no training pair uses and always carry the gold's clean labels; for
the length-biased task they are balanced in length, so a reward model that learned "longer is better"
scores 0.5 there.

Tasks (`TASKS`):
- sentiment: gold = share of positive minus share of negative words; clean labels.
- letter_noisy: gold = share of words that contain the letter "o"; 25% of training labels flipped.
- format_length: gold = ends with "." (1 point) + contains a number (1 point); in 80% of training
  pairs the chosen answer has more words than the rejected one, while held-out pairs are balanced.
- long_answer: a verifiable task where truncation matters: gold = 0 unless the answer is one sentence
  ended by its only "." (it finished before the token limit), else min(words, 24) / 24; clean labels.
  The corpus's answers have 3-10 words, so the SFT policy scores ~0.14 and has far to go, while 24
  words take ~49 of the quality benchmark's 64 response tokens and ~32 words fill all 64: a policy that
  stops emitting EOS is cut off mid-sentence and scores 0.

    python bench/tasks.py [--root bench/results/rm_tasks] [--task NAME]   # build (cached)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ppo_cli.tiny.task import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, gold_score

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_ROOT = HERE / "results" / "rm_tasks"
# Bump when what a build writes changes, so that cached builds from older code are rebuilt.
BUILD_VERSION = 1

# ---------------------------------------------------------------------------------------------------
# The corpus: short answers to the tiny task's prompts, with numbers and varied end marks


ENDINGS = (".", ".", "!", "")  # a period in half the answers, "!" or nothing in the rest
NUMBER_RATE = 0.3  # answers that contain a number
_NUMBER_RE = re.compile(r"\d")
_WORD_RE = re.compile(r"[a-z0-9]+")
_NEUTRAL = frozenset(NEUTRAL_WORDS)


def corpus_answer(rng: random.Random, min_words: int = 3, max_words: int = 10) -> str:
    """An answer of the corpus, e.g. ``" calm river 7 bitter!"``: words from the tiny task's positive,
    negative and neutral lists, sometimes a number, then an end mark (leading space as in tiny)."""
    lists = (POSITIVE_WORDS, NEGATIVE_WORDS, NEUTRAL_WORDS)
    words = [rng.choice(rng.choice(lists)) for _ in range(rng.randint(min_words, max_words))]
    if rng.random() < NUMBER_RATE:
        words.insert(rng.randint(0, len(words)), str(rng.randint(1, 99)))
    return " " + " ".join(words) + rng.choice(ENDINGS)


def words_of(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


# ---------------------------------------------------------------------------------------------------
# Gold scorers: fixed functions of the answer's text


def sentiment_gold(answer: str) -> float:
    """Share of positive minus share of negative words (the tiny task's metric)."""
    return gold_score(answer)


def letter_gold(answer: str) -> float:
    """Share of words that contain the letter "o"."""
    words = words_of(answer)
    return sum("o" in w for w in words) / max(1, len(words))


# long_answer's target length in words: 24 corpus words + "." take ~49 tokens with EOS (95% under 58), ~32
# fill bench/quality.py's 64 new tokens (half of 32-word answers are cut there).
LONG_ANSWER_WORDS = 24


def long_answer_gold(answer: str) -> float:
    """min(words, LONG_ANSWER_WORDS) / LONG_ANSWER_WORDS for one finished sentence: 0 unless the answer ends
    with a "." that is its only one, so a response cut at the token limit (mid-sentence) scores 0 and
    writing several short sentences does not help."""
    text = answer.strip()
    if not text.endswith(".") or text.count(".") != 1:
        return 0.0
    return min(len(words_of(text)), LONG_ANSWER_WORDS) / LONG_ANSWER_WORDS


def format_gold(answer: str) -> float:
    """Plain style: the share of neutral (object) words, plus 0.2 for ending with a period and 0.2 for
    containing a number. Length-free: a longer answer is not better by itself."""
    text = answer.strip()
    words = words_of(text)
    plain = sum(w in _NEUTRAL for w in words) / max(1, len(words))
    return plain + 0.2 * text.endswith(".") + 0.2 * bool(_NUMBER_RE.search(text))


# ---------------------------------------------------------------------------------------------------
# Task specifications


@dataclass(frozen=True)
class TaskSpec:
    name: str
    gold: str  # a key of GOLDS
    # Base model shape (Llama) and its pretraining.
    hidden_size: int
    num_layers: int
    num_heads: int
    pretrain_steps: int
    model_seed: int
    # Pairs: training pairs, held-out pairs.
    n_train: int
    n_eval: int
    # Share of training labels flipped.
    label_noise: float = 0.0
    # Share of training pairs whose chosen answer is longer (None = as sampled); held-out pairs are then
    # balanced 50/50.
    longer_chosen: float | None = None
    description: str = ""
    # Bump when this task's gold or pair selection changes: its pairs are rebuilt (the base and the SFT
    # adapter are cached by their own settings).
    revision: int = 0


GOLDS: dict[str, Callable[[str], float]] = {
    "sentiment": sentiment_gold,
    "letter": letter_gold,
    "format": format_gold,
    "long_answer": long_answer_gold,
}

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "sentiment", "sentiment", hidden_size=256, num_layers=2, num_heads=4, pretrain_steps=400,
            model_seed=0, n_train=4000, n_eval=600,
            description="share of positive minus negative words; on-policy pairs, clean labels",
        ),
        TaskSpec(
            "letter_noisy", "letter", hidden_size=192, num_layers=4, num_heads=4, pretrain_steps=400,
            model_seed=1, n_train=6000, n_eval=600, label_noise=0.25,
            description='share of words containing "o"; on-policy pairs, 25% of training labels flipped',
        ),
        TaskSpec(
            "format_length", "format", hidden_size=256, num_layers=2, num_heads=8, pretrain_steps=400,
            model_seed=2, n_train=3000, n_eval=600, longer_chosen=0.8, revision=1,
            description='share of neutral words + 0.2 for a final "." + 0.2 for a number; chosen longer '
            "in 80% of training pairs, held-out pairs balanced",
        ),
        TaskSpec(
            "long_answer", "long_answer", hidden_size=256, num_layers=2, num_heads=4, pretrain_steps=400,
            model_seed=3, n_train=4000, n_eval=600,
            description='min(words, 24) / 24 for one sentence ended by its only "."; 0 otherwise (an answer '
            "cut at the token limit scores 0); on-policy pairs, clean labels",
        ),
    )
}  # fmt: skip

# SFT of the base before sampling (the policy whose samples are labelled), and sampling settings.
SFT_OVERRIDES = (
    "lora=all-linear",
    "lora.dropout=0.0",
    "data.max_length=64",
    "train.max_steps=120",
    "train.batch_size=32",
    "train.lr=1e-3",
    "train.warmup_ratio=0.05",
    "train.eval_every=0",
    "train.save_every=0",
    "train.log_every=20",
    "train.device=cpu",
    "train.mixed_precision=no",
    "logger.progress=false",
)
N_SFT_ROWS = 4000
MAX_NEW_TOKENS = 24
TEMPERATURE = 1.0
EVAL_PROMPT_SHARE = 0.2  # of the 400 prompts, held out for the evaluation pairs


# ---------------------------------------------------------------------------------------------------
# Building blocks


def pretraining_sequences(tokenizer, n: int, seed: int) -> list[list[int]]:
    """`n` token sequences prompt + answer + EOS of the corpus."""
    from ppo_cli.tiny.task import all_prompts

    rng = random.Random(f"bench-pretrain-{seed}")
    prompts = all_prompts()
    eos = tokenizer.eos_token_id
    return [
        [*tokenizer(rng.choice(prompts) + corpus_answer(rng), add_special_tokens=False)["input_ids"], eos]
        for _ in range(n)
    ]


def build_base(spec: TaskSpec, out_dir: Path, batch_size: int = 32, lr: float = 2e-3) -> dict[str, Any]:
    """Pretrain a Llama of the spec's shape on the corpus (full parameters, warmup + cosine to 10%);
    returns its parameter count and first/last losses."""

    import torch
    from transformers import AutoModelForCausalLM

    from ppo_cli.tiny.models import _model_config, embedding_rows
    from ppo_cli.tiny.pretrain import _pretrain_step, pretraining_optimizer
    from ppo_cli.tiny.tokenizer import build_tokenizer, save_tokenizer

    tokenizer = build_tokenizer()
    config = _model_config(
        "llama",
        vocab_size=embedding_rows(len(tokenizer), 64),  # spare rows: the pad token fits
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.model_seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    steps = spec.pretrain_steps
    sequences = pretraining_sequences(tokenizer, steps * batch_size, spec.model_seed)
    optimizer, scheduler = pretraining_optimizer(model, steps, lr)
    model.train()
    losses = []
    for step in range(steps):
        batch = sequences[step * batch_size : (step + 1) * batch_size]
        losses.append(_pretrain_step(model, batch, tokenizer.eos_token_id))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.generation_config.pad_token_id = None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    return {"parameters": n_params, "loss_first": losses[0], "loss_last": sum(losses[-20:]) / 20}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def split_prompts(seed: int) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out prompts."""
    from ppo_cli.tiny.task import all_prompts

    pool = all_prompts()
    random.Random(f"bench-prompts-{seed}").shuffle(pool)
    n_eval = int(len(pool) * EVAL_PROMPT_SHARE)
    return pool[n_eval:], pool[:n_eval]


def run_sft(base: Path, sft_rows: Path, out_dir: Path) -> Path:
    """`ppo-cli train-sft` on the corpus's SFT rows; returns its final/."""
    cmd = [
        sys.executable,
        "-m",
        "ppo_cli",
        "train-sft",
        f"model.name_or_path={base}",
        f"data.train={sft_rows}",
        f"output_dir={out_dir}",
        "resume=never",
        *SFT_OVERRIDES,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return out_dir / "final"


def sample_answers(sft_final: Path, prompts: list[str], n_per_prompt: int, seed: int) -> list[list[str]]:
    """`n_per_prompt` on-policy answers per prompt from the SFT policy (temperature 1, EOS-finished only,
    an unfinished answer is replaced by None)."""
    import torch
    from omegaconf import OmegaConf

    from ppo_cli.command_config import CheckpointModelConfig
    from ppo_cli.data import encode_prompt
    from ppo_cli.generate import load_policy, sample

    model_cfg = OmegaConf.structured(CheckpointModelConfig(dtype="float32"))
    policy = load_policy(str(sft_final), model_cfg, torch.device("cpu"))
    flat = [p for p in prompts for _ in range(n_per_prompt)]
    ids = [encode_prompt(policy.tokenizer, p, "prompts") for p in flat]
    out = sample(policy, ids, MAX_NEW_TOKENS, TEMPERATURE, batch_size=128, seed=seed)
    texts = [t if done else None for t, done in zip(out.texts, out.finished, strict=True)]
    return [texts[i * n_per_prompt : (i + 1) * n_per_prompt] for i in range(len(prompts))]


def label_pair(prompt: str, a: str, b: str, gold: Callable[[str], float]) -> dict[str, Any] | None:
    """A {"prompt", "chosen", "rejected"} row ranked by the gold (None on a tie)."""
    ga, gb = gold(a), gold(b)
    if ga == gb:
        return None
    chosen, rejected = (a, b) if ga > gb else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "gold_margin": abs(ga - gb)}


def chosen_longer(row: dict[str, Any]) -> bool | None:
    """Whether the chosen answer has more words (None when both have as many)."""
    nc, nr = len(words_of(row["chosen"])), len(words_of(row["rejected"]))
    return None if nc == nr else nc > nr


def candidate_pairs(
    sft_final: Path, prompts: list[str], gold: Callable[[str], float], n_pairs: int, seed: int
) -> list[dict[str, Any]]:
    """At least `n_pairs` labelled on-policy pairs (two answers per prompt, sampled in rounds)."""
    rows: list[dict[str, Any]] = []
    rnd = 0
    while len(rows) < n_pairs:
        rng = random.Random(f"bench-round-{seed}-{rnd}")
        batch_prompts = [rng.choice(prompts) for _ in range(max(256, int(1.6 * (n_pairs - len(rows)))))]
        answers = sample_answers(sft_final, batch_prompts, 2, seed=seed * 1000 + rnd)
        for prompt, (a, b) in zip(batch_prompts, answers, strict=True):
            if a is None or b is None or a == b:
                continue
            row = label_pair(prompt, a, b, gold)
            if row is not None:
                rows.append(row)
        rnd += 1
    return rows


def select_length_bias(rows: list[dict[str, Any]], share_longer: float, n: int, seed: int) -> list[dict]:
    """`n` rows of which a `share_longer` fraction has the longer answer chosen (ties in length are left
    out); raises when the pool is too small."""
    rng = random.Random(f"bench-length-{seed}")
    longer = [r for r in rows if chosen_longer(r) is True]
    shorter = [r for r in rows if chosen_longer(r) is False]
    n_long = round(n * share_longer)
    if len(longer) < n_long or len(shorter) < n - n_long:
        raise RuntimeError(
            f"length selection: need {n_long} longer-chosen and {n - n_long} shorter-chosen pairs, the pool "
            f"has {len(longer)} and {len(shorter)}"
        )
    picked = rng.sample(longer, n_long) + rng.sample(shorter, n - n_long)
    rng.shuffle(picked)
    return picked


def flip_labels(rows: list[dict[str, Any]], share: float, seed: int) -> list[dict[str, Any]]:
    """A copy of `rows` with exactly round(share * n) of them swapped (chosen <-> rejected)."""
    rng = random.Random(f"bench-flip-{seed}")
    flipped = set(rng.sample(range(len(rows)), round(share * len(rows))))
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i in flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            row["flipped"] = True
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------
# A whole task (cached)


def _stamp(spec: TaskSpec) -> dict[str, Any]:
    return {"version": BUILD_VERSION, **asdict(spec), "sft": list(SFT_OVERRIDES)}


def _base_stamp(spec: TaskSpec) -> dict[str, Any]:
    keys = ("hidden_size", "num_layers", "num_heads", "pretrain_steps", "model_seed")
    return {"version": BUILD_VERSION, **{k: getattr(spec, k) for k in keys}}


def _sft_stamp(spec: TaskSpec) -> dict[str, Any]:
    return {**_base_stamp(spec), "sft": list(SFT_OVERRIDES), "rows": N_SFT_ROWS}


def _cached(stamp_file: Path, stamp: dict[str, Any]) -> bool:
    return stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp


def task_paths(root: Path, name: str) -> dict[str, Path]:
    d = Path(root) / name
    return {
        "root": d,
        "base": d / "base",
        "sft_data": d / "data" / "sft.jsonl",
        "sft": d / "sft" / "final",
        "train": d / "data" / "prefs_train.jsonl",
        "eval": d / "data" / "prefs_eval.jsonl",
        "info": d / "task.json",
    }


def build_task(spec: TaskSpec, root: Path = DEFAULT_ROOT, log=print) -> dict[str, Path]:
    """Build (or find cached) base, SFT adapter and preference pairs of one task; returns their paths."""
    paths = task_paths(root, spec.name)
    info_path = paths["info"]
    if info_path.is_file() and json.loads(info_path.read_text()).get("stamp") == _stamp(spec):
        return paths
    info_path.unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    started = time.perf_counter()
    info: dict[str, Any] = {"stamp": _stamp(spec)}
    gold = GOLDS[spec.gold]
    train_prompts, eval_prompts = split_prompts(spec.model_seed)

    base_stamp, sft_stamp = paths["base"] / "bench_build.json", paths["sft"].parent / "bench_build.json"
    if not _cached(base_stamp, _base_stamp(spec)):
        log(
            f"[{spec.name}] pretraining the base ({spec.hidden_size}x{spec.num_layers}, {spec.pretrain_steps} steps)"
        )
        sft_stamp.unlink(missing_ok=True)
        t = time.perf_counter()
        base_info = build_base(spec, paths["base"])
        base_info["seconds"] = round(time.perf_counter() - t, 1)
        base_stamp.write_text(json.dumps(_base_stamp(spec)) + "\n")
        (paths["base"] / "bench_base.json").write_text(json.dumps(base_info) + "\n")
    info["base"] = json.loads((paths["base"] / "bench_base.json").read_text())

    if not _cached(sft_stamp, _sft_stamp(spec)):
        rng = random.Random(f"bench-sft-{spec.model_seed}")
        rows = [
            {"prompt": rng.choice(train_prompts), "completion": corpus_answer(rng)} for _ in range(N_SFT_ROWS)
        ]
        write_jsonl(paths["sft_data"], rows)
        log(f"[{spec.name}] train-sft")
        shutil.rmtree(paths["sft"].parent, ignore_errors=True)
        t = time.perf_counter()
        run_sft(paths["base"], paths["sft_data"], paths["sft"].parent)
        sft_stamp.write_text(json.dumps(_sft_stamp(spec)) + "\n")
        info["sft_seconds"] = round(time.perf_counter() - t, 1)

    log(f"[{spec.name}] sampling and labelling on-policy pairs")
    t = time.perf_counter()
    extra = 2.6 if spec.longer_chosen is not None else 1.0  # the length selection discards pairs
    train = candidate_pairs(paths["sft"], train_prompts, gold, int(extra * spec.n_train), spec.model_seed)
    evals = candidate_pairs(paths["sft"], eval_prompts, gold, int(extra * spec.n_eval), spec.model_seed + 100)
    if spec.longer_chosen is not None:
        train = select_length_bias(train, spec.longer_chosen, spec.n_train, spec.model_seed)
        evals = select_length_bias(evals, 0.5, spec.n_eval, spec.model_seed + 100)
    else:
        train, evals = train[: spec.n_train], evals[: spec.n_eval]
    if spec.label_noise:
        train = flip_labels(train, spec.label_noise, spec.model_seed)
    info["sample_seconds"] = round(time.perf_counter() - t, 1)
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], evals)
    info["pairs"] = describe_pairs(train, evals)
    info["seconds"] = round(time.perf_counter() - started, 1)
    info_path.write_text(json.dumps(info, indent=2) + "\n")  # written last: marks the build done
    return paths


def describe_pairs(train: list[dict], evals: list[dict]) -> dict[str, Any]:
    """Pair counts, median gold margin, and the share of pairs whose chosen answer is longer."""
    import statistics

    def summary(rows: list[dict]) -> dict[str, Any]:
        longer = [chosen_longer(r) for r in rows]
        decided = [x for x in longer if x is not None]
        return {
            "pairs": len(rows),
            "median_gold_margin": statistics.median(r["gold_margin"] for r in rows),
            "chosen_longer": round(sum(decided) / max(1, len(decided)), 3),
            "flipped": sum(bool(r.get("flipped")) for r in rows),
        }

    return {"train": summary(train), "eval": summary(evals)}


def build_all(root: Path = DEFAULT_ROOT, names: list[str] | None = None, log=print) -> dict[str, dict]:
    return {name: build_task(TASKS[name], root, log) for name in (names or list(TASKS))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="default: all")
    ns = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and leaves the other core free
    sys.path.insert(0, str(REPO))
    from ppo_cli.app import quiet_libraries

    quiet_libraries()
    for name, paths in build_all(ns.root, ns.task).items():
        info = json.loads(paths["info"].read_text())
        print(name, json.dumps({k: info[k] for k in ("base", "pairs", "seconds")}))


if __name__ == "__main__":
    main()
