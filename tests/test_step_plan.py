"""The step plan under ``max_minutes``, on a fake clock: the first plan, the re-plan at half the
budget, the landing with a tenth left, an lr without jumps, the loop ending on its budget, and
resumes on either side of the re-plan."""

from __future__ import annotations

import pytest

from mae.optim import lr_at
from mae.step_plan import StepPlan


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_plan(clock: FakeClock, minutes: float = 1.0, cap: int = 100_000) -> StepPlan:
    return StepPlan(steps_per_epoch=100, cap=cap, warmup_steps=20, base_lr=1e-3, max_minutes=minutes, now=clock)


def run(plan: StepPlan, clock: FakeClock, pace, start: int = 0, stop_at: int | None = None) -> tuple[int, list[str]]:
    """Steps the plan as the loop does: each step takes ``pace(step)`` seconds; returns the last
    step and the plan's lines. Stops at the planned total, the budget, or ``stop_at``."""
    plan.start(start)
    step, notes = start, []
    while step < plan.total_steps and not plan.spent() and step != stop_at:
        clock.t += pace(step)
        step += 1
        note = plan.observe(step)
        if note:
            notes.append(note)
    return step, notes


def slows_down(step: int) -> float:
    """0.1 s a step while the loader's prefetched batches last, 0.125 s after (the pace the
    first plan half sees), and an evaluation at each epoch end (100 steps), the first one
    slower (4 s: compilation, caches) than the later ones (2 s)."""
    end = 0.0 if step == 0 or step % 100 else (4.0 if step == 100 else 2.0)  # before the epoch's first step
    return (0.1 if step < 30 else 0.125) + end


def test_the_plan_is_made_early_at_half_the_budget_and_when_a_tenth_is_left():
    clock = FakeClock()
    plan = make_plan(clock)
    last, notes = run(plan, clock, slows_down)
    assert len(notes) == 3 and "planned" in notes[0] and "re-planned at half the budget" in notes[1]
    assert "re-planned to land on the budget" in notes[2]
    assert plan.plans == 3
    # the first plan, timed while the loader was ahead and before any evaluation, would overrun
    first_total = int(notes[0].split("-> ")[1].split()[0])
    assert sum(slows_down(s) for s in range(first_total)) > 1.1 * 60
    # the re-plan ends the loop at its total within 2% of the budget, the lr at its end value
    assert last == plan.total_steps and not plan.spent()
    assert plan.elapsed() == pytest.approx(60.0, rel=0.02)
    assert plan.lr(last) == 0.0


def test_a_pace_that_picks_up_leaves_no_budget_unused():
    clock = FakeClock()
    plan = make_plan(clock)
    last, _ = run(plan, clock, lambda step: 0.12 if step < 40 else 0.08)  # the first plan times mostly slow steps
    assert last == plan.total_steps
    assert plan.elapsed() == pytest.approx(60.0, rel=0.02)


def drifts(step: int) -> float:
    """A pace that changes after the re-plan: 0.1 s a step, then 8% slower from step 320 on (a
    neighbour on a shared machine)."""
    return 0.1 if step < 320 else 0.108


def test_a_pace_that_drifts_after_the_re_plan_still_lands_on_the_budget():
    """The re-plan at half alone would run into the clock about 4% short of its plan, the lr
    not yet at its end; the landing refits the last tenth."""
    clock = FakeClock()
    plan = make_plan(clock)
    last, notes = run(plan, clock, drifts)
    re_planned = int(notes[1].split("-> ")[1].split()[0])
    assert sum(drifts(s) for s in range(re_planned)) > 1.02 * 60  # the re-plan's count would overrun
    assert len(notes) == 3 and last == plan.total_steps < re_planned and not plan.spent()
    assert plan.elapsed() == pytest.approx(60.0, rel=0.02)
    assert plan.lr(last) == 0.0


def test_the_lr_goes_on_without_a_jump_at_the_re_plan():
    clock = FakeClock()
    plan = make_plan(clock)
    rates, anchors = [], []
    plan.start(0)
    step = 0
    while step < plan.total_steps:
        rates.append(plan.lr(step))
        clock.t += slows_down(step)
        step += 1
        if plan.observe(step):
            anchors.append(plan.anchor)
    assert anchors[1] != anchors[2]  # the landing re-planned too; it moved the end by a few steps
    anchor = anchors[1][0]  # the re-plan at half, which moved the end most
    steps = [abs(b - a) for a, b in zip(rates, rates[1:])]
    # the cosine steepens to fit fewer steps, but the rate does not jump at the re-plan ...
    assert max(steps[anchor - 3 : anchor + 3]) < 2 * max(steps[anchor - 30 : anchor - 3])
    # ... as the plain schedule over the new total would have
    plain = lr_at(anchor, base_lr=1e-3, warmup_steps=20, total_steps=plan.total_steps)
    assert abs(plain - rates[anchor]) > 10 * max(steps[anchor - 3 : anchor + 3])
    assert rates[-1] < 0.001 * max(rates)
    # the same rates from the pure function, given the anchor
    landing = anchors[2][0]
    assert max(steps[landing - 3 : landing + 3]) < 2 * max(steps[landing - 30 : landing - 3])
    assert rates[landing:] == [lr_at(s, base_lr=1e-3, warmup_steps=20, total_steps=plan.total_steps, anchor=plan.anchor)
                               for s in range(landing, plan.total_steps)]  # fmt: skip


@pytest.mark.parametrize("stop, plans", [("before the re-plan", 1), ("after the re-plan", 2), ("after the landing", 3)])
def test_a_resumed_run_keeps_its_schedule(stop, plans):
    """A run stopped, saved and resumed in a new process (a new clock origin) follows the
    schedule of an uninterrupted one where it can: after the landing it keeps it exactly;
    before, it keeps the plans made and makes the rest from its own pace, still on budget."""
    clock = FakeClock()
    whole = make_plan(clock)
    run(whole, clock, slows_down)

    clock = FakeClock()
    first = make_plan(clock)
    step, _ = run(first, clock, slows_down, stop_at={"before the re-plan": 150, "after the re-plan": 300,
                                                       "after the landing": 400}[stop])  # fmt: skip
    state = first.state()
    assert state["plans"] == plans

    clock.t += 500.0  # the job waits in the queue: not the run's time
    resumed = make_plan(clock)
    resumed.restore(state)
    assert resumed.total_steps == first.total_steps and resumed.anchor == first.anchor
    last, notes = run(resumed, clock, slows_down, start=step)
    assert len(notes) == 3 - plans and all("re-planned" in note for note in notes)
    if stop == "after the landing":
        assert last == whole.total_steps
        assert [resumed.lr(s) for s in range(step, last)] == [whole.lr(s) for s in range(step, last)]
    assert resumed.elapsed() == pytest.approx(60.0, rel=0.02)
    assert resumed.lr(last) == 0.0


def test_a_plan_under_another_bound_is_not_kept():
    clock = FakeClock()
    plan = make_plan(clock)
    run(plan, clock, slows_down, stop_at=300)
    state = plan.state()
    smaller = make_plan(FakeClock(), cap=state["total_steps"] - 1)  # max_steps now below the saved plan
    smaller.restore(state)
    assert smaller.plans == 0 and smaller.total_steps == state["total_steps"] - 1
    unbounded = StepPlan(steps_per_epoch=100, cap=1000, warmup_steps=20, base_lr=1e-3)
    unbounded.restore(state)
    assert unbounded.plans == 0 and unbounded.total_steps == 1000 and not unbounded.timed
    assert unbounded.elapsed() >= state["elapsed_s"]  # the time already spent is carried all the same


def test_no_budget_no_plan():
    plan = StepPlan(steps_per_epoch=10, cap=40, warmup_steps=10, base_lr=1.0)
    assert not plan.timed and plan.observe(25) is None and plan.total_steps == 40
    assert [plan.lr(s) for s in (0, 5, 10, 40)] == [0.0, 0.5, 1.0, 0.0]


def test_the_plan_stops_at_an_epoch_end_that_going_past_would_not_pay():
    """Steps that fit, with 0.1 s a step and 5 s at each epoch end gone past (100 steps an epoch)."""
    plan = make_plan(FakeClock())
    assert plan._steps_that_fit(50, 6.0, 0.1, 5.0) == 50  # to the end (5 s); the 1 s after does not pay for it
    assert plan._steps_that_fit(50, 12.0, 0.1, 5.0) == 70  # 50, the end, then 2 s of steps
    assert plan._steps_that_fit(100, 4.0, 0.1, 5.0) == 0  # at an end with less than its cost left
    assert plan._steps_that_fit(100, 7.0, 0.1, 5.0) == 20
    assert plan._steps_that_fit(0, 25.0, 0.1, 5.0) == 200  # two epochs; a third would need 5 s more first
