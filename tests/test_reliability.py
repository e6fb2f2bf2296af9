"""Reliability (issue 7): what a user can get wrong, and what can go wrong underneath a run.

- A catalogue of bad inputs for all three stages: each is exit 2, one paragraph on stderr naming the cause
  (key, file, row, checkpoint, model), no traceback, and nothing written or overwritten.
- A full disk while a checkpoint, final/ or metrics.jsonl is written; NaN/inf in the loss, the gradients
  or the optimizer update: the run stops naming the step and the last good checkpoint, which resumes.
- kill -9 during a checkpoint write and at random moments of a run: resume=auto ends with exactly the
  weights of an uninterrupted run. SIGTERM stops train-ppo with a checkpoint and the resume command.
- Safe loading: checkpoint state only through torch.load(weights_only=True), weights as safetensors, and
  trust_remote_code off in every config.

The catalogue runs the real dispatcher (`ppo_cli.cli.main`, what the `ppo-cli` script calls) inside the test
process, so that forty cases do not pay forty interpreter start-ups; `test_catalogue_in_a_real_process`
runs a few of them as separate processes to show the same result there. Kill and signal tests need real
processes and are marked slow.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli_in_process
from ppo_helpers import assert_usage_error, cli_env, tiny_adapters
from safetensors import SafetensorError
from safetensors.torch import load_file

from ppo_cli import checkpoint as ckpt
from ppo_cli.errors import UserError

REPO = Path(__file__).resolve().parent.parent
REWARD_FN = "reward_fn=ppo_cli.tiny.task:positive_reward"

# ================================================================================================
# Helpers
# ================================================================================================


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """`ppo-cli ARGS` through the real dispatcher in this process: exit code, stdout, stderr."""
    return run_cli_in_process(*args)


def snapshot(*roots: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under the roots with its modification time and bytes (to prove nothing was touched)."""
    return {
        str(p): (p.stat().st_mtime_ns, p.read_bytes())
        for root in roots
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def first_lines(source: Path, n: int, out: Path) -> Path:
    out.write_text("".join(Path(source).read_text().splitlines(keepends=True)[:n]))
    return out


def fake_run(root: Path, stage: str) -> Path:
    """A run directory of `stage` as a finished run leaves it: config.yaml, metrics, a real checkpoint, final/."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  name_or_path: base\n")
    (root / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    ckpt.save_checkpoint(
        root, 1, {"w": torch.ones(2)}, {"optimizer": {}}, {"data": {"epoch": 0, "offset": 1}}
    )
    (root / "final").mkdir()
    (root / "final" / "ppo_cli.json").write_text(json.dumps({"stage": stage, "base_model": "base"}))
    return root


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ================================================================================================
# The catalogue of bad inputs
# ================================================================================================


@pytest.fixture(scope="module")
def world(tiny, tiny_factory, tmp_path_factory) -> dict[str, str]:
    """Models, stage products, runs and (bad) data files the catalogue points at, by placeholder name."""
    root = tmp_path_factory.mktemp("catalogue")
    data = root / "data"
    data.mkdir()
    products = tiny_adapters(tiny)  # an SFT and an RM adapter on the tiny base, as the stages write them
    long_text = "good happy river " * 20
    files = {
        "empty": data / "empty.jsonl",
        "blank": data / "blank.jsonl",
        "sft_not_json": write_jsonl(data / "sft_not_json.jsonl", [{"text": "a"}, '{"text": "b"']),
        "rm_not_json": write_jsonl(
            data / "rm_not_json.jsonl", [{"chosen": "a", "rejected": "b"}, "chosen=a"]
        ),
        "ppo_not_json": write_jsonl(data / "ppo_not_json.jsonl", [{"prompt": "a"}, "{'prompt': 'b'}"]),
        "ppo_not_object": write_jsonl(data / "ppo_not_object.jsonl", [{"prompt": "a"}, ["b"]]),
        "sft_no_completion": write_jsonl(
            data / "sft_no_completion.jsonl", [{"prompt": "a", "completion": " b"}, {"prompt": "c"}]
        ),
        "sft_no_field": write_jsonl(
            data / "sft_no_field.jsonl", [{"text": "a"}, {"question": "q", "answer": "a"}]
        ),
        "sft_text_not_string": write_jsonl(data / "sft_text_not_string.jsonl", [{"text": "a"}, {"text": 5}]),
        "sft_empty_texts": write_jsonl(data / "sft_empty_texts.jsonl", [{"text": ""}, {"text": ""}]),
        "sft_long": write_jsonl(data / "sft_long.jsonl", [{"text": long_text}] * 3),
        "rm_no_rejected": write_jsonl(
            data / "rm_no_rejected.jsonl",
            [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
        ),
        "rm_mixed": write_jsonl(
            data / "rm_mixed.jsonl",
            [
                {"chosen": "a", "rejected": "b"},
                {"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
            ],
        ),
        "rm_long": write_jsonl(
            data / "rm_long.jsonl", [{"chosen": long_text, "rejected": long_text + "sad"}] * 3
        ),
        "ppo_no_prompt": write_jsonl(data / "ppo_no_prompt.jsonl", [{"prompt": "a"}, {"query": "b"}]),
        "ppo_bad_messages": write_jsonl(
            data / "ppo_bad_messages.jsonl", [{"prompt": "a"}, {"messages": [{"role": "user", "content": 5}]}]
        ),
        "ppo_long": write_jsonl(data / "ppo_long.jsonl", [{"prompt": long_text}] * 8),
    }
    files["empty"].write_text("")
    files["blank"].write_text("\n   \n\n")
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    sft_run = fake_run(root / "sft_run", "sft")
    rm_run = fake_run(root / "rm_run", "rm")
    damaged = root / "damaged" / "checkpoints" / "step-000003"
    ckpt.save_checkpoint(damaged.parent.parent, 3, {"w": torch.ones(2)}, {}, {})
    target = damaged / ckpt.TRAINABLE
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")  # same size, different bytes
    return {
        "root": str(root),
        "products_root": str(Path(products["sft"]).parent),
        "model": str(tiny["model"]),
        "other_model": str(tiny_factory("gpt2")["model"]),
        "sft_data": str(tiny["sft"]),
        "prefs": str(tiny["prefs"]),
        "prompts": str(tiny["prompts"]),
        "sft_product": str(products["sft"]),
        "rm_product": str(products["rm"]),
        "sft_run": str(sft_run),
        "rm_run": str(rm_run),
        "rm_checkpoint": str(rm_run / "checkpoints" / "step-000001"),
        "damaged": str(damaged),
        "not_a_model": str(not_a_model),
        "missing": str(root / "missing"),
        **{name: str(path) for name, path in files.items()},
    }


M = "model.name_or_path={model}"
# (id, command, overrides with {placeholders} from `world`, what the one-paragraph message must name);
# output_dir is a fresh directory unless given, and must still not exist afterwards.
CATALOGUE = [
    # -- keys and values -------------------------------------------------------------------------------
    ("sft-unknown-key", "train-sft", [M, "data.train={sft_data}", "train.learning_rate=1e-4"],
     ["train.learning_rate", "ppo-cli train-sft --cfg job"]),
    ("rm-mistyped-key", "train-rm", [M, "data.train={prefs}", "center_reward_coef=0.1"],
     ["center_reward_coef"]),
    ("ppo-mistyped-key", "train-ppo", [M, "data.train={prompts}", REWARD_FN, "ppo.kl_coeff=0.1"],
     ["ppo.kl_coeff"]),
    ("ppo-wrong-type", "train-ppo", [M, "data.train={prompts}", REWARD_FN, "generation.max_new_tokens=many"],
     ["generation.max_new_tokens", "many"]),
    ("sft-unset-env-variable", "train-sft", [M, "data.train=${{oc.env:PPO_CLI_SURELY_UNSET}}"],
     ["data.train=${{oc.env:PPO_CLI_SURELY_UNSET}}", "not found"]),
    ("rm-negative-lr", "train-rm", [M, "data.train={prefs}", "train.lr=-1e-4"], ["train.lr=-0.0001"]),
    ("sft-unknown-device", "train-sft", [M, "data.train={sft_data}", "train.device=tpu"], ["train.device=tpu"]),
    # -- data files, every stage ---------------------------------------------------------------------------
    ("sft-missing-file", "train-sft", [M, "data.train={missing}.jsonl"], ["data.train", "missing.jsonl", "not found"]),
    ("ppo-missing-file", "train-ppo", [M, "data.train={missing}.jsonl", REWARD_FN], ["data.train", "not found"]),
    ("rm-missing-eval-file", "train-rm", [M, "data.train={prefs}", "data.eval={missing}.jsonl"],
     ["data.eval", "missing.jsonl", "not found"]),
    ("sft-empty-file", "train-sft", [M, "data.train={empty}"], ["data.train", "empty.jsonl", "empty"]),
    ("rm-empty-file", "train-rm", [M, "data.train={empty}"], ["empty.jsonl", "empty"]),
    ("ppo-blank-lines-file", "train-ppo", [M, "data.train={blank}", REWARD_FN], ["blank.jsonl", "empty"]),
    ("sft-not-json", "train-sft", [M, "data.train={sft_not_json}"], ["sft_not_json.jsonl", "line 2", "not valid JSON"]),
    ("rm-not-json", "train-rm", [M, "data.train={rm_not_json}"], ["rm_not_json.jsonl", "line 2", "not valid JSON"]),
    ("ppo-not-json", "train-ppo", [M, "data.train={ppo_not_json}", REWARD_FN],
     ["ppo_not_json.jsonl", "line 2", "not valid JSON"]),
    ("ppo-row-not-object", "train-ppo", [M, "data.train={ppo_not_object}", REWARD_FN],
     ["ppo_not_object.jsonl", "row 2", "not a JSON object"]),
    # -- rows that do not fit, every stage -------------------------------------------------------------------
    ("sft-row-missing-completion", "train-sft", [M, "data.train={sft_no_completion}"],
     ["sft_no_completion.jsonl, row 2", "'completion'"]),
    ("sft-row-no-known-field", "train-sft", [M, "data.train={sft_no_field}"],
     ["sft_no_field.jsonl, row 2", "missing field", "'messages'", "'text'", "have: question, answer"]),
    ("sft-row-field-not-string", "train-sft", [M, "data.train={sft_text_not_string}"],
     ["sft_text_not_string.jsonl, row 2", "'text' must be a string"]),
    ("rm-row-missing-rejected", "train-rm", [M, "data.train={rm_no_rejected}"],
     ["rm_no_rejected.jsonl, row 2", "'rejected'"]),
    ("rm-row-text-and-conversation", "train-rm", [M, "data.train={rm_mixed}"],
     ["rm_mixed.jsonl, row 2", "all be text or all be conversations"]),
    ("ppo-row-missing-prompt", "train-ppo", [M, "data.train={ppo_no_prompt}", REWARD_FN],
     ["ppo_no_prompt.jsonl, row 2", "'prompt'", "have: query"]),
    ("ppo-row-unrenderable-messages", "train-ppo", [M, "data.train={ppo_bad_messages}", REWARD_FN],
     ["ppo_bad_messages.jsonl, row 2", "chat template cannot render"]),
    # -- length limits that leave nothing --------------------------------------------------------------------
    ("sft-only-empty-texts", "train-sft", [M, "data.train={sft_empty_texts}", "data.eval_fraction=0"],
     ["no example is left", "no token to learn"]),
    ("sft-drop-leaves-nothing", "train-sft",
     [M, "data.train={sft_long}", "data.max_length=8", "data.overflow=drop", "data.eval_fraction=0"],
     ["no example is left", "3 of 3 examples dropped for being longer than data.max_length=8"]),
    ("rm-drop-leaves-nothing", "train-rm",
     [M, "data.train={rm_long}", "data.max_length=8", "data.overflow=drop", "data.eval_fraction=0"],
     ["no pair is left", "data.max_length=8"]),
    ("ppo-drop-leaves-no-prompt", "train-ppo",
     [M, "data.train={ppo_long}", REWARD_FN, "data.max_length=8", "data.overflow=drop", "train.batch_size=4"],
     ["0 usable prompts", "8 of 8 longer than data.max_length=8 were dropped"]),
    # -- checkpoints and models -----------------------------------------------------------------------------
    ("ppo-sft-checkpoint-of-rm", "train-ppo", ["sft_checkpoint={rm_product}", "data.train={prompts}", REWARD_FN],
     ["sft_checkpoint={rm_product}", "product of the rm stage, not of the sft stage"]),
    ("ppo-reward-checkpoint-of-sft", "train-ppo",
     ["sft_checkpoint={sft_product}", "reward_checkpoint={sft_product}", "data.train={prompts}"],
     ["reward_checkpoint={sft_product}", "product of the sft stage, not a reward model"]),
    ("ppo-other-base-model", "train-ppo",
     ["sft_checkpoint={sft_product}", "model.name_or_path={other_model}", "data.train={prompts}", REWARD_FN],
     ["sft_checkpoint={sft_product}", "trained on base model '{model}'", "model.name_or_path={other_model}"]),
    ("rm-other-base-model", "train-rm",
     ["sft_checkpoint={sft_product}", "model.name_or_path={other_model}", "data.train={prefs}"],
     ["trained on base model '{model}'", "model.name_or_path={other_model}"]),
    ("sft-model-missing", "train-sft", ["model.name_or_path={missing}", "data.train={sft_data}"],
     ["'{missing}'", "no such directory"]),
    ("rm-model-not-a-model", "train-rm", ["model.name_or_path={not_a_model}", "data.train={prefs}"],
     ["cannot load the tokenizer of '{not_a_model}'", "no Hugging Face model or tokenizer"]),
    ("ppo-model-missing", "train-ppo", ["model.name_or_path={missing}", "data.train={prompts}", REWARD_FN],
     ["'{missing}'", "no such directory"]),
    ("ppo-sft-checkpoint-missing", "train-ppo", ["sft_checkpoint={missing}", "data.train={prompts}", REWARD_FN],
     ["sft_checkpoint={missing}", "no such directory"]),
    ("ppo-reward-checkpoint-missing", "train-ppo", [M, "reward_checkpoint={missing}", "data.train={prompts}"],
     ["reward_checkpoint={missing}", "no such directory"]),
    # -- output_dir and resume -------------------------------------------------------------------------------
    ("rm-output-dir-of-sft-run", "train-rm", [M, "data.train={prefs}", "output_dir={sft_run}"],
     ["output_dir {sft_run}", "holds a sft run, not a rm run"]),
    ("ppo-output-dir-of-rm-run", "train-ppo", [M, "data.train={prompts}", REWARD_FN, "output_dir={rm_run}"],
     ["output_dir {rm_run}", "holds a rm run, not a ppo run"]),
    ("sft-resume-run-directory", "train-sft", [M, "data.train={sft_data}", "resume={sft_run}"],
     ["resume={sft_run} is not a checkpoint", "output_dir={sft_run} resume=auto"]),
    ("sft-resume-final", "train-sft", [M, "data.train={sft_data}", "resume={sft_run}/final"],
     ["resume={sft_run}/final is not a checkpoint", "final/"]),
    ("rm-resume-any-directory", "train-rm", [M, "data.train={prefs}", "resume={not_a_model}"],
     ["resume={not_a_model} is not a checkpoint", "checkpoints/step-NNNNNN"]),
    ("sft-resume-missing", "train-sft", [M, "data.train={sft_data}", "resume={missing}"],
     ["resume={missing}", "no such checkpoint directory"]),
    ("sft-resume-typo", "train-sft", [M, "data.train={sft_data}", "resume=atuo"],
     ["resume=atuo", "auto, never"]),
    ("sft-resume-checkpoint-of-rm", "train-sft", [M, "data.train={sft_data}", "resume={rm_checkpoint}"],
     ["resume={rm_checkpoint}", "checkpoint of a rm run, not of a sft run"]),
    ("ppo-resume-damaged-checkpoint", "train-ppo", [M, "data.train={prompts}", REWARD_FN, "resume={damaged}"],
     ["resume={damaged}", "not usable", "trainable.safetensors is corrupt"]),
]  # fmt: skip


def _case_args(world: dict[str, str], overrides: list[str], out: Path) -> list[str]:
    args = [o.format(**world) for o in overrides]
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={out}")
    return [*args, "logger.progress=false", "logger.plots=false"]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue_of_bad_inputs(world, tmp_path, case):
    _, command, overrides, needles = case
    out = tmp_path / "out"
    watched = (Path(world["root"]), Path(world["products_root"]))
    before = snapshot(*watched)
    result = run_in_process(command, *_case_args(world, overrides, out))
    assert_usage_error(result, command, *(n.format(**world) for n in needles))
    assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.rglob('*'))}"
    assert snapshot(*watched) == before, "an existing file was modified"


REAL_PROCESS_CASES = ["ppo-row-missing-prompt", "sft-resume-checkpoint-of-rm", "rm-other-base-model"]


def test_catalogue_in_a_real_process(world, tmp_path):
    """The same answers from `python -m ppo_cli` as separate processes (started together)."""
    cases = [c for c in CATALOGUE if c[0] in REAL_PROCESS_CASES]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ppo_cli", command, *_case_args(world, overrides, tmp_path / name)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        for name, command, overrides, _ in cases
    ]
    for (name, command, _, needles), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert_usage_error(result, command, *(n.format(**world) for n in needles))
        assert not (tmp_path / name).exists()


# ================================================================================================
# Runs that go wrong underneath: full disk, NaN/inf
# ================================================================================================


@pytest.fixture(scope="module")
def small_sft(tiny, tmp_path_factory) -> Path:
    return first_lines(tiny["sft"], 24, tmp_path_factory.mktemp("small") / "sft.jsonl")


def sft_args(tiny, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={data}",
        f"output_dir={out}",
        "data.eval_fraction=0",
        "train.batch_size=2",
        "train.log_every=1",
        "train.save_every=1",
        "logger.progress=false",
        "logger.plots=false",
        *extra,
    ]


# What a full disk raises from each writer (seen on a full tmpfs): safetensors and torch.save do not raise
# OSError.
FULL_DISK = {
    "safetensors": SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    ),
    "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    "os": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
}


REASON = {"safetensors": "No space left on device", "torch.save": "unexpected pos", "os": "No space left"}


@pytest.mark.parametrize(
    "target,error",
    [
        ("save_file", "safetensors"),
        ("torch.save", "torch.save"),
        ("trainer_state", "os"),
        ("rename", "os"),
    ],
)
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target, error):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"optimizer": {}}, {"data": {}})
    previous = tmp_path / "checkpoints" / "step-000001"
    files = snapshot(previous)
    exc = FULL_DISK[error]

    def fail(*args, **kwargs):
        raise exc

    if target == "save_file":
        monkeypatch.setattr(ckpt, "save_file", fail)
    elif target == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", fail)
    elif target == "trainer_state":
        real = Path.write_text
        monkeypatch.setattr(
            Path,
            "write_text",
            lambda self, *a, **k: fail() if self.name == ckpt.TRAINER_STATE else real(self, *a, **k),
        )
    else:
        monkeypatch.setattr(ckpt.os, "replace", fail)
    with pytest.raises(UserError) as info:
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {"optimizer": {}}, {"data": {}})
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "step-000002") in message, message
    assert REASON[error] in message and "previous checkpoints are intact" in message, message
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == previous and ckpt.verify_checkpoint(previous) is None
    assert snapshot(previous) == files
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]  # no .tmp left


def test_disk_full_during_a_run_stops_it_and_resume_continues(tiny, small_sft, tmp_path, monkeypatch):
    """train-sft: the second checkpoint write hits a full disk -> exit 2 naming it; the first checkpoint is
    intact and the latest; once there is space, resume=auto finishes the run from it."""
    out = tmp_path / "run"
    calls = {"n": 0}
    real_save_file = ckpt.save_file

    def save_file(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FULL_DISK["safetensors"]
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    result = run_in_process(*sft_args(tiny, small_sft, out, "train.max_steps=3"))
    assert_usage_error(
        result,
        "train-sft",
        f"could not write checkpoint {out}/checkpoints/step-000002",
        "No space left on device",
    )
    first = out / "checkpoints" / "step-000001"
    assert ckpt.latest_checkpoint(out) == first and ckpt.verify_checkpoint(first) is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert not (out / "final").exists()

    monkeypatch.undo()
    resumed = run_in_process(*sft_args(tiny, small_sft, out, "train.max_steps=3", "resume=auto"))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed at" in resumed.stdout and "step 1" in resumed.stdout
    assert metric_steps(out) == [1, 2, 3]
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("what", ["final", "metrics"])
def test_disk_full_writing_final_or_metrics(tiny, small_sft, tmp_path, monkeypatch, what):
    out = tmp_path / "run"
    full = FULL_DISK["os"]
    if what == "final":
        import ppo_cli.run

        def write_product_info(*args, **kwargs):
            raise OSError(full.errno, full.strerror)

        monkeypatch.setattr(ppo_cli.run, "write_product_info", write_product_info)
        needles = [f"could not write {out}/final", "No space left on device", "resume=auto"]
    else:
        import ppo_cli.logger

        def open_(path, *args, **kwargs):
            if Path(path).name == "metrics.jsonl":
                raise OSError(full.errno, full.strerror, str(path))
            return open(path, *args, **kwargs)

        monkeypatch.setattr(ppo_cli.logger, "open", open_, raising=False)
        needles = ["No space left on device while writing", f"{out}/metrics.jsonl", "resume=auto"]
    result = run_in_process(*sft_args(tiny, small_sft, out, "train.max_steps=2"))
    assert_usage_error(result, "train-sft", *needles)
    assert not list(out.glob(".*tmp*")) and not (out / "final").exists()
    monkeypatch.undo()
    if what == "final":  # the last checkpoint holds the finished weights: resume=auto writes final/ from it
        assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-000002"
        resumed = run_in_process(*sft_args(tiny, small_sft, out, "train.max_steps=2", "resume=auto"))
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert (out / "final" / "adapter_model.safetensors").is_file()


def _stopped_at(paragraph: str) -> int:
    import re

    match = re.search(r"at step (\d+);", paragraph)
    assert match, paragraph
    return int(match.group(1))


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(tiny, small_sft, tmp_path):
    """train.lr=1e38 after a 2-step warmup: the weights blow up and the loss becomes NaN a step later.
    The run stops there, names the step and the last good checkpoint, which is intact and resumable."""
    out = tmp_path / "run"
    args = sft_args(tiny, small_sft, out, "train.max_steps=4", "train.lr=1e38", "train.warmup_ratio=0.5")
    result = run_in_process(*args)
    paragraph = assert_usage_error(result, "train-sft", "became nan", "the last good checkpoint is")
    step = _stopped_at(paragraph)
    last = out / "checkpoints" / f"step-{step - 1:06d}"
    assert step >= 2 and str(last) in paragraph
    assert ckpt.latest_checkpoint(out) == last and ckpt.verify_checkpoint(last) is None
    assert metric_steps(out) == list(range(1, step))  # nothing logged for the failed step
    assert not (out / "final").exists()
    # Every weight in the last good checkpoint is finite.
    assert all(torch.isfinite(t).all() for t in ckpt.load_checkpoint(last).trainable.values())


def test_optimizer_overflow_is_reported_like_a_nan(tiny, small_sft, tmp_path):
    """train.lr=1e38 from the first step: AdamW's step size overflows float32 (a torch RuntimeError)."""
    out = tmp_path / "run"
    result = run_in_process(
        *sft_args(tiny, small_sft, out, "train.max_steps=2", "train.lr=1e38", "train.warmup_ratio=0")
    )
    assert_usage_error(
        result,
        "train-sft",
        "optimizer update overflowed",
        "at step 1",
        "no checkpoint was written yet",
        "train.lr",
    )
    assert ckpt.list_checkpoints(out) == [] and not (out / "final").exists()


def test_nan_gradient_names_the_step(tiny, small_sft, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (d sqrt(x)/dx at 0, times 0) at step 2: the gradient norm check."""
    import ppo_cli.sft.train

    real_loss = ppo_cli.sft.train.sft_loss
    calls = {"n": 0}

    def loss_with_nan_gradient(model, batch):
        loss, metrics, n_tokens = real_loss(model, batch)
        calls["n"] += 1
        if calls["n"] >= 2:
            trainable = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + torch.sqrt((trainable * 0).sum())  # adds 0 to the loss, NaN to the gradient
        return loss, metrics, n_tokens

    monkeypatch.setattr(ppo_cli.sft.train, "sft_loss", loss_with_nan_gradient)
    out = tmp_path / "run"
    result = run_in_process(*sft_args(tiny, small_sft, out, "train.max_steps=3"))
    assert_usage_error(
        result, "train-sft", "the gradient norm became nan at step 2", f"{out}/checkpoints/step-000001"
    )
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-000001"


# ================================================================================================
# Safe loading
# ================================================================================================


class _Payload:
    """Unpickling this object with full pickle would create `marker` (i.e. run code from the checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def quick_run(tiny, small_sft, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "run"
    result = run_in_process(*sft_args(tiny, small_sft, out, "train.max_steps=2"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def test_checkpoint_state_that_needs_pickle_is_refused(tiny, small_sft, quick_run, tmp_path):
    """A state.pt holding a pickled object (one that would run code when unpickled), with a manifest that
    matches it: resume= refuses it with one paragraph naming the checkpoint; the code never runs."""
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    target = run / "checkpoints" / "step-000002"
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _Payload(marker)}, target / ckpt.STATE)
    manifest = json.loads((target / ckpt.MANIFEST).read_text())
    manifest[ckpt.STATE] = {
        "bytes": (target / ckpt.STATE).stat().st_size,
        "sha256": ckpt._sha256(target / ckpt.STATE),
    }
    (target / ckpt.MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(run / "final")
    assert ckpt.verify_checkpoint(target) is None  # intact as far as checksums go

    result = run_in_process(
        *sft_args(tiny, small_sft, tmp_path / "new", "train.max_steps=3", f"resume={target}")
    )
    assert_usage_error(result, "train-sft", f"checkpoint {target}", "weights_only=True")
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert not (tmp_path / "new" / "final").exists()


def test_weights_are_safetensors_and_state_loads_weights_only(quick_run):
    for path in quick_run.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".bin", ".pkl", ".pickle", ".ckpt") and (
                path.suffix != ".pt" or path.name == ckpt.STATE
            ), path
    for _, path in ckpt.list_checkpoints(quick_run):
        assert load_file(path / ckpt.TRAINABLE)  # the weights: safetensors
        state = torch.load(path / ckpt.STATE, weights_only=True)  # the rest: tensors and plain containers
        assert {"optimizer", "scheduler", "rng_torch"} <= state.keys()
    assert load_file(quick_run / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("command", ["train-sft", "train-rm", "train-ppo", "generate", "export"])
def test_trust_remote_code_is_off_by_default(command):
    result = run_in_process(command, "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["trust_remote_code"] is False


def test_tokenizer_without_a_distinct_pad_token_gets_one(tiny, quick_run, tmp_path):
    """No pad token (the tiny tokenizer) or pad == EOS (the GPT-2 habit): a pad token distinct from EOS is
    used, and the run's final/ tokenizer carries it."""
    from transformers import AutoTokenizer

    from ppo_cli.models import load_tokenizer

    raw = AutoTokenizer.from_pretrained(str(tiny["model"]))
    assert raw.pad_token is None
    raw.pad_token = raw.eos_token
    raw.save_pretrained(tmp_path / "pad_is_eos")
    for source in (tiny["model"], tmp_path / "pad_is_eos"):
        tokenizer = load_tokenizer(str(source))
        assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    final = AutoTokenizer.from_pretrained(quick_run / "final")
    assert final.pad_token is not None and final.pad_token_id != final.eos_token_id


# ================================================================================================
# kill -9 during checkpoint writes and at random moments; SIGTERM in train-ppo
# ================================================================================================

# Runs `ppo-cli ARGS` after arranging for the process to SIGKILL itself in the middle of writing the
# checkpoint of step STEP: "torn" = half of trainable.safetensors on disk; "rename" = every file written,
# fsync'ed and the manifest too, killed at the rename that publishes the checkpoint. Patched from outside,
# so the product carries no test hook.
KILL_DURING_WRITE = r"""
import os, signal, sys
from pathlib import Path
from ppo_cli import checkpoint

point, step, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
tag = f".tmp-step-{step:06d}-"

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "torn":
    real_save_file = checkpoint.save_file
    def save_file(tensors, path, *a, **k):
        real_save_file(tensors, path, *a, **k)
        if tag in str(path):
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            die()
    checkpoint.save_file = save_file
else:
    real_replace = os.replace
    def replace(src, dst):
        if tag in str(src):
            die()
        return real_replace(src, dst)
    os.replace = replace

from ppo_cli.cli import main
main(args)
"""

KILL_STEPS = 6


def start(args: list[str], log: Path, code: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "ppo_cli", *args]
    with open(log, "w") as fh:  # a file, not a pipe nobody reads
        return subprocess.Popen(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=cli_env())


@pytest.fixture(scope="module")
def killed_runs(tiny, small_sft, tmp_path_factory):
    """An uninterrupted SFT run, and runs killed with SIGKILL during a checkpoint write (from inside) or at
    random moments (from outside), then resumed with resume=auto; and a run stopped with SIGTERM after a
    checkpoint, then continued with exactly the command it printed. All start together."""
    root = tmp_path_factory.mktemp("kills")
    rng_seed = int(os.environ.get("PPO_CLI_TEST_KILL_SEED", time.time_ns() % 100_000))  # to replay a failure
    rng = random.Random(rng_seed)

    def args(name: str, *extra: str) -> list[str]:
        return sft_args(tiny, small_sft, root / name, f"train.max_steps={KILL_STEPS}", *extra)

    reference = start(args("reference"), root / "reference.log")
    during = {
        "torn-step-2": start(["torn", "2", *args("torn-step-2")], root / "torn.log", KILL_DURING_WRITE),
        "rename-step-3": start(
            ["rename", "3", *args("rename-step-3")], root / "rename.log", KILL_DURING_WRITE
        ),
    }
    # From outside: (what to wait for, then a random extra delay in seconds)
    moments = {
        "after-start": (lambda d: (d / "config.yaml").exists(), rng.uniform(0, 0.5)),
        "at-step-1-write": (lambda d: (d / "metrics.jsonl").exists(), rng.uniform(0, 0.05)),
        "in-step-3": (lambda d: (d / "checkpoints" / "step-000002").exists(), rng.uniform(0, 0.1)),
    }
    outside = {name: start(args(name), root / f"{name}.log") for name in moments}
    terminated = start(args("sigterm"), root / "sigterm.log")
    pending = dict(moments)
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 400
    term_sent = False
    while pending or not term_sent:
        if not term_sent and (root / "sigterm" / "checkpoints" / "step-000002").exists():
            terminated.send_signal(signal.SIGTERM)  # mid-run: it has 6 steps
            term_sent = True
        elif not term_sent:
            assert terminated.poll() is None, (root / "sigterm.log").read_text()[-3000:]
        now = time.monotonic()
        for name, (ready, delay) in list(pending.items()):
            if name not in seen and ready(root / name):
                seen[name] = now
            if name in seen and now - seen[name] >= delay:
                outside[name].send_signal(signal.SIGKILL)
                del pending[name]
            elif outside[name].poll() is not None:
                pytest.fail(
                    f"{name} ended before it was killed:\n{(root / f'{name}.log').read_text()[-3000:]}"
                )
        assert time.monotonic() < deadline, f"timed out waiting for {list(pending)}"
        time.sleep(0.005)
    killed = {**during, **outside}
    state = {}
    for name, proc in killed.items():
        proc.wait(timeout=400)
        leftovers = (
            sorted(p.name for p in (root / name / "checkpoints").glob(".tmp-*"))
            if (root / name / "checkpoints").is_dir()
            else []
        )
        state[name] = {
            "returncode": proc.returncode,
            "latest": ckpt.latest_checkpoint(root / name) if (root / name).is_dir() else None,
            "all_checkpoints_intact": all(
                ckpt.verify_checkpoint(path) is None for _, path in ckpt.list_checkpoints(root / name)
            ),
            "leftovers": leftovers,
            "final": (root / name / "final").exists(),
        }
    resumed = {name: start(args(name, "resume=auto"), root / f"{name}-resumed.log") for name in killed}
    returncode = terminated.wait(timeout=400)
    output = " ".join((root / "sigterm.log").read_text().split())
    printed = re.search(r"Resume with: (ppo-cli \S+ \S+ resume=auto)", output)
    assert printed, output[-3000:]
    state["sigterm"] = {"returncode": returncode, "printed": printed.group(1)}
    resumed["sigterm"] = start(shlex.split(printed.group(1))[1:], root / "sigterm-resumed.log")
    assert reference.wait(timeout=400) == 0, (root / "reference.log").read_text()[-3000:]
    for name, proc in resumed.items():
        assert proc.wait(timeout=400) == 0, (root / f"{name}-resumed.log").read_text()[-3000:]
        state[name]["resumed_log"] = (root / f"{name}-resumed.log").read_text()
    return {"root": root, "state": state, "seed": rng_seed, "delays": {k: v[1] for k, v in moments.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("name,latest", [("torn-step-2", 1), ("rename-step-3", 2)])
def test_kill_during_a_checkpoint_write_resumes_exactly(killed_runs, name, latest):
    root, state = killed_runs["root"], killed_runs["state"][name]
    assert state["returncode"] == -signal.SIGKILL
    # The half-written checkpoint never became one: the previous complete one is the newest.
    assert state["latest"] == root / name / "checkpoints" / f"step-{latest:06d}"
    assert len(state["leftovers"]) == 1 and state["leftovers"][0].startswith(f".tmp-step-{latest + 1:06d}-")
    assert not state["final"]
    assert f"step {latest}" in state["resumed_log"]
    _assert_same_as_reference(root, name)
    assert not list((root / name / "checkpoints").glob(".tmp-*"))  # the dead writer's leftover was cleaned


@pytest.mark.slow
@pytest.mark.parametrize("name", ["after-start", "at-step-1-write", "in-step-3"])
def test_kill_at_a_random_moment_resumes_exactly(killed_runs, name):
    root, state = killed_runs["root"], killed_runs["state"][name]
    where = f"(seed {killed_runs['seed']}, delay {killed_runs['delays'][name]:.3f}s)"
    assert state["returncode"] == -signal.SIGKILL, where
    # Whatever the moment, every step-NNNNNN directory on disk is complete (a write in progress is a .tmp).
    assert state["all_checkpoints_intact"], where
    latest = state["latest"]
    if latest is not None:
        assert f"step {int(latest.name.split('-')[1])}" in state["resumed_log"], where
    _assert_same_as_reference(root, name)


@pytest.mark.slow
def test_sigterm_then_the_printed_resume_command_finishes_exactly(killed_runs):
    """The command a stopped run prints names only output_dir: the rest comes from the run's config.yaml."""
    root, state = killed_runs["root"], killed_runs["state"]["sigterm"]
    assert state["returncode"] == 128 + signal.SIGTERM
    assert state["printed"] == f"ppo-cli train-sft output_dir={root / 'sigterm'} resume=auto"
    assert "resumed at" in state["resumed_log"]
    _assert_same_as_reference(root, "sigterm")


def _assert_same_as_reference(root: Path, name: str) -> None:
    reference, resumed = adapter_tensors(root / "reference"), adapter_tensors(root / name)
    assert reference.keys() == resumed.keys() and reference
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), f"{name}: {key} differs from the uninterrupted run"
    assert metric_steps(root / name) == list(range(1, KILL_STEPS + 1))  # each step logged once


@pytest.fixture(scope="module")
def stopped_ppo(tiny, tmp_path_factory):
    """Two train-ppo runs stopped after their first step, one with Ctrl-C (SIGINT), one with SIGTERM, then
    resumed with resume=auto. Started together."""
    root = tmp_path_factory.mktemp("ppo-stop")
    adapters = tiny_adapters(tiny)

    def args(name: str, *extra: str) -> list[str]:
        return [
            "train-ppo",
            f"sft_checkpoint={adapters['sft']}",
            REWARD_FN,
            f"data.train={tiny['prompts']}",
            f"output_dir={root / name}",
            "train.max_steps=4",
            "train.batch_size=4",
            "train.save_every=0",  # no periodic checkpoint: the one found is the stop's
            "train.log_every=1",
            "generation.max_new_tokens=6",
            "ppo.epochs=1",
            "sample_every=0",
            "logger.progress=false",
            "logger.plots=false",
            *extra,
        ]

    signals = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
    procs = {name: start(args(name), root / f"{name}.log") for name in signals}
    pending = dict(procs)
    deadline = time.monotonic() + 400
    while pending:  # signal each run once its first step is logged (mid-run: it has 4)
        for name, proc in list(pending.items()):
            metrics = root / name / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().strip():
                proc.send_signal(signals[name])
                del pending[name]
            else:
                assert proc.poll() is None, (root / f"{name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"no PPO step finished in time: {list(pending)}"
        time.sleep(0.02)
    state = {}
    for name, proc in procs.items():
        proc.wait(timeout=400)
        state[name] = {
            "returncode": proc.returncode,
            "output": " ".join((root / f"{name}.log").read_text().split()),
            "checkpoints": [s for s, _ in ckpt.list_checkpoints(root / name)],
            "metric_steps": metric_steps(root / name),
            "final": (root / name / "final").exists(),
            "dir": root / name,
        }
    resumed = {name: start(args(name, "resume=auto"), root / f"{name}-resumed.log") for name in signals}
    for name, proc in resumed.items():
        state[name]["resumed_returncode"] = proc.wait(timeout=400)
        state[name]["resumed_output"] = (root / f"{name}-resumed.log").read_text()
    return state


@pytest.mark.slow
@pytest.mark.parametrize("name,signum", [("SIGINT", signal.SIGINT), ("SIGTERM", signal.SIGTERM)])
def test_signal_stops_train_ppo_with_a_checkpoint_and_the_resume_command(stopped_ppo, name, signum):
    """The first Ctrl-C / SIGTERM finishes the step, checkpoints it, prints the resume command and exits
    128 + the signal's number (130, 143); resume=auto then completes the run."""
    run = stopped_ppo[name]
    output = run["output"]
    assert run["returncode"] == 128 + signum, output[-3000:]
    assert f"{name} received" in output and "Traceback" not in output
    assert len(run["checkpoints"]) == 1 and 1 <= run["checkpoints"][0] < 4, run["checkpoints"]
    stopped = run["checkpoints"][0]
    assert run["metric_steps"][-1] == stopped  # the checkpoint is at the step the run stopped after
    assert f"stopped at step {stopped}" in output
    assert f"ppo-cli train-ppo output_dir={run['dir']} resume=auto" in output
    assert not run["final"]

    assert run["resumed_returncode"] == 0, run["resumed_output"][-3000:]
    assert "resumed at" in run["resumed_output"] and f"step {stopped}" in run["resumed_output"]
    assert metric_steps(run["dir"]) == [1, 2, 3, 4]
    assert (run["dir"] / "final" / "adapter_model.safetensors").is_file()
