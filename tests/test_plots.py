"""plots/ in every run directory, `ppo-cli plot` overlaying runs, and TensorBoard event files
(ppo_cli/plots.py, ppo_cli/logger.py): tiny SFT and PPO runs of 2-3 steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli_in_process

from ppo_cli.logger import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SFT_PNGS = {"loss.png", "lr.png", "overview.png"}
PPO_PNGS = {
    "scores.png",
    "kl.png",
    "kl_coef.png",
    "entropy.png",
    "approxkl.png",
    "clipfrac.png",
    "value_loss.png",
    "response_length.png",
    "eos.png",
    "overview.png",
}


def png_info(path: Path) -> dict[str, str]:
    """Check `path` is a PNG that matplotlib reads back; return its text fields (Title, Metrics, Runs)."""
    import matplotlib.image
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300, pixels.shape
    assert pixels.std() > 0.01  # something is drawn
    with Image.open(path) as image:
        return dict(image.text)


def train(*args: str):
    """A short run in this process (the imports are paid already: the fixture's three runs share them)."""
    result = run_cli_in_process(*args, "logger.progress=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    sft = root / "sft"
    sft_out = train(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['sft']}",
        f"data.eval={tiny['sft_eval']}",
        f"output_dir={sft}",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.log_every=1",
        "train.eval_every=2",
        "train.save_every=0",
    )
    ppo_args = [
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['prompts']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.save_every=0",
        "generation.max_new_tokens=4",
        "sample_every=2",
    ]
    ppo = root / "ppo-seed1"
    ppo_out = train(*ppo_args, f"output_dir={ppo}", "logger.tensorboard.enabled=true")
    ppo2 = root / "ppo-seed2"
    ppo2_out = train(
        *ppo_args, f"output_dir={ppo2}", "train.seed=2", "train.max_steps=2", "logger.plots=false"
    )
    return {
        "sft": sft,
        "sft_stdout": sft_out.stdout,
        "ppo": ppo,
        "ppo_stdout": ppo_out.stdout,
        "ppo2": ppo2,
        "ppo2_stdout": ppo2_out.stdout,
    }


def test_sft_run_writes_its_plots(runs):
    plots = runs["sft"] / "plots"
    assert {p.name for p in plots.iterdir()} == SFT_PNGS
    loss = png_info(plots / "loss.png")
    assert loss["Metrics"] == "loss, eval/loss" and "SFT loss" in loss["Title"]
    assert loss["Runs"] == "sft"
    assert png_info(plots / "lr.png")["Metrics"] == "lr"
    overview = png_info(plots / "overview.png")
    assert overview["Title"].count(" | ") == 1  # two panels
    assert f"plots: {plots} (3 PNGs)" in runs["sft_stdout"]
    # final/ stays the console's last line (it is what a user copies).
    assert runs["sft_stdout"].strip().splitlines()[-1] == f"final: {runs['sft'] / 'final'}"


def test_ppo_run_writes_its_plots(runs):
    plots = runs["ppo"] / "plots"
    assert {p.name for p in plots.iterdir()} == PPO_PNGS
    expected = {
        "scores.png": "objective/scores",
        "kl.png": "objective/kl",
        "kl_coef.png": "objective/kl_coef",
        "entropy.png": "objective/entropy",
        "approxkl.png": "policy/approxkl_avg",
        "clipfrac.png": "policy/clipfrac_avg, val/clipfrac_avg",
        "value_loss.png": "loss/value_avg",
        "response_length.png": "val/mean_response_length",
        "eos.png": "val/num_eos_tokens",
    }
    for name, metrics in expected.items():
        assert png_info(plots / name)["Metrics"] == metrics, name
    overview = png_info(plots / "overview.png")
    assert overview["Title"].count(" | ") == len(expected) - 1


def test_logger_plots_false_draws_nothing_and_plot_draws_it_later(runs):
    """ppo-seed2 ran with logger.plots=false: no plots/, no "plots:" line; test_plot_command_overlays_runs
    draws its curves afterwards."""
    assert (runs["ppo2"] / "metrics.jsonl").is_file() and not (runs["ppo2"] / "plots").exists()
    assert "plots: " not in runs["ppo2_stdout"] and "final: " in runs["ppo2_stdout"]


def test_panels_of_missing_metrics_are_skipped(tmp_path, runs):
    """A critic-free run logs no loss/value_avg or val/clipfrac_avg: no value-loss picture, and the
    clip-fraction panel draws the policy's only."""
    from ppo_cli.plots import write_run_plots

    rows = [
        {k: v for k, v in row.items() if k not in ("loss/value_avg", "val/clipfrac_avg")}
        for row in read_metrics(runs["ppo"])
    ]
    written = write_run_plots(tmp_path, "ppo", rows)
    assert {p.name for p in written} == PPO_PNGS - {"value_loss.png"}
    assert png_info(tmp_path / "plots" / "clipfrac.png")["Metrics"] == "policy/clipfrac_avg"
    assert "loss/value_avg" not in png_info(tmp_path / "plots" / "overview.png")["Metrics"]


def test_a_plotting_failure_only_warns(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    import ppo_cli.plots
    from ppo_cli.logger import RunLogger

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(ppo_cli.plots, "write_run_plots", broken)
    cfg = OmegaConf.create({"logger": {"progress": False, "plots": True, "wandb": {"enabled": False}}})
    logger = RunLogger(tmp_path, cfg, "sft")
    logger.log(1, {"loss": 1.0})
    logger.flush()
    logger.finish({"steps": 1})
    out = capsys.readouterr().out
    assert "could not draw the plots" in out and "RuntimeError: no fonts" in out


def test_ema_is_debiased():
    from ppo_cli.plots import auto_smoothing, ema

    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert auto_smoothing(10) == 0.0 and 0 < auto_smoothing(1000) < 1


def test_plot_command_overlays_runs(runs, tmp_path):
    out = tmp_path / "overlay"
    result = run_cli_in_process("plot", str(runs["ppo"]), str(runs["ppo2"]), f"output={out}", "smoothing=0.5")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == PPO_PNGS
    scores = png_info(out / "scores.png")
    assert scores["Runs"] == "ppo-seed1, ppo-seed2"
    assert scores["Metrics"] == "objective/scores"
    assert str(out) in result.stdout


def test_plot_command_errors(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    no_metrics, mixed, no_output, bad_key, bad_smoothing = (
        run_cli_in_process(*args)
        for args in (
            ["plot", str(empty), f"output={out}"],
            ["plot", str(runs["sft"]), str(runs["ppo"]), f"output={out}"],
            ["plot", str(runs["sft"])],
            ["plot", str(runs["sft"]), f"output={out}", "smooth=0.3"],
            ["plot", str(runs["sft"]), f"output={out}", "smoothing=1.5"],
        )
    )
    for result in (no_metrics, mixed, no_output, bad_key, bad_smoothing):
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one paragraph
    assert f"{empty} has no metrics.jsonl" in no_metrics.stderr
    assert "different stages" in mixed.stderr
    assert f"{runs['sft']} (train-sft)" in mixed.stderr and f"{runs['ppo']} (train-ppo)" in mixed.stderr
    assert "missing required value for output" in no_output.stderr
    assert "smooth" in bad_key.stderr
    assert "smoothing=1.5 must be" in bad_smoothing.stderr
    assert not out.exists()
    help_ = run_cli_in_process("plot", "--help")
    assert help_.returncode == 0 and "usage: ppo-cli plot RUN_DIR" in help_.stdout


def test_tensorboard_events_hold_the_metrics_and_samples(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = runs["ppo"] / "tensorboard"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(events))
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = acc.Tags()
    rows = read_metrics(runs["ppo"])
    logged = {k for row in rows for k, v in row.items() if k != "step" and isinstance(v, int | float)}
    assert set(tags["scalars"]) == logged
    scores = acc.Scalars("objective/scores")
    assert [e.step for e in scores] == [row["step"] for row in rows if "objective/scores" in row]
    assert [e.value for e in scores] == pytest.approx([row["objective/scores"] for row in rows])
    # The samples table (the first step, then every sample_every=2) as Markdown text.
    assert "samples/text_summary" in tags["tensors"]
    texts = acc.Tensors("samples/text_summary")
    assert [e.step for e in texts] == [1, 2]
    assert texts[0].tensor_proto.string_val[0].decode().startswith("| prompt | completion | score |")
    # Off by default: the other run wrote none.
    assert not (runs["ppo2"] / "tensorboard").exists()
