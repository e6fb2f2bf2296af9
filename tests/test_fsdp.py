"""train.strategy=fsdp (ppo_cli/fsdp.py): the base sharded across two CPU ranks (torchrun, gloo).

- each rank holds half of the base's bytes, a bf16 base trains beside fp32 adapters, and a checkpoint's
  full tensors go back into the shards unchanged (a worker script, tests/fsdp_worker.py);
- SFT and RM on two sharded ranks give one process's losses and adapters (the same global batch);
- PPO on the sharded base gives DDP's metrics and adapters on two ranks (each rank samples from its own
  RNG stream, which one process cannot reproduce), resumes bit-exactly after kill -9, and its final/ loads
  with plain peft and generates what the last checkpoint does;
- GRPO at train.lr=0 on a 4-bit base never moves; vLLM sampling and an 8-bit base are refused before
  anything loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli_in_process
from ppo_helpers import (
    TESTS_DIR,
    assert_never_moved,
    assert_resumed_identically,
    assert_usage_error,
    finish,
    read_metrics,
    start_cli,
    start_two_ranks,
    tiny_adapters,
)
from safetensors.torch import load_file
from test_distributed import torchrun

from ppo_cli import fsdp

pytestmark = pytest.mark.slow

FSDP = "train.strategy=fsdp"
# No dropout (its masks would differ between one process and two ranks), no warmup (step 1 would not
# move), fp32 throughout.
EXACT = ["lora.dropout=0", "train.warmup_ratio=0", "train.mixed_precision=no", "train.log_every=1"]


def comparable(run_dir: Path) -> list[dict]:
    """A run's metrics without times and peak memory (not the run's numbers)."""
    skip = ("time/", "memory/", "tokens_per_second")
    return [{k: v for k, v in m.items() if not k.startswith(skip)} for m in read_metrics(run_dir)]


def assert_close_metrics(a: list[dict], b: list[dict], keys: tuple[str, ...] | None = None) -> None:
    """The same steps, and at each the same values of `keys` (None: every key; both have the same)."""
    assert [m["step"] for m in a] == [m["step"] for m in b] and a
    for x, y in zip(a, b, strict=True):
        if keys is None:
            assert x.keys() == y.keys(), x.keys() ^ y.keys()
        for key in x.keys() if keys is None else [k for k in keys if k in x or k in y]:
            torch.testing.assert_close(float(x[key]), float(y[key]), rtol=1e-4, atol=1e-5, msg=key)


# What one process and two ranks share in SFT and RM's logs: the logged training loss and the RM's batch
# metrics are per-rank means averaged over the ranks (a rank's mean of its own items), which equal one
# process's only when every rank has as many items: the RM's pairs do, SFT's labelled tokens do not.
SHARED_METRICS = {
    "sft": ("lr", "grad_norm", "eval/loss"),
    "rm": ("lr", "grad_norm", "loss", "accuracy", "rewards/margin", "eval/loss", "eval/accuracy"),
}


def assert_close_tensors(a: Path, b: Path) -> None:
    """The same tensors up to fp32 rounding, as AdamW amplifies it: its first updates are about
    lr x sign(gradient), so an element whose gradient is near 0 may move by ~lr on one side only of a
    1e-7 difference. A wrong average (a factor of 2, a rank's gradient missing) moves them by ~lr."""
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-3, atol=5e-5, msg=key)


def assert_ok(
    result: subprocess.CompletedProcess, sharded: bool = True, read_by: str = "rank 0 alone"
) -> None:
    """The run succeeded, and (`sharded`) its start panel says the base was sharded over the 2 ranks, and
    who read it (`read_by`: "rank 0 alone", or "every rank" for a quantized base)."""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    if sharded:
        assert "sharded over 2 ranks" in result.stdout, result.stdout[-3000:]
        assert f"read by {read_by}" in result.stdout, result.stdout[-3000:]


# ------------------------------------------------------------------------------------ the shards


def test_each_rank_holds_half_of_a_bf16_base_and_round_trips_its_checkpoint(tiny, tmp_path):
    worker = TESTS_DIR / "fsdp_worker.py"
    result = torchrun(
        str(tiny["model"]), str(tmp_path), "bfloat16", cwd=tmp_path, entry=(str(worker),), timeout=180
    )
    assert_ok(result, sharded=False)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = ranks[0]["frozen_full_bytes"]
    # Rank 0 alone read the weights; rank 1 built the model on the meta device (the fresh LoRA tensors
    # peft made on the CPU beside it: under 2% of the base) and received its shards of the files' weights,
    # and rank 0's adapter.
    assert ranks[0]["loaded_bytes"] >= full and ranks[1]["loaded_bytes"] < 0.02 * full, ranks
    for r in ranks:
        assert r["base_mismatches"] == [] and r["buffers_match_files"], r
        assert r["lora_b_norms"] == ranks[0]["lora_b_norms"] and min(r["lora_b_norms"]) > 0
    assert sum(r["frozen_local_bytes"] for r in ranks) == full
    for r in ranks:
        assert r["layers"] == 2  # the tiny Llama's decoder layers, found through peft's wrappers
        assert r["all_sharded"]
        assert abs(r["frozen_local_bytes"] - full / 2) <= 0.02 * full, r
        # The base stays bf16 beside fp32 adapters in the same units; a step trains and clips them.
        assert r["frozen_dtypes"] == ["torch.bfloat16"] and r["trainable_dtypes"] == ["torch.float32"]
        assert torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() and r["grad_norm"] > 0
        # A checkpoint holds full tensors, and puts every shard and optimizer moment back as it was.
        assert r["state_is_full"] and r["weights_round_trip"] and r["optimizer_round_trip"]
        assert r["state_shapes"][
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
        ] == [4, 64]
        assert r["gathered_keys"] == sorted(r["state_shapes"])
    # The gradient norm is the global one, the same on both ranks.
    assert ranks[0]["grad_norm"] == ranks[1]["grad_norm"]


@pytest.mark.parametrize("tied", [False, True])
def test_untied_embeddings_and_output_head_are_units_of_their_own(tied):
    """Untied, each is gathered only around its own pass; tied, the shared weight stays in the root (one
    parameter cannot belong to two units)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    units = fsdp.embedding_units(model)
    if tied:
        assert units == []
    else:
        assert units == [model.get_input_embeddings(), model.get_output_embeddings()]


# ------------------------------------------------------------------------------------- SFT and RM


def first_rows(path: Path, n: int, into: Path) -> Path:
    """The first `n` rows of a .jsonl file, as a file in `into` (small data: every pass is a collective)."""
    out = into / path.name
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


def _one_process(*args: str, log: Path) -> subprocess.Popen:
    return start_cli(*args, "logger.progress=false", "logger.plots=false", log=log)


def test_sft_and_rm_on_two_sharded_ranks_match_one_process(tiny, tmp_path):
    """The same global batch (2 per rank x 2 ranks x 2 micro-batches, or 4 x 2 micro-batches on one
    process): the same losses, evaluation and adapters over 3 steps. 5 evaluation rows give the ranks 3
    and 2 (rank 1 runs one forward only to keep step), and final/ is written from the gathered adapter."""
    data = {
        name: first_rows(tiny[name], n, tmp_path)
        for name, n in (("sft_eval", 5), ("prefs", 24), ("prefs_eval", 5))
    }
    common = {
        "sft": ["train-sft", f"data.train={tiny['sft']}", f"data.eval={data['sft_eval']}"],
        "rm": ["train-rm", f"data.train={data['prefs']}", f"data.eval={data['prefs_eval']}"],
    }
    shared = [
        f"model.name_or_path={tiny['model']}",
        "train.max_steps=3",
        "train.lr=1e-2",
        "train.save_every=1",
    ]
    shared += ["train.grad_accum_steps=2", "train.eval_every=0", *EXACT]
    singles = {
        stage: _one_process(
            *args,
            *shared,
            "train.batch_size=4",
            f"output_dir={tmp_path / stage / 'one'}",
            log=tmp_path / stage,
        )
        for stage, args in common.items()
    }
    # Gathered layers kept from the forward to the backward, and recomputed activations: memory only.
    # (The evaluation, and the RM's scoring before final/, then leave every layer gathered when the
    # weights are saved.)
    memory = ["train.fsdp.reshard_after_forward=false", "model.gradient_checkpointing=true"]
    for stage, args in common.items():
        (tmp_path / stage).mkdir(exist_ok=True)
        sharded = start_two_ranks(
            *args, *shared, FSDP, *memory, "train.batch_size=2", f"output_dir={tmp_path / stage / 'fsdp'}",
            log=tmp_path / stage / "fsdp",
        )  # fmt: skip
        assert_ok(finish(sharded))
    for stage in common:
        assert_ok(finish(singles[stage]), sharded=False)
        one, two = tmp_path / stage / "one", tmp_path / stage / "fsdp"
        assert_close_metrics(comparable(one), comparable(two), SHARED_METRICS[stage])
        assert {"eval/loss", "grad_norm"} <= {k for m in comparable(two) for k in m}
        assert_close_tensors(
            one / "final" / "adapter_model.safetensors", two / "final" / "adapter_model.safetensors"
        )
        # The weights moved: a run that trained nothing would match too.
        first = load_file(two / "checkpoints" / "step-000003" / "trainable.safetensors")
        assert any(float(t.abs().max()) > 0 for k, t in first.items() if "lora_B" in k)
    info = {
        s: json.loads((tmp_path / "rm" / s / "final" / "ppo_cli.json").read_text()) for s in ("one", "fsdp")
    }
    torch.testing.assert_close(info["one"]["reward_mean"], info["fsdp"]["reward_mean"], rtol=1e-4, atol=1e-5)
    assert_final_generates_like_its_checkpoint(
        tiny["model"], tmp_path / "sft" / "fsdp", "step-000003", prefix=""
    )
    # A checkpoint holds full tensors: the sharded run continues on one process (one more step).
    sharded_run = tmp_path / "sft" / "fsdp"
    (sharded_run / "final" / "ppo_cli.json").unlink()  # not complete: resume=auto continues it
    resumed = finish(
        _one_process("train-sft", f"output_dir={sharded_run}", "train.max_steps=4", log=tmp_path / "r")
    )
    assert_ok(resumed, sharded=False)
    assert "resumed at" in resumed.stdout and (sharded_run / "checkpoints" / "step-000004").is_dir()


# ------------------------------------------------------------------------------------------- PPO


def assert_final_generates_like_its_checkpoint(base: Path, run_dir: Path, step: str, prefix: str) -> None:
    """final/ is a plain peft adapter: transformers + peft load it, and its greedy tokens are those of
    the same adapter with the last checkpoint's tensors (named `prefix` + the peft model's names)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tokenizer("the weather is", return_tensors="pt")

    def greedy(model) -> list[int]:
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return out[0].tolist()

    final = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "final")
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "final")
    saved = load_file(run_dir / "checkpoints" / step / "trainable.safetensors")
    params = dict(restored.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            if ".default." in name:
                params[name.removeprefix(prefix)].copy_(tensor)
                assert torch.equal(dict(final.named_parameters())[name.removeprefix(prefix)], tensor), name
    assert greedy(final) == greedy(restored)


def ppo_args(tiny, adapters, *extra: str) -> list[str]:
    """train-ppo with the four roles on one base: SFT adapter (policy, reference), RM adapter (reward,
    value), 3 steps of a checkpoint each."""
    return [
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        f"sft_checkpoint={adapters['sft']}",
        f"reward_checkpoint={adapters['rm']}",
        f"data.train={tiny['prompts']}",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.save_every=1",
        "train.lr=3e-3",
        "train.lr_scheduler=constant",
        "generation.max_new_tokens=6",
        "ppo.epochs=2",
        "ppo.kl_horizon=100",
        "sample_every=0",
        *EXACT,
        *extra,
    ]


def kill_all(pid: int) -> None:
    """SIGKILL to torchrun and its ranks: the ranks run in sessions of their own, and live on (to finish
    the run) when torchrun alone is killed."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [pid], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        tree += kids
        todo += kids
    for member in reversed(tree):  # the ranks first, then torchrun
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def kill_and_resume_two_ranks(args: list[str], root: Path) -> dict:
    """tests/ppo_helpers.py's kill_and_resume on two ranks: A uninterrupted; B killed with SIGKILL (all its
    processes) once its step-2 checkpoint exists, then resumed with resume=auto."""
    full = start_two_ranks(*args, f"output_dir={root / 'A'}", log=root / "A")
    killed = start_two_ranks(*args, f"output_dir={root / 'B'}", log=root / "B")
    step2 = root / "B" / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 300
    while not step2.is_dir():
        assert killed.poll() is None, finish(killed).stderr[-3000:]
        assert time.monotonic() < deadline, "run B wrote no step-2 checkpoint"
        time.sleep(0.05)
    kill_all(killed.pid)
    killed_result = finish(killed)
    resumed = start_two_ranks(*args, f"output_dir={root / 'B'}", "resume=auto", log=root / "B-resumed")
    return {
        "A": (finish(full), root / "A"),
        "killed": (killed_result, root / "B"),
        "B": (finish(resumed), root / "B"),
    }


def test_ppo_on_the_sharded_base_matches_ddp_and_resumes_exactly(tiny, tmp_path):
    adapters = tiny_adapters(tiny)
    args = ppo_args(tiny, adapters)
    ddp = start_two_ranks(*args, f"output_dir={tmp_path / 'ddp'}", log=tmp_path / "ddp")
    assert_ok(finish(ddp), sharded=False)
    runs = kill_and_resume_two_ranks([*args, FSDP], tmp_path)
    # kill -9 after the step-2 checkpoint, resumed: A's weights and metrics bit for bit.
    metrics = assert_resumed_identically(runs)
    for name in ("A", "B"):  # both sharded, the resumed one too
        assert_ok(runs[name][0])
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # The sharded base gives DDP's numbers: the same samples (each rank's own stream), losses, adapters.
    assert_close_metrics(comparable(tmp_path / "ddp"), comparable(tmp_path / "A"))
    for rel in (
        "adapter_model.safetensors",
        "value/adapter_model.safetensors",
        "value/value_head.safetensors",
    ):
        assert_close_tensors(tmp_path / "ddp" / "final" / rel, tmp_path / "A" / "final" / rel)
    assert metrics[-1]["objective/kl"] != 0.0  # the policy moved
    assert_final_generates_like_its_checkpoint(tiny["model"], tmp_path / "A", "step-000003", prefix="model.")


@pytest.mark.parametrize(
    ("setting", "read_by"),
    [
        (
            ["ppo.advantage_estimator=grpo", "generation.samples_per_prompt=2", "model.load_in_4bit=true"],
            "every rank",
        ),
        (["ppo.advantage_estimator=gae"], "rank 0 alone"),
    ],
    ids=["grpo-4bit", "gae-rank0-load"],
)
def test_ppo_at_zero_learning_rate_never_moves_on_a_sharded_base(tiny, tmp_path, setting, read_by):
    """A fresh policy adapter and the bare base as the reference, at train.lr=0: every step's KL and
    approx-KL are 0 and its ratio 1, across steps (the shards never drift). GRPO (no critic) on a 4-bit base
    (bitsandbytes' packed weights are sharded and gathered like any other; every rank loads it); GAE on
    the base only rank 0 reads (its critic adapter starts as a copy of the policy's, made on rank 0)."""
    result = torchrun(
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        f"data.train={tiny['prompts']}",
        f"output_dir={tmp_path / 'grpo'}",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.lr=0",
        "generation.max_new_tokens=6",
        "sample_every=0",
        *setting,
        FSDP,
        *EXACT,
        cwd=tmp_path,
        timeout=300,
    )
    assert_ok(result, read_by=read_by)
    metrics = read_metrics(tmp_path / "grpo")
    assert [m["step"] for m in metrics] == [1, 2]
    assert_never_moved(metrics)


# ------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("setting", "needles"),
    [
        ("generation.engine=vllm", ["generation.engine=vllm", "train.strategy=fsdp", "generation.engine=hf"]),
        (
            "model.load_in_8bit=true",
            ["model.load_in_8bit=true", "train.strategy=ddp", "model.load_in_4bit=true"],
        ),
    ],
    ids=["vllm", "8bit"],
)
def test_what_fsdp_cannot_shard_is_refused_before_loading(tiny, tmp_path, setting, needles):
    result = run_cli_in_process(
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        f"data.train={tiny['prompts']}",
        f"output_dir={tmp_path / 'run'}",
        FSDP,
        setting,
    )
    assert_usage_error(result, "train-ppo", *needles)
    assert not (tmp_path / "run").exists()
