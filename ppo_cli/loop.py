"""The shell every stage's training loop runs in: checkpointed state, restore-or-start, step cadence, stop.

API (a stage builds one `TrainingLoop` and calls `fit` once):

    state = LoopState(module, optimizer, scheduler, data)
        What a checkpoint holds besides the stage's own counters: the trainable parameters of `module`
        (adapters, heads, or all weights; `checkpoint.trainable_state`), the optimizer and scheduler
        state dicts, every rank's RNG state, and the data position (`data`: anything with state_dict() /
        load_state_dict(), e.g. `data.EpochBatches`).

    loop = TrainingLoop(run, state, total_steps, stage)
        `stage` supplies the work (see `LoopStage`; override what the stage needs):
          train_step(step)        take step `step` (1-based): rollout + update for PPO, one optimizer
                                  step over grad_accum micro-batches for SFT/RM. Every collective a
                                  step needs happens here, on every rank, every step. loop.step
                                  is still step - 1 meanwhile: use `step` in messages.
          start()                 once resumed or seeded and the progress display is open, before the
                                  first step (PPO: roles in eval mode; SFT/RM: the log window's clock).
          log_metrics(step)       what to log when the log is due (train.log_every, and the last step);
                                  SFT/RM average a window, PPO returns its last step's metrics.
          evaluate()              held-out metrics, when train.eval_every is due and once after the
                                  last step (an empty dict: nothing to evaluate).
          after_step(step)        after the step's log line (PPO: sample tables).
          extra_state()           the stage's own JSON-able state, stored at the top level of
                                  trainer_state.json (PPO: kl_controller, reward_scale, guards,
                                  episode; SFT/RM: total_steps).
          load_extra_state(state) the whole trainer_state.json dict of the checkpoint being resumed,
                                  called after the data position is restored and before the RNG is.
          finish()                after the final checkpoint (SFT/RM: final/ on rank 0).

    final_eval = loop.fit(summary, weights_dtype)
        Resume from `run.resume_from` (or seed with `run.seed`), open the progress display, then step
        until `total_steps`, with the cadence of train.log_every / eval_every / save_every, inside the
        attention kernel chosen for `weights_dtype`. A stop request (Ctrl-C, SIGTERM, on any rank) ends
        the current step, writes a checkpoint, prints the resume command and exits with the signal's
        code. After the last step: the final evaluation (logged), a checkpoint, `stage.finish()`.
        Returns the final evaluation.

    loop.step, loop.final_eval, loop.save() and loop.restore() are there for stages and tests that need
    them directly.

PPO fits as: train_step = one rollout + update (its KL controller update and guards included; it
keeps the step's all-reduced metrics for log_metrics), after_step = the sample tables, extra_state =
kl_controller / reward_scale / guards / episode, load_extra_state also marks the critic as on the scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ppo_cli import checkpoint as ckpt
from ppo_cli import fsdp
from ppo_cli.dist import all_gather_object, any_flag
from ppo_cli.models import attention_kernel
from ppo_cli.run import StageRun


@dataclass
class LoopState:
    """The state every stage checkpoints, whatever its step does."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any


def follow_schedule(scheduler: Any) -> None:
    """Set each param group's rate (and the scheduler's last rate) to this run's schedule at the restored
    step.

    Why: the optimizer's state brings back each group's `lr` and the scheduler's state its `_last_lr`,
    both computed by the saved run's schedule; this run's schedule (built for its own length) would
    only take over at the next `scheduler.step()`. A run resumed with a longer train.max_steps (or a
    warmup, a share of that length) would otherwise take its first step at the old schedule's rate.
    Every schedule `build_scheduler` makes (transformers' get_scheduler) is a LambdaLR, whose rate at
    step t is base_lr * lr_lambda(t) whatever came before: the same expression `step()` evaluates, so
    a resume with an unchanged length gets the saved rates bit for bit. A scheduler whose rate depends
    on its previous rates cannot be recomputed this way and keeps the restored ones.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    rates = [
        base * fn(scheduler.last_epoch)
        for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
    ]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = list(rates)


class LoopStage:
    """What a stage supplies to `TrainingLoop`; every hook but `train_step` has a default."""

    def train_step(self, step: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        pass

    def log_metrics(self, step: int) -> dict[str, float]:
        return {}

    def evaluate(self) -> dict[str, float]:
        return {}

    def after_step(self, step: int) -> None:
        pass

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class TrainingLoop:
    def __init__(self, run: StageRun, state: LoopState, total_steps: int, stage: LoopStage):
        self.run, self.state, self.total_steps, self.stage = run, state, total_steps, stage
        self.train_cfg = run.cfg.train
        self.step = 0
        # The evaluation after the last step, once there is one (`finish` may read it).
        self.final_eval: dict[str, float] = {}

    # -- cadence ---------------------------------------------------------------------------------
    def log_due(self) -> bool:
        return self.step % self.train_cfg.log_every == 0 or self.step == self.total_steps

    def eval_due(self) -> bool:
        # Not at the last step: the final evaluation follows it.
        every = self.train_cfg.eval_every
        return every > 0 and self.step % every == 0 and self.step != self.total_steps

    def save_due(self) -> bool:
        every = self.train_cfg.save_every
        return every > 0 and self.step % every == 0

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> None:
        # Every rank's RNG state (rank 0 alone writes): each rank samples from its own stream.
        rng, rng_tensors = ckpt.split_rng_ranks(all_gather_object(ckpt.capture_rng(), self.run.dist))
        # Under FSDP the weights and the optimizer state are shards: gathered to full tensors (every rank
        # takes part), so the files are a ddp run's and resume on any number of ranks (ppo_cli/fsdp.py).
        objects = {
            "optimizer": fsdp.full_tensors(self.state.optimizer.state_dict()),
            "scheduler": self.state.scheduler.state_dict(),
            **rng_tensors,
        }
        state = {"data": self.state.data.state_dict(), **rng, **self.stage.extra_state()}
        fsdp.to_shards(self.state.module)  # the shards, not gathered copies an evaluation left behind
        trainable = fsdp.full_tensors(ckpt.trainable_state(self.state.module))
        self.run.save_checkpoint(self.step, trainable, objects, state)

    def restore(self) -> None:
        loaded = ckpt.load_checkpoint(self.run.resume_from)
        ckpt.load_trainable_state(self.state.module, loaded.trainable, str(loaded.path))
        # Full tensors on disk; under FSDP each rank keeps its shard of them.
        optimizer_state = fsdp.shard_optimizer_state(self.state.optimizer, loaded.objects["optimizer"])
        self.state.optimizer.load_state_dict(optimizer_state)
        self.state.scheduler.load_state_dict(loaded.objects["scheduler"])
        follow_schedule(self.state.scheduler)
        self.state.data.load_state_dict(loaded.state["data"])
        self.stage.load_extra_state(loaded.state)
        self.restore_rng(loaded)
        self.step = loaded.step

    def restore_rng(self, loaded: ckpt.Checkpoint) -> None:
        """This rank's RNG state from the checkpoint. A checkpoint written by another number of ranks
        cannot give every rank its stream back: rank 0 continues its own and the others start from their
        seed mixed with the step (not their first steps' random numbers again), with a note."""
        rank, world = self.run.dist.rank, self.run.dist.world_size
        saved = ckpt.saved_rng_ranks(loaded.state)
        if saved == world or rank == 0:
            ckpt.restore_rng(ckpt.rank_rng(loaded.state, loaded.objects, rank))
        else:
            ckpt.seed_everything(self.run.seed + loaded.step)
        if saved != world:
            self.run.logger.warn(
                f"the checkpoint holds the random state of {saved} rank(s) and this run has {world}: rank 0 "
                "continues its own, any other rank starts from a fresh seed, so the samples differ from "
                "those of an uninterrupted run."
            )

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, summary: dict[str, Any], weights_dtype: torch.dtype) -> dict[str, float]:
        run, logger = self.run, self.run.logger
        if run.resume_from is not None:
            self.restore()
        else:
            ckpt.seed_everything(run.seed)
        sharding = fsdp.describe(self.state.module, run.dist, fsdp.loads_on_rank0(run.cfg, run.dist))
        logger.start(self.total_steps, self.step, {**summary, **sharding})
        self.stage.start()
        kernel = attention_kernel(run.device, self.train_cfg.mixed_precision, weights_dtype)
        with kernel:  # for the whole loop, backward passes included: see attention_kernel
            try:
                while self.step < self.total_steps:
                    self.stage.train_step(self.step + 1)
                    self.step += 1
                    logger.advance(self.step)
                    metrics = dict(self.stage.log_metrics(self.step)) if self.log_due() else {}
                    if self.eval_due():
                        metrics.update(self.stage.evaluate())
                    if metrics:
                        logger.log(self.step, metrics)
                    self.stage.after_step(self.step)
                    stop = any_flag(run.stop.requested, run.dist)
                    if self.save_due() or stop:
                        self.save()
                    if stop:
                        logger.close_progress()
                        logger.flush()  # plots/ and TensorBoard up to the stop
                        logger.print(f"[bold]{run.stopped_message(self.step)}[/]")
                        raise SystemExit(run.stop.exit_code)
                self.final_eval = self.stage.evaluate()
                if self.final_eval:
                    logger.log(self.step, self.final_eval)
                self.save()
                self.stage.finish()
            finally:
                logger.close_progress()
        return self.final_eval
