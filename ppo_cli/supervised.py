"""The optimisation step that SFT and reward-model training share, plus optimizer/schedule builders.

A stage supplies its model, tokenized examples, a collate function and a `loss_fn(model, batch)`;
SupervisedTrainer does one step (gradient accumulation, clipping, AdamW with warmup + decay, a clean
stop on NaN/inf), the logging window and the evaluation, and runs them in `loop.TrainingLoop`, which
owns the rest: atomic checkpoints, exact resume (weights, optimizer, scheduler, RNG, data position),
the log/eval/save cadence and the graceful stop on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from ppo_cli import checkpoint as ckpt
from ppo_cli import fsdp
from ppo_cli.data import EpochBatches, LengthReport, load_train_eval_rows
from ppo_cli.dist import all_reduce_mean, all_reduce_sum, broadcast_object
from ppo_cli.errors import UserError
from ppo_cli.logger import Throughput
from ppo_cli.loop import LoopStage, LoopState, TrainingLoop
from ppo_cli.models import autocast, keep_trainable_in_fp32
from ppo_cli.models.devices import release_freed_cpu_memory
from ppo_cli.run import StageRun, TrainingDiverged

# loss_fn(model, batch) -> (loss, metrics to average over the logging window, tokens in the batch); the
# loss is a mean over the batch's items (SupervisedTask.count_items), 0 when it has none.
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float], int]]
# count_items(batch) -> the number of items (labelled tokens for SFT, pairs for the RM) its loss is a mean of.
CountItems = Callable[[dict[str, torch.Tensor]], int]


def build_optimizer(
    params: Sequence[torch.nn.Parameter] | list[dict], train_cfg: DictConfig, lr: float | None = None
):
    return torch.optim.AdamW(
        params,
        lr=train_cfg.lr if lr is None else lr,
        weight_decay=train_cfg.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: DictConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = int(math.ceil(train_cfg.warmup_ratio * total_steps))
    # transformers' name for each schedule (train.lr_scheduler is a Choice: nothing else gets here).
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        str(train_cfg.lr_scheduler)
    ]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


def total_optimizer_steps(n_examples: int, train_cfg: DictConfig, world_size: int = 1) -> int:
    if train_cfg.max_steps > 0:
        return int(train_cfg.max_steps)
    per_step = train_cfg.batch_size * train_cfg.grad_accum_steps * world_size
    return max(1, int(math.ceil(train_cfg.num_epochs * n_examples / per_step)))


def diverged(what: str, step: int, run: StageRun) -> TrainingDiverged:
    """The error that stops a run whose numbers blew up: names the step and the last good checkpoint."""
    last = ckpt.latest_checkpoint(run.output_dir)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return TrainingDiverged(
        f"{what} at step {step}; the run stopped and {where}. Lower train.lr, "
        "check the data for empty or extreme rows, or use model.dtype=float32."
    )


def check_finite(value: torch.Tensor | float, what: str, step: int, run: StageRun) -> None:
    if not math.isfinite(float(value)):
        raise diverged(f"{what} became {float(value)}", step, run)


def optimizer_step(optimizer: torch.optim.Optimizer, step: int, run: StageRun) -> None:
    """optimizer.step(); an update too large for the weights' dtype (torch: "value cannot be converted to
    type float without overflow", e.g. train.lr=1e38) stops the run like a NaN loss does."""
    try:
        optimizer.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise diverged(f"the optimizer update overflowed ({exc})", step, run) from exc


def validate_supervised(cfg: DictConfig) -> None:
    """The data and batch checks that SFT and RM training share, before anything loads."""
    if cfg.data.max_length < 2:
        raise UserError(f"data.max_length={cfg.data.max_length} is too small (at least 2 tokens).")
    for key in ("batch_size", "grad_accum_steps", "log_every"):
        if cfg.train[key] < 1:
            raise UserError(f"train.{key}={cfg.train[key]} must be at least 1.")


def load_examples(
    cfg: DictConfig,
    tokenizer,
    build: Callable[..., tuple[list[dict], LengthReport]],
    say: Callable[[Any], None],
    nothing_left: Callable[[LengthReport, int], str],
    noun: str = "examples",
) -> tuple[list[dict], list[dict]]:
    """The training and evaluation examples of a supervised stage: data.train / data.eval rows (or the
    held-out fraction) through `build(tokenizer, rows, max_length, overflow)`. What the length limit cut
    or dropped is said with `say` (a rich console's print, or print), counting `noun`; no training
    example left is a UserError that names data.train, then `nothing_left(report, data.max_length)`."""
    from rich.text import Text  # styled without markup: print shows it plain, file names stay verbatim

    data_cfg = cfg.data
    train_rows, eval_rows = load_train_eval_rows(data_cfg, cfg.train.seed)
    train, report = build(tokenizer, train_rows, data_cfg.max_length, data_cfg.overflow)
    evals, eval_report = build(tokenizer, eval_rows, data_cfg.max_length, data_cfg.overflow)
    for name, rep in (("data.train", report), ("eval", eval_report)):
        message = rep.describe(data_cfg.max_length, noun)
        if message:
            say(Text(f"{name}: {message}", style="yellow"))
    if not train:
        raise UserError(f"data.train={data_cfg.train}: {nothing_left(report, data_cfg.max_length)}")
    return train, evals


def weighted_means(sums: dict[str, float], counts: dict[str, float], dist_info) -> dict[str, float]:
    """`eval/<key>`: sum over ranks of sums[key] / sum over ranks of counts[key]. Every rank calls it
    with the same keys, or with none (a rank without evaluation examples); the key set is rank 0's."""
    keys = broadcast_object(sorted(sums), dist_info)
    totals = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0.0)] for k in keys], dtype=torch.float64)
    totals = all_reduce_sum(totals.reshape(-1, 2), dist_info)
    return {f"eval/{k}": float(s / c) for k, (s, c) in zip(keys, totals.tolist()) if c > 0}


@dataclass
class SupervisedTask:
    """What a stage hands the loop."""

    model: torch.nn.Module
    train_examples: list[Any]
    eval_examples: list[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    loss_fn: LossFn
    # Saves the stage's product into final/ (rank 0 only).
    save_final: Callable[[], None]
    # Shown on the console at start.
    summary: dict[str, Any]
    # What the loss is a mean over; a step's loss is the mean over all its micro-batches' items (on all
    # ranks), so a micro-batch weighs by its items, not by its rows. Default: its rows.
    count_items: CountItems | None = None

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        if self.count_items is not None:
            return int(self.count_items(batch))
        return int(next(iter(batch.values())).shape[0])


class SupervisedTrainer(LoopStage):
    def __init__(self, run: StageRun, task: SupervisedTask):
        self.run, self.task, self.cfg = run, task, run.cfg
        self.train_cfg = run.cfg.train
        self.model = task.model
        keep_trainable_in_fp32(self.model)  # before DDP, FSDP and the optimizer see the parameters
        self.sharded = fsdp.enabled(self.cfg, run.dist)
        self.ddp_model = self._wrap()
        # After sharding, which replaces every parameter by its shard.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        world = run.dist.world_size
        self.total_steps = total_optimizer_steps(len(task.train_examples), self.train_cfg, world)
        # One global batch order shared by every rank (seeded with train.seed); each rank takes its slice.
        # Full batches only (pad_last): every rank gets train.batch_size examples at every step.
        self.batches = EpochBatches(
            len(task.train_examples), self.train_cfg.batch_size * world, self.train_cfg.seed, pad_last=True
        )
        self.optimizer = build_optimizer(self.trainable, self.train_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.train_cfg, self.total_steps)
        self.last_lr = self.scheduler.get_last_lr()[0]
        # The training loss over the last tenth of the run (at least 10 steps): the RM's health reads it.
        self.recent_losses: deque[float] = deque(maxlen=max(10, self.total_steps // 10))
        # The logging window: metrics of the steps since the last log line, and their tokens.
        self.window: dict[str, list[float]] = defaultdict(list)
        self.throughput = Throughput()
        state = LoopState(self.model, self.optimizer, self.scheduler, self.batches)
        self.loop = TrainingLoop(run, state, self.total_steps, self)

    def _wrap(self) -> torch.nn.Module:
        """The module the training step calls: DDP around the model, or the model itself, sharded in
        place (train.strategy=fsdp), or unwrapped on one process."""
        if not self.run.dist.enabled:
            return self.model
        if self.sharded:
            from_rank0 = fsdp.loads_on_rank0(self.cfg, self.run.dist)
            return fsdp.shard(self.model, self.train_cfg.fsdp, self.run.dist, from_rank0=from_rank0)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.run.device.index] if self.run.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=False)

    # -- checkpoints (the loop writes and reads them) ---------------------------------------------
    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def final_eval(self) -> dict[str, float]:
        return self.loop.final_eval

    def save(self) -> None:
        self.loop.save()

    def restore(self) -> None:
        self.loop.restore()

    def extra_state(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps}

    # -- one optimizer step --------------------------------------------------------------------
    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        rank, world = self.run.dist.rank, self.run.dist.world_size
        out = []
        for _ in range(self.train_cfg.grad_accum_steps):
            indices = self.batches.next()[rank::world]
            batch = self.task.collate([self.task.train_examples[i] for i in indices])
            out.append({k: v.to(self.run.device) for k, v in batch.items()})
        return out

    def train_step(self, step: int) -> None:
        self.ddp_model.train()
        micro = self._micro_batches()
        items = [self.task.items(batch) for batch in micro]
        # The step's loss is the mean over every item of every micro-batch on every rank: a micro-batch's
        # mean weighs by its share of the items. DDP then averages the ranks' gradients (FSDP's
        # reduce-scatter too), so the share is of the items per rank (the global count over the world size).
        world = self.run.dist.world_size
        global_items = float(all_reduce_sum(torch.tensor([float(sum(items))]), self.run.dist)[0])
        per_rank = max(global_items / world, 1.0)
        total_loss = 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            # FSDP reads its flag in the backward (DDP's no_sync acts through the forward, below).
            fsdp.set_gradient_sync(self.ddp_model, sync)
            ddp = self.run.dist.enabled and not self.sharded
            no_sync = self.ddp_model.no_sync() if (ddp and not sync) else contextlib.nullcontext()
            with no_sync, autocast(self.run.device, self.train_cfg.mixed_precision):
                loss, metrics, n_tokens = self.task.loss_fn(self.ddp_model, batch)
            (loss * (items[i] / per_rank)).backward()
            release_freed_cpu_memory(self.run.device)
            total_loss += loss.item() * items[i] / max(sum(items), 1)
            self.throughput.add(n_tokens)
            for key, value in metrics.items():
                self.window[key].append(value)
        check_finite(total_loss, "the training loss", step, self.run)
        if self.train_cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.train_cfg.max_grad_norm)
            check_finite(norm, "the gradient norm", step, self.run)
            self.window["grad_norm"].append(float(norm))
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this update uses, for the log
        optimizer_step(self.optimizer, step, self.run)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window["loss"].append(total_loss)
        self.recent_losses.append(total_loss)

    def log_metrics(self, step: int) -> dict[str, float]:
        """The window's averages since the last log line, over all ranks, and the learning rate."""
        metrics = {k: sum(v) / len(v) for k, v in self.window.items()}
        metrics["tokens_per_second"] = self.throughput.rate()
        metrics = all_reduce_mean(metrics, self.run.dist)
        metrics["lr"] = self.last_lr
        self.window.clear()
        return metrics

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        examples = self.task.eval_examples
        if not examples:
            return {}
        self.model.eval()
        rank, world = self.run.dist.rank, self.run.dist.world_size
        # Sums and counts over every rank's slice, then one division: the ranks' slices may differ in
        # size (and in tokens), so a mean of per-rank means would weigh their examples unequally.
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        bs = self.train_cfg.batch_size
        mine = examples[rank::world]
        for start in self._eval_starts(len(examples), len(mine)):
            if start >= len(mine):  # FSDP: a forward to keep step with the ranks that have more
                self._forward_only(examples[:1])
                continue
            batch = self.task.collate(mine[start : start + bs])
            batch = {k: v.to(self.run.device) for k, v in batch.items()}
            with autocast(self.run.device, self.train_cfg.mixed_precision):
                loss, metrics, _ = self.task.loss_fn(self.model, batch)
            # The loss is a mean over the batch's items (labelled tokens, pairs), the metrics over its rows.
            items, rows = self.task.items(batch), len(mine[start : start + bs])
            sums["loss"] += float(loss) * items
            counts["loss"] += items
            for key, value in metrics.items():
                sums[key] += float(value) * rows
                counts[key] += rows
        return weighted_means(sums, counts, self.run.dist)

    def _eval_starts(self, total: int, mine: int) -> range:
        """Where this rank's evaluation batches start. Under FSDP every forward is a collective, so every
        rank runs as many as the rank with the most examples (the extra ones past its own: `mine`)."""
        bs = self.train_cfg.batch_size
        rows = -(-total // self.run.dist.world_size) if self.sharded else mine
        return range(0, rows, bs)

    def _forward_only(self, examples: list[Any]) -> None:
        """One evaluation forward whose result is dropped."""
        batch = {k: v.to(self.run.device) for k, v in self.task.collate(examples).items()}
        with autocast(self.run.device, self.train_cfg.mixed_precision):
            self.task.loss_fn(self.model, batch)

    # -- the loop ------------------------------------------------------------------------------
    def finish(self) -> None:
        # Sharded, every rank takes part (gathering the weights, the RM's scoring passes); rank 0 writes.
        if self.run.is_main or self.sharded:
            self.task.save_final()

    def start(self) -> None:
        self.window.clear()
        self.throughput = Throughput()  # the first window's clock starts with the first step

    def fit(self) -> dict[str, float]:
        weights = next(self.model.parameters()).dtype
        return self.loop.fit(self.task.summary, weights)
