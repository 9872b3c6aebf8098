"""Check that a folder of shards holds exactly what its indexes promise.

Run after copying shards to a cluster or object store: a truncated upload or a
stray corrupt member should be caught before a multi-day run, not by a dataloader
worker crashing (or silently skipping) at hour 30.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mae.data.decode import UndecodableImage, decode_rgb, image_key
from mae.data.shard_index import INDEX_SUFFIX, ShardEntry, ShardIndex, index_path, read_index

from .build import TAR_END, SourceError, unlisted_shards


@dataclass(frozen=True)
class Problem:
    where: str  # the index or shard file name, plus ``:member`` when one member is at fault
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _split_name(name: str) -> tuple[str, str]:
    """Key and extension the way WebDataset groups members: the key ends at the
    first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _read_samples(tar: tarfile.TarFile, shard: str, problems: list[Problem]) -> list[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key; a key seen again later is a broken shard."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
    for member in tar:
        if not member.isfile():
            continue
        key, ext = _split_name(member.name)
        if not samples or samples[-1][0] != key:
            if key in seen:
                problems.append(Problem(f"{shard}:{member.name}", f"key {key!r} appears twice"))
            seen.add(key)
            samples.append((key, {}))
        fileobj = tar.extractfile(member)
        samples[-1][1][ext] = fileobj.read() if fileobj else b""
    return samples


def _check_sample(key: str, sample: dict[str, bytes], index: ShardIndex, shard: str) -> list[Problem]:
    ext = image_key(sample)
    if ext is None:
        return [Problem(f"{shard}:{key}", f"sample has no image (members: {', '.join(sorted(sample))})")]
    problems = []
    try:
        decode_rgb(sample[ext])
    except UndecodableImage as err:
        problems.append(Problem(f"{shard}:{key}.{ext}", f"undecodable: {err}"))
    if index.classes is not None:
        raw = sample.get("cls")
        text = raw.decode("ascii", "replace").strip() if raw is not None else ""
        if raw is None:
            problems.append(Problem(f"{shard}:{key}", "labelled set but sample has no .cls"))
        elif not text.isdigit() or int(text) >= len(index.classes):
            problems.append(
                Problem(f"{shard}:{key}.cls", f"class {text!r} is not in 0..{len(index.classes) - 1}")
            )
    return problems


def _has_end_marker(path: Path, offset: int) -> bool:
    """A shard cut at a block boundary still parses; only the missing end marker shows it."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(TAR_END) == bytes(TAR_END)


def verify_shard(folder: Path, entry: ShardEntry, index: ShardIndex) -> list[Problem]:
    """Every problem found in one shard of ``index``."""
    path = folder / entry.name
    if not path.is_file():
        return [Problem(entry.name, "missing shard file")]
    problems: list[Problem] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            samples = _read_samples(tar, entry.name, problems)
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as err:
        return problems + [Problem(entry.name, f"tar read error (truncated or corrupt?): {err}")]
    if not _has_end_marker(path, end):
        problems.append(Problem(entry.name, "no end-of-archive marker: the shard is truncated"))
    if len(samples) != entry.samples:
        problems.append(Problem(entry.name, f"holds {len(samples)} samples, index says {entry.samples}"))
    for key, sample in samples:
        problems += _check_sample(key, sample, index, entry.name)
    return problems


def verify_index(folder: Path, index: ShardIndex) -> list[Problem]:
    """Check every shard of one set, and flag shard files of the set the index does not list."""
    problems: list[Problem] = []
    for entry in index.shards:
        problems += verify_shard(folder, entry, index)
    for path in unlisted_shards(folder, index):
        problems.append(Problem(path.name, f"shard not listed in {index.prefix}{INDEX_SUFFIX}"))
    return problems


def load_indexes(out: str | os.PathLike, prefix: str | None = None) -> tuple[list[ShardIndex], list[Problem]]:
    """The indexes to check; an unreadable index is a problem, having none at all an error."""
    folder = Path(out)
    if not folder.is_dir():
        raise SourceError(f"shard folder {folder} does not exist or is not a folder")
    paths = [index_path(folder, prefix)] if prefix else sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if not paths or not paths[0].exists():
        wanted = paths[0].name if prefix else f"*{INDEX_SUFFIX}"
        raise SourceError(f"no shard index ({wanted}) in {folder}")
    indexes, problems = [], []
    for path in paths:
        try:
            indexes.append(read_index(path))
        except (ValueError, KeyError, TypeError) as err:
            problems.append(Problem(path.name, f"unreadable index: {err}"))
    return indexes, problems


def verify_shards(out: str | os.PathLike, prefix: str | None = None) -> list[Problem]:
    """All problems in the shard sets of ``out`` (only set ``prefix`` when given); empty means fine."""
    indexes, problems = load_indexes(out, prefix)
    for index in indexes:
        problems += verify_index(Path(out), index)
    return problems
