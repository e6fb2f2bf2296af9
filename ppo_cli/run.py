"""A stage's run: its output directory, process group, logger, resume point and stop requests.

Every stage (train_sft, train_rm, train_ppo) starts with `StageRun(cfg, stage)`; it decides where the
run writes (all ranks agree), refuses to overwrite another run, writes config.yaml, and knows which
checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
from pathlib import Path
from types import FrameType

import torch
from omegaconf import DictConfig, OmegaConf

from ppo_cli import checkpoint as ckpt
from ppo_cli import fsdp
from ppo_cli.dist import SEED_STRIDE, DistInfo, barrier, broadcast_object, check_in_sync, init_distributed
from ppo_cli.errors import UserError
from ppo_cli.logger import RunLogger
from ppo_cli.models import PRODUCT_FILE, check_quantization, resolve_device, write_product_info
from ppo_cli.models.devices import return_large_frees_to_os
from ppo_cli.resume_config import check_output_dir, resume_command, saved_stage, start_afresh

FINAL = "final"


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag the loop checks between steps (then checkpoint and
    exit); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.exit_code = 130  # 128 + the signal's number, as shells report it
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # signal.signal raises ValueError outside the main thread (e.g. a test runner's thread).
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.exit_code = 128 + signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
            "(send it again to stop at once).",
            file=sys.stderr,
        )


def validate_train(cfg: DictConfig) -> None:
    """Checks of the keys every stage shares, before anything loads or is written (torch would otherwise
    fail later with a traceback, e.g. AdamW on a negative train.lr)."""
    train = cfg.train
    for key in ("train.lr", "train.weight_decay", "ppo.value_lr"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{key}={value} must be a finite number >= 0.")
    if not 0 <= train.warmup_ratio <= 1:
        raise UserError(f"train.warmup_ratio={train.warmup_ratio} must be between 0 and 1.")
    if not math.isfinite(train.max_grad_norm):
        raise UserError(
            f"train.max_grad_norm={train.max_grad_norm} must be a finite number (0 = no clipping)."
        )
    eval_fraction = OmegaConf.select(cfg, "data.eval_fraction")
    if eval_fraction is not None and not 0 <= eval_fraction < 1:
        raise UserError(f"data.eval_fraction={eval_fraction} must be at least 0 and less than 1.")
    fsdp.check_fsdp(cfg)  # train.strategy=fsdp: no vLLM sampling, no quantized base
    # A 4/8-bit base: bitsandbytes present, a device it serves, LoRA on (quantized weights cannot train).
    check_quantization(cfg.model, train.device, lora_enabled=bool(cfg.lora.enabled))


class StageRun:
    def __init__(self, cfg: DictConfig, stage: str):
        validate_train(cfg)
        self.cfg = cfg
        self.stage = stage
        self.dist: DistInfo = init_distributed(cfg.train.device)
        # Model building (new LoRA weights, heads) draws from the shared seed, the same on every rank;
        # training then reseeds per rank (see `seed`).
        ckpt.seed_everything(int(cfg.train.seed))
        self.device = self._device()
        if self.device.type == "cpu" and fsdp.enabled(cfg, self.dist):
            return_large_frees_to_os()  # sharding is a choice for memory: RSS that follows the live tensors
        # All ranks must agree on one run directory: rank 0's resolved output_dir wins.
        self.output_dir = Path(broadcast_object(str(cfg.output_dir), self.dist))
        cfg.output_dir = str(self.output_dir)
        self.final_dir = self.output_dir / FINAL
        self.resume_from: Path | None = None
        self.stop = StopRequest()
        self.logger: RunLogger | None = None

    def _device(self) -> torch.device:
        device = resolve_device(self.cfg.train.device)
        if device.type == "cuda" and self.dist.enabled:
            return torch.device("cuda", self.dist.local_rank)
        return device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def seed(self) -> int:
        """This rank's seed: differs per rank (sampling, dropout); data order uses cfg.train.seed."""
        return int(self.cfg.train.seed) + self.dist.rank * SEED_STRIDE

    def is_complete(self) -> bool:
        return (self.final_dir / PRODUCT_FILE).is_file()

    def prepare(self) -> bool:
        """Check the output dir and pick the resume point. Returns False when the run is already complete."""
        check_output_dir(self.output_dir, self.stage)  # not a pipeline's directory, nor another stage's run
        existing = saved_stage(self.output_dir)
        if self.is_complete() and existing == self.stage and self.cfg.resume != "never":
            if self.is_main:
                print(
                    f"ppo-cli train-{self.stage}: {self.output_dir} already holds a complete run "
                    f"({self.final_dir}); nothing to do."
                )
            return False
        self.resume_from = ckpt.resolve_resume(self.output_dir, self.cfg.resume, self.stage)
        barrier(self.dist)
        return True

    def start(self, lora: str | None = None, data_tokens: int | None = None) -> RunLogger:
        """Create the output dir, write config.yaml, and open the logger (rank 0 writes).

        lora: the start panel's LoRA row (models.describe_lora of the model being trained); data_tokens: the
        longest sequence of the loaded examples, for the memory plan's row (plan.shape.longest_tokens)."""
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # From step 0 in a directory an earlier attempt left without a checkpoint: keep its records.
            afresh = start_afresh(self.output_dir) if self.resume_from is None else None
            if afresh:
                print(f"ppo-cli train-{self.stage}: {afresh}")
            resolved = OmegaConf.to_container(self.cfg, resolve=True)
            OmegaConf.save(
                OmegaConf.create({"stage": self.stage, **resolved}), self.output_dir / ckpt.RUN_MARKER
            )
        barrier(self.dist)
        memory_plan = None
        if self.is_main:
            from ppo_cli.plan.command import summary_row

            memory_plan = summary_row(self.cfg, self.stage, self.device, data_tokens)
        self.logger = RunLogger(
            self.output_dir, self.cfg, self.stage, enabled=self.is_main, lora=lora, memory_plan=memory_plan
        )
        self.stop.install()
        return self.logger

    def save_checkpoint(self, step: int, trainable, objects, state) -> None:
        check_in_sync(list(trainable.values()), self.dist)
        if self.is_main:
            ckpt.save_checkpoint(
                self.output_dir, step, trainable, objects, state, keep_last=self.cfg.train.keep_last
            )
        barrier(self.dist)

    def stopped_message(self, step: int) -> str:
        return (
            f"stopped at step {step} with a checkpoint in {self.output_dir / ckpt.CHECKPOINTS}. "
            f"Resume with: {resume_command(self.stage, self.output_dir)}"
        )

    def save_final(self, model, tokenizer, save_kwargs: dict | None = None, extra_save=None, **info) -> None:
        """Write the stage's product to final/ atomically (rank 0): the adapter (or full model), the
        tokenizer, `extra_save(dir)` if given, and ppo_cli.json last, which marks the product complete.

        A sharded model (train.strategy=fsdp) is saved from its gathered trainable tensors: every rank
        must call this then (the gathering is a collective), rank 0 alone writes."""
        import shutil

        gathered = fsdp.gathered_state(model)
        if not self.is_main:
            return
        if gathered is not None:
            save_kwargs = {**(save_kwargs or {}), "state_dict": gathered}
        tmp = self.output_dir / f".{FINAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True, **(save_kwargs or {}))
            tokenizer.save_pretrained(tmp)
            if extra_save is not None:
                extra_save(tmp)
            write_product_info(
                tmp, self.stage, self.cfg.model.name_or_path, lora=bool(self.cfg.lora.enabled), **info
            )
            ckpt.replace_dir(tmp, self.final_dir)
        except ckpt.WRITE_ERRORS as exc:  # e.g. disk full: the last checkpoint holds the finished weights
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"could not write {self.final_dir} ({ckpt.describe_write_error(exc, self.output_dir)}); "
                f"the run's last checkpoint in "
                f"{self.output_dir / ckpt.CHECKPOINTS} is intact. Free disk space, then rerun with "
                "resume=auto to write final/ from it."
            ) from exc

    def finish(self) -> None:
        self.stop.uninstall()


class TrainingDiverged(UserError):
    """Loss or gradients became NaN/inf: the run stops, keeping the last good checkpoint."""
