#!/usr/bin/env python
"""Baseline PPO benchmark: TRL 1.12.0 ``trl.experimental.ppo.PPOTrainer``.

Everything is built locally (nothing is fetched from the Hugging Face Hub):

* ``build_bench_model(out_dir, seed=0)`` writes a ~30M-parameter random-init
  Llama (hidden 512, 6 layers, 8 heads, intermediate 1408, vocab 10240) plus a
  byte-level BPE tokenizer trained on generated text, both with
  ``save_pretrained``.  It is deterministic for a given seed and reuses
  ``out_dir`` when it already holds a complete build with the same spec, so our
  own benchmark can load the very same model directory.
* 16 synthetic prompts (16-32 tokens each) as a ``datasets.Dataset`` with an
  ``input_ids`` column, the format TRL's PPO trainer expects.
* PPO: LoRA policy (r=16, alpha=32, dropout 0, q_proj/v_proj), reward model and
  value model = ``AutoModelForSequenceClassification(num_labels=1)`` loaded from
  the same base dir, ``ref_model=None`` (TRL then uses the adapter-disabled
  policy as reference), 16 prompts per rollout, 1 mini-batch, 4 PPO epochs,
  24 response tokens, temperature 0.7, no EOS penalty, no eval/saving/reporting.

Timing: TRL's ``PPOTrainer.train()`` calls ``callback_handler.on_step_end``
once per PPO update (rollout + 4 epochs of optimisation + logging), so a
``TrainerCallback`` records ``time.perf_counter()`` at ``on_train_begin`` and at
every ``on_step_end``; step *i* is the difference between consecutive stamps.
The first ``--warmup`` steps are reported separately and excluded from the
median.

Usage::

    python bench/trl_baseline.py --steps 5 --warmup 1 --threads 2 --out results.json

Reusing the model from another benchmark::

    from bench.trl_baseline import build_bench_model   # or importlib on the file path
    path = build_bench_model("/some/cache/dir", seed=0)
    # AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------------------
# Model / tokenizer spec (part of the cache key: change it and the cache is rebuilt)
# ---------------------------------------------------------------------------
MODEL_SPEC = {
    "arch": "LlamaForCausalLM",
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1408,
    "vocab_size": 10240,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "tokenizer": "byte-level BPE, trained on generated pseudo-word text",
    "spec_version": 2,
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3
SPEC_FILE = "bench_model_spec.json"

DEFAULT_CACHE_ROOT = os.environ.get(
    "PPO_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ppo_cli_bench")
)

_SYLLABLES = [
    c + v
    for c in [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "z",
        "st",
        "tr",
        "ch",
        "sh",
        "th",
        "pl",
        "gr",
        "br",
        "kl",
    ]
    for v in ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
]
_PUNCT = [".", ",", "?", "!", ";", ":"]


def _lexicon(rng: random.Random, n_words: int = 6000) -> list[str]:
    words: set[str] = set()
    while len(words) < n_words:
        n = rng.choice([1, 2, 2, 3, 3, 3, 4])
        w = "".join(rng.choice(_SYLLABLES) for _ in range(n))
        if rng.random() < 0.08:
            w += rng.choice(["s", "ed", "ing", "ly", "n", "r"])
        words.add(w)
    return sorted(words)


def _zipf_cum_weights(n: int) -> list[float]:
    cum, acc = [], 0.0
    for rank in range(n):
        acc += 1.0 / (rank + 20)  # Zipf-like with a flattened head
        cum.append(acc)
    return cum


def _sentence(rng: random.Random, lex: list[str], n_words: int, cum: list[float] | None = None) -> str:
    cum = cum or _zipf_cum_weights(len(lex))
    out = []
    for w in rng.choices(lex, cum_weights=cum, k=n_words):
        r = rng.random()
        if r < 0.06:
            w = w.capitalize()
        elif r < 0.09:
            w = str(rng.randint(0, 9999))
        out.append(w)
    s = " ".join(out)
    return s[0].upper() + s[1:] + rng.choice(_PUNCT)


def _corpus(seed: int, n_lines: int = 40000) -> list[str]:
    rng = random.Random(seed)
    lex = _lexicon(rng)
    rng.shuffle(lex)  # frequency rank independent of alphabetical order
    cum = _zipf_cum_weights(len(lex))
    return [_sentence(rng, lex, rng.randint(6, 30), cum) for _ in range(n_lines)]


def _spec_matches(out_dir: Path, seed: int) -> bool:
    f = out_dir / SPEC_FILE
    if not f.is_file():
        return False
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("spec") == MODEL_SPEC and saved.get("seed") == seed


def build_bench_model(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Build (or reuse) the benchmark base model + tokenizer in ``out_dir``.

    Returns ``str(out_dir)``; load it with ``AutoModelForCausalLM.from_pretrained``
    / ``AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`` /
    ``AutoTokenizer.from_pretrained``.  Deterministic for a given ``seed``.  The
    directory is considered complete once ``bench_model_spec.json`` exists
    (written last), and is rebuilt if that file is missing or its spec differs.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    if _spec_matches(out, seed):
        return str(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        # ---- tokenizer: byte-level BPE trained on generated text ----
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=MODEL_SPEC["vocab_size"],
            min_frequency=2,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(seed), trainer=trainer)
        hf_tok = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            padding_side="left",  # TRL's PPO generates from left-padded prompts
            model_max_length=MODEL_SPEC["max_position_embeddings"],
        )
        assert hf_tok.pad_token_id != hf_tok.eos_token_id
        hf_tok.save_pretrained(tmp)

        # ---- random-init Llama ----
        config = LlamaConfig(
            vocab_size=len(hf_tok),
            hidden_size=MODEL_SPEC["hidden_size"],
            intermediate_size=MODEL_SPEC["intermediate_size"],
            num_hidden_layers=MODEL_SPEC["num_hidden_layers"],
            num_attention_heads=MODEL_SPEC["num_attention_heads"],
            num_key_value_heads=MODEL_SPEC["num_key_value_heads"],
            max_position_embeddings=MODEL_SPEC["max_position_embeddings"],
            tie_word_embeddings=MODEL_SPEC["tie_word_embeddings"],
            pad_token_id=hf_tok.pad_token_id,
            bos_token_id=hf_tok.bos_token_id,
            eos_token_id=hf_tok.eos_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / SPEC_FILE).write_text(
            json.dumps(
                {"spec": MODEL_SPEC, "seed": seed, "model_params": n_params, "tokenizer_len": len(hf_tok)},
                indent=2,
            )
        )
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def make_prompt_dataset(tokenizer, n_prompts: int = 16, min_len: int = 16, max_len: int = 32, seed: int = 0):
    """``n_prompts`` synthetic prompts, each ``min_len..max_len`` tokens, as a
    ``datasets.Dataset`` with a single ``input_ids`` column (unpadded; TRL's
    ``DataCollatorWithPadding`` left-pads them per batch)."""
    from datasets import Dataset

    lex_rng = random.Random(seed)
    lex = _lexicon(lex_rng)
    lex_rng.shuffle(lex)  # same frequency ranking as the tokenizer corpus
    cum = _zipf_cum_weights(len(lex))
    rng = random.Random(1000 + seed)
    ids_list, texts = [], []
    for _ in range(n_prompts):
        target = rng.randint(min_len, max_len)
        text = _sentence(rng, lex, max_len, cum)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(ids) < target:  # extremely unlikely, but keep the length guarantee
            text += " " + _sentence(rng, lex, max_len, cum)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[:target]
        ids_list.append(ids)
        texts.append(tokenizer.decode(ids))
    return Dataset.from_dict({"input_ids": ids_list}), texts


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------
def _sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="measured PPO steps (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="warmup PPO steps, not in the median (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto = fp32 on cpu, bf16 on cuda (weights in bf16 + PPOConfig(bf16=True))",
    )
    ap.add_argument(
        "--model-dir",
        default=None,
        help=f"base model cache dir (default {DEFAULT_CACHE_ROOT}/llama30m-s<seed>)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout = dataset size (default 16)")
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument(
        "--build-only", action="store_true", help="only build/reuse the base model dir, print its path"
    )
    args = ap.parse_args(argv)

    if args.build_only:
        path = build_bench_model(
            args.model_dir or os.path.join(DEFAULT_CACHE_ROOT, f"llama30m-s{args.seed}"), seed=args.seed
        )
        print(path)
        return {"model_dir": path}

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if args.device == "cuda" else "fp32")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    import datasets
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    model_dir = args.model_dir or os.path.join(DEFAULT_CACHE_ROOT, f"llama30m-s{args.seed}")
    t_build = time.perf_counter()
    reused = _spec_matches(Path(model_dir), args.seed)
    model_path = build_bench_model(model_dir, seed=args.seed)
    t_build = time.perf_counter() - t_build

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    train_dataset, prompt_texts = make_prompt_dataset(tokenizer, n_prompts=args.prompts, seed=args.seed)
    prompt_lens = [len(x) for x in train_dataset["input_ids"]]

    transformers.set_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    model_params = sum(p.numel() for p in policy.parameters())
    torch.manual_seed(args.seed + 1)
    value_model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, dtype=torch_dtype
    )
    torch.manual_seed(args.seed + 2)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, dtype=torch_dtype
    )
    reward_model.eval()

    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],  # = peft's default mapping for llama
        task_type="CAUSAL_LM",
    )

    total_steps = args.warmup + args.steps
    out_dir = tempfile.mkdtemp(prefix="trl_ppo_bench_")
    config = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.prompts,  # -> batch_size = local_batch_size = prompts
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=args.ppo_epochs,
        response_length=args.response_length,
        temperature=0.7,
        missing_eos_penalty=None,
        total_episodes=args.prompts * total_steps,  # -> num_total_batches = warmup + steps
        num_sample_generations=0,
        local_rollout_forward_batch_size=args.prompts,
        # PPOConfig defaults gradient_checkpointing=True, but PPOTrainer never applies it (it overrides train()
        # and never calls gradient_checkpointing_enable); set False explicitly and verify below.
        gradient_checkpointing=False,
        bf16=(dtype == "bf16"),
        fp16=False,
        use_cpu=(args.device == "cpu"),
        report_to=[],
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
    )

    def _cpu_s() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    class StepTimer(TrainerCallback):
        """Wall + process-CPU stamps at train begin and after every PPO update."""

        def __init__(self):
            self.stamps: list[float] = []
            self.cpu_stamps: list[float] = []

        def _sync(self):
            if args.device == "cuda":
                torch.cuda.synchronize()

        def on_train_begin(self, a, state, control, **kw):
            self._sync()
            self.stamps = [time.perf_counter()]
            self.cpu_stamps = [_cpu_s()]

        def on_step_end(self, a, state, control, **kw):
            self._sync()
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(_cpu_s())
            dt = self.stamps[-1] - self.stamps[-2]
            dc = self.cpu_stamps[-1] - self.cpu_stamps[-2]
            i = len(self.stamps) - 1
            tag = "warmup" if i <= args.warmup else "step"
            print(
                f"[trl-baseline] {tag} {i}/{total_steps}: {dt:.3f} s wall, {dc:.3f} s cpu "
                f"(loadavg {os.getloadavg()[0]:.2f})",
                flush=True,
            )

    timer = StepTimer()
    t_init = time.perf_counter()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        callbacks=[timer],
        peft_config=peft_config,
    )
    t_init = time.perf_counter() - t_init
    unwrapped_policy = trainer.accelerator.unwrap_model(trainer.model).policy
    lora_trainable = sum(p.numel() for p in unwrapped_policy.parameters() if p.requires_grad)
    value_trainable = sum(
        p.numel()
        for p in trainer.accelerator.unwrap_model(trainer.model).value_model.parameters()
        if p.requires_grad
    )
    lora_targets = sorted(next(iter(unwrapped_policy.peft_config.values())).target_modules)
    device = str(trainer.accelerator.device)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before_train = _current_rss_mb()
    load_before = os.getloadavg()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t_train = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t_train
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    load_after = os.getloadavg()
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    shutil.rmtree(out_dir, ignore_errors=True)

    all_steps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    if len(all_steps) != total_steps:
        raise RuntimeError(f"expected {total_steps} on_step_end calls, got {len(all_steps)}")
    warm, measured = all_steps[: args.warmup], all_steps[args.warmup :]
    cpu_measured = [b - a for a, b in zip(timer.cpu_stamps, timer.cpu_stamps[1:])][args.warmup :]

    result = {
        "impl": f"trl-{trl.__version__}",
        "model_params": model_params,
        "prompts": args.prompts,
        "response_length": args.response_length,
        "ppo_epochs": args.ppo_epochs,
        "step_seconds": [round(x, 4) for x in measured],
        "median_step_s": round(statistics.median(measured), 4) if measured else None,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        # --- extra context ---
        "trl": trl.__version__,
        "peft": peft.__version__,
        "accelerate": __import__("accelerate").__version__,
        "datasets": datasets.__version__,
        "python": sys.version.split()[0],
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "warmup_step_seconds": [round(x, 4) for x in warm],
        "mean_step_s": round(statistics.mean(measured), 4) if measured else None,
        # process CPU time (user+sys, all threads) per measured step: less sensitive to other jobs sharing the
        # cores than wall time; with --threads 1 on an idle core it is ~= the wall time per step.
        "step_cpu_seconds": [round(x, 4) for x in cpu_measured],
        "median_step_cpu_s": round(statistics.median(cpu_measured), 4) if cpu_measured else None,
        "peak_cuda_mb": round(peak_cuda_mb, 1) if peak_cuda_mb is not None else None,
        "rss_before_train_mb": round(rss_before_train, 1),
        "train_wall_s": round(t_train, 3),
        "trainer_init_s": round(t_init, 3),
        "model_build_s": round(t_build, 3),
        # contention check: on an idle box cpu_util ~= threads; loadavg >> threads means other jobs competed
        "train_cpu_s": round(cpu_s, 2),
        "cpu_util": round(cpu_s / t_train, 2),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "os_cpu_count": os.cpu_count(),
        "model_reused_from_cache": reused,
        "model_dir": model_path,
        "model_sha256": _sha256(Path(model_path) / "model.safetensors"),
        "tokenizer_sha256": _sha256(Path(model_path) / "tokenizer.json"),
        "model_config": {
            k: getattr(policy.config, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
                "tie_word_embeddings",
            )
        },
        "lora": {
            "r": 16,
            "alpha": 32,
            "dropout": 0.0,
            "target_modules": lora_targets,
            "trainable_params": lora_trainable,
        },
        "value_model_trainable_params": value_trainable,
        "gradient_checkpointing_active": bool(getattr(unwrapped_policy, "is_gradient_checkpointing", False)),
        "prompt_token_lengths": prompt_lens,
        "num_mini_batches": 1,
        "temperature": 0.7,
        "timing_method": "TrainerCallback: on_train_begin + per-step on_step_end perf_counter stamps "
        "(PPOTrainer.train calls on_step_end once per PPO update)",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
