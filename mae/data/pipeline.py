"""The streaming reader: a ``webdataset.DataPipeline`` of named steps.

    ShardStream      shard list -> shuffled (seed, epoch), split by rank, split by worker
                     (finite mode), or an endless seeded draw of shards (resampled mode)
    TarSamples       tar members grouped into samples; unreadable tars skipped and counted
    SampleShuffle    buffered shuffle seeded by (seed, epoch, rank, worker)
    SkipTrained      numbers the samples; drops those a resumed run already trained on, undecoded
    DecodeImages     bytes -> transform (uint8 pixels), the random draws seeded by the
                     sample's number; undecodable or image-less samples counted
    FillToPlan       (training, finite mode) exactly the worker's planned samples: what
                     corrupt samples took is refilled with repeats of its latest ones
    batched          stacked batches; the last one of each worker may be partial
    TagBatches       each batch carries its worker id and that worker's counts: samples
                     skipped (by reason) and kept after a colour-mode conversion (by mode)

Rank and world size are given, not discovered, so the same pipeline serves one process,
many processes and tests. Loaders are never passed through ``accelerator.prepare``: the
split by rank happens here, once.
"""

from __future__ import annotations

import glob
import math
import os
import random
import re
import signal
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch_slots import BatchSlots, SlotRef
from .decode import UndecodableImage, decode_with_mode, image_key
from .plan import Position
from .shard_index import find_indexes
from .tar_members import read_members
from .transforms import BytesTransform, Transform

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "hf://")


@dataclass
class DataConfig:
    """Where the shards are and how to read them."""

    train: str = "shards/cifar10/train-{000000..000007}.tar"  # brace pattern, glob, folder, URL; "::" joins
    val: str = "shards/cifar10/test-{000000..000003}.tar"  # "" for none
    shuffle: bool = True  # shuffle shards and samples (seeded by seed and epoch)
    num_workers: int = 2  # loader processes per training process
    shuffle_buffer: int = 1000  # samples held for shuffling
    resampled: bool = False  # draw shards with replacement, a fixed samples_per_epoch
    samples_per_epoch: int | None = None  # needed when resampled or when shards have no index

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be positive, got {self.samples_per_epoch}")


class DataError(ValueError):
    """Shards that cannot make an epoch: missing files, too few shards for the readers."""


# ----------------------------------------------------------------------- shard lists


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns (``train-{000000..000127}.tar``), ``::``-joined lists, globs and
    directories of local tars, and URLs webdataset opens (``pipe:``, ``http(s)://``)."""
    parts = spec if isinstance(spec, list) else [spec]
    urls: list[str] = []
    for part in parts:
        for url in wds.shardlists.expand_urls(part):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
            elif os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar")))
                if not found:
                    raise DataError(f"shard folder {url} holds no .tar files")
                urls += found
            elif any(c in url for c in "*?["):
                found = sorted(glob.glob(url))
                if not found:
                    raise DataError(f"no shard matches {url!r} (relative to {os.getcwd()})")
                urls += found
            elif not os.path.exists(url):
                raise DataError(f"shard {url} does not exist (relative paths start at {os.getcwd()})")
            else:
                urls.append(url)
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    return urls


def shard_classes(spec: str | list[str]) -> list[str] | None:
    """Class names from the index beside the first local shard; None when unlabelled or unindexed."""
    url = expand_shards(spec)[0]
    if url.startswith(REMOTE_PREFIXES):
        return None
    name = Path(url).name
    for index in find_indexes(Path(url).parent):
        if name in index.counts():
            return index.classes
    return None


def shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from the ``*-index.json`` files next to local shards; None when
    any shard is remote or unindexed (the epoch length must then be given)."""
    sizes: dict[str, int] = {}
    by_folder: dict[str, dict[str, int]] = {}
    for url in urls:
        if url.startswith(REMOTE_PREFIXES):
            return None
        folder = str(Path(url).parent)
        if folder not in by_folder:
            by_folder[folder] = {}
            for index in find_indexes(folder):
                by_folder[folder].update(index.counts())
        name = Path(url).name
        if name not in by_folder[folder]:
            return None
        sizes[url] = by_folder[folder][name]
    return sizes


# ------------------------------------------------------------------------ the steps


@dataclass
class StreamContext:
    """What every step needs to seed and split itself; pickled into each worker per epoch."""

    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    skip_batches: tuple[int, ...] = ()  # per worker: batches a resumed run already trained on
    # The DataLoader takes its first batch from its worker process 0; a resumed run whose next
    # batch belongs to worker k lets process i play worker (i + k) % workers, which keeps the
    # uninterrupted run's order of batches.
    worker_offset: int = 0

    def skipped(self, worker: int) -> int:
        return self.skip_batches[worker] if worker < len(self.skip_batches) else 0

    def worker(self) -> tuple[int, int]:
        """(the worker this process plays, workers): every step splits and seeds itself by it."""
        info = get_worker_info()
        return ((info.id + self.worker_offset) % info.num_workers, info.num_workers) if info is not None else (0, 1)

    def rng(self, purpose: str) -> random.Random:
        worker, _ = self.worker()
        return random.Random(f"{purpose}/{self.seed}/{self.epoch}/{self.rank}/{worker}")


def finite_assignment(urls: list[str], ctx: StreamContext, num_workers: int, shuffle: bool) -> list[list[str]]:
    """Shards of each worker of ``ctx.rank`` this epoch: every shard goes to exactly one
    (rank, worker). The same function plans the epoch length and feeds the stream."""
    order = list(urls)
    if shuffle:
        random.Random(f"shards/{ctx.seed}/{ctx.epoch}").shuffle(order)  # the same on every rank
    mine = order[ctx.rank :: ctx.world_size]
    return [mine[w::num_workers] for w in range(num_workers)]


class ShardStream(IterableDataset):
    """First step: yields ``{"url": ...}`` for the shards this rank and worker read."""

    def __init__(self, urls: list[str], ctx: StreamContext, shuffle: bool, resampled: bool) -> None:
        self.urls, self.ctx, self.shuffle, self.resampled = urls, ctx, shuffle, resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = self.ctx.worker()
        if self.resampled:
            rng = self.ctx.rng("resample")
            while True:  # the epoch length is cut by TagBatches' batch budget
                yield {"url": rng.choice(self.urls)}
        for url in finite_assignment(self.urls, self.ctx, num_workers, self.shuffle)[worker]:
            yield {"url": url}


@dataclass
class SkipCounter:
    """Per-worker counts: samples dropped, by reason, and samples kept after a colour-mode
    conversion to RGB, by stored mode; kept apart so that ``skipped`` means lost."""

    counts: Counter = field(default_factory=Counter)  # skipped, by reason
    converted: Counter = field(default_factory=Counter)  # kept, by mode (L, CMYK, RGBA, P, I;16...)
    bad_shards: set = field(default_factory=set)
    current: str = ""  # the shard being read, noted by ``reading``

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

    META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples

    def __init__(self, handler: Callable[[Exception], bool]) -> None:
        self.handler = handler

    def _members(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for shard in wds.tariterators.url_opener(shards, handler=self.handler):
            try:
                try:
                    for name, data in read_members(shard["stream"]):
                        if not self.META.match(name):
                            yield {"fname": name, "data": data, "__url__": shard["url"]}
                finally:
                    shard["stream"].close()  # a pipe: its command's failure shows here
            except Exception as exn:
                if not self.handler(exn):
                    raise
            yield {}  # the shard's end: its last sample is complete

    def __call__(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        return wds.tariterators.group_by_keys(self._members(shards), handler=self.handler)


class SampleShuffle:
    def __init__(self, ctx: StreamContext, bufsize: int) -> None:
        self.ctx, self.bufsize = ctx, bufsize

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.bufsize <= 1:
            yield from src
            return
        rng, buf = self.ctx.rng("samples"), []
        for sample in src:
            buf.append(sample)
            if len(buf) >= self.bufsize:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class SkipTrained:
    """Numbers each sample of this worker's epoch stream (``__number__``) and drops the
    first ones, which a run resumed mid-epoch has already trained on, before anything
    decodes them. The shuffle before it never looks at pixels, so the stream, and with
    it every later batch, is the uninterrupted run's."""

    def __init__(self, ctx: StreamContext, batch_size: int) -> None:
        self.ctx, self.batch_size = ctx, batch_size

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        skip = self.ctx.skipped(self.ctx.worker()[0]) * self.batch_size
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
    """Each worker delivers exactly the samples planned for it (its shards' indexed count,
    or its share of ``samples_per_epoch``), so every rank gets the batches the epoch was
    planned with even when corrupt samples are skipped, and ranks never need to ask each
    other whether one ran out. A shortfall is refilled by cycling through the worker's
    latest ``batch_size`` samples (the skip counts already report it); a surplus is cut."""

    def __init__(self, urls: list[str], sizes: dict[str, int] | None, ctx: StreamContext, shuffle: bool,
                 batch_size: int, rank_batches: int) -> None:  # fmt: skip
        self.urls, self.sizes, self.ctx, self.shuffle = urls, sizes, ctx, shuffle
        self.batch_size, self.rank_batches = batch_size, rank_batches

    def planned(self, worker: int, num_workers: int) -> tuple[int, list[str]]:
        """(samples, shards) of this worker this epoch."""
        shards = finite_assignment(self.urls, self.ctx, num_workers, self.shuffle)[worker]
        if self.sizes is not None:
            return sum(self.sizes[u] for u in shards), shards
        share = self.rank_batches // num_workers + (worker < self.rank_batches % num_workers)
        return share * self.batch_size, shards

    def __call__(self, src: Iterator[tuple[torch.Tensor, int]]) -> Iterator[tuple[torch.Tensor, int]]:
        worker, num_workers = self.ctx.worker()
        want, shards = self.planned(worker, num_workers)
        want -= self.ctx.skipped(worker) * self.batch_size  # a resumed run's SkipTrained dropped these
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
            raise DataError(f"rank {self.ctx.rank} could decode no sample from its shards {shards}: "
                            "nothing to fill its planned batches with")  # fmt: skip
        for i in range(want):
            yield recent[i % len(recent)]


class TagBatches:
    """Last step: dict batches with the worker's skip and conversion counts; caps a resampled epoch."""

    def __init__(self, counter: SkipCounter, ctx: StreamContext, batches_per_rank: int | None) -> None:
        self.counter, self.ctx, self.batches_per_rank = counter, ctx, batches_per_rank

    def __call__(self, src: Iterator[tuple]) -> Iterator[dict[str, Any]]:
        worker, num_workers = self.ctx.worker()
        budget = math.inf
        if self.batches_per_rank is not None:  # spread the rank's batches over its workers
            budget = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
        for i, (images, labels) in enumerate(src, start=self.ctx.skipped(worker)):
            if i >= budget:
                return
            yield {"image": images, "label": labels, "worker": worker, "skipped": dict(self.counter.counts),
                   "converted": dict(self.counter.converted)}  # fmt: skip


def _ignore_stop_signals(worker_id: int) -> None:
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


# ----------------------------------------------------------------------------- loader


class ShardLoader:
    """An epoch-aware loader over shards: ``set_epoch(e)`` then iterate.

    ``batches_per_epoch`` is this epoch's plan, the same on every rank: the fewest
    batches any rank gets (finite mode, from the shard index) or the resampled budget.
    With ``fill_to_plan`` (training) every rank delivers at least that many, corrupt
    samples or not; without it a finite epoch reads what the shards hold, once.
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
    ) -> None:
        self.urls = expand_shards(spec)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.ctx = StreamContext(seed=seed, rank=rank, world_size=world_size)
        self.shuffle, self.resampled = shuffle, resampled
        self.sizes = shard_sizes(self.urls)
        readers = world_size * max(1, num_workers)
        if resampled:
            if samples_per_epoch is None:
                if self.sizes is None:
                    raise DataError("data.resampled needs data.samples_per_epoch: the shards have no index")
                samples_per_epoch = sum(self.sizes.values())
            self.samples_per_epoch = samples_per_epoch
        else:
            # Training needs every rank busy (ranks step together); evaluation can leave one idle.
            if len(self.urls) < readers and every_reader_needs_a_shard:
                if len(self.urls) < world_size:
                    raise DataError(
                        f"{len(self.urls)} shard(s) cannot feed {world_size} process(es) in a finite epoch: each "
                        "process needs a shard of its own. Build more shards (python -m shards build "
                        "--samples-per-shard N, N at most samples / processes), run fewer processes, "
                        "or set data.resampled=true."
                    )
                # Each loader worker reads whole shards: more workers than shards would idle.
                self.num_workers = len(self.urls) // world_size
                if rank == 0:
                    print(f"warning: {len(self.urls)} shard(s) feed {world_size} process(es) x {self.num_workers} "
                          f"loader worker(s), not the {num_workers} of data.num_workers; more shards would read "
                          "faster", file=sys.stderr)  # fmt: skip
            if self.sizes is None and samples_per_epoch is None:
                raise DataError(
                    "the shards have no index (<prefix>-index.json beside them) to count an epoch by; "
                    "set data.samples_per_epoch"
                )
            self.samples_per_epoch = samples_per_epoch if self.sizes is None else sum(self.sizes.values())
        self.counter = SkipCounter()
        self._counts_by_worker: dict[int, dict[str, dict[str, int]]] = {}
        self.transform, self.collate = transform, Collate()
        fill = [] if resampled or not fill_to_plan else [
            FillToPlan(self.urls, self.sizes, self.ctx, shuffle, batch_size, self._resampled_budget())
        ]  # fmt: skip
        self._pipeline = wds.DataPipeline(
            ShardStream(self.urls, self.ctx, shuffle, resampled),
            self.counter.reading,
            TarSamples(self.counter.tar_error),
            SampleShuffle(self.ctx, shuffle_buffer if shuffle else 0),
            SkipTrained(self.ctx, batch_size),
            DecodeImages(transform, self.counter, self.ctx),
            *fill,
            wds.batched(batch_size, collation_fn=self.collate, partial=True),
            TagBatches(self.counter, self.ctx, self._resampled_budget() if resampled else None),
        )

    def _resampled_budget(self) -> int:
        return max(1, self.samples_per_epoch // (self.ctx.world_size * self.batch_size))

    def _finite_worker_batches(self, epoch: int, rank: int) -> list[int]:
        ctx = StreamContext(self.ctx.seed, epoch, rank, self.ctx.world_size)
        assignment = finite_assignment(self.urls, ctx, max(1, self.num_workers), self.shuffle)
        return [math.ceil(sum(self.sizes[u] for u in shards) / self.batch_size) for shards in assignment]

    def rank_batches(self, epoch: int, rank: int) -> int:
        """Batches ``rank`` reads in ``epoch`` (finite mode with an index)."""
        return sum(self._finite_worker_batches(epoch, rank))

    def batches_per_epoch(self, epoch: int) -> int:
        if self.resampled:
            return self._resampled_budget()
        if self.sizes is None:
            return self._resampled_budget()  # an estimate from data.samples_per_epoch
        return min(self.rank_batches(epoch, r) for r in range(self.ctx.world_size))

    def unseen_per_epoch(self, epoch: int) -> int:
        """Samples the slowest-ending ranks leave unread when ranks get unequal shares."""
        if self.resampled or self.sizes is None:
            return 0
        per_rank = [self.rank_batches(epoch, r) for r in range(self.ctx.world_size)]
        return (sum(per_rank) - min(per_rank) * len(per_rank)) * self.batch_size

    def worker_batches(self, epoch: int) -> list[float]:
        """Batches each worker of this rank yields in ``epoch`` (inf where only the stream's end tells)."""
        workers = max(1, self.num_workers)
        if self.resampled:
            total = self._resampled_budget()
            return [total // workers + (w < total % workers) for w in range(workers)]
        if self.sizes is None:
            return [math.inf] * workers
        return list(self._finite_worker_batches(epoch, self.ctx.rank))

    def set_epoch(self, epoch: int, position: Position | None = None) -> None:
        """Read ``epoch`` from its start, or without its first ``skip_batches`` batches
        (a resumed run): the batches after them are those of an uninterrupted read.

        The DataLoader takes batches from its workers in turn, passing over a worker once
        it has run out, so the first ``skip_batches`` split over the workers as below.
        Exact when no sample among the skipped ones is undecodable or image-less (those
        are dropped after the count, which the skip cannot know without decoding them)."""
        self.ctx.epoch = epoch
        skip_batches = 0 if position is None else position.batches
        remaining = self.worker_batches(epoch)
        skips = [0] * len(remaining)
        left, last = skip_batches, -1
        while left > 0 and any(r > 0 for r in remaining):
            for w in range(len(remaining)):
                if left > 0 and remaining[w] > 0:
                    skips[w] += 1
                    remaining[w] -= 1
                    left -= 1
                    last = w
        self.ctx.skip_batches = tuple(skips)
        # the worker whose batch comes next: the first after ``last``, in turn, with batches left
        n = len(remaining)
        self.ctx.worker_offset = next((w % n for w in range(last + 1, last + 1 + n) if remaining[w % n] > 0), 0)

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
            worker_init_fn=_ignore_stop_signals,
        )  # fmt: skip
        self.counter.counts.clear()  # counts are per epoch; workers get a fresh copy anyway
        self.counter.converted.clear()
        self.counter.bad_shards.clear()
        self._counts_by_worker = {}
        return self._batches(iter(loader), self.collate.slots, pin)

    def data_counts(self) -> dict[str, dict[str, int]]:
        """This rank's samples skipped (by reason) and converted to RGB (by mode) in the epoch read so far."""
        totals: dict[str, dict[str, int]] = {"skipped": {}, "converted": {}}
        for counts in self._counts_by_worker.values():
            for kind, by_key in counts.items():
                for key, n in by_key.items():
                    totals[kind][key] = totals[kind].get(key, 0) + n
        return totals

    def _batches(self, batches: Iterator[dict[str, Any]], slots: BatchSlots | None, pin: bool) -> Iterator[dict[str, Any]]:
        for batch in batches:
            if isinstance(batch["image"], SlotRef):
                batch["image"] = slots.take(batch["image"], pin)
            if "worker" in batch:
                self._counts_by_worker[batch["worker"]] = {"skipped": batch["skipped"], "converted": batch["converted"]}
            yield {"image": batch["image"], "label": batch["label"]}


def make_loaders(
    d: DataConfig, train_transform: Transform, val_transform: Transform, *, batch_size: int, seed: int,
    rank: int, world_size: int,
) -> tuple[ShardLoader, ShardLoader | None]:  # fmt: skip
    """The train loader (shuffled as configured) and the val loader (in order, one worker), or None without val."""
    train = ShardLoader(d.train, train_transform, batch_size=batch_size, num_workers=d.num_workers, rank=rank,
                        world_size=world_size, seed=seed, shuffle=d.shuffle, shuffle_buffer=d.shuffle_buffer,
                        resampled=d.resampled, samples_per_epoch=d.samples_per_epoch, fill_to_plan=True)  # fmt: skip
    val = None
    if d.val:
        val = ShardLoader(d.val, val_transform, batch_size=batch_size, num_workers=min(1, d.num_workers),
                          rank=rank, world_size=world_size, seed=seed, shuffle=False,
                          every_reader_needs_a_shard=False)  # fmt: skip
    return train, val
