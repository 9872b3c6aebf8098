"""The index file written next to a set of shards.

One index per shard set (a prefix such as ``train``), named ``<prefix>-index.json``.
It gives the reader the epoch length without opening a tar, and tells ``verify``
what each shard should hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import write_atomic

INDEX_SUFFIX = "-index.json"
FORMAT = "mae-shards/1"


@dataclass
class ShardEntry:
    name: str  # file name relative to the index's folder, e.g. "train-000000.tar"
    samples: int


@dataclass
class ShardIndex:
    prefix: str
    shards: list[ShardEntry]
    classes: list[str] | None = None  # None for unlabelled sets
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    source: str = ""
    seed: int | None = None
    format: str = FORMAT

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    def counts(self) -> dict[str, int]:
        return {s.name: s.samples for s in self.shards}


def index_path(folder: str | os.PathLike, prefix: str) -> Path:
    return Path(folder) / f"{prefix}{INDEX_SUFFIX}"


def write_index(folder: str | os.PathLike, index: ShardIndex) -> Path:
    path = index_path(folder, index.prefix)
    payload = asdict(index)
    payload["total"] = index.total
    return write_atomic(path, json.dumps(payload, indent=1) + "\n")


def read_index(path: str | os.PathLike) -> ShardIndex:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read shard index {path}: {err}") from err
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a shard index of format {FORMAT!r}")
    return ShardIndex(
        prefix=raw["prefix"],
        shards=[ShardEntry(**s) for s in raw["shards"]],
        classes=raw.get("classes"),
        skipped=raw.get("skipped", []),
        source=raw.get("source", ""),
        seed=raw.get("seed"),
    )


def find_indexes(folder: str | os.PathLike) -> list[ShardIndex]:
    """All shard indexes in a folder (a folder may hold train and test sets side by side)."""
    return [read_index(p) for p in sorted(Path(folder).glob(f"*{INDEX_SUFFIX}"))]
