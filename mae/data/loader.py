"""The training and evaluation loaders over shards: ``set_epoch`` makes the epoch's plan,
iterating runs the steps (``steps.py``) in DataLoader workers.

Loaders are never passed through ``accelerator.prepare``: the split by rank happens in the
plan, once.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from .batch_slots import BatchSlots, SlotRef
from .plan import EpochPlanner, Position, reading_workers
from .shards import DataError, expand_shards, shard_sizes
from .steps import (
    Collate,
    DecodeImages,
    FillToPlan,
    KeepUnread,
    SampleShuffle,
    ShardStream,
    SkipCounter,
    SkipTrained,
    StreamContext,
    TagBatches,
    TarSamples,
    ignore_stop_signals,
)
from .transforms import BytesTransform, Transform


@dataclass
class DataConfig:
    """Where the shards are and how to read them."""

    train: str = "shards/cifar10/train-{000000..000007}.tar"  # brace pattern, glob, folder, URL; "::" joins
    val: str = "shards/cifar10/test-{000000..000003}.tar"  # "" for none
    shuffle: bool = True  # shuffle shards and samples (seeded by seed and epoch)
    num_workers: int = 2  # loader processes per training process
    shuffle_buffer: int = 1000  # samples held for shuffling
    resampled: bool = False  # draw shards with replacement, a fixed samples_per_epoch
    samples_per_epoch: int | None = None  # needed when resampled or when the shards are remote (URLs)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be positive, got {self.samples_per_epoch}")


class ShardLoader:
    """An epoch-aware loader over shards: ``set_epoch(e)`` then iterate.

    ``batches_per_epoch`` is this epoch's plan, the same on every rank: the fewest
    batches any rank gets (finite mode, from the shard sizes) or the resampled budget.
    With ``fill_to_plan`` (training) every rank delivers at least that many, corrupt
    samples or not; without it a finite epoch reads what the shards hold, once.
    Batches are ``{"image", "label"}``; ``data_counts`` tells what was skipped and converted.
    """

    def __init__(
        self,
        spec: str | list[str],
        transform: Transform,
        *,
        batch_size: int,
        num_workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        every_reader_needs_a_shard: bool = True,
        fill_to_plan: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        """``cache_dir`` (the run's output folder) keeps the header counts of shards without an
        index when their own folder is read-only."""
        urls = expand_shards(spec)
        self.urls, self.batch_size, self.num_workers = urls, batch_size, num_workers
        sizes = shard_sizes(urls, cache_dir)
        readers = world_size * max(1, num_workers)
        if resampled:
            if samples_per_epoch is None:
                if sizes is None:
                    raise DataError("data.resampled over remote shards needs data.samples_per_epoch")
                samples_per_epoch = sum(sizes.values())
        else:
            # Training needs every rank busy (ranks step together); evaluation can leave one idle.
            if len(urls) < readers and every_reader_needs_a_shard:
                if len(urls) < world_size:
                    raise DataError(
                        f"{len(urls)} shard(s) cannot feed {world_size} process(es) in a finite epoch: each "
                        "process needs a shard of its own. Build more shards (python -m shards build "
                        "--samples-per-shard N, N at most samples / processes), run fewer processes, "
                        "or set data.resampled=true."
                    )
                self.num_workers = reading_workers(len(urls), world_size, num_workers, resampled)
                if rank == 0:
                    print(f"warning: {len(urls)} shard(s) feed {world_size} process(es) x {self.num_workers} "
                          f"loader worker(s), not the {num_workers} of data.num_workers; more shards would read "
                          "faster", file=sys.stderr)  # fmt: skip
            if sizes is None and samples_per_epoch is None:
                raise DataError("remote shards (URLs) cannot be counted before reading them; "
                                "set data.samples_per_epoch")  # fmt: skip
            if sizes is not None:
                samples_per_epoch = sum(sizes.values())
        self.samples_per_epoch = samples_per_epoch
        self.planner = EpochPlanner(
            tuple(urls), sizes, world_size, max(1, self.num_workers), batch_size, seed, shuffle,
            shuffle_buffer if shuffle else 0, resampled, samples_per_epoch or 0, fill_to_plan and not resampled,
        )  # fmt: skip
        self.ctx = StreamContext(seed=seed, rank=rank, plan=self.planner.plan(0, rank))
        self.counter = SkipCounter()
        self.transform, self.collate = transform, Collate()
        self._counts: dict[int, dict[str, dict[str, int]]] = {}
        self._pipeline = wds.DataPipeline(
            ShardStream(self.ctx, resampled),
            self.counter.reading,
            TarSamples(self.counter.tar_error),
            KeepUnread(self.ctx),
            SampleShuffle(self.ctx, self.planner.shuffle_buffer),
            SkipTrained(self.ctx, batch_size),
            DecodeImages(transform, self.counter, self.ctx),
            FillToPlan(self.ctx, batch_size),
            wds.batched(batch_size, collation_fn=self.collate, partial=True),
            TagBatches(self.counter, self.ctx),
        )

    @property
    def sizes(self) -> dict[str, int] | None:
        return self.planner.sizes

    def rank_batches(self, epoch: int, rank: int) -> int:
        """Batches ``rank`` reads in ``epoch`` (finite mode with known sizes)."""
        return int(self.planner.rank_batches(epoch, rank))

    def batches_per_epoch(self, epoch: int) -> int:
        """Micro-batches of each rank in ``epoch``, read from its start, in this world."""
        return self.planner.batches_per_epoch(epoch)

    def unseen_per_epoch(self, epoch: int) -> int:
        """Samples the slowest-ending ranks leave unread when ranks get unequal shares."""
        return self.planner.unseen_per_epoch(epoch)

    def set_epoch(self, epoch: int, position: Position | None = None) -> None:
        """Read ``epoch`` from its start, or from where a stopped run left it (``position``).

        With the stopped run's world size, batch size and workers, the batches are those of
        an uninterrupted read, and nothing it took is decoded again: exact unless a sample
        among those taken is undecodable or image-less (dropped after the count, which cannot
        be known without decoding). With another shape, none of the samples it took is read,
        and each rank yields the epoch's remaining batches in this world."""
        if position is not None and position.batches > 0 and not self.planner.same_shape(position):
            if self.planner.sizes is None and not self.planner.resampled:
                raise DataError(
                    f"resuming mid-epoch on {self.planner.world} process(es) x batch {self.batch_size} from a run of "
                    f"{position.world} x {position.batch_size} needs the shard sizes, which remote shards do not "
                    "give: resume with the stopped run's processes and batch_size"
                )
        self.ctx.plan = self.planner.plan(epoch, self.ctx.rank, position)

    def data_counts(self) -> dict[str, dict[str, int]]:
        """This rank's samples skipped (by reason) and converted to RGB (by mode) in the batches
        taken since ``set_epoch``."""
        totals: dict[str, Counter] = {"skipped": Counter(), "converted": Counter()}
        for counts in self._counts.values():
            for kind, total in totals.items():
                total.update(counts[kind])
        return {kind: dict(sorted(total.items())) for kind, total in totals.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A fresh generator per epoch fixes the workers' seeds, hence the augmentations,
        # so a run resumed at an epoch boundary sees exactly the same pixels.
        gen = torch.Generator().manual_seed(hash((self.ctx.seed, self.ctx.epoch, self.ctx.rank)) & 0x7FFFFFFF)
        prefetch = 4
        self.collate.slots = None
        if self.num_workers and isinstance(self.transform, BytesTransform):  # uint8 [3, size, size] images
            shape = (self.num_workers, prefetch + 1, self.batch_size, self.transform.size)
            if BatchSlots.fit(*shape):
                self.collate.slots = BatchSlots(*shape)  # fresh per epoch: no slot outlives its workers
        pin = torch.cuda.is_available()
        loader = DataLoader(
            self._pipeline, batch_size=None, num_workers=self.num_workers, generator=gen, pin_memory=pin,
            persistent_workers=False, prefetch_factor=prefetch if self.num_workers else None,
            worker_init_fn=ignore_stop_signals,
        )  # fmt: skip
        self.counter.clear()  # counts are per epoch; workers get a fresh copy anyway
        self._counts = {}
        return self._batches(iter(loader), self.collate.slots, pin)

    def _batches(self, batches: Iterator[dict[str, Any]], slots: BatchSlots | None, pin: bool) -> Iterator[dict[str, Any]]:
        for batch in batches:
            image = batch["image"]
            if isinstance(image, SlotRef):
                image = slots.take(image, pin)
            # each worker's counts so far ride on its batches; the latest of each is the epoch's
            self._counts[batch["worker"]] = {"skipped": batch["skipped"], "converted": batch["converted"]}
            yield {"image": image, "label": batch["label"]}


def make_loaders(
    d: DataConfig, train_transform: Transform, val_transform: Transform, *, batch_size: int, seed: int,
    rank: int, world_size: int, cache_dir: str | os.PathLike | None = None,
) -> tuple[ShardLoader, ShardLoader | None]:  # fmt: skip
    """The train loader (shuffled as configured) and the val loader (in order, one worker), or
    None without val. ``cache_dir``: where the header counts of read-only shard folders go."""
    train = ShardLoader(d.train, train_transform, batch_size=batch_size, num_workers=d.num_workers, rank=rank,
                        world_size=world_size, seed=seed, shuffle=d.shuffle, shuffle_buffer=d.shuffle_buffer,
                        resampled=d.resampled, samples_per_epoch=d.samples_per_epoch, fill_to_plan=True,
                        cache_dir=cache_dir)  # fmt: skip
    val = None
    if d.val:
        val = ShardLoader(d.val, val_transform, batch_size=batch_size, num_workers=min(1, d.num_workers),
                          rank=rank, world_size=world_size, seed=seed, shuffle=False,
                          every_reader_needs_a_shard=False, cache_dir=cache_dir)  # fmt: skip
    return train, val
