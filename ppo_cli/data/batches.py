"""Padding token lists into tensors, and a shuffled batch order that can be resumed exactly."""

from __future__ import annotations

import math

import torch


def pad_right(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def pad_left(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + s for s in sequences], dtype=torch.long)


class EpochBatches:
    """Shuffled batches of indices, reshuffled each epoch with (seed, epoch); resumable from (epoch, offset).

    The state is just two integers, so a resumed run sees exactly the batches the uninterrupted run
    would have seen. An epoch's last batch is short, dropped (drop_last), or topped up to full size from
    the start of the same epoch's order (pad_last, as torch's DistributedSampler pads). Training pads:
    each rank takes a slice of one global batch, and a short one would give ranks unequal or empty
    slices, so their collectives would no longer match.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False, pad_last: bool = False):
        if n <= 0:
            raise ValueError("no examples")
        if drop_last and pad_last:
            raise ValueError("drop_last and pad_last exclude each other")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.drop_last, self.pad_last = drop_last, pad_last
        self.epoch, self.offset = 0, 0

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return max(1, self.n // self.batch_size)
        return math.ceil(self.n / self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        if self.offset >= self.batches_per_epoch():
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset * self.batch_size
        self.offset += 1
        order = self._order(self.epoch)
        batch = order[start : start + self.batch_size]
        if self.pad_last and len(batch) < self.batch_size:
            # The order's head is disjoint from its tail while n >= batch_size: no index twice in a batch.
            missing = self.batch_size - len(batch)
            batch += (order * math.ceil(missing / self.n))[:missing]
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
