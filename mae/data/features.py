"""Features held in memory, for the cached-feature linear probe: it encodes the training
set once and trains its head on these (``mae.linprobe.fit_head_on_features``, a loop of its
own) instead of re-running the frozen encoder every epoch."""

from __future__ import annotations

import torch


class CachedFeatures:
    """All ranks' (features, labels) on one device, and each epoch's shuffle of them: one
    gather per epoch whose consecutive ``batch_size`` slices are that epoch's batches."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:  # fmt: skip
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} features but {len(labels)} labels")
        self.features, self.labels = features, labels
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle

    @property
    def batches_per_epoch(self) -> int:
        """Batches of ``batch_size`` in an epoch, the last one possibly short."""
        return -(-len(self.features) // self.batch_size)

    def shuffled(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All (features, labels) in ``epoch``'s order (seeded by seed and epoch), or as stored
        without shuffling."""
        if not self.shuffle:
            return self.features, self.labels
        order = torch.randperm(len(self.features), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        order = order.to(self.features.device)
        return self.features[order], self.labels[order]
