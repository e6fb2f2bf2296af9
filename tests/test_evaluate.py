"""`ppo-cli evaluate`: exact numbers on a stub reward function, the default reference, and its error exits."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli_in_process
from omegaconf import OmegaConf
from ppo_helpers import tiny_adapters
from ppo_rewards import letters

from ppo_cli.app import precheck
from ppo_cli.evaluation import command as evaluate

STUB = "ppo_rewards:letters"  # a plain function of the text: equal completions score equal


@pytest.fixture(scope="module")
def products(tiny) -> dict[str, Path]:
    return tiny_adapters(tiny)


def run_evaluate(tiny, *overrides: str) -> tuple[dict, list[dict]]:
    cfg = precheck(
        "evaluate",
        [
            f"data.prompts={tiny['prompts_eval']}",
            "data.limit=6",
            "generation.max_new_tokens=8",
            "generation.samples_per_prompt=2",
            "batch_size=4",
            "device=cpu",
            *overrides,
        ],
        "evaluate",
    )
    OmegaConf.resolve(cfg)
    result = evaluate.run(cfg)
    assert json.loads(Path(cfg.output).read_text()) == result
    rows = [json.loads(line) for line in evaluate.samples_path(cfg.output).read_text().splitlines()]
    return result, rows


def _interval(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    half = 1.959963984540054 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return [mean - half, mean + half]


def test_policy_equal_to_reference_gives_exact_numbers(tiny, products, tmp_path):
    sft = products["sft"]
    result, rows = run_evaluate(
        tiny, f"policy={sft}", f"reference={sft}", f"reward_fn={STUB}", f"output={tmp_path / 'eval.json'}"
    )
    assert result["n"] == 6 and result["samples_per_prompt"] == 2 and len(rows) == 12
    assert (tmp_path / "eval.samples.jsonl").is_file()
    # The same model with the same seeds: identical samples, ties everywhere, no KL.
    assert all(r["policy"] == r["reference"] and r["kl"] == 0.0 for r in rows)
    assert result["win_rate"] == 0.5 and result["win_rate_ci95"] == [0.5, 0.5]
    assert result["kl"] == 0.0
    assert result["policy"]["reward_mean"] == result["reference"]["reward_mean"]
    # Every number from the samples by hand: the stub's rewards, the per-prompt interval, length, EOS, distinct-2.
    completions = [r["policy"]["completion"] for r in rows]
    rewards = letters([r["prompt"] for r in rows], completions)
    assert [r["policy"]["reward"] for r in rows] == pytest.approx(rewards, abs=1e-6)
    by_prompt = [(rewards[2 * i] + rewards[2 * i + 1]) / 2 for i in range(6)]
    pol = result["policy"]
    assert pol["reward_mean"] == pytest.approx(sum(rewards) / 12, abs=1e-6)
    assert pol["reward_ci95"] == pytest.approx(_interval(by_prompt), abs=1e-6)
    assert pol["length_mean"] == sum(r["policy"]["length"] for r in rows) / 12
    assert pol["eos_rate"] == sum(r["policy"]["eos"] for r in rows) / 12
    bigrams = [tuple(w[j : j + 2]) for w in (c.split() for c in completions) for j in range(len(w) - 1)]
    assert pol["distinct_2"] == len(set(bigrams)) / len(bigrams)
    assert rows[0]["sample"] == 0 and rows[1]["sample"] == 1 and rows[0]["prompt"] == rows[1]["prompt"]
    # The two samples of a prompt are drawn with different seeds.
    assert any(rows[2 * i]["policy"] != rows[2 * i + 1]["policy"] for i in range(6))


def test_json_keys_and_positive_kl_when_policy_differs(tiny, products, tmp_path):
    result, rows = run_evaluate(
        tiny,
        f"policy={products['sft']}",
        f"reference={tiny['model']}",
        f"reward_fn={STUB}",
        f"output={tmp_path / 'eval.json'}",
    )
    for key in ("n", "win_rate", "kl"):
        assert key in result
    for side in ("policy", "reference"):
        for key in ("reward_mean", "reward_ci95", "length_mean", "eos_rate", "distinct_2"):
            assert key in result[side]
    assert result["kl"] > 0
    assert result["kl"] == pytest.approx(sum(r["kl"] for r in rows) / len(rows), abs=1e-5)
    assert 0 <= result["win_rate"] <= 1
    wins = [
        1.0 if p > q else 0.5 if p == q else 0.0
        for p, q in ((r["policy"]["reward"], r["reference"]["reward"]) for r in rows)
    ]
    assert result["win_rate"] == pytest.approx(sum(wins) / len(wins))


def test_reference_defaults_to_the_sft_checkpoint_of_a_ppo_product(tiny, products, tmp_path):
    # A train-ppo product: its ppo_cli.json names the SFT checkpoint it was KL-penalised to.
    ppo = shutil.copytree(products["sft"], tmp_path / "ppo-final")
    info = json.loads((ppo / "ppo_cli.json").read_text())
    info.update(stage="ppo", sft_checkpoint=str(products["sft"]), reward_source=STUB)
    (ppo / "ppo_cli.json").write_text(json.dumps(info))
    result, _ = run_evaluate(tiny, f"policy={ppo}", f"reward_fn={STUB}", f"output={tmp_path / 'eval.json'}")
    assert result["reference"]["checkpoint"] == str(products["sft"])
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)  # the same weights, loaded twice
    assert result["win_rate"] == 0.5


def _error(*args: str) -> str:
    result = run_cli_in_process("evaluate", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    paragraph = result.stderr.strip()
    assert paragraph.startswith("ppo-cli evaluate: error: ") and "\n" not in paragraph, paragraph
    assert "Traceback" not in result.stdout + result.stderr
    return paragraph


def test_mistakes_exit_2_naming_the_key(tiny, products, tmp_path):
    prompts = f"data.prompts={tiny['prompts_eval']}"
    output = tmp_path / "eval.json"
    base = [f"policy={products['sft']}", prompts, f"output={output}"]
    assert "policy" in _error(prompts, f"reward_fn={STUB}", f"output={output}")
    assert "neither" in _error(*base)
    both = _error(*base, f"reward_fn={STUB}", f"reward_checkpoint={products['rm']}")
    assert "both" in both and "reward_fn" in both and "reward_checkpoint" in both
    # An SFT product names no reference to compare with.
    assert "reference=" in _error(*base, f"reward_fn={STUB}")
    output.write_text("{}")
    exists = _error(*base, f"reward_fn={STUB}", f"reference={products['sft']}")
    assert "output=" in exists and "overwrite=true" in exists
    assert not evaluate.samples_path(output).exists()


def test_train_ppo_evaluates_its_final_policy_on_held_out_prompts(tiny, products, tmp_path):
    """eval.prompts: once training ends, output_dir/eval.json compares final/ with the SFT policy it
    started from, on the run's reward source and sampling settings."""
    out = tmp_path / "ppo"
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(Path(tiny["prompts"]).read_text().splitlines(keepends=True)[:3]))
    args = (
        "train-ppo", f"sft_checkpoint={products['sft']}", f"data.train={tiny['prompts']}",
        "reward_fn=ppo_rewards:letters", "train.device=cpu", "train.batch_size=2", "train.max_steps=1",
        "generation.max_new_tokens=6", "logger.progress=false", "logger.plots=false", "sample_every=0", f"output_dir={out}",
        f"eval.prompts={prompts}", "eval.samples_per_prompt=2",
    )  # fmt: skip
    result = run_cli_in_process(*args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 3 and report["samples_per_prompt"] == 2
    assert report["policy"]["checkpoint"] == str(out / "final")
    assert report["reference"]["checkpoint"] == str(products["sft"])
    assert report["reward_source"] == "ppo_rewards:letters"
    assert len((out / "eval.samples.jsonl").read_text().splitlines()) == 6

    # Stopped during the evaluation (final/ saved, eval.json not yet): the same command evaluates, trains nothing.
    (out / "eval.json").unlink()
    final_mtime = (out / "final" / "adapter_model.safetensors").stat().st_mtime_ns
    again = run_cli_in_process(*args)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "is missing; evaluating the final policy now" in again.stdout
    assert json.loads((out / "eval.json").read_text()) == report
    assert (out / "final" / "adapter_model.safetensors").stat().st_mtime_ns == final_mtime


def test_train_ppo_refuses_missing_eval_prompts_before_training(tiny, products, tmp_path):
    out = tmp_path / "ppo"
    result = run_cli_in_process(
        "train-ppo", f"sft_checkpoint={products['sft']}", f"data.train={tiny['prompts']}",
        "reward_fn=ppo_rewards:letters", f"output_dir={out}", f"eval.prompts={tmp_path / 'nope.jsonl'}",
    )  # fmt: skip
    assert result.returncode == 2
    assert "eval.prompts=" in result.stdout + result.stderr and not out.exists()


def test_greedy_evaluation_reports_no_kl(tiny, products, tmp_path, capsys):
    """At temperature 0 the samples are no draws from the policy: kl is null (JSON, rows), and said so."""
    result, rows = run_evaluate(
        tiny,
        f"policy={products['sft']}",
        f"reference={tiny['model']}",
        f"reward_fn={STUB}",
        "generation.temperature=0",
        f"output={tmp_path / 'eval.json'}",
    )
    assert result["kl"] is None and result["kl_ci95"] is None
    assert all(r["kl"] is None for r in rows)
    assert "KL: not estimated" in capsys.readouterr().out


def test_kl_is_scored_as_train_ppo_scores_it_without_the_pad_token(tiny, products):
    """evaluate samples without the pad token and scores under the distribution without it, as train-ppo
    does: sequence_logprobs(suppress_pad=True) is the sum of log softmax((logits with pad at -inf) / T)."""
    from omegaconf import OmegaConf

    from ppo_cli import rlhf
    from ppo_cli.command_config import EvaluateConfig
    from ppo_cli.generate import load_policy, sample, sequence_logprobs

    cfg = OmegaConf.structured(EvaluateConfig)
    policy = load_policy(str(products["sft"]), cfg.model, torch.device("cpu"))
    pad = policy.tokenizer.pad_token_id
    prompt = policy.tokenizer("the", add_special_tokens=False)["input_ids"]
    drawn = sample(policy, [prompt] * 4, 6, 1.3, batch_size=4, seed=0, suppress_pad=True)
    assert all(pad not in r for r in drawn.response_ids)
    got = sequence_logprobs(policy, [prompt], drawn.response_ids[:1], 1.3, suppress_pad=True)
    ids = torch.tensor([prompt + drawn.response_ids[0]])
    with torch.no_grad():
        logits = policy.model(input_ids=ids).logits[:, len(prompt) - 1 : -1].float()
    logits[..., pad] = float("-inf")
    want = rlhf.logprobs_from_logits(logits, ids[:, len(prompt) :], 1.3).sum()
    assert float(got[0]) == pytest.approx(float(want), abs=1e-5)
    unsuppressed = sequence_logprobs(policy, [prompt], drawn.response_ids[:1], 1.3)
    assert float(unsuppressed[0]) < float(got[0])  # the pad's share of the mass is gone
