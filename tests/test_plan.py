"""The epoch plan, as pure arithmetic: every shard read once, every rank its batches, and a run
resumed mid-epoch, on the same or another world, reads none of what the stopped run took."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from mae.data.plan import EpochPlanner, Position, WorkerPlan, round_robin, share

SIZES = [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # uneven: workers run out at different batches


def planner(world: int, workers: int, batch_size: int, **kw) -> EpochPlanner:
    urls = tuple(f"train-{n:06d}.tar" for n in range(len(SIZES)))
    kw = {"seed": 5, "shuffle_buffer": 8, "fill": True} | kw
    return EpochPlanner(urls, dict(zip(urls, SIZES)), world, workers, batch_size, **kw)


def test_share_splits_evenly_and_whole() -> None:
    for n in range(30):
        for parts in range(1, 7):
            shares = [share(n, parts, i) for i in range(parts)]
            assert sum(shares) == n and max(shares) - min(shares) <= 1 and shares == sorted(shares, reverse=True)


def test_each_shard_goes_to_one_rank_and_worker_and_each_worker_plans_its_batches() -> None:
    p = planner(world=2, workers=3, batch_size=4)
    plans = [p.plan(1, rank) for rank in range(2)]
    shards = [u for plan in plans for w in plan.workers for u in w.shards]
    assert sorted(shards) == sorted(p.urls)
    for plan in plans:
        for w in plan.workers:
            assert w.samples == sum(p.sizes[u] for u in w.shards)
            assert w.batches == math.ceil(w.samples / 4) and w.taken == 0 and w.keep is None
    assert p.batches_per_epoch(1) == min(plan.batches() for plan in plans)


def test_same_shape_resume_drops_the_taken_batches_and_starts_at_the_next_worker() -> None:
    """The DataLoader asks its workers in turn: the first k batches fall as it would have taken them."""
    p = planner(world=1, workers=3, batch_size=4)
    full = p.plan(0, 0)
    order = []  # the worker of each batch of an uninterrupted epoch
    left = [w.batches for w in full.workers]
    while any(left):
        for w in range(3):
            if left[w]:
                order.append(w)
                left[w] -= 1
    for k in range(1, len(order)):
        resumed = p.plan(0, 0, Position(1, 4, 3, k))
        assert [w.taken for w in resumed.workers] == [order[:k].count(w) for w in range(3)]
        assert resumed.first_worker == order[k]
        assert resumed.batches() == len(order) - k
    assert round_robin([2, 0, 1], 0) == ([0, 0, 0], 0)


def read_after(p: EpochPlanner, epoch: int, position: Position) -> tuple[list[tuple[str, int]], list[WorkerPlan]]:
    """The samples (shard, number) every rank and worker of the resumed world reads."""
    read, workers = [], []
    for rank in range(p.world):
        plan = p.plan(epoch, rank, position)
        assert plan.batches() == p.remaining_batches(epoch, position), f"rank {rank}"
        for w in plan.workers:
            assert w.taken == 0 and w.keep is not None
            got = [(u, i) for u, ranges in w.keep.items() for a, b in ranges for i in range(a, b)]
            assert len(got) == w.samples, "a worker short of samples would repeat some"
            assert w.batches == math.ceil(w.samples / p.batch_size)
            read += got
            workers.append(w)
    return read, workers


def left_unread(p: EpochPlanner, epoch: int) -> int:
    """Samples an uninterrupted epoch leaves unread: ranks stop together at the fewest batches."""
    per_rank = [sum(w.samples for w in p.plan(epoch, rank).workers) for rank in range(p.world)]
    return sum(SIZES) - p.world * min(per_rank)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((2, 2, 4), (1, 2, 8)),  # 2 -> 1 processes, the effective batch kept by the batch
        ((1, 2, 8), (2, 2, 4)),  # 1 -> 2
        ((2, 2, 4), (1, 3, 8)),  # and another number of workers
        ((1, 3, 8), (2, 1, 4)),
        ((2, 1, 4), (1, 1, 4)),  # 2 -> 1 with accum_iter 1 -> 2: the same batch
        ((1, 2, 4), (2, 2, 4)),  # 1 -> 2 with accum_iter 2 -> 1
    ],
    ids=["2to1", "1to2", "2to1_workers", "1to2_workers", "2to1_accum", "1to2_accum"],
)
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in_order"])
def test_resume_on_another_world_reads_no_taken_sample_and_the_rest_once(before, after, shuffle: bool) -> None:
    """Stopped k batches in (k whole optimiser steps of the effective batch), the resumed world
    reads none of the samples the stopped run took, none twice, and every rank exactly the
    epoch's remaining batches; together they cover the epoch but for what the planning
    leaves unread, as an uninterrupted epoch does (unequal ranks, partial last batches)."""
    old = planner(*before, shuffle=shuffle)
    new = planner(*after, shuffle=shuffle)
    total = sum(SIZES)
    effective = before[0] * before[2]
    accum_new = 16 // (after[0] * after[2])  # effective batch 16 in every case
    accum_old = 16 // effective
    last = old.batches_per_epoch(3) // accum_old - 1
    for steps in sorted({1, 2, last // 2, last - 1, last}):
        position = Position(before[0], before[2], before[1], steps * accum_old)
        taken = old.taken_samples(3, position)
        taken_list = [(u, i) for u, numbers in taken.items() for i in numbers]
        assert len(taken_list) <= steps * 16  # a worker's last batch may be partial
        read, _ = read_after(new, 3, position)
        assert new.remaining_batches(3, position) == new.batches_per_epoch(3) - steps * accum_new
        counts = Counter(read + taken_list)
        assert max(counts.values()) == 1, f"step {steps}: read again {[s for s, c in counts.items() if c > 1][:5]}"
        unread = total - len(counts)
        # the stopped run's partial batches counted as whole ones in the steps it took
        partial = steps * 16 - len(taken_list)
        assert unread <= max(left_unread(old, 3), left_unread(new, 3)) + partial, f"step {steps}: {unread} unread"


def test_resampled_resume_on_another_world_yields_the_remaining_budget() -> None:
    p = planner(world=1, workers=2, batch_size=8, resampled=True, samples_per_epoch=160, fill=False)
    plan = p.plan(0, 0, Position(2, 4, 2, 6))  # 6 x 2 x 4 = 48 samples taken: 6 batches of 8
    assert plan.batches() == p.batches_per_epoch(0) - 6 == 14


def test_a_position_with_the_configured_workers_resumes_exactly_where_the_loader_lowered_them() -> None:
    """The loop records ``data.num_workers``; with fewer shards than readers the loader used
    fewer workers, and a resume on the same settings is still the same shape (exact order)."""
    urls = tuple(f"s{n}.tar" for n in range(4))
    p = EpochPlanner(urls, dict.fromkeys(urls, 10), world=2, workers=2, batch_size=4, fill=True)
    assert p.readers(2, 4) == 2 and p.same_shape(Position(2, 4, 4, 3))
    assert p.plan(0, 0, Position(2, 4, 4, 3)).workers[0].keep is None
