"""The epoch plan: which shards and samples each (rank, loader worker) reads, how many batches
it yields, and what a resumed run leaves out. Pure arithmetic on shard names and sizes, made
once per epoch by ``ShardLoader.set_epoch`` and read by every pipeline step, so the steps
never redo it.

Two kinds of resume:

- the same world size, batch size and workers: each worker drops the first batches of its
  shuffled stream that the stopped run took (undecoded), and the DataLoader starts at the
  worker whose batch came next, so the batches are the uninterrupted run's;
- any other shape: the samples the stopped run took are worked out by replaying its plan
  (shard assignment and shuffle buffer, on sample numbers), and the samples left are split
  over the new ranks and workers. The order cannot be the uninterrupted run's.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

T = TypeVar("T")
Ranges = tuple[tuple[int, int], ...]  # half-open [start, stop) runs of sample numbers in a shard


@dataclass(frozen=True)
class Position:
    """Where a run stopped inside an epoch; what the resumed loader must not read again."""

    world: int  # processes of the run that stopped
    batch_size: int  # its per-process batch
    num_workers: int  # its loader workers per process
    batches: int  # micro-batches each of its ranks had taken in this epoch


def share(n: int, parts: int, i: int) -> int:
    """Part ``i`` of ``n`` split as evenly as possible over ``parts``, the first ones one larger."""
    return n // parts + (i < n % parts)


def shuffled(items: Iterable[T], rng: random.Random, bufsize: int) -> Iterator[T]:
    """A buffered shuffle: the stream step, and the replay of a stopped run's stream."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        buf.append(item)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def stream_rng(purpose: str, seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    return random.Random(f"{purpose}/{seed}/{epoch}/{rank}/{worker}")


def round_robin(batches: list[float], taken: int) -> tuple[list[int], int]:
    """How the DataLoader's first ``taken`` batches fall on its workers (it asks them in turn,
    passing over those that ran out), and the worker whose batch comes next."""
    remaining, per_worker, last = list(batches), [0] * len(batches), -1
    while taken > 0 and any(r > 0 for r in remaining):
        for w in range(len(remaining)):
            if taken > 0 and remaining[w] > 0:
                per_worker[w] += 1
                remaining[w] -= 1
                taken -= 1
                last = w
    n = len(remaining)
    following = next((w % n for w in range(last + 1, last + 1 + n) if remaining[w % n] > 0), 0)
    return per_worker, following


def reading_workers(shards: int, world: int, num_workers: int, resampled: bool) -> int:
    """Loader workers per rank of a training loader: each reads whole shards, so never more
    than the shards give each rank (0 workers: the training process reads)."""
    if not resampled and world <= shards < world * max(1, num_workers):
        return shards // world
    return num_workers


@dataclass(frozen=True)
class WorkerPlan:
    """One loader worker's epoch."""

    shards: tuple[str, ...]  # read in this order (resampled: the shards drawn from)
    samples: int | None  # delivered, refilled or cut to this; None: what the shards hold
    batches: float  # yielded from the epoch's start; inf when only the stream's end tells
    taken: int = 0  # leading batches of its stream that the stopped run trained on: dropped undecoded
    keep: dict[str, Ranges] | None = None  # per shard, the sample numbers to read; None: all


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    rank: int
    workers: tuple[WorkerPlan, ...]
    # The DataLoader takes its first batch from its worker process 0; worker process i plays
    # plan worker (i + first_worker) % workers, which keeps the uninterrupted order on a resume.
    first_worker: int = 0

    def batches(self) -> float:
        """What this rank yields from here on."""
        return sum(w.batches - w.taken for w in self.workers)


@dataclass(frozen=True)
class EpochPlanner:
    """Everything the plan depends on: the shards, their sizes, and the readers."""

    urls: tuple[str, ...]
    sizes: dict[str, int] | None  # samples per shard; None when unknown (remote shards)
    world: int
    workers: int  # loader workers per rank, at least 1 (0 workers read in the training process)
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    samples_per_epoch: int = 0  # resampled, or unknown sizes: the epoch's length
    fill: bool = False  # training: every worker delivers exactly its planned samples
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    # -- the plan of an epoch read from its start

    def shard_order(self, epoch: int) -> list[str]:
        """The epoch's order of shards, the same on every rank."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        return order

    def assignment(self, epoch: int, rank: int) -> list[list[str]]:
        """Each worker's shards: every shard goes to exactly one (rank, worker)."""
        mine = self.shard_order(epoch)[rank :: self.world]
        return [mine[w :: self.workers] for w in range(self.workers)]

    def budget(self) -> int:
        """Batches per rank when the sizes do not tell: from ``samples_per_epoch``."""
        return max(1, self.samples_per_epoch // (self.world * self.batch_size))

    def fresh(self, epoch: int, rank: int) -> list[WorkerPlan]:
        key = (epoch, rank)
        if key not in self._cache and len(self._cache) >= 2 * self.world:
            self._cache.clear()  # the plans of this epoch and the last are the ones asked for
        if key not in self._cache:
            self._cache[key] = self._fresh(epoch, rank)
        return self._cache[key]

    def _fresh(self, epoch: int, rank: int) -> list[WorkerPlan]:
        if self.resampled:
            budget = self.budget()
            return [WorkerPlan(self.urls, None, share(budget, self.workers, w)) for w in range(self.workers)]
        plans = []
        for w, shards in enumerate(self.assignment(epoch, rank)):
            if self.sizes is not None:
                samples = sum(self.sizes[u] for u in shards)
                plans.append(WorkerPlan(tuple(shards), samples if self.fill else None,
                                        math.ceil(samples / self.batch_size)))  # fmt: skip
            elif self.fill:
                batches = share(self.budget(), self.workers, w)
                plans.append(WorkerPlan(tuple(shards), batches * self.batch_size, batches))
            else:
                plans.append(WorkerPlan(tuple(shards), None, math.inf))
        return plans

    def rank_batches(self, epoch: int, rank: int) -> float:
        return sum(w.batches for w in self.fresh(epoch, rank))

    def batches_per_epoch(self, epoch: int) -> int:
        """Micro-batches of every rank in ``epoch``: the fewest any rank has."""
        if self.resampled or self.sizes is None:
            return self.budget()
        return int(min(self.rank_batches(epoch, r) for r in range(self.world)))

    def unseen_per_epoch(self, epoch: int) -> int:
        """Samples the slowest-ending ranks leave unread when ranks get unequal shares."""
        if self.resampled or self.sizes is None:
            return 0
        per_rank = [int(self.rank_batches(epoch, r)) for r in range(self.world)]
        return (sum(per_rank) - min(per_rank) * len(per_rank)) * self.batch_size

    # -- the plan of an epoch a run resumes in

    def plan(self, epoch: int, rank: int, position: Position | None = None) -> EpochPlan:
        fresh = self.fresh(epoch, rank)
        if position is None or position.batches <= 0:
            return EpochPlan(epoch, rank, tuple(fresh))
        if self.same_shape(position):
            taken, following = round_robin([w.batches for w in fresh], position.batches)
            return EpochPlan(epoch, rank, tuple(replace(w, taken=t) for w, t in zip(fresh, taken)), following)
        return self._plan_rest(epoch, rank, position)

    def readers(self, world: int, num_workers: int) -> int:
        return max(1, reading_workers(len(self.urls), world, num_workers, self.resampled))

    def same_shape(self, position: Position) -> bool:
        return (position.world, position.batch_size, self.readers(position.world, position.num_workers)) == (
            self.world, self.batch_size, self.workers)  # fmt: skip

    def remaining_batches(self, epoch: int, position: Position) -> int:
        """Micro-batches per rank left after ``position``, in this world (the loop keeps the
        effective batch, so the samples taken are a whole number of this world's batches)."""
        taken = position.world * position.batch_size * position.batches
        return max(0, self.batches_per_epoch(epoch) - taken // (self.world * self.batch_size))

    def taken_samples(self, epoch: int, position: Position) -> dict[str, set[int]]:
        """Per shard, the numbers of the samples the stopped run had taken: its plan replayed,
        shuffle buffer included, on sample numbers instead of samples."""
        if self.sizes is None:
            raise ValueError("the samples taken can only be worked out from the shard sizes")
        old = replace(self, world=position.world, batch_size=position.batch_size,
                      workers=self.readers(position.world, position.num_workers), _cache={})  # fmt: skip
        taken: dict[str, set[int]] = {}
        for rank in range(old.world):
            fresh = old.fresh(epoch, rank)
            per_worker, _ = round_robin([w.batches for w in fresh], position.batches)
            for w, (plan, batches) in enumerate(zip(fresh, per_worker)):
                stream = ((u, i) for u in plan.shards for i in range(self.sizes[u]))
                rng = stream_rng("samples", self.seed, epoch, rank, w)
                order = shuffled(stream, rng, self.shuffle_buffer if self.shuffle else 0)
                for n, (url, i) in enumerate(order):
                    if n >= batches * old.batch_size:
                        break
                    taken.setdefault(url, set()).add(i)
        return taken

    def _plan_rest(self, epoch: int, rank: int, position: Position) -> EpochPlan:
        """Another world size or batch: the samples not taken, in this epoch's shard order,
        split into equal contiguous parts per rank, each cut into its workers' shares."""
        want = self.remaining_batches(epoch, position)
        batches = [share(want, self.workers, w) for w in range(self.workers)]
        if self.resampled:  # draws with replacement: nothing to leave out
            return EpochPlan(epoch, rank, tuple(WorkerPlan(self.urls, None, b) for b in batches))
        taken = self.taken_samples(epoch, position)
        left = [(u, _complement(taken.get(u, set()), self.sizes[u])) for u in self.shard_order(epoch)]
        total = sum(_count(r) for _, r in left)
        per_rank = total // self.world
        samples = [b * self.batch_size for b in batches]
        short = sum(samples) - per_rank  # fewer samples than full batches: shorten last batches
        for w in reversed(range(self.workers)):
            cut = min(max(0, short), self.batch_size - 1 if samples[w] else 0)
            samples[w] -= cut
            short -= cut
        start, end = rank * per_rank, (rank + 1) * per_rank  # a shortfall left is refilled by FillToPlan
        plans = []
        for w in range(self.workers):
            keep = _slice(left, start, min(start + samples[w], end))
            start = min(start + samples[w], end)
            plans.append(WorkerPlan(tuple(keep), samples[w], batches[w], keep=keep))
        return EpochPlan(epoch, rank, tuple(plans))


def _complement(taken: set[int], size: int) -> Ranges:
    runs, start = [], 0
    for i in sorted(taken):
        if i > start:
            runs.append((start, i))
        start = i + 1
    if start < size:
        runs.append((start, size))
    return tuple(runs)


def _count(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def _slice(left: list[tuple[str, Ranges]], lo: int, hi: int) -> dict[str, Ranges]:
    """Samples ``lo`` to ``hi`` of the list of what is left, per shard (in order)."""
    out: dict[str, Ranges] = {}
    pos = 0
    for url, ranges in left:
        for a, b in ranges:
            s, e = max(a, a + lo - pos), min(b, a + hi - pos)
            if s < e:
                out[url] = out.get(url, ()) + ((s, e),)
            pos += b - a
            if pos >= hi:
                return out
    return out


def in_ranges(ranges: Ranges) -> Callable[[int], bool]:
    """Membership test for the sample numbers of one shard."""
    starts = [a for a, _ in ranges]

    def contains(i: int) -> bool:
        k = bisect.bisect_right(starts, i) - 1
        return k >= 0 and i < ranges[k][1]

    return contains
