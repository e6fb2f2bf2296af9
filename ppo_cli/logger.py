"""What a run shows and records: rich console for people, metrics.jsonl (ppo_cli/metrics_file.py), wandb
and TensorBoard for tools, and plots/*.png of the curves (ppo_cli/plots.py, which imports nothing of this
module), drawn when the run finishes or stops gracefully.

Only the main process (rank 0) writes; other ranks get a logger that does nothing. On a terminal the
console fits the window and shows a live progress bar; elsewhere (a log file, a pipe, CI) lines are wide
and progress comes as plain lines, one per logged step. Values a user copies (paths) are never cut.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ppo_cli import plots  # matplotlib only once a plot is drawn
from ppo_cli.metrics_file import METRICS_FILE, read_metrics
from ppo_cli.models import lora_targets_text

TENSORBOARD_DIR = "tensorboard"
# Line width when the output is not a terminal and COLUMNS is not set: rich would otherwise wrap at 80,
# and nothing in a file or a pipe limits a line's length.
PLAIN_WIDTH = 200

# Metrics shown on the progress bar, per stage, in this order (the rest go to metrics.jsonl only).
BAR_METRICS = {
    "sft": ["loss", "eval/loss", "lr", "tokens_per_second"],
    "rm": ["loss", "accuracy", "eval/accuracy", "lr"],
    "ppo": [
        "objective/scores",
        "objective/kl",
        "objective/kl_coef",
        "policy/clipfrac_avg",
        "val/ratio",
        "lr",
    ],
}


# What each stage set out to move: the final summary shows their first and last logged values.
KEY_METRICS = {
    "sft": ["loss", "eval/loss"],
    "rm": ["accuracy", "eval/accuracy"],
    "ppo": ["objective/scores", "objective/kl"],
}


# Control characters other than tab and newline: a sampled completion can hold any byte (an untrained
# model's surely do); rich counts them as zero width but a terminal may act on them (\r, \b, ESC), breaking
# the table's box.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with each control character shown as U+FFFD, as undecodable bytes already are."""
    return CONTROL_CHARS.sub("\ufffd", text)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def make_console(**kwargs: Any) -> Console:
    """A rich console that fits a terminal's window, or the COLUMNS a user set (a log read later in an
    80-column terminal: boxes wider than it break there). Off a terminal without COLUMNS, text lines are
    never wrapped, and tables and panels get at least PLAIN_WIDTH columns."""
    console = Console(highlight=False, **kwargs)
    if not console.is_terminal and not _columns_set():
        console.width = max(console.width, PLAIN_WIDTH)
        console.soft_wrap = True
    return console


def _columns_set() -> bool:
    """Whether the environment names a width (rich reads the same variable)."""
    return os.environ.get("COLUMNS", "").isdigit()


def describe_base(model_cfg: DictConfig) -> str:
    """The start panel's model row: the base, and how it is quantized when it is (a 4-bit base learns
    and samples differently from the full-precision one a user may compare it with)."""
    name = str(model_cfg.name_or_path)
    if model_cfg.get("load_in_4bit"):
        extras = [str(model_cfg.get("bnb_4bit_quant_type", "nf4"))]
        if model_cfg.get("bnb_4bit_use_double_quant"):
            extras.append("double quant")
        if str(model_cfg.get("bnb_4bit_compute_dtype", "auto")) != "auto":
            extras.append(f"compute {model_cfg.bnb_4bit_compute_dtype}")
        return f"{name} (4-bit base: {', '.join(extras)}; bitsandbytes)"
    if model_cfg.get("load_in_8bit"):
        return f"{name} (8-bit base: LLM.int8; bitsandbytes)"
    return name


def metric_change(rows: list[dict[str, Any]], key: str) -> str | None:
    """'first -> last (step a -> b)' of `key` over logged metric rows; None when it was never logged."""
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), int | float)]
    if not points:
        return None
    (first_step, first), (last_step, last) = points[0], points[-1]
    if len(points) == 1:
        return f"{_fmt(first)} (step {first_step} only)"
    return f"{_fmt(first)} -> {_fmt(last)} (step {first_step} -> {last_step})"


def summary_rows(stage: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The final summary's (name, value) rows: steps, then how the stage's key metrics moved over the
    logged `rows`, then the rest of `summary` (a key metric never logged keeps its value there)."""
    out = [("steps", _fmt(summary["steps"]))] if "steps" in summary else []
    changes = {key: metric_change(rows, key) for key in KEY_METRICS.get(stage, [])}
    out += [(key, change) for key, change in changes.items() if change is not None]
    out += [(k, _fmt(v)) for k, v in summary.items() if k != "steps" and changes.get(k) is None]
    return out


def _bar_metrics(stage: str, last: dict[str, Any]) -> str:
    """'name=value ...' of the stage's bar metrics, named as in metrics.jsonl (what a user greps, plots
    and compares between runs) less TRL's "objective/" prefix, which every PPO headline metric shares."""
    return " ".join(
        f"{k.removeprefix('objective/')}={_fmt(last[k])}" for k in BAR_METRICS.get(stage, []) if k in last
    )


def plain_progress_line(stage: str, step: int, total: int, metrics: str, elapsed: float, eta: float) -> str:
    """A progress line for logs that are not a terminal (no live bar there)."""

    def clock(seconds: float) -> str:
        return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"

    parts = [f"{stage} step {step}/{total}", metrics, f"elapsed {clock(elapsed)} eta {clock(eta)}"]
    return " ".join(part for part in parts if part)


class RunLogger:
    """Console, progress bar, metrics.jsonl, plots/ and (optionally) wandb and TensorBoard for one run."""

    def __init__(
        self,
        output_dir: Path,
        cfg: DictConfig,
        stage: str,
        enabled: bool = True,
        lora: str | None = None,
        memory_plan: str | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.cfg = cfg
        self.stage = stage
        self.enabled = enabled
        # The LoRA row of the start panel: what the model really has (models.describe_lora), when known.
        self.lora = lora
        # The start panel's "memory plan" row: `ppo-cli plan`'s total for this run (ppo_cli/plan/), when known.
        self.memory_plan = memory_plan
        self.console = make_console()
        self.progress: Progress | None = None
        # Off a terminal: (first step, total steps, start time) for plain progress lines.
        self._plain: tuple[int, int, float] | None = None
        self._task = None
        self._wandb = None
        self._tensorboard = None
        self._last: dict[str, Any] = {}

    # -- start / finish ------------------------------------------------------------------------
    def start(self, total_steps: int, start_step: int = 0, summary: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        self._trim_metrics(start_step)
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # long paths fold onto more lines: never cut with "…"
        rows = {
            "model": describe_base(self.cfg.model),
            "lora": self.lora or self._asked_lora(),
            "data": self.cfg.data.train,
            "steps": f"{total_steps} (batch {self.cfg.train.batch_size} x accum {self.cfg.train.grad_accum_steps}, "
            f"lr {self.cfg.train.lr})",
            "output_dir": str(self.output_dir),
            **({"memory plan": self.memory_plan} if self.memory_plan else {}),
            **(summary or {}),
        }
        if start_step:
            rows["resumed at"] = f"step {start_step}"
        for key, value in rows.items():
            table.add_row(f"[bold]{key}[/]", Text(str(value)))
        self.console.print(Panel(table, title=f"ppo-cli train-{self.stage}", expand=False))
        self._start_wandb()
        self._start_tensorboard(start_step)
        if self.cfg.logger.progress and not self.console.is_terminal:
            self._plain = (start_step, total_steps, time.monotonic())
        elif self.cfg.logger.progress:
            self.progress = Progress(
                TextColumn(f"[bold]{self.stage}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self._task = self.progress.add_task("train", total=total_steps, completed=start_step, metrics="")

    def _asked_lora(self) -> str:

        lora = self.cfg.lora
        if not lora.enabled:
            return "off (full fine-tuning)"
        asked = lora.target_modules
        asked = list(asked) if OmegaConf.is_list(asked) else asked
        return f"r={lora.r} alpha={lora.alpha} targets={lora_targets_text(asked, asked, None)}"

    def finish(self, summary: dict[str, Any] | None = None, final_dir: Path | None = None) -> None:
        """The closing table (how the key metrics moved, then `summary`), and final_dir on a line of its
        own so that it can be copied whole whatever the width."""
        if not self.enabled:
            return
        self.close_progress()
        self.flush()  # before the summary: final_dir stays the last line, for copying
        if summary:
            table = Table(title=f"train-{self.stage} finished", show_header=False)
            table.add_column(no_wrap=True)
            table.add_column(overflow="fold")
            for key, value in summary_rows(self.stage, read_metrics(self.output_dir), summary):
                table.add_row(key, Text(value))
            self.console.print(table)
        if final_dir is not None:
            self.console.print(Text(f"final: {final_dir}"), soft_wrap=True)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def flush(self) -> None:
        """Bring what lies beside metrics.jsonl up to date: plots/ (redrawn from metrics.jsonl) and the
        TensorBoard event files. Called at the end of a run and at a graceful stop. A plotting failure
        is a warning: the run's weights and metrics matter more than its pictures."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            self._tensorboard.flush()
        if not self.cfg.logger.plots:
            return
        try:
            written = plots.write_run_plots(self.output_dir, self.stage, read_metrics(self.output_dir))
        except Exception as exc:  # noqa: BLE001 - matplotlib missing, a bad value, a full disk...
            from rich.markup import escape

            self.warn(
                escape(
                    f"could not draw the plots in {self.output_dir / 'plots'}: {type(exc).__name__}: {exc}"
                )
            )
            return
        if written:
            self.console.print(
                Text(f"plots: {self.output_dir / plots.PLOTS_DIR} ({len(written)} PNGs)"), soft_wrap=True
            )

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # -- per step ------------------------------------------------------------------------------
    def advance(self, step: int) -> None:
        """Move the bar to `step` (call every optimizer step, logged or not)."""
        if self.progress is not None:
            self.progress.update(self._task, completed=step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record metrics of `step`: one line of metrics.jsonl, wandb, and the progress bar."""
        if not self.enabled:
            return
        clean = {
            k: (float(v) if hasattr(v, "__float__") and not isinstance(v, bool | int) else v)
            for k, v in metrics.items()
        }
        with open(self.output_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._tensorboard is not None:
            for key, value in clean.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, step)
        self._last.update(clean)
        if self.progress is not None:
            self.progress.update(self._task, completed=step, metrics=_bar_metrics(self.stage, self._last))
        if self._plain is not None:
            first, total, started = self._plain
            elapsed = time.monotonic() - started
            eta = elapsed / (step - first) * (total - step) if step > first else math.nan
            # This step's metrics only: a live bar keeps the last of each, a log line need not repeat them.
            shown = _bar_metrics(self.stage, clean)
            line = plain_progress_line(self.stage, step, total, shown, elapsed, eta)
            self.console.print(Text(line), soft_wrap=True)

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[bold yellow]warning:[/] {message}")

    def table(self, title: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """A rich table on the console (and a wandb Table when wandb is on)."""
        if not self.enabled:
            return
        table = Table(title=title, show_lines=True)
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*[Text(_fmt(v) if isinstance(v, float) else printable(str(v))) for v in row])
        self.console.print(table)
        if self._wandb is not None:
            import wandb

            self._wandb.log(
                {title: wandb.Table(columns=columns, data=[list(map(str, r)) for r in rows])}, step=step
            )
        if self._tensorboard is not None:
            # One tag per table kind ("samples at step 5" -> "samples"), its steps on TensorBoard's slider.
            tag = re.sub(r" at step \d+$", "", title)
            self._tensorboard.add_text(tag, markdown_table(columns, rows), global_step=step)

    # -- helpers -------------------------------------------------------------------------------
    def _trim_metrics(self, start_step: int) -> None:
        """On resume, drop lines logged after the checkpoint: those steps run again."""
        path = self.output_dir / METRICS_FILE
        if not path.exists():
            return
        if start_step == 0:
            path.unlink()
            return
        kept = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= start_step
        ]
        path.write_text("".join(ln + "\n" for ln in kept))

    def _start_tensorboard(self, start_step: int) -> None:
        if not self.cfg.logger.get("tensorboard", {}).get("enabled", False):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            from ppo_cli.errors import UserError

            raise UserError(
                f"logger.tensorboard.enabled=true needs the tensorboard package ({exc}): pip install tensorboard, "
                "or run with logger.tensorboard.enabled=false."
            ) from exc
        # On resume, events of the steps after the checkpoint are dropped: those steps run again (as
        # _trim_metrics does for metrics.jsonl).
        self._tensorboard = SummaryWriter(
            str(self.output_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
        )

    def _start_wandb(self) -> None:
        wcfg = self.cfg.logger.wandb
        if not wcfg.enabled or wcfg.mode == "disabled":
            return
        import wandb

        self._wandb = wandb.init(
            project=wcfg.project,
            entity=wcfg.entity,
            name=wcfg.name or self.output_dir.name,
            mode=wcfg.mode,
            dir=str(self.output_dir),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            resume="allow",
            id=_wandb_id(self.output_dir),
        )


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders Markdown); cells on one line, pipes escaped."""

    def cell(value: Any) -> str:
        text = _fmt(value) if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _wandb_id(output_dir: Path) -> str:
    """A stable wandb run id per output_dir, so a resumed run continues the same wandb run."""
    path = output_dir / ".wandb_id"
    if path.exists():
        return path.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    path.write_text(run_id)
    return run_id


class Throughput:
    """Tokens per second over the last logging window."""

    def __init__(self) -> None:
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        value = self.tokens / elapsed if elapsed > 0 else math.nan
        self.tokens, self.start = 0, time.perf_counter()
        return value
