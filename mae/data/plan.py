"""Where a run stopped inside an epoch, as the loader needs it to resume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Position:
    """Where a run stopped inside an epoch; what the resumed loader must not read again."""

    world: int  # processes of the run that stopped
    batch_size: int  # its per-process batch
    num_workers: int  # its loader workers per process
    batches: int  # micro-batches each of its ranks had taken in this epoch
