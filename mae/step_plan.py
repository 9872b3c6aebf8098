"""How long a run trains and at what rate: its optimiser steps, warm-up and lr schedule, and
under ``max_minutes`` the clock's plan of the step count.

A run bounded by the clock cannot know its step count up front, yet the cosine schedule must
end at the last step. So the plan times the steps after a short warm-up (compilation, caches),
fixes the step count that fits the budget at that pace, and fixes it again at about half the
budget, from the pace of the steps since the first plan and the cost of the latest epoch end
(evaluation, checkpoint, the loader's restart), counted at each epoch end still to come: those
come in lumps, and a pace that spread them over the steps would misjudge the rest.

A pace measured over half the budget still drifts by several percent over the other half on a
shared machine (BENCHMARKS.md, "The clock keeps its word"), so one last correction lands the
run: when a tenth of the budget is left (or the plan would end within a tenth), the step count
is fitted once more from the pace since the re-plan. Each re-plan keeps the lr continuous: the
cosine goes on from where it was, over the new remaining steps. The plan travels in
checkpoints, so a resumed run keeps its schedule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .optim import cosine_progress, lr_at

Now = Callable[[], float]


class StepPlan:
    """Total steps, warm-up, the lr at each step, and the clock that may re-plan them.

    ``cap`` is the bound the settings give (``max_steps``, else ``epochs`` x steps per epoch);
    ``max_minutes`` may plan fewer steps than that, never more.
    """

    WARM, TIMED = 10, 40  # steps not timed (compilation, caches), then at least this many timed to plan
    LANDING_MARGIN = 0.005  # of the budget, left unplanned by the landing

    def __init__(self, *, steps_per_epoch: int, cap: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0,
                 max_minutes: float | None = None, now: Now = time.perf_counter) -> None:  # fmt: skip
        self.steps_per_epoch, self.cap = steps_per_epoch, cap
        self.total_steps, self.warmup_steps = cap, warmup_steps
        self.base_lr, self.min_lr = base_lr, min_lr
        self.budget_s = None if max_minutes is None else max_minutes * 60.0
        self.anchor: tuple[int, float] | None = None  # (step, cosine progress) where the cosine was re-planned
        self.plans = 0  # clock plans made: 1 after the first timed steps, 2 at half the budget, 3 the landing
        self._now = now
        self._before = 0.0  # seconds spent by earlier processes of this run
        self._origin = now()
        self._first_step = 0  # this process's first step
        self._mark: tuple[int, float] | None = None  # (step, time) the pace is timed from
        self._last = 0.0  # when the last step was observed
        self._ends: tuple[float, int] = (0.0, 0)  # seconds and steps of epoch starts since the mark
        self._epoch_end: float | None = None  # the latest epoch end's step time, end included

    # -- the schedule

    def lr(self, step: int) -> float:
        """The rate of optimiser step ``step`` (0-based): linear warm-up, then half-cosine."""
        return lr_at(step, base_lr=self.base_lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                     min_lr=self.min_lr, anchor=self.anchor)  # fmt: skip

    def _reschedule(self, step: int, total: int) -> None:
        """End the cosine at ``total`` from ``step`` on, without a jump in the rate."""
        if step > self.warmup_steps and total != self.total_steps:
            self.anchor = (step, cosine_progress(step, warmup_steps=self.warmup_steps,
                                                       total_steps=self.total_steps, anchor=self.anchor))
        self.total_steps = total

    # -- the clock

    @property
    def timed(self) -> bool:
        """Whether the step count still waits on the clock."""
        return self.budget_s is not None and self.plans < 3

    def start(self, step: int) -> None:
        """The loop starts (or resumes) at ``step``: this process's clock starts now."""
        self._first_step, self._origin, self._mark = step, self._now(), None

    def elapsed(self) -> float:
        """Seconds of the loop, carried across resumes."""
        return self._before + self._now() - self._origin

    def spent(self) -> bool:
        return self.budget_s is not None and self.elapsed() >= self.budget_s

    def observe(self, step: int, *, may_decide: bool = True, sync: Callable[[], Any] = lambda: None,
                any_rank: Callable[[bool], bool] = lambda flag: flag,
                slowest: Callable[[float], float] = lambda pace: pace) -> str | None:  # fmt: skip
        """After optimiser step ``step``: time it, and plan (or re-plan) when enough is known.

        ``sync`` waits for the device's queued work (a host read), so the clock reads true.
        Several ranks decide together at steps where ``may_decide`` holds on all of them,
        through ``any_rank`` and ``slowest`` (collectives). Returns a line to print when it planned.
        """
        if not self.timed or step - self._first_step < self.WARM:
            return None
        if self._mark is None:
            sync()  # whatever the device still had queued belongs to the untimed steps
            self._mark = (step, self._now())
            self._last, self._ends = self._mark[1], (0.0, 0)
            return None
        now = self._now()
        took, self._last = now - self._last, now
        if (step - 1) % self.steps_per_epoch == 0:
            # the first step of an epoch: its time holds the last one's end (evaluation,
            # checkpoint, the loader's restart), which comes in lumps, not per step
            self._ends = (self._ends[0] + took, self._ends[1] + 1)
            self._epoch_end = took
        if not may_decide:
            return None
        mark_step, mark_time = self._mark
        timed, seconds = step - mark_step, now - mark_time
        if self.plans == 0:
            # long enough for the loader's prefetched batches to run out: a loader-bound run is
            # fast only while they last, and a plan from that pace would outrun the budget
            ready = seconds >= self.budget_s / 10 or (timed >= self.TIMED and seconds >= self.budget_s / 20)
        elif self.plans == 1:
            # at half the budget, from at least a fifth of it (evaluations come in lumps), which a
            # run resumed shortly before half must first spend
            ready = timed >= self.TIMED and self.elapsed() >= self.budget_s / 2 and seconds >= self.budget_s / 5
        else:
            # the landing: a tenth of the budget left, to its end or to the plan's, whichever
            # comes first by the pace since the re-plan (the host's clock: a trigger, not a measure)
            left = min(self.budget_s, self.elapsed() + (self.total_steps - step) * seconds / max(1, timed)) - self.elapsed()
            ready = timed >= self.TIMED and seconds >= self.budget_s / 10 and left <= self.budget_s / 10
        if not any_rank(ready):
            return None
        sync()
        ends_s, ends = self._ends
        per_step = max(slowest((self._now() - mark_time - ends_s) / max(1, timed - ends)), 1e-9)
        end_cost = slowest(max(0.0, self._epoch_end - per_step) if self._epoch_end is not None else 0.0)
        # the landing aims half a percent short of the budget: a step's jitter must not make the
        # clock, rather than the plan, end the run with the lr short of its end value
        margin = self.budget_s * self.LANDING_MARGIN if self.plans == 2 else 0.0
        fits = step + self._steps_that_fit(step, self.budget_s - self.elapsed() - margin, per_step, end_cost)
        previous = self.total_steps
        self._reschedule(step, max(step, min(self.cap, fits)))
        self.plans += 1
        self._mark, self._ends = (step, self._now()), (0.0, 0)  # the re-plan times the steps since this plan
        what = ("planned", "re-planned at half the budget", "re-planned to land on the budget")[self.plans - 1]
        return (f"max_minutes={self.budget_s / 60:g}: {per_step:.3f} s per step over steps {mark_step + 1}-{step} -> "
                f"{self.total_steps} optimiser steps {what} ({self.total_steps / self.steps_per_epoch:.1f} epochs"
                + (", capped by epochs/max_steps" if self.total_steps == self.cap else "")
                + (f"; was {previous}" if self.plans > 1 else "") + ")")  # fmt: skip

    def _steps_that_fit(self, step: int, seconds: float, per_step: float, end_cost: float) -> int:
        """Steps after ``step`` that fit in ``seconds``, with ``end_cost`` at each epoch end they
        go past. An epoch end the run stops at costs the loop nothing (the last evaluation comes
        after it), so when going past the next end does not pay, the plan stops there."""
        n, left = 0, max(0.0, seconds)
        spe, done = self.steps_per_epoch, step
        while True:
            if done > 0 and done % spe == 0:  # at an epoch end: going on costs the end first
                if left - end_cost < per_step:
                    return n
                left -= end_cost
            to_end = spe - done % spe
            if left < to_end * per_step:
                return n + int(left / per_step)
            n, done, left = n + to_end, done + to_end, left - to_end * per_step

    # -- checkpoints

    def state(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "steps_per_epoch": self.steps_per_epoch, "elapsed_s": self.elapsed(), "planned": self.plans > 0,
                "plans": self.plans, "lr_anchor": list(self.anchor) if self.anchor else None,
                "epoch_end_s": self._epoch_end}  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        """A resumed run spends what is left of the budget and keeps a plan made under the same
        bound; a plan made under another bound (or none) is not this run's plan."""
        self._before = float(state.get("elapsed_s", 0.0))
        if self.budget_s is None or not state.get("planned") or state["total_steps"] > self.cap:
            return
        self.plans = int(state.get("plans", 1))
        self.total_steps = int(state["total_steps"])
        anchor = state.get("lr_anchor")
        self.anchor = (int(anchor[0]), float(anchor[1])) if anchor else None
        self._epoch_end = state.get("epoch_end_s")  # a later plan may see no epoch end of its own before the next
