"""What a run shows and records: rich console for people, metrics.jsonl and wandb for tools.

Only the main process (rank 0) writes; other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import time
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

METRICS_FILE = "metrics.jsonl"

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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


class RunLogger:
    """Console, progress bar, metrics.jsonl and (optionally) wandb for one run."""

    def __init__(self, output_dir: Path, cfg: DictConfig, stage: str, enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.cfg = cfg
        self.stage = stage
        self.enabled = enabled
        self.console = Console(stderr=False, highlight=False)
        self.progress: Progress | None = None
        self._task = None
        self._wandb = None
        self._last: dict[str, Any] = {}

    # -- start / finish ------------------------------------------------------------------------
    def start(self, total_steps: int, start_step: int = 0, summary: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        self._trim_metrics(start_step)
        table = Table.grid(padding=(0, 2))
        rows = {
            "model": self.cfg.model.name_or_path,
            "lora": (
                f"r={self.cfg.lora.r} alpha={self.cfg.lora.alpha} targets={self.cfg.lora.target_modules}"
                if self.cfg.lora.enabled
                else "off (full fine-tuning)"
            ),
            "data": self.cfg.data.train,
            "steps": f"{total_steps} (batch {self.cfg.train.batch_size} x accum {self.cfg.train.grad_accum_steps}, "
            f"lr {self.cfg.train.lr})",
            "output_dir": str(self.output_dir),
            **(summary or {}),
        }
        if start_step:
            rows["resumed at"] = f"step {start_step}"
        for key, value in rows.items():
            table.add_row(f"[bold]{key}[/]", str(value))
        self.console.print(Panel(table, title=f"ppo-cli train-{self.stage}", expand=False))
        self._start_wandb()
        if self.cfg.logger.progress:
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

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        self.close_progress()
        if summary:
            table = Table(title=f"train-{self.stage} finished", show_header=False)
            for key, value in summary.items():
                table.add_row(key, _fmt(value))
            self.console.print(table)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

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
        self._last.update(clean)
        if self.progress is not None:
            shown = [
                f"{k.replace('objective/', '').replace('/', '_')}={_fmt(self._last[k])}"
                for k in BAR_METRICS.get(self.stage, [])
                if k in self._last
            ]
            self.progress.update(self._task, completed=step, metrics=" ".join(shown))

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
            table.add_row(*[_fmt(v) if isinstance(v, float) else str(v) for v in row])
        self.console.print(table)
        if self._wandb is not None:
            import wandb

            self._wandb.log(
                {title: wandb.Table(columns=columns, data=[list(map(str, r)) for r in rows])}, step=step
            )

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
