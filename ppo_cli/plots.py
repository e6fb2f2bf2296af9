"""Pictures of a run's curves: `plots/*.png` in every run directory, and `ppo-cli plot` to overlay runs.

Every training stage draws its curves from its metrics.jsonl when it finishes or stops gracefully
(RunLogger.flush, rank 0 only), one PNG per panel plus `overview.png` with every panel on one page. Each
curve is drawn raw (thin, faint) and smoothed with a debiased exponential moving average (thick), against
the optimizer step; a PPO panel has a second x axis on top with the episodes (responses sampled) when the
run logs `episode`.

`ppo-cli plot RUN_DIR [RUN_DIR ...] output=DIR [smoothing=W]` draws the same panels with several runs of one
stage on each (a sweep, seeds), one colour per run, labelled with the run directory's name.

matplotlib is imported only inside the drawing functions, with the Agg backend (no display needed): the
CLI, and ppo_cli/logger.py which imports this module, start without paying for it. This module reads
metrics.jsonl through ppo_cli/metrics_file.py and imports nothing of the logger. Each PNG carries its panel in its PNG text fields, for tools and tests:
`Title` (the panel's title; overview.png: every panel's, joined by " | "), `Metrics` (the metric names of
its panels, comma-separated) and `Runs` (the runs' labels).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppo_cli.metrics_file import METRICS_FILE, read_metrics

PLOTS_DIR = "plots"
OVERVIEW = "overview.png"
COMMAND = "plot"


@dataclass(frozen=True)
class Panel:
    """One picture: the metrics it draws (same units), its file name, title and y-axis label. `smooth`:
    False for values a schedule sets (lr, β), which a moving average would only show late."""

    name: str
    title: str
    ylabel: str
    metrics: tuple[str, ...]
    smooth: bool = True


PANELS: dict[str, list[Panel]] = {
    "sft": [
        Panel("loss", "SFT loss: train and held-out", "cross-entropy (nats / token)", ("loss", "eval/loss")),
        Panel("lr", "Learning rate", "learning rate", ("lr",), smooth=False),
    ],
    "rm": [
        Panel("loss", "Reward-model loss: train and held-out", "pairwise loss (nats)", ("loss", "eval/loss")),
        Panel(
            "accuracy",
            "Reward-model accuracy: chosen scored above rejected",
            "fraction of pairs",
            ("accuracy", "eval/accuracy"),
        ),
        Panel(
            "margin",
            "Score margin: chosen − rejected",
            "mean score difference",
            ("rewards/margin", "eval/rewards/margin"),
        ),
        Panel("lr", "Learning rate", "learning rate", ("lr",), smooth=False),
    ],
    "ppo": [
        Panel("scores", "Reward of the policy's samples", "mean raw score", ("objective/scores",)),
        Panel("kl", "KL(policy ‖ reference)", "nats per response (k1 sum)", ("objective/kl",)),
        Panel("kl_coef", "KL coefficient β", "β", ("objective/kl_coef",), smooth=False),
        Panel("entropy", "Policy entropy", "nats per response", ("objective/entropy",)),
        Panel("approxkl", "Approximate KL of each PPO update", "nats per token", ("policy/approxkl_avg",)),
        Panel(
            "clipfrac",
            "Clipped fraction: policy ratio and value",
            "fraction of tokens",
            ("policy/clipfrac_avg", "val/clipfrac_avg"),
        ),
        Panel("value_loss", "Value loss (critic)", "loss", ("loss/value_avg",)),
        Panel("response_length", "Response length", "tokens per response", ("val/mean_response_length",)),
        Panel(
            "eos",
            "Responses that end (EOS tokens per batch)",
            "EOS tokens in the batch",
            ("val/num_eos_tokens",),
        ),
    ],
}

STAGE_NAMES = {"sft": "train-sft", "rm": "train-rm", "ppo": "train-ppo"}
X_LABEL = {
    "sft": "step (optimizer steps)",
    "rm": "step (optimizer steps)",
    "ppo": "step (rollout batch + PPO update)",
}
LINE_STYLES = ("-", "--", ":", "-.")


# ------------------------------------------------------------------------------------------- data


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over metric rows, finite numbers only."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(float(row["step"]))
            values.append(float(value))
    return steps, values


def auto_smoothing(points: int) -> float:
    """An EMA weight that averages over about a twentieth of the points (none below 20 points)."""
    window = points / 20
    return 0.0 if window <= 1 else min(1 - 1 / window, 0.99)


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): the first values are not pulled
    towards 0."""
    out, last, norm = [], 0.0, 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def episode_axis(rows: list[dict[str, Any]]) -> tuple[list[float], list[float]] | None:
    """(steps, episodes) when the run logs `episode` increasing with the step, else None."""
    steps, episodes = series(rows, "episode")
    pairs = sorted(dict(zip(steps, episodes)).items())
    if len(pairs) < 2 or any(b[1] <= a[1] for a, b in zip(pairs, pairs[1:])):
        return None
    return [p[0] for p in pairs], [p[1] for p in pairs]


def shared_episode_axis(runs_rows: list[list[dict[str, Any]]]) -> tuple[list[float], list[float]] | None:
    """The longest run's (steps, episodes) when every run logs episodes that agree with it at their steps
    (same episodes per step); else None."""
    axes = [episode_axis(rows) for rows in runs_rows]
    if any(a is None for a in axes):
        return None
    longest = max(axes, key=lambda a: a[0][-1])
    lookup = dict(zip(*longest))
    for steps, episodes in axes:
        if any(lookup.get(s, e) != e for s, e in zip(steps, episodes)):
            return None
    return longest


# ---------------------------------------------------------------------------------------- drawing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _draw_panel(
    ax, panel: Panel, runs: list[tuple[str, list[dict[str, Any]]]], stage: str, weight
) -> tuple[str, ...]:
    """Draw `panel` for each (label, rows) of `runs` on `ax`; returns the metrics drawn (none when no run
    logged any of the panel's metrics: a critic-free run has no value loss)."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    colours = [f"C{i}" for i in range(10)]
    present = [m for m in panel.metrics if any(series(rows, m)[0] for _, rows in runs)]
    for r, (label, rows) in enumerate(runs):
        for m, metric in enumerate(present):
            steps, values = series(rows, metric)
            if not steps:
                continue
            colour = colours[(r if len(runs) > 1 else m) % len(colours)]
            style = LINE_STYLES[m % len(LINE_STYLES)]
            name = " ".join(part for part in (label if len(runs) > 1 else "", metric) if part)
            if len(present) == 1 and len(runs) > 1:
                name = label
            w = auto_smoothing(len(values)) if weight is None else weight
            # An eval/ point is already an average over the held-out set.
            if not panel.smooth or metric.startswith("eval/"):
                w = 0.0
            marker = "o" if len(values) <= 30 else None
            if w > 0:
                ax.plot(
                    steps, values, style, color=colour, linewidth=0.8, alpha=0.3, marker=marker, markersize=3
                )
                ax.plot(steps, ema(values, w), style, color=colour, linewidth=2.2, label=name)
            else:
                ax.plot(
                    steps, values, style, color=colour, linewidth=1.8, marker=marker, markersize=4, label=name
                )
    if not present:
        return ()
    _readable_ticks(ax)
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel(X_LABEL.get(stage, "step"))
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    # An episode axis on top, when every run maps steps to episodes the same way (one batch size).
    mapping = shared_episode_axis([rows for _, rows in runs])
    if mapping is not None:
        xs, eps = np.array(mapping[0]), np.array(mapping[1])
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: _extend_interp(s, xs, eps), lambda e: _extend_interp(e, eps, xs))
        )
        top.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole responses, as the steps
        top.set_xlabel("episode (responses sampled)", fontsize=8)
        top.tick_params(labelsize=8)
    return tuple(present)


def _readable_ticks(ax) -> None:
    """Whole values on the y ticks: matplotlib's default would show "+0.39" or "1e-7" once in a corner,
    where it collides with the episode axis and is easy to miss. Whole steps on the x axis: a run of a few
    steps would otherwise get ticks at 1.5, 2.5, steps that do not exist."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    low, high = ax.get_ylim()
    top = max(abs(low), abs(high))
    if top and (top < 1e-3 or top >= 1e5):
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2e}" if v else "0"))
    else:
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))


def _extend_interp(x, xp, fp):
    """np.interp, continued linearly past both ends (matplotlib asks an axis for values outside the data)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    out = np.interp(x, xp, fp)
    low, high = x < xp[0], x > xp[-1]
    out[low] = fp[0] + (x[low] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    out[high] = fp[-1] + (x[high] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return out


def _smoothing_note(weight: float | None) -> str:
    if weight is None:
        return "thin: raw values; thick: exponential moving average (weight set by the number of points)"
    return f"thin: raw values; thick: exponential moving average (weight {weight:g})"


def draw(
    stage: str,
    runs: list[tuple[str, list[dict[str, Any]]]],
    out_dir: Path,
    heading: str,
    weight: float | None = None,
) -> list[Path]:
    """Write out_dir/<panel>.png for each of the stage's panels that some run logged, and out_dir/overview.png
    with all of them; returns the paths written. `runs`: (label, metric rows) per run."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    drawn: list[tuple[Panel, tuple[str, ...]]] = []
    for panel in PANELS.get(stage, []):
        fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
        try:
            metrics = _draw_panel(ax, panel, runs, stage, weight)
            if not metrics:
                continue
            fig.suptitle(f"{heading}\n{_smoothing_note(weight)}", fontsize=8, color="0.35")
            path = out_dir / f"{panel.name}.png"
            fig.savefig(path, dpi=110, metadata=_metadata(panel.title, metrics, runs))
            written.append(path)
            drawn.append((panel, metrics))
        finally:
            plt.close(fig)
    if drawn:
        cols = 2 if len(drawn) > 1 else 1
        rows_n = math.ceil(len(drawn) / cols)
        fig, axes = plt.subplots(
            rows_n, cols, figsize=(7 * cols, 3.8 * rows_n), layout="constrained", squeeze=False
        )
        try:
            for ax, (panel, _) in zip(axes.flat, drawn):
                _draw_panel(ax, panel, runs, stage, weight)
            for ax in list(axes.flat)[len(drawn) :]:
                ax.set_visible(False)
            fig.suptitle(f"{heading}\n{_smoothing_note(weight)}", fontsize=10)
            path = out_dir / OVERVIEW
            metrics = tuple(m for _, panel_metrics in drawn for m in panel_metrics)
            title = " | ".join(panel.title for panel, _ in drawn)
            fig.savefig(path, dpi=90, metadata=_metadata(title, metrics, runs))
            written.append(path)
        finally:
            plt.close(fig)
    return written


def _metadata(title: str, metrics: tuple[str, ...], runs: list[tuple[str, Any]]) -> dict[str, str]:
    return {
        "Title": title,
        "Metrics": ", ".join(metrics),
        "Runs": ", ".join(label for label, _ in runs),
        "Software": "ppo-cli",
    }


def write_run_plots(output_dir: Path, stage: str, rows: list[dict[str, Any]]) -> list[Path]:
    """plots/ of one run from its metric rows (old PNGs of panels no longer drawn are removed)."""
    out_dir = Path(output_dir) / PLOTS_DIR
    if out_dir.is_dir():
        for old in out_dir.glob("*.png"):
            old.unlink()
    if not rows:
        return []
    return draw(
        stage, [(Path(output_dir).name, rows)], out_dir, f"{STAGE_NAMES.get(stage, stage)}: {output_dir}"
    )


# ------------------------------------------------------------------------------------ the command


def usage() -> str:
    return (
        "usage: ppo-cli plot RUN_DIR [RUN_DIR ...] output=DIR [smoothing=W]\n\n"
        "Overlay the curves of several runs of one stage (a sweep, seeds): one PNG per metric panel and\n"
        "overview.png in DIR, one colour per run, labelled with the run directory's name. Each RUN_DIR is a\n"
        "train-sft, train-rm or train-ppo output_dir (it holds metrics.jsonl).\n\n"
        "  output=DIR    where the PNGs go (created if needed)\n"
        "  smoothing=W   EMA weight in [0, 1) for the thick curves; default: set by the number of points"
    )


def _run_stage(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    from ppo_cli.resume_config import saved_stage

    stage = saved_stage(run_dir)
    if stage in PANELS:
        return stage
    # No readable config.yaml: the metric names tell the stage.
    keys = {k for row in rows for k in row}
    if "objective/scores" in keys:
        return "ppo"
    return "rm" if "accuracy" in keys else "sft"


def _labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name; the whole path where two runs share a name."""
    names = [d.name or str(d) for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def parse_args(args: list[str]) -> tuple[list[Path], Path, float | None]:
    """(run dirs, output dir, smoothing weight or None) of `ppo-cli plot`'s arguments; the key=value ones
    are checked against PlotCommandConfig (ppo_cli/command_config.py)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ppo_cli.command_config import PlotCommandConfig
    from ppo_cli.errors import UserError

    flags = [a for a in args if a.startswith("-") and "=" not in a]
    if flags:
        raise UserError(f"unknown flag {flags[0]}: plot takes run directories, output=DIR and smoothing=W.")
    run_dirs = [Path(a) for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PlotCommandConfig), OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise UserError(
            f"invalid setting {key}: plot takes run directories, output=DIR and smoothing=W "
            f"({str(exc).splitlines()[0]}). See `ppo-cli plot --help`."
        ) from exc
    if not run_dirs:
        raise UserError(
            "plot needs at least one run directory, e.g. `ppo-cli plot outputs/ppo/run-a output=plots`."
        )
    if OmegaConf.is_missing(cfg, "output"):
        raise UserError("missing required value for output: set it on the command line, e.g. output=plots.")
    weight = cfg.smoothing
    if weight is not None and not 0 <= weight < 1:
        raise UserError(f"smoothing={weight} must be a number in [0, 1) (0 = no smoothing).")
    return run_dirs, Path(cfg.output), weight


def plot_runs(run_dirs: list[Path], output: Path, weight: float | None) -> tuple[str, list[Path]]:
    """Overlay the runs' curves into `output`; returns (stage, paths written)."""
    from ppo_cli.errors import UserError

    loaded: list[tuple[Path, str, list[dict[str, Any]]]] = []
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(
                f"{run_dir} is not a directory: give the output_dir of a train-sft, train-rm or train-ppo run."
            )
        try:
            rows = read_metrics(run_dir)
        except ValueError as exc:
            raise UserError(f"{run_dir / METRICS_FILE} is not JSON lines ({exc}).") from exc
        if not rows:
            raise UserError(
                f"{run_dir} has no {METRICS_FILE} with logged steps: give the output_dir of a train-sft, "
                "train-rm or train-ppo run that logged at least one step."
            )
        loaded.append((run_dir, _run_stage(run_dir, rows), rows))
    stages = {stage for _, stage, _ in loaded}
    if len(stages) > 1:
        listing = ", ".join(f"{d} ({STAGE_NAMES[s]})" for d, s, _ in loaded)
        raise UserError(
            f"the runs are of different stages: {listing}. Overlay runs of one stage; each stage has its own metrics."
        )
    stage = stages.pop()
    labels = _labels([d for d, _, _ in loaded])
    runs = [(label, rows) for label, (_, _, rows) in zip(labels, loaded)]
    heading = f"{STAGE_NAMES[stage]}: " + ", ".join(labels)
    written = draw(stage, runs, output, heading, weight)
    if not written:
        raise UserError(f"none of the runs logged a metric that {STAGE_NAMES[stage]}'s plots draw.")
    return stage, written


def main(args: list[str]) -> None:
    from ppo_cli.app import fail
    from ppo_cli.errors import UserError

    if not args or args[0] == "help" or {"-h", "--help"}.intersection(args):
        print(usage())
        sys.exit(0)
    try:
        run_dirs, output, weight = parse_args(args)
        _, written = plot_runs(run_dirs, output, weight)
    except UserError as exc:
        fail(str(exc), COMMAND)
    print(f"ppo-cli plot: {len(written)} PNGs of {len(run_dirs)} run(s) in {output}")
    for path in written:
        print(f"  {path}")
