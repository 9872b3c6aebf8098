"""Shard lists and their sizes.

``expand_shards`` turns a spec into shard URLs; ``shard_sizes`` says how many samples each
holds, which plans the epoch. Sizes come, in this order, from this project's
``<prefix>-index.json``, from img2dataset's ``<shard>_stats.json``, or, for tars any other
tool wrote (webdataset's ``ShardWriter``, ``tar``), from reading their headers once without
decoding. Those counts are cached beside the shards when the folder is writable, else in the
run's output folder. Remote shards have no size: the epoch length must then be given.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import sys
import tarfile
import tempfile
from pathlib import Path

import webdataset as wds

from .decode import IMAGE_EXTENSIONS
from .shard_index import find_indexes
from .tar_members import member_names

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "hf://")
COUNTS_FILE = "sample-counts.json"  # header counts of shards without an index
COUNTS_FORMAT = "mae-sample-counts/1"
META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples


class DataError(ValueError):
    """Shards that cannot make an epoch: missing files, too few shards for the readers."""


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


def shard_sizes(urls: list[str], cache_dir: str | os.PathLike | None = None) -> dict[str, int] | None:
    """Samples per shard; None when any shard is remote (the epoch length must then be given).
    ``cache_dir`` holds the header counts of a read-only shard folder."""
    if any(url.startswith(REMOTE_PREFIXES) for url in urls):
        return None
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(str(Path(url).parent), []).append(url)
    sizes: dict[str, int] = {}
    for folder, members in by_folder.items():
        known: dict[str, int] = {}
        for index in find_indexes(folder):
            known.update(index.counts())
        unknown = [u for u in members if Path(u).name not in known]
        known.update(_stats_counts(unknown))
        unknown = [u for u in unknown if Path(u).name not in known]
        if unknown:
            known.update(_header_counts(folder, unknown, cache_dir))
        sizes.update({u: known[Path(u).name] for u in members})
    return sizes


def _stats_counts(urls: list[str]) -> dict[str, int]:
    """img2dataset writes ``00000_stats.json`` beside ``00000.tar``; ``successes`` is what the tar holds."""
    counts = {}
    for url in urls:
        stats = Path(url).with_name(Path(url).stem + "_stats.json")
        if stats.is_file():
            try:
                counts[Path(url).name] = int(json.loads(stats.read_text())["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not img2dataset's: count the headers
    return counts


def count_samples(path: str | os.PathLike) -> int:
    """Samples with an image member in a tar, by its headers alone: a sample is a run of
    members sharing a key (webdataset's rule). A tar cut short counts the samples before the
    fault, as the reader keeps them."""
    count, key, has_image = 0, None, False
    with open(path, "rb") as stream:
        try:
            for name in member_names(stream):
                if META.match(name):
                    continue
                prefix, suffix = wds.tariterators.base_plus_ext(name)
                if prefix is None:
                    continue
                if prefix != key:
                    count += has_image
                    key, has_image = prefix, False
                has_image = has_image or suffix.lower() in IMAGE_EXTENSIONS
        except tarfile.ReadError as err:
            print(f"warning: {path}: {err}; counted the samples before it", file=sys.stderr)
    return count + has_image


def writable(folder: str | os.PathLike) -> bool:
    """Whether files may be added to ``folder``: a real write (read-only mounts, other users'
    folders), and a folder whose mode grants no one writing is left alone even by root."""
    if not os.stat(folder).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _header_counts(folder: str, urls: list[str], cache_dir: str | os.PathLike | None) -> dict[str, int]:
    """Counts of ``urls`` (all in ``folder``), from the cache when their size and time match."""
    if writable(folder):
        cache, key = Path(folder) / COUNTS_FILE, lambda u: Path(u).name
    elif cache_dir is not None:
        cache, key = Path(cache_dir) / COUNTS_FILE, lambda u: str(Path(u).resolve())
    else:
        cache, key = None, None
    cached = _read_counts(cache) if cache is not None else {}
    counts, fresh = {}, False
    for url in urls:
        st = os.stat(url)
        entry = cached.get(key(url)) if key else None
        if not entry or entry.get("bytes") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = {"samples": count_samples(url), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            fresh = True
            if key:
                cached[key(url)] = entry
        counts[Path(url).name] = entry["samples"]
    if fresh and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # ranks may count at once
        tmp.write_text(json.dumps({"format": COUNTS_FORMAT, "shards": cached}, indent=1) + "\n")
        os.replace(tmp, cache)
    return counts


def _read_counts(path: Path) -> dict[str, dict[str, int]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw.get("shards", {}) if raw.get("format") == COUNTS_FORMAT else {}
