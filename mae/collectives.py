"""Collectives that keep ranks in step: every rank calls them at the same point of the run.

One home for the questions ranks must answer together (did all of them finish? did any get a
stop signal? what is the sum, the slowest pace, every rank's rows?), so the loop, the
evaluations and the stages ask them the same way. Alone, each is free: no communication.
"""

from __future__ import annotations

from typing import Any

import torch


def all_ranks(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` holds on every rank."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item() == 0


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` holds on at least one rank."""
    return not all_ranks(accelerator, not flag)


def sum_ranks(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (``values`` on this rank's device)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values, reduction="sum")


def max_ranks(accelerator: Any, value: float) -> float:
    """The largest ``value`` of all ranks (e.g. the slowest rank's pace)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="max").item())


def main_rank_says(accelerator: Any, flag: bool) -> bool:
    """The main process's ``flag`` on every rank: for decisions from a clock, which differs across ranks."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([float(flag)], device=accelerator.device), from_process=0).item())


def gather_all(tensor: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (row counts may differ across ranks)."""
    if accelerator.num_processes == 1:
        return tensor
    from accelerate.utils import gather_object

    return torch.cat(gather_object([tensor]))


def gather_objects(accelerator: Any, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (any picklable value), in rank order."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])
