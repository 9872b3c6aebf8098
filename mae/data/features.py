"""A loader over features held in memory: the cached-feature linear probe trains its head
on these instead of re-running the frozen encoder every epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .plan import Position


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

    def set_epoch(self, epoch: int, position: Position | None = None) -> None:
        """From ``epoch``'s start, or past the samples a stopped run took (``position``)."""
        taken = position.world * position.batch_size * position.batches if position else 0
        self.epoch, self.skip = epoch, taken // self.batch_size

    def data_counts(self) -> dict[str, dict[str, int]]:
        return {"skipped": {}, "converted": {}}  # features in memory: nothing to skip or convert

    def batches_per_epoch(self, epoch: int) -> int:
        return self._batches if self._even is None else self._even

    def unseen_per_epoch(self, epoch: int) -> int:
        return 0

    def shuffled(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All (features, labels) in ``epoch``'s order, one gather on their device; its
        consecutive slices are the epoch's batches."""
        n = len(self.features)
        if not self.shuffle:
            return self.features, self.labels
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        order = order.to(self.features.device)
        return self.features[order], self.labels[order]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        features, labels = self.shuffled(self.epoch)
        for start in range(self.skip * self.batch_size, len(features), self.batch_size):
            end = start + self.batch_size
            yield {"image": features[start:end], "label": labels[start:end]}
