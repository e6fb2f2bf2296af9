"""The reward model's health report: a 95% interval on held-out accuracy and plain verdicts."""

from __future__ import annotations

import math

import pytest

from ppo_cli.reward.health import RMHealth, wilson_interval


def test_wilson_interval_hand_computed():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half = 1.96*sqrt(0.0025 + 0.000096)/1.0384 = 0.0961
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    # 0 of 10 still gives a positive upper bound, and bounds stay in [0, 1]
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_ten_pairs_are_noise_even_at_seventy_percent():
    health = RMHealth(accuracy=0.7, pairs=10)
    assert health.at_chance
    (warning,) = health.warnings()
    assert "too few pairs" in warning and "data.eval" in warning


def test_a_good_rm_on_many_pairs_is_healthy():
    health = RMHealth(accuracy=0.68, pairs=400, late_train_loss=0.55)
    assert not health.at_chance and health.warnings() == []
    assert "0.680" in health.describe() and "400 pairs" in health.describe()


def test_a_chance_rm_on_many_pairs_warns_about_ppo():
    health = RMHealth(accuracy=0.53, pairs=400)
    assert health.at_chance and "optimise noise" in health.warnings()[0]


def test_a_loss_stuck_at_log2_is_named():
    health = RMHealth(accuracy=None, pairs=0, late_train_loss=math.log(2) + 0.002)
    assert health.at_chance and any("log 2" in w for w in health.warnings())


def test_info_round_trip():
    health = RMHealth(accuracy=0.64, pairs=200, late_train_loss=0.6)
    info = health.as_info()
    assert RMHealth.from_info(info) == health
    assert info["eval_accuracy_ci95"][0] < 0.64 < info["eval_accuracy_ci95"][1]
    assert RMHealth.from_info({"stage": "rm"}) is None


def test_train_ppo_reports_the_rm_it_loads(tmp_path):
    import json

    from omegaconf import OmegaConf

    from ppo_cli.ppo.train import report_rm_health

    rm = tmp_path / "rm-final"
    rm.mkdir()
    info = {"stage": "rm", "base_model": "x", **RMHealth(accuracy=0.52, pairs=300).as_info()}
    (rm / "ppo_cli.json").write_text(json.dumps(info))
    said: list[str] = []

    class Logger:
        def print(self, message):
            said.append(message)

        def warn(self, message):
            said.append("warning: " + message)

    report_rm_health(OmegaConf.create({"reward_checkpoint": str(rm)}), Logger())
    assert "held-out accuracy 0.520" in said[0] and "300 pairs" in said[0]
    assert said[1].startswith("warning:") and "chance" in said[1]
