"""A loader over features held in memory: the cached-feature linear probe trains its head
on these instead of re-running the frozen encoder every epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class FeatureLoader:
    """Batches of this rank's (features, labels), shuffled by (seed, epoch); the same
    interface as ``ShardLoader`` so the shared loop can train on it."""

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int = 0,
        shuffle: bool = True, batches_per_epoch: int | None = None,
    ) -> None:  # fmt: skip
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} features but {len(labels)} labels")
        self.features, self.labels = features, labels
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch, self.skip = 0, 0
        self._batches = -(-len(features) // batch_size)
        self._even = batches_per_epoch  # the fewest any rank has, when ranks hold different counts

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def batches_per_epoch(self, epoch: int) -> int:
        return self._batches if self._even is None else self._even

    def unseen_per_epoch(self, epoch: int) -> int:
        return 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self.features)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        else:
            order = torch.arange(n)
        for start in range(self.skip * self.batch_size, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield {"image": self.features[idx], "label": self.labels[idx], "worker": 0, "skipped": {}}
