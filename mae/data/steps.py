"""The steps of the streaming reader, a ``webdataset.DataPipeline``:

    ShardStream      the worker's shards from the epoch plan (finite mode), or an endless
                     seeded draw of shards (resampled mode)
    TarSamples       tar members grouped into samples; unreadable tars skipped and counted
    KeepUnread       (resumed on another world size) only the samples the plan left to read
    SampleShuffle    buffered shuffle seeded by (seed, epoch, rank, worker)
    SkipTrained      numbers the samples; drops those a resumed run already trained on, undecoded
    DecodeImages     bytes -> transform (uint8 pixels), the random draws seeded by the
                     sample's number; undecodable or image-less samples counted
    FillToPlan       (training) exactly the worker's planned samples: what corrupt samples
                     took is refilled with repeats of its latest ones
    batched          stacked batches; the last one of each worker may be partial
    TagBatches       caps the worker's batches at its plan; each batch carries its worker id
                     and that worker's counts, which ``ShardLoader`` takes off

Every step reads the epoch plan (``plan.py``) from the ``StreamContext`` instead of working
out its share itself. Rank and world size are given, not discovered, so the same pipeline
serves one process, many processes and tests.
"""

from __future__ import annotations

import random
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .batch_slots import BatchSlots, SlotRef
from .decode import UndecodableImage, decode_with_mode, image_key
from .plan import EpochPlan, WorkerPlan, in_ranges, shuffled, stream_rng
from .shards import META, DataError
from .tar_members import read_members
from .transforms import BytesTransform, Transform


@dataclass
class StreamContext:
    """What every step needs to seed and split itself; pickled into each worker per epoch."""

    seed: int = 0
    rank: int = 0
    plan: EpochPlan = field(default_factory=lambda: EpochPlan(0, 0, (WorkerPlan((), None, 0),)))

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    def worker(self) -> tuple[int, WorkerPlan]:
        """(the worker this process plays, its plan): every step splits and seeds itself by it."""
        info = get_worker_info()
        worker = (info.id + self.plan.first_worker) % info.num_workers if info is not None else 0
        return worker, self.plan.workers[worker]

    def rng(self, purpose: str) -> random.Random:
        return stream_rng(purpose, self.seed, self.epoch, self.rank, self.worker()[0])


class ShardStream(IterableDataset):
    """First step: yields ``{"url": ...}`` for the shards this rank and worker read."""

    def __init__(self, ctx: StreamContext, resampled: bool) -> None:
        self.ctx, self.resampled = ctx, resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        _, plan = self.ctx.worker()
        if self.resampled:
            rng = self.ctx.rng("resample")
            while True:  # the epoch length is cut by TagBatches at the plan's batches
                yield {"url": rng.choice(plan.shards)}
        for url in plan.shards:
            yield {"url": url}


@dataclass
class SkipCounter:
    """Per-worker counts: samples dropped, by reason, and samples kept after a colour-mode
    conversion to RGB, by stored mode; kept apart so that ``skipped`` means lost."""

    counts: Counter = field(default_factory=Counter)  # skipped, by reason
    converted: Counter = field(default_factory=Counter)  # kept, by mode (L, CMYK, RGBA, P, I;16...)
    bad_shards: set = field(default_factory=set)
    current: str = ""  # the shard being read, noted by ``reading``

    def clear(self) -> None:
        """Counts are per epoch."""
        self.counts.clear()
        self.converted.clear()
        self.bad_shards.clear()

    def reading(self, src: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
        """Step before the tar reader: errors until the next shard is pulled belong to this one."""
        for shard in src:
            self.current = shard["url"]
            yield shard

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler: count the unreadable shard once, go on with the next.

        A tar cut mid-member is reported twice with different args (from inside the tar,
        "... @ <stream>", then from the shard loop with the url), so key on the shard read."""
        where = self.current or next(
            (a for a in getattr(exn, "args", ())[::-1] if isinstance(a, str) and a), repr(exn)
        )
        if where not in self.bad_shards:
            self.bad_shards.add(where)
            self.counts["unreadable_tar"] += 1
        return True


class TarSamples:
    """Second step: shard urls -> samples (member bytes by extension, ``__key__``), each
    member read in one call (``read_members``). A shard that cannot be opened or read goes
    to ``handler`` (counted once) and reading goes on with the next; the samples it gave
    before the fault are kept."""

    def __init__(self, handler: Callable[[Exception], bool]) -> None:
        self.handler = handler

    def _members(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for shard in wds.tariterators.url_opener(shards, handler=self.handler):
            try:
                try:
                    for name, data in read_members(shard["stream"]):
                        if not META.match(name):
                            yield {"fname": name, "data": data, "__url__": shard["url"]}
                finally:
                    shard["stream"].close()  # a pipe: its command's failure shows here
            except Exception as exn:
                if not self.handler(exn):
                    raise
            yield {}  # the shard's end: its last sample is complete

    def __call__(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        return wds.tariterators.group_by_keys(self._members(shards), handler=self.handler)


class KeepUnread:
    """A run resumed on another world size reads, of each shard, only the sample numbers its
    plan keeps (those the stopped run did not take, in this worker's share). Samples are
    numbered within their shard, counting those with an image, as the shard sizes count."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        keep = self.ctx.worker()[1].keep
        if keep is None:
            yield from src
            return
        url, number, wanted = None, 0, in_ranges(())
        for sample in src:
            if sample["__url__"] != url:
                url, number, wanted = sample["__url__"], 0, in_ranges(keep.get(sample["__url__"], ()))
            if image_key(sample) is None:
                yield sample  # counted as image-less further on
                continue
            if wanted(number):
                yield sample
            number += 1


class SampleShuffle:
    def __init__(self, ctx: StreamContext, bufsize: int) -> None:
        self.ctx, self.bufsize = ctx, bufsize

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        return shuffled(src, self.ctx.rng("samples"), self.bufsize)


class SkipTrained:
    """Numbers each sample of this worker's epoch stream (``__number__``) and drops the
    first ones, which a run resumed mid-epoch has already trained on, before anything
    decodes them. The shuffle before it never looks at pixels, so the stream, and with
    it every later batch, is the uninterrupted run's."""

    def __init__(self, ctx: StreamContext, batch_size: int) -> None:
        self.ctx, self.batch_size = ctx, batch_size

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        skip = self.ctx.worker()[1].taken * self.batch_size
        for number, sample in enumerate(src):
            if number >= skip:
                yield dict(sample, __number__=number)


class SampleSeeds:
    """The random state of each sample's augmentation, a function of (seed, epoch, rank,
    worker, sample number) alone, so a sample augments the same however many before it
    were decoded or skipped. torch, ``random`` and numpy are all seeded: torchvision draws
    from torch, timm's RandAugment from the other two."""

    def __init__(self, ctx: StreamContext) -> None:
        self.base = ctx.rng("augment").getrandbits(62)
        self.in_worker = get_worker_info() is not None

    def __call__(self, number: int, fn: Callable[..., Any], *args: Any) -> Any:
        seed = (self.base + number * 0x9E3779B97F4A7C15) % 2**62
        saved = None
        if not self.in_worker:  # in the training process: leave its random streams as they were
            saved = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return fn(*args)
        finally:
            if saved is not None:
                torch.random.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])


class DecodeImages:
    """Sample dict -> (image tensor, label); label -1 for unlabelled shards. A
    ``BytesTransform`` decodes the bytes itself (at the scale its crop needs); any other
    transform gets the fully decoded RGB image."""

    def __init__(self, transform: Transform, counter: SkipCounter, ctx: StreamContext) -> None:
        self.transform, self.counter, self.ctx = transform, counter, ctx

    def _decode(self, data: bytes) -> tuple[torch.Tensor, str]:
        if isinstance(self.transform, BytesTransform):
            return self.transform(data)
        img, mode = decode_with_mode(data)
        return self.transform(img), mode

    def __call__(self, src: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int]]:
        seeds = SampleSeeds(self.ctx)
        for sample in src:
            ext = image_key(sample)
            if ext is None:
                self.counter.counts["no_image"] += 1
                continue
            try:
                image, mode = seeds(sample["__number__"], self._decode, sample[ext])
            except UndecodableImage:
                self.counter.counts["undecodable"] += 1
                continue
            if mode != "RGB":
                self.counter.converted[mode] += 1
            label = -1
            if "cls" in sample:
                try:
                    label = int(sample["cls"])
                except ValueError:
                    self.counter.counts["bad_label"] += 1
                    continue
            yield image, label


class FillToPlan:
    """Each worker delivers exactly the samples its plan gives it (its shards' count, or its
    share of ``samples_per_epoch``), so every rank gets the batches the epoch was planned
    with even when corrupt samples are skipped, and ranks never need to ask each other
    whether one ran out. A shortfall is refilled by cycling through the worker's latest
    ``batch_size`` samples (the skip counts already report it); a surplus is cut."""

    def __init__(self, ctx: StreamContext, batch_size: int) -> None:
        self.ctx, self.batch_size = ctx, batch_size

    def __call__(self, src: Iterator[tuple[torch.Tensor, int]]) -> Iterator[tuple[torch.Tensor, int]]:
        _, plan = self.ctx.worker()
        if plan.samples is None:
            yield from src
            return
        want = plan.samples - plan.taken * self.batch_size  # a resumed run's SkipTrained dropped these
        if want <= 0:
            return
        recent: deque = deque(maxlen=self.batch_size)
        for sample in src:
            recent.append(sample)
            yield sample
            want -= 1
            if want == 0:
                return
        if not recent:
            raise DataError(f"rank {self.ctx.rank} could decode no sample from its shards {list(plan.shards)}: "
                            "nothing to fill its planned batches with")  # fmt: skip
        for i in range(want):
            yield recent[i % len(recent)]


class TagBatches:
    """Last step: caps the worker's batches at its plan, and tags each with the worker and
    its skip and conversion counts, which ``ShardLoader`` takes off before the loop sees them."""

    def __init__(self, counter: SkipCounter, ctx: StreamContext) -> None:
        self.counter, self.ctx = counter, ctx

    def __call__(self, src: Iterator[tuple]) -> Iterator[dict[str, Any]]:
        worker, plan = self.ctx.worker()
        for i, (images, labels) in enumerate(src, start=plan.taken):
            if i >= plan.batches:
                return
            yield {"image": images, "label": labels, "worker": worker, "skipped": dict(self.counter.counts),
                   "converted": dict(self.counter.converted)}  # fmt: skip


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to their rank, which checkpoints and then ends
    them; killed by the signal themselves, they would take the rank down first."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class Collate:
    """Samples -> (images, labels). In a loader worker, with ``slots`` set for the epoch,
    the images go into shared memory mapped once (``BatchSlots``) and only the slot is sent."""

    def __init__(self) -> None:
        self.slots: BatchSlots | None = None

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor | SlotRef, torch.Tensor]:
        images, labels = zip(*samples)
        labels = torch.tensor(labels, dtype=torch.long)
        if self.slots is not None and get_worker_info() is not None:
            return self.slots.put(images), labels
        return torch.stack(images), labels


