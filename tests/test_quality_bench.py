"""bench/quality.py's plumbing, without training or judging anything: the seeds' aggregation and tables, the
jobs of several seeds and of the named grpo variants, and the long_answer task's gold (bench/tasks.py)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402  (bench/quality.py)
import quality_tasks  # noqa: E402  (bench/quality_tasks.py)
import tasks as task_builders  # noqa: E402  (bench/tasks.py)


def policy(gold_lift: float, kl: float, train_kl: float | None = 1.0, **extra) -> dict:
    """A judged policy's metrics, as bench/judge.py + judge_products write them."""
    return {
        "gold": 0.1 + gold_lift, "gold_lift": gold_lift, "kl": kl, "rm_win": {"ppo-cli": 0.5 + gold_lift},
        "rm_score": {"ppo-cli": 0.0}, "eos": 1.0, "distinct2": 0.5, "words": 6.0, "response_tokens": 14.0,
        "rm": "ppo-cli", "source": "gold", "train_kl": train_kl, **extra,
    }  # fmt: skip


def seed_result(lift: float, kl: float, seconds: float | None, with_grpo: bool = True) -> dict:
    """One seed's judged results of one task: SFT, the defaults' gold row and (maybe) a critic-free row."""
    policies = {"sft": policy(0.0, 0.0), "ppo-cli[defaults]/gold": policy(lift, kl)}
    critic_free = {
        "ppo-cli gae": {"policy": "ppo-cli[defaults]/gold", "rollout": "32 x 1", "job_seconds": seconds}
    }
    if with_grpo:
        policies["ppo-cli[grpo]/gold"] = policy(lift / 2, kl * 2, train_kl=None, main=False)
        critic_free["ppo-cli grpo"] = {
            "policy": "ppo-cli[grpo]/gold",
            "rollout": "8 x 4",
            "job_seconds": 60.0,
        }
    return {"rm_accuracy": {"ppo-cli": 0.6 + lift / 10}, "policies": policies, "critic_free": critic_free}


def test_aggregate_seeds_means_ranges_and_counts():
    per_seed = [
        seed_result(0.1, 4.0, 100.0),
        seed_result(0.3, 8.0, None),
        seed_result(0.2, 6.0, 200.0, False),
    ]
    out = quality.aggregate_seeds(per_seed)
    ppo = out["policies"]["ppo-cli[defaults]/gold"]
    assert ppo["gold_lift"] == pytest.approx(0.2)
    assert ppo["range"]["gold_lift"] == pytest.approx([0.1, 0.3])
    assert ppo["kl"] == pytest.approx(6.0) and ppo["range"]["kl"] == [4.0, 8.0]
    assert ppo["seeds"] == 3
    assert ppo["rm_win"]["ppo-cli"] == pytest.approx(0.7)  # nested dicts: key by key
    assert ppo["source"] == "gold" and ppo["rm"] == "ppo-cli"  # labels kept
    grpo = out["policies"]["ppo-cli[grpo]/gold"]  # in two seeds only
    assert grpo["seeds"] == 2 and grpo["gold_lift"] == pytest.approx(0.1)
    assert grpo["range"]["kl"] == [8.0, 16.0]
    assert grpo["train_kl"] is None and grpo["main"] is False
    assert out["rm_accuracy"]["ppo-cli"] == pytest.approx(0.62)
    assert out["rm_accuracy_range"]["ppo-cli"] == pytest.approx([0.61, 0.63])
    assert out["critic_free"]["ppo-cli gae"]["job_seconds"] == pytest.approx(150.0)  # None left out
    assert out["critic_free"]["ppo-cli grpo"]["rollout"] == "8 x 4"
    assert list(out["policies"]) == ["sft", "ppo-cli[defaults]/gold", "ppo-cli[grpo]/gold"]
    json.dumps(out)  # results.json


def test_tables_show_mean_range_and_seeds():
    results = {
        "sentiment": quality.aggregate_seeds([seed_result(0.1, 4.0, 100.0), seed_result(0.3, 8.0, 120.0)])
    }
    main = quality.markdown(results, ["a note"])
    row = next(line for line in main.splitlines() if "ppo-cli |" in line)
    assert "| +0.200 (+0.100..+0.300) | 6.0 (4.0..8.0) |" in row and row.endswith("| 2 |")
    assert "ppo-cli[grpo]" not in main  # a critic-free comparison's row only
    critic = quality.critic_free_markdown(results, "note")
    row = next(line for line in critic.splitlines() if "ppo-cli grpo" in line)
    assert "| 8 x 4 | +0.100 (+0.050..+0.150) | 12.0 (8.0..16.0) | 60 |" in row
    one = quality.markdown({"sentiment": quality.aggregate_seeds([seed_result(0.1, 4.0, 100.0)])}, [])
    assert "| +0.100 | 4.0 |" in one  # one seed: no range
    rm_row = quality.aggregate_seeds([seed_result(0.1, 4.0, 100.0), seed_result(0.3, 8.0, 120.0)])
    rm_row["policies"]["ppo-cli[defaults]/gold"]["source"] = "rm"  # trained on its RM: the accuracy shows
    line = next(x for x in quality.markdown({"s": rm_row}, []).splitlines() if "ppo-cli |" in x)
    assert "| ppo-cli RM | 0.620 (0.610..0.630) |" in line


def test_seeds_options_and_named_variants():
    assert quality.parse_args([]).seeds == [0]
    assert quality.parse_args(["--seed", "2"]).seeds == [2]  # the old option still works
    args = quality.parse_args(["--seeds", "0,1,2,1", "--estimators", "gae,grpo_dapo,gspo"])
    assert args.seeds == [0, 1, 2] and args.estimators == ["gae", "grpo_dapo", "gspo"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--estimators", "dapo"])
    assert quality.seed_suffix(0) == "" and quality.seed_suffix(2) == "-seed2"
    dapo, gspo = quality.ESTIMATOR_ROWS["grpo_dapo"], quality.ESTIMATOR_ROWS["gspo"]
    assert {"ppo.clip_range_high=0.28", "ppo.loss_aggregation=token_mean", "ppo.overlong_penalty=1.0"} <= set(
        dapo
    )
    assert {"ppo.ratio_level=sequence", "ppo.clip_range=3e-4", "ppo.clip_range_high=4e-4"} <= set(gspo)
    assert quality.variants_note(["grpo", "gspo"]).startswith(" gspo = ppo.advantage_estimator=grpo")
    assert all(e in quality.ESTIMATORS for e in quality.DEFAULT_ESTIMATORS.split(","))


def test_jobs_of_several_seeds(tmp_path):
    """Seed 0 keeps the runs' paths from before --seeds (its cache stays valid); other seeds run apart, with
    their own train.seed, names and dependencies."""
    info = task_builders.task_paths(tmp_path / "tasks", "long_answer")["info"]
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    args = quality.parse_args(
        ["--root", str(tmp_path / "tasks"), "--results", str(tmp_path / "q"), "--skip-trl", "--tasks", "long_answer",
         "--estimators", "gae,grpo,gspo", "--batch-size", "8", "--samples-per-prompt", "4"]
    )  # fmt: skip
    jobs0, products0 = quality.task_jobs("long_answer", args, {"defaults": []}, seed=0)
    jobs1, _ = quality.task_jobs("long_answer", args, {"defaults": []}, seed=1)
    runs = tmp_path / "q" / "runs" / "long_answer" / f"{quality.build_id(info)}-{quality.defaults_id()}"
    by_name = {j.name: j for j in jobs0 + jobs1}
    assert len(by_name) == len(jobs0) + len(jobs1) == 2 * 5  # RM, gold, RM-trained, grpo, gspo; gae = gold
    gspo0, gspo1 = by_name["long_answer/ppo-cli[gspo]/gold"], by_name["long_answer-seed1/ppo-cli[gspo]/gold"]
    assert f"output_dir={runs / 'ppo-cli-gspo-gold'}" in gspo0.cmd and "train.seed=0" in gspo0.cmd
    assert f"output_dir={runs.parent / (runs.name + '-seed1') / 'ppo-cli-gspo-gold'}" in gspo1.cmd
    assert "train.seed=1" in gspo1.cmd and "ppo.ratio_level=sequence" in gspo1.cmd
    assert "train.batch_size=2" in gspo1.cmd and "generation.samples_per_prompt=4" in gspo1.cmd
    assert by_name["long_answer-seed1/ppo-cli[defaults]/rm"].after == ["long_answer-seed1/rm-ppo-cli"]
    assert "reward_fn=bench.quality_tasks:gold_long_answer" in gspo0.cmd
    assert products0["critic_free"]["ppo-cli gae"]["policy"] == "ppo-cli[defaults]/gold"


def test_long_answer_gold_by_hand():
    gold = task_builders.long_answer_gold
    k = task_builders.LONG_ANSWER_WORDS
    assert k == 24
    assert gold(" calm river 7 bitter.") == pytest.approx(4 / 24)  # a number is a word
    assert gold(" " + " ".join(["calm"] * 24) + ".") == 1.0
    assert gold(" " + " ".join(["calm"] * 31) + ".\n") == 1.0  # capped at K; whitespace around is ignored
    assert gold(" calm river bitter!") == 0.0  # not ended by "."
    assert gold(" calm river bitt") == 0.0  # cut at the token limit
    assert gold(" calm river. bitter stone.") == 0.0  # two sentences
    assert gold(" calm river. bitter") == 0.0
    assert gold("") == 0.0 and gold(".") == 0.0
    reward = quality_tasks.gold_long_answer
    assert reward(["p", "q"], [" a b.", " a b"]) == [pytest.approx(2 / 24), 0.0]
    assert quality_tasks.reward_fn_spec("long_answer") == "bench.quality_tasks:gold_long_answer"
    assert task_builders.TASKS["long_answer"].gold == "long_answer"


@pytest.mark.parametrize("name", ["grpo_dapo", "gspo"])
def test_named_variants_compose_and_pass_train_ppo_checks(name):
    from hydra import compose, initialize_config_dir

    from ppo_cli.config import register_configs
    from ppo_cli.ppo.validate import validate_ppo

    register_configs()
    overrides = [*quality.ESTIMATOR_ROWS[name], "generation.samples_per_prompt=4", "train.batch_size=8"]
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose(
            "train_ppo", overrides=["model.name_or_path=x", "data.train=x", "output_dir=x", *overrides]
        )
    validate_ppo(cfg)  # raises UserError on a refused combination
    assert cfg.ppo.advantage_estimator.value == "grpo"
    if name == "gspo":
        assert (cfg.ppo.ratio_level.value, cfg.ppo.clip_range, cfg.ppo.clip_range_high) == (
            "sequence",
            3e-4,
            4e-4,
        )
    else:
        assert (cfg.ppo.clip_range, cfg.ppo.clip_range_high, cfg.ppo.overlong_penalty) == (0.2, 0.28, 1.0)
        assert cfg.ppo.loss_aggregation.value == "token_mean" and not cfg.ppo.mask_truncated


def test_task_builds_run_two_at_a_time(monkeypatch, tmp_path):
    """Three tasks to build on two cores: never more than `workers` build processes at once."""
    running, peak, built = [], [], []

    class FakeBuild:
        def __init__(self, cmd, env):
            running.append(cmd[-1])
            peak.append(len(running))

        def wait(self):
            if running:
                built.append(running.pop(0))
            return 0

    monkeypatch.setattr(quality.subprocess, "Popen", FakeBuild)
    monkeypatch.setattr(quality.quality_tasks, "is_built", lambda name, root: name == "sentiment")
    monkeypatch.setattr(quality.task_builders, "build_task", lambda spec, root: None)
    quality.build_tasks(["sentiment", "format_length", "long_answer", "letter_noisy"], tmp_path, 1, workers=2)
    assert max(peak) == 2 and sorted(built) == ["format_length", "letter_noisy", "long_answer"]


def test_reward_models_train_only_for_ppo_against_them(tmp_path):
    """--sources gold: neither side's RM is trained (TRL's took ~30 min a seed on two cores for nothing)."""
    paths = task_builders.task_paths(tmp_path / "tasks", "sentiment")
    for path, text in ((paths["info"], "{}"), (paths["train"], '{"chosen": "a", "rejected": "b"}\n')):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    common = ["--root", str(tmp_path / "tasks"), "--results", str(tmp_path / "q"), "--tasks", "sentiment",
              "--trl-rm-python", "py116", "--trl-ppo-python", "py112"]  # fmt: skip
    names = {
        sources: {j.name for j in quality.task_jobs("sentiment", quality.parse_args([*common, "--sources", sources]),
                                                    {"defaults": []})[0]}
        for sources in ("gold", "gold,rm")
    }  # fmt: skip
    assert names["gold"] == {"sentiment/ppo-cli[defaults]/gold", "sentiment/trl/gold"}
    assert names["gold,rm"] - names["gold"] == {
        "sentiment/rm-ppo-cli", "sentiment/rm-trl", "sentiment/ppo-cli[defaults]/rm", "sentiment/trl/rm"
    }  # fmt: skip
