"""The optimisation loop that SFT and reward-model training share, plus optimizer/schedule builders.

A stage supplies its model, tokenized examples, a collate function and a `loss_fn(model, batch)`;
the loop does the rest: gradient accumulation, clipping, AdamW with warmup + decay, periodic eval,
logging, atomic checkpoints, exact resume (weights, optimizer, scheduler, RNG, data position), a
graceful stop on Ctrl-C / SIGTERM, and a clean stop on NaN/inf.
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
from ppo_cli.data import EpochBatches
from ppo_cli.dist import all_reduce_mean, any_flag
from ppo_cli.logger import Throughput
from ppo_cli.models import attention_kernel, autocast, keep_trainable_in_fp32
from ppo_cli.run import StageRun, TrainingDiverged

# loss_fn(model, batch) -> (loss, metrics to average over the logging window, tokens in the batch)
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float], int]]


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
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}.get(
        train_cfg.lr_scheduler
    )
    if name is None:
        from ppo_cli.errors import UserError

        raise UserError(
            f"train.lr_scheduler={train_cfg.lr_scheduler} is not one of cosine, linear, constant."
        )
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


class SupervisedTrainer:
    def __init__(self, run: StageRun, task: SupervisedTask):
        self.run, self.task, self.cfg = run, task, run.cfg
        self.train_cfg = run.cfg.train
        self.model = task.model
        keep_trainable_in_fp32(self.model)  # before DDP and the optimizer see the parameters
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp_model = self._wrap_ddp()
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
        self.step = 0

    def _wrap_ddp(self) -> torch.nn.Module:
        if not self.run.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.run.device.index] if self.run.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=False)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        rng, rng_tensors = ckpt.split_rng(ckpt.capture_rng())
        objects = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **rng_tensors,
        }
        state = {"data": self.batches.state_dict(), "rng": rng, "total_steps": self.total_steps}
        self.run.save_checkpoint(self.step, ckpt.trainable_state(self.model), objects, state)

    def restore(self) -> None:
        loaded = ckpt.load_checkpoint(self.run.resume_from)
        ckpt.load_trainable_state(self.model, loaded.trainable, str(loaded.path))
        self.optimizer.load_state_dict(loaded.objects["optimizer"])
        self.scheduler.load_state_dict(loaded.objects["scheduler"])
        self.batches.load_state_dict(loaded.state["data"])
        ckpt.restore_rng(ckpt.join_rng(loaded.state["rng"], loaded.objects))
        self.step = loaded.step

    # -- one optimizer step --------------------------------------------------------------------
    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        rank, world = self.run.dist.rank, self.run.dist.world_size
        out = []
        for _ in range(self.train_cfg.grad_accum_steps):
            indices = self.batches.next()[rank::world]
            batch = self.task.collate([self.task.train_examples[i] for i in indices])
            out.append({k: v.to(self.run.device) for k, v in batch.items()})
        return out

    def train_step(self, window: dict[str, list[float]], throughput: Throughput) -> float:
        self.ddp_model.train()
        micro = self._micro_batches()
        total_loss = 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            no_sync = (
                self.ddp_model.no_sync() if (self.run.dist.enabled and not sync) else contextlib.nullcontext()
            )
            with no_sync, autocast(self.run.device, self.train_cfg.mixed_precision):
                loss, metrics, n_tokens = self.task.loss_fn(self.ddp_model, batch)
            (loss / len(micro)).backward()
            total_loss += loss.item() / len(micro)
            throughput.add(n_tokens)
            for key, value in metrics.items():
                window[key].append(value)
        check_finite(total_loss, "the training loss", self.step + 1, self.run)
        if self.train_cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.train_cfg.max_grad_norm)
            check_finite(norm, "the gradient norm", self.step + 1, self.run)
            window["grad_norm"].append(float(norm))
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this update uses, for the log
        optimizer_step(self.optimizer, self.step + 1, self.run)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total_loss

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        examples = self.task.eval_examples
        if not examples:
            return {}
        self.model.eval()
        rank, world = self.run.dist.rank, self.run.dist.world_size
        mine = examples[rank::world] or examples[:1]
        sums: dict[str, float] = defaultdict(float)
        count = 0
        bs = self.train_cfg.batch_size
        for start in range(0, len(mine), bs):
            batch = self.task.collate(mine[start : start + bs])
            batch = {k: v.to(self.run.device) for k, v in batch.items()}
            with autocast(self.run.device, self.train_cfg.mixed_precision):
                loss, metrics, _ = self.task.loss_fn(self.model, batch)
            n = batch["input_ids"].shape[0] if "input_ids" in batch else 1
            sums["loss"] += float(loss) * n
            for key, value in metrics.items():
                sums[key] += float(value) * n
            count += n
        result = {f"eval/{k}": v / count for k, v in sums.items()}
        return all_reduce_mean(result, self.run.dist)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        run, logger = self.run, self.run.logger
        if run.resume_from is not None:
            self.restore()
        else:
            ckpt.seed_everything(run.seed)
        logger.start(self.total_steps, self.step, self.task.summary)
        window: dict[str, list[float]] = defaultdict(list)
        throughput = Throughput()
        last_eval: dict[str, float] = {}
        cfg = self.train_cfg
        weights = next(self.model.parameters()).dtype
        kernel = attention_kernel(self.run.device, cfg.mixed_precision, weights)
        with kernel:  # for the whole loop, backward passes included: see attention_kernel
            try:
                while self.step < self.total_steps:
                    loss = self.train_step(window, throughput)
                    window["loss"].append(loss)
                    self.recent_losses.append(loss)
                    logger.advance(self.step)
                    metrics: dict[str, float] = {}
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        metrics = {k: sum(v) / len(v) for k, v in window.items()}
                        metrics["tokens_per_second"] = throughput.rate()
                        metrics = all_reduce_mean(metrics, run.dist)
                        metrics["lr"] = self.last_lr
                        window.clear()
                    if (
                        cfg.eval_every > 0
                        and self.step % cfg.eval_every == 0
                        and self.step != self.total_steps
                    ):
                        last_eval = self.evaluate()
                        metrics.update(last_eval)
                    if metrics:
                        logger.log(self.step, metrics)
                    stop = any_flag(run.stop.requested, run.dist)
                    if (cfg.save_every > 0 and self.step % cfg.save_every == 0) or stop:
                        self.save()
                    if stop:
                        logger.close_progress()
                        logger.print(f"[bold]{run.stopped_message(self.step)}[/]")
                        raise SystemExit(run.stop.exit_code)
                last_eval = self.evaluate()
                self.final_eval = last_eval
                if last_eval:
                    logger.log(self.step, last_eval)
                self.save()
                if run.is_main:
                    self.task.save_final()
            finally:
                logger.close_progress()
        return last_eval
