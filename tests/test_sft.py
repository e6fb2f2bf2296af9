"""`ppo-cli train-sft` end to end on tiny models: the output tree, loading final/ with plain transformers + peft,
LoRA vs full fine-tuning, exact resume after SIGKILL and after SIGTERM, four architectures, reruns.

The runs are started together (module fixtures) because most of a run is process start-up; the tests then
assert on what they left behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ppo_cli import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
# Longer than an 80-column table cell: the reference run's console must still show its final/ whole.
LONG_DIR = "a-directory-whose-name-alone-is-longer-than-what-an-80-column-table-can-show"


@dataclass
class Run:
    """One `python -m ppo_cli train-sft ...` process, its output files and its output_dir."""

    args: list[str]
    output_dir: Path
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float = 300) -> Run:
        self.proc.wait(timeout=timeout)
        return self

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def output(self) -> str:
        return self.log.read_text()

    def check(self) -> Run:
        self.wait()
        assert self.returncode == 0, f"exit {self.returncode}\n{self.output}"
        return self


def start(
    output_dir: Path,
    model: Path,
    *overrides: str,
    data: Path,
    eval_data: Path,
    log_name: str | None = None,
    columns: int = 200,
) -> Run:
    args = [
        "train-sft",
        f"model.name_or_path={model}",
        f"data.train={data}",
        f"data.eval={eval_data}",
        f"output_dir={output_dir}",
        "train.batch_size=2",
        "train.log_every=1",
        "logger.progress=false",
        "logger.plots=false",
        *overrides,
    ]
    log = output_dir.with_name((log_name or output_dir.name) + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": str(columns), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:  # a file, not a pipe: a pipe nobody reads would block the run
        proc = subprocess.Popen(
            [sys.executable, "-m", "ppo_cli", *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    return Run(args, output_dir, proc, log)


def first_lines(path: Path, n: int, out: Path) -> Path:
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def trainable_reported(output: str) -> tuple[int, int]:
    match = re.search(r"parameters\s+([\d,]+) trainable of ([\d,]+)", output)
    assert match, output
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-data")
    return {
        "train": tiny["sft"],
        "eval": first_lines(tiny["sft_eval"], 4, root / "eval.jsonl"),
        # A bigger eval set, evaluated every step, makes each step long enough to interrupt it mid-run.
        "slow_eval": first_lines(tiny["sft"], 100, root / "slow_eval.jsonl"),
    }


@pytest.fixture(scope="module")
def runs(tiny, tiny_factory, files, tmp_path_factory):
    """The uninterrupted reference run and the short variant runs, all started at once."""
    root = tmp_path_factory.mktemp("sft-runs")
    common = {"data": files["train"], "eval_data": files["eval"]}
    arch_models = {arch: tiny_factory(arch)["model"] for arch in ("qwen2", "gpt2", "gpt_neox")}
    started = {
        # Into a file at 80 columns, as a first-time user piping to a log would (see test_console_at_80_columns).
        "lora": start(
            root / LONG_DIR / "lora",
            tiny["model"],
            f"train.max_steps={STEPS}",
            "train.save_every=2",
            "train.eval_every=3",
            columns=80,
            **common,
        ),
        "full": start(root / "full", tiny["model"], "train.max_steps=2", "lora.enabled=false", **common),
        "gradckpt": start(
            root / "gradckpt",
            tiny["model"],
            f"train.max_steps={STEPS}",
            "train.save_every=2",
            "train.eval_every=3",
            "model.gradient_checkpointing=true",
            **common,
        ),
        **{
            arch: start(root / arch, model, "train.max_steps=2", **common)
            for arch, model in arch_models.items()
        },
    }
    for run in started.values():
        run.check()
    return {**started, "arch_models": arch_models, "base": tiny["model"]}


@pytest.fixture(scope="module")
def interrupted(tiny, files, tmp_path_factory, runs):
    """Runs with the reference run's settings, stopped mid-way (SIGKILL / SIGTERM), then resumed with resume=auto."""
    root = tmp_path_factory.mktemp("sft-interrupted")
    slow = {"data": files["train"], "eval_data": files["slow_eval"]}
    overrides = (f"train.max_steps={STEPS}", "train.save_every=2", "train.eval_every=1")
    killed = start(root / "killed", tiny["model"], *overrides, **slow)
    termed = start(root / "termed", tiny["model"], *overrides, **slow)

    # A checkpoint directory appears by rename once complete: signal each run as soon as its own appears.
    pending = {
        "killed": (killed, root / "killed" / "checkpoints" / "step-000004", signal.SIGKILL),
        "termed": (termed, root / "termed" / "checkpoints" / "step-000002", signal.SIGTERM),
    }
    deadline = time.monotonic() + 300
    while pending:
        for name, (run, path, sig) in list(pending.items()):
            if path.exists():
                run.proc.send_signal(sig)
                del pending[name]
            else:
                assert run.proc.poll() is None, f"{name} ended before {path} appeared:\n{run.output}"
        assert time.monotonic() < deadline, f"no checkpoint appeared in time: {list(pending)}"
        time.sleep(0.01)
    killed.wait()
    termed.wait()
    state = {
        "killed": {"returncode": killed.returncode, "files": sorted(os.listdir(root / "killed"))},
        "termed": {
            "returncode": termed.returncode,
            "output": termed.output,
            "files": sorted(os.listdir(root / "termed")),
            "checkpoints": [s for s, _ in ckpt.list_checkpoints(root / "termed")],
        },
    }
    resumed = {
        name: start(
            root / name,
            tiny["model"],
            *overrides,
            "resume=auto",
            data=files["train"],
            eval_data=files["eval"],
            log_name=f"{name}-resumed",
        )
        for name in ("killed", "termed")
    }
    for name, run in resumed.items():
        run.check()
        state[name]["resumed_output"] = run.output
        state[name]["dir"] = root / name
    return state


# ------------------------------------------------------------------------------------- output tree


def test_output_tree(runs):
    out = runs["lora"].output_dir
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["stage"] == "sft"
    assert cfg["output_dir"] == str(out)
    assert cfg["model"]["name_or_path"] == str(runs["base"])
    assert cfg["train"]["max_steps"] == STEPS

    lines = metrics(out)
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, STEPS + 1))
    for m in train_lines:
        for key in ("loss", "lr", "tokens_per_second"):
            assert math.isfinite(m[key]), m
        assert m["tokens_per_second"] > 0
    eval_steps = [m["step"] for m in lines if "eval/loss" in m]
    assert eval_steps == [3, STEPS]  # train.eval_every=3, and once at the end
    assert all(math.isfinite(m["eval/loss"]) for m in lines if "eval/loss" in m)

    # keep_last=2 of the checkpoints written every 2 steps; each one complete and verifiable.
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step-000004", "step-000006"]
    for _, path in ckpt.list_checkpoints(out):
        assert sorted(os.listdir(path)) == sorted(
            [ckpt.MANIFEST, ckpt.STATE, ckpt.TRAINABLE, ckpt.TRAINER_STATE]
        )
        assert ckpt.verify_checkpoint(path) is None
    state = json.loads((out / "checkpoints" / "step-000006" / ckpt.TRAINER_STATE).read_text())
    assert state["step"] == STEPS and set(state["data"]) == {"epoch", "offset"}

    final = out / "final"
    names = set(os.listdir(final))
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "ppo_cli.json",
    } <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names
    info = json.loads((final / "ppo_cli.json").read_text())
    assert info["stage"] == "sft" and info["base_model"] == str(runs["base"]) and info["lora"] is True
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(runs["base"])
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["task_type"] == "CAUSAL_LM"
    # Nothing half-written is left next to the products.
    assert not [p for p in out.rglob(".*tmp*")]


def test_console_at_80_columns(runs):
    """COLUMNS=80, output to a file: the final/ path on a line of its own, whole; nothing cut with '…'; the
    LoRA targets on one line; the summary says how loss and eval loss moved from first to last log."""
    run = runs["lora"]
    final = run.output_dir / "final"
    assert f"final: {final}" in run.output.splitlines(), run.output
    assert "…" not in run.output, run.output
    text = " ".join(run.output.replace("│", " ").split())
    assert "targets=peft default for llama (q_proj, v_proj)" in text, run.output
    losses = [m["loss"] for m in metrics(run.output_dir) if "loss" in m]
    evals = [m["eval/loss"] for m in metrics(run.output_dir) if "eval/loss" in m]
    assert f"loss {losses[0]:.4g} -> {losses[-1]:.4g} (step 1 -> {STEPS})" in text, run.output
    assert f"eval/loss {evals[0]:.4g} -> {evals[-1]:.4g} (step 3 -> {STEPS})" in text, run.output


def test_logged_lr_is_the_rate_each_step_used(runs):
    """`lr` at step s is the rate step s's optimizer update used. train-sft's lr 2e-4 over 6 steps with
    warmup_ratio 0.03 -> ceil(0.18) = 1 warmup step, then cosine: the factor at scheduler index i is
    0/1 = 0 for i = 0, else 0.5 (1 + cos(pi (i - 1) / 5)): 1, 0.9045085, 0.6545085, 0.3454915, 0.0954915."""
    train_lines = [m for m in metrics(runs["lora"].output_dir) if "loss" in m]
    factors = [0.0, 1.0, 0.9045085, 0.6545085, 0.3454915, 0.0954915]
    assert [m["lr"] for m in train_lines] == pytest.approx([2e-4 * f for f in factors], abs=1e-11)


def _plain_policy(base: Path, final: Path, resize: bool = False):
    """The policy as a user without ppo-cli loads it: the README's transformers + peft load, word for word.

    resize=True: grow the base to the saved tokenizer first (peft's recipe for an added token), which padded
    batches need when the run added a pad token the base has no row for (the tiny tokenizer has none).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(base)
    if resize:
        model.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(model, final).eval(), tokenizer


def _run_model(out: Path):
    """The run's own model: ppo-cli's loaders and the weights of the run's last checkpoint."""
    from omegaconf import OmegaConf

    from ppo_cli.models import apply_lora, load_causal_lm, load_tokenizer

    cfg = OmegaConf.load(out / "config.yaml")
    model = apply_lora(
        load_causal_lm(cfg.model, load_tokenizer(cfg.model.name_or_path), torch.device("cpu")), cfg.lora
    )
    last = ckpt.load_checkpoint(out / "checkpoints" / f"step-{STEPS:06d}")
    ckpt.load_trainable_state(model, last.trainable, "last checkpoint")
    return model.eval()


def test_final_loads_with_plain_peft_and_matches_the_run(runs):
    out = runs["lora"].output_dir
    saved = adapter(out)
    assert saved and all("lora_" in name for name in saved)  # only the adapter, no copy of the embeddings
    run_model = _run_model(out)
    base_vocab = json.loads((runs["base"] / "config.json").read_text())["vocab_size"]
    texts = ["Describe the river: good river sad happy calm.", "How was the day?"]

    policy, tokenizer = _plain_policy(runs["base"], out / "final")
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    with torch.no_grad():
        for text in texts:  # one unpadded sequence at a time
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            got, expected = policy(input_ids=ids).logits, run_model(input_ids=ids).logits
            torch.testing.assert_close(got, expected[..., :base_vocab], rtol=0, atol=1e-5)
            with policy.disable_adapter():  # the adapter really changes the model
                assert not torch.allclose(policy(input_ids=ids).logits, got)

    # A padded batch with the saved tokenizer: the same logits at every real token.
    policy, tokenizer = _plain_policy(runs["base"], out / "final", resize=True)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["input_ids"] == tokenizer.pad_token_id).any()
    with torch.no_grad():
        got, expected = policy(**batch).logits, run_model(**batch).logits
    real = batch["attention_mask"].bool()
    # Column `pad` is the new row's logit: initialised anew by each resize, it is never a target.
    torch.testing.assert_close(got[real][:, :base_vocab], expected[real][:, :base_vocab], rtol=0, atol=1e-5)


def test_lora_versus_full_fine_tuning(runs):
    from transformers import AutoModelForCausalLM

    lora_trainable, total = trainable_reported(runs["lora"].output)
    full_trainable, full_total = trainable_reported(runs["full"].output)
    assert (
        full_trainable == full_total == total - lora_trainable
    )  # the LoRA model's total counts its adapters
    assert 0 < lora_trainable < total // 10

    # What each checkpoint holds is exactly the trainable parameters.
    def numel(run_dir: Path) -> int:
        _, path = ckpt.list_checkpoints(run_dir)[-1]
        return sum(t.numel() for t in load_file(path / ckpt.TRAINABLE).values())

    assert numel(runs["lora"].output_dir) == lora_trainable
    assert numel(runs["full"].output_dir) == full_trainable

    final = runs["full"].output_dir / "final"
    assert not (final / "adapter_config.json").exists()
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert json.loads((final / "ppo_cli.json").read_text())["lora"] is False
    model = AutoModelForCausalLM.from_pretrained(final)  # a standalone model directory
    base = AutoModelForCausalLM.from_pretrained(runs["base"])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])  # the weights trained


def test_gradient_checkpointing_gives_the_same_losses(runs):
    plain = [m["loss"] for m in metrics(runs["lora"].output_dir) if "loss" in m]
    checkpointed = [m["loss"] for m in metrics(runs["gradckpt"].output_dir) if "loss" in m]
    assert len(checkpointed) == STEPS
    assert checkpointed == pytest.approx(plain, rel=1e-5)  # recomputation changes memory, not the maths
    assert (runs["gradckpt"].output_dir / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gpt_neox"])
def test_architectures(runs, arch):
    out = runs[arch].output_dir
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2]
    final = out / "final"
    assert json.loads((final / "ppo_cli.json").read_text())["stage"] == "sft"
    policy, tokenizer = _plain_policy(runs["arch_models"][arch], final)
    batch = tokenizer(["Describe the river:"], return_tensors="pt")
    with torch.no_grad():
        logits = policy(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    assert sum("lora_A" in k for k in adapter(out)) > 0


# ------------------------------------------------------------------------------------------ resume


def test_sigkill_then_resume_equals_uninterrupted(runs, interrupted):
    killed = interrupted["killed"]
    assert killed["returncode"] == -signal.SIGKILL
    assert "final" not in killed["files"]  # it really died mid-run
    assert "resumed at" in killed["resumed_output"] and "step 4" in killed["resumed_output"]
    reference, resumed = adapter(runs["lora"].output_dir), adapter(killed["dir"])
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    last = f"step-{STEPS:06d}"
    a = load_file(runs["lora"].output_dir / "checkpoints" / last / ckpt.TRAINABLE)
    b = load_file(killed["dir"] / "checkpoints" / last / ckpt.TRAINABLE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl holds each step once: the lines written after step 4 by the killed process were dropped.
    assert [m["step"] for m in metrics(killed["dir"]) if "loss" in m] == list(range(1, STEPS + 1))


def test_sigterm_checkpoints_and_prints_the_resume_hint(runs, interrupted):
    termed = interrupted["termed"]
    assert termed["returncode"] == 128 + signal.SIGTERM, termed["output"]
    output = " ".join(termed["output"].split())
    assert "SIGTERM received" in output
    stopped = termed["checkpoints"][-1]
    assert stopped >= 2 and "final" not in termed["files"]
    assert f"stopped at step {stopped}" in output
    assert f"ppo-cli train-sft output_dir={termed['dir']} resume=auto" in output
    assert "Traceback" not in output
    # The graceful-stop checkpoint resumes exactly too.
    assert f"step {stopped}" in termed["resumed_output"]
    reference, resumed = adapter(runs["lora"].output_dir), adapter(termed["dir"])
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def test_rerun_of_a_complete_run_does_nothing(runs, files, interrupted):
    out = runs["lora"].output_dir
    before = snapshot(out)
    run = start(
        out,
        runs["base"],
        f"train.max_steps={STEPS}",
        "train.save_every=2",
        "train.eval_every=3",
        data=files["train"],
        eval_data=files["eval"],
        log_name="lora-rerun",
    )
    run.check()
    assert "nothing to do" in " ".join(run.output.split())
    assert snapshot(out) == before


def test_checkpoint_holds_and_restores_every_rng_state_cuda_included(tmp_path, monkeypatch):
    """The SFT/RM loop's checkpoint carries what capture_rng sees, the CUDA generators included
    (simulated: no GPU is needed), and resume hands every state back."""
    import random

    import numpy as np
    from omegaconf import OmegaConf

    from ppo_cli.config import SFTConfig
    from ppo_cli.run import StageRun
    from ppo_cli.supervised import SupervisedTask, SupervisedTrainer

    cfg = OmegaConf.structured(SFTConfig)
    cfg.output_dir, cfg.train.device, cfg.train.max_steps = str(tmp_path / "run"), "cpu", 2
    task = SupervisedTask(torch.nn.Linear(2, 1), [0, 1], [], None, None, None, {})
    trainer = SupervisedTrainer(StageRun(cfg, "sft"), task)
    saved_cuda = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
    cuda_now = {"state": saved_cuda}
    restored_cuda: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in cuda_now["state"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored_cuda.append)

    ckpt.seed_everything(3)
    before = ckpt.capture_rng()
    trainer.save()
    torch.rand(3), random.random(), np.random.rand()  # move every generator on
    cuda_now["state"] = [torch.tensor([9], dtype=torch.uint8)]
    trainer.run.resume_from = ckpt.latest_checkpoint(trainer.run.output_dir)
    trainer.restore()

    assert len(restored_cuda) == 1 and torch.equal(restored_cuda[0][0], saved_cuda[0])
    after = ckpt.capture_rng()
    assert torch.equal(after["torch"], before["torch"])
    assert after["python"] == before["python"] and after["numpy"] == before["numpy"]
