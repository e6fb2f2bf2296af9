"""Helpers for the PPO tests: hand-made SFT / RM adapters on the tiny base, roles and trainers in-process.

The adapters are made directly with peft (non-zero LoRA B weights, a random score head), so the PPO
tests do not depend on train-sft / train-rm, and a wrong adapter (e.g. the reward adapter used where
the policy's should be) changes the numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

LORA_TARGETS = ["q_proj", "v_proj"]


def model_cfg(base: str | Path):
    return OmegaConf.create(
        {
            "name_or_path": str(base),
            "dtype": "float32",
            "trust_remote_code": False,
            "attn_implementation": "sdpa",
            "gradient_checkpointing": False,
            "revision": None,
        }
    )


def tokenizer_of(base: str | Path):
    from ppo_cli.models import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    tokenizer.padding_side = "left"
    return tokenizer


def load_base(base: str | Path, tokenizer):
    """The base CausalLM the way train-ppo loads it (pad token added, embeddings grown)."""
    from ppo_cli.models import load_causal_lm

    return load_causal_lm(model_cfg(base), tokenizer, torch.device("cpu"))


def _randomise(model, names: tuple[str, ...], std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(n in name for n in names):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def make_sft_adapter(
    base: str | Path, out: Path, dropout: float = 0.05, seed: int = 1, std: float = 0.3
) -> Path:
    """An SFT-like LoRA adapter (as train-sft writes it: lora dropout 0.05) with non-zero B weights."""
    from peft import LoraConfig, get_peft_model

    from ppo_cli.models import write_product_info

    tokenizer = tokenizer_of(base)
    model = get_peft_model(
        load_base(base, tokenizer),
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
        ),
    )
    _randomise(model, ("lora_B",), std, seed)
    model.save_pretrained(str(out), save_embedding_layers=False)
    tokenizer.save_pretrained(str(out))
    write_product_info(out, "sft", str(base), lora=True)
    return out


def make_rm_adapter(base: str | Path, out: Path, seed: int = 2, std: float = 0.3) -> Path:
    """An RM-like adapter: LoRA on AutoModelForSequenceClassification + the 'score' head (modules_to_save)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from ppo_cli.models import fit_embeddings, write_product_info

    tokenizer = tokenizer_of(base)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=torch.float32)
    fit_embeddings(model, tokenizer)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="SEQ_CLS",
            modules_to_save=["score"],
        ),
    )
    _randomise(model, ("lora_B", "score"), std, seed)
    model.save_pretrained(str(out), save_embedding_layers=False)
    tokenizer.save_pretrained(str(out))
    write_product_info(out, "rm", str(base), lora=True)
    return out


def shift_rm_adapter(rm: Path, out: Path, bias: float) -> Path:
    """A copy of the RM adapter `rm` whose score head has a bias: every score moves by `bias`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(rm, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    (head_weight,) = [k for k in tensors if k.endswith("score.weight")]
    tensors[head_weight.removesuffix("weight") + "bias"] = torch.tensor([bias])
    save_file(tensors, weights)
    return out


def build_tiny_roles(
    base: str | Path, sft: Path | None, rm: Path | None, targets=LORA_TARGETS, critic: bool = True
):
    """(roles, tokenizer) exactly as train-ppo builds them (`targets` matter only without `sft`)."""
    from ppo_cli.ppo.roles import build_roles

    tokenizer = tokenizer_of(base)
    model = load_base(base, tokenizer)
    lora = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets})
    roles = build_roles(
        model, lora, str(sft) if sft else None, str(rm) if rm else None, model.config.hidden_size, critic
    )
    roles.eval()
    return roles, tokenizer


def ppo_config(base: str | Path, data: str | Path, output_dir: Path, *overrides: str):
    """The composed and resolved train-ppo config, as the CLI would see it."""
    from ppo_cli.app import precheck

    cfg = precheck(
        "train_ppo",
        [
            f"model.name_or_path={base}",
            f"data.train={data}",
            f"output_dir={output_dir}",
            "reward_fn=ppo_cli.tiny.task:positive_reward",
            "train.device=cpu",
            "train.batch_size=4",
            "generation.max_new_tokens=8",
            "logger.progress=false",
            "logger.plots=false",
            *overrides,
        ],
        "train-ppo",
    )
    OmegaConf.resolve(cfg)
    return cfg


def make_trainer(cfg, roles, tokenizer, reward=None, dist=None, rm_stats=None):
    """A PPOTrainer on `roles` with the tiny prompts; `reward(qr, mask, prompts, completions)`.

    `dist` (a DistInfo) makes the run look like one rank of several; no process group is started, so
    the caller must stub what would talk to one (ppo_cli.ppo.trainer.broadcast_parameters).
    """
    from ppo_cli.data import build_prompts, load_rows
    from ppo_cli.logger import RunLogger
    from ppo_cli.ppo.trainer import PPOTrainer
    from ppo_cli.run import StageRun

    run = StageRun(cfg, "ppo")
    if dist is not None:
        run.dist = dist
    run.logger = RunLogger(Path(cfg.output_dir), cfg, "ppo")
    prompts, _ = build_prompts(tokenizer, load_rows(cfg.data.train, "data.train"), 64, "truncate")
    if reward is None:
        reward = lambda qr, mask, prompts, completions: roles.reward_scores(qr, mask)  # noqa: E731
    return PPOTrainer(run, roles, tokenizer, prompts, reward, [tokenizer.eos_token_id], rm_stats)


def tiny_adapters(tiny: dict) -> dict[str, Path]:
    """The SFT and RM adapters on the session's tiny base, made once per session (lock-free: a test
    session is one process), beside the tiny build rather than inside it."""
    root = Path(tiny["root"]).parent / f"ppo-adapters-{Path(tiny['root']).name}"
    paths = {"sft": root / "sft", "rm": root / "rm"}
    if not (paths["rm"] / "ppo_cli.json").is_file():
        make_sft_adapter(tiny["model"], paths["sft"])
        make_rm_adapter(tiny["model"], paths["rm"])
    return paths


TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: tests/ importable (ppo_rewards), one thread per process (the
    CLI tests start several runs at once on a 2-core machine), plain console."""
    import os

    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def start_cli(*args: str, log: Path, env: dict | None = None):
    """`python -m ppo_cli ARGS` started in the background, stdout/stderr to `log`.out/.err (files, not
    pipes: several runs go at once and none may block on a full pipe); see `finish`."""
    import subprocess
    import sys

    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ppo_cli", *args],
            cwd=REPO,
            stdout=out,
            stderr=err,
            text=True,
            env=env or cli_env(),
        )
    proc.log = log
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_ranks(*args: str, log: Path):
    """`ppo-cli ARGS` on two CPU ranks (torchrun, gloo) in the background, output to `log`.out/.err, in a
    session of its own: torchrun starts its ranks there, so `finish` can kill a stuck run with them."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr"]
    cmd += [
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "ppo_cli",
        *args,
        "logger.progress=false",
        "logger.plots=false",
    ]
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=cli_env(), start_new_session=True)
    proc.log = log
    return proc


def finish(proc, timeout: float = 600):
    """Wait for a process from `start_cli` or `start_two_ranks`: a CompletedProcess with its return code
    and output. Past `timeout` the run is killed (with its session: a torchrun's ranks) and its return code
    says so."""
    import os
    import signal
    import subprocess

    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if os.getpgid(proc.pid) == proc.pid:  # leads its own session: start_two_ranks
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
    out, err = Path(f"{proc.log}.out").read_text(), Path(f"{proc.log}.err").read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_metrics(output_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def hostile_generation_fields(tokenizer) -> dict:
    """generation_config.json values that, if they reached generate, would move sampling away from
    softmax(z / T): filters, penalties, forced/banned tokens, length and time limits, beams, CFG and
    prompt-lookup decoding. Each would make 16 samples of one prompt identical or visibly biased."""
    good, happy, sad = (tokenizer(w)["input_ids"][-1] for w in ("good", "happy", "sad"))
    eos = tokenizer.eos_token_id
    return {
        "do_sample": False,
        "num_beams": 2,
        "temperature": 0.05,
        "top_k": 1,
        "top_p": 0.1,
        "min_p": 0.9,
        "typical_p": 0.2,
        "epsilon_cutoff": 0.3,
        "eta_cutoff": 0.3,
        "repetition_penalty": 2.0,
        "no_repeat_ngram_size": 2,
        "min_length": 40,
        "min_new_tokens": 8,
        "bad_words_ids": [[sad]],
        "sequence_bias": [[[good], 5.0]],
        "forced_bos_token_id": good,
        "forced_eos_token_id": eos,
        "suppress_tokens": [happy],
        "begin_suppress_tokens": [sad],
        "exponential_decay_length_penalty": [1, 3.0],
        "renormalize_logits": True,
        "remove_invalid_values": True,
        "guidance_scale": 3.0,
        "prompt_lookup_num_tokens": 2,
        "max_time": 0.001,
    }


def hostile_base(model_dir: str | Path, out: Path) -> tuple[Path, dict]:
    """A copy of the base model whose generation_config.json holds `hostile_generation_fields`;
    returns (its directory, the hostile fields)."""
    import json
    import shutil

    shutil.copytree(model_dir, out)
    fields = hostile_generation_fields(tokenizer_of(out))
    path = out / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, **fields}, indent=2))
    return out, fields


def record_generation(model, monkeypatch) -> dict:
    """Spy on the transformers model under `model` (peft unwrapped): after a generate call the dict holds
    the merged generation config ("config") and the logits processors it built ("processors")."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen: dict = {}
    prepare, processors = inner._prepare_generation_config, inner._get_logits_processor

    def prepare_spy(*args, **kwargs):
        config, model_kwargs = prepare(*args, **kwargs)
        seen["config"] = config
        return config, model_kwargs

    def processors_spy(*args, **kwargs):
        seen["processors"] = processors(*args, **kwargs)
        return seen["processors"]

    monkeypatch.setattr(inner, "_prepare_generation_config", prepare_spy)
    monkeypatch.setattr(inner, "_get_logits_processor", processors_spy)
    return seen


def leaked_generation_fields(merged, hostile: dict) -> dict:
    """The hostile fields whose value reached the merged generation config."""
    return {k: getattr(merged, k, None) for k, v in hostile.items() if getattr(merged, k, None) == v}


def kill_and_resume(args_a: list[str], args_b: list[str], root: Path, deadline_s: float = 500) -> dict:
    """Run A uninterrupted beside run B, kill B (SIGKILL: no chance to clean up) once its step-2 checkpoint
    exists, and resume B with resume=auto: {"A": (result, dir), "killed": (result, dir), "B": (result, dir)}."""
    import signal
    import time

    full = start_cli(*args_a, log=root / "logs" / "A")
    killed = start_cli(*args_b, log=root / "logs" / "B")
    step2 = root / "B" / "checkpoints" / "step-000002"
    deadline = time.monotonic() + deadline_s
    while not step2.is_dir():
        assert killed.poll() is None, finish(killed).stderr[-3000:]
        assert time.monotonic() < deadline, "run B wrote no step-2 checkpoint"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed_result = finish(killed)
    resumed = start_cli(*args_b, "resume=auto", log=root / "logs" / "B-resumed")
    return {
        "A": (finish(full), root / "A"),
        "killed": (killed_result, root / "B"),
        "B": (finish(resumed), root / "B"),
    }


def assert_same_products(a: Path, b: Path) -> None:
    """Two train-ppo runs' final/ hold identical policy and value adapters and value heads."""
    from safetensors.torch import load_file

    for rel in (
        "adapter_model.safetensors",
        "value/adapter_model.safetensors",
        "value/value_head.safetensors",
    ):
        ta, tb = load_file(a / "final" / rel), load_file(b / "final" / rel)
        assert ta.keys() == tb.keys() and ta, rel
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{rel}: {key} differs after resume"


def assert_usage_error(result, command: str, *needles: str) -> str:
    """Exit 2, no traceback anywhere, and one paragraph on stderr that names every needle."""
    everything = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{everything[-3000:]}"
    assert "Traceback" not in everything, everything[-3000:]
    paragraph = result.stderr.strip()
    assert paragraph.startswith(f"ppo-cli {command}: error: "), everything[-3000:]
    assert "\n" not in paragraph, f"more than one paragraph on stderr:\n{paragraph}"
    for needle in needles:
        assert needle in paragraph, f"{needle!r} not in: {paragraph}"
    return paragraph


def assert_resumed_identically(runs: dict) -> list[dict]:
    """`kill_and_resume`'s runs: both finished, B was killed and resumed at step 2, and B's final policy,
    value adapter and head and its metrics (times and peak memory aside) are A's exactly. Returns A's
    comparable metrics."""
    import signal

    for name in ("A", "B"):
        result, _ = runs[name]
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    killed, _ = runs["killed"]
    assert killed.returncode == -signal.SIGKILL
    (_, a), (result_b, b) = runs["A"], runs["B"]
    assert "resumed at" in result_b.stdout and "step 2" in result_b.stdout
    assert_same_products(a, b)

    def comparable(run_dir):
        # Times and peak memory (process RSS) are not the run's numbers.
        skip = ("time/", "memory/")
        return [{k: v for k, v in m.items() if not k.startswith(skip)} for m in read_metrics(run_dir)]

    metrics = comparable(a)
    assert metrics == comparable(b)
    return metrics


def assert_never_moved(metrics: list[dict], first_ratio: bool = True) -> None:
    """A train.lr=0 run's steps: the policy never moves, so KL 0, approx-KL 0, no clipping and ratio 1
    exactly (docs/ppo-details.md, details 15 and 16)."""
    for m in metrics:
        assert m["objective/kl"] == 0.0, m
        assert m["policy/approxkl_avg"] == 0.0, m
        assert m["policy/clipfrac_avg"] == 0.0, m
        assert m["val/ratio"] == 1.0, m
        if first_ratio:
            assert m["policy/first_ratio"] == 1.0, m
