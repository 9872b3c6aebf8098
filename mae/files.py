"""Files that appear complete or not at all.

A run reads back what it wrote: a resumed fine-tune reads ``best.json``, the probe reads an
encoder, the loader reads a shard index, a resumed shard build reads its journal. Each such
file is written under a temporary name in its own folder (``<name>.tmp``), flushed to disk
and renamed over the final name, so a kill or an error at any point leaves the old file or
the new one, never half of one. A leftover ``.tmp`` is only ever a file nobody reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


class AtomicFile:
    """The temporary file behind ``path``: ``commit`` puts it in place, ``discard`` removes it.

    For a writer that fills one file over many calls (a shard of the shard builder);
    everything written in one go uses :func:`write_atomic`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)

    def commit(self) -> Path:
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())  # the data must be on disk before the name says "complete"
        os.replace(self.tmp, self.path)
        _sync_folder(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``path`` atomically. ``content`` is text, bytes, or a function that writes the file
    at the path it is given (``lambda p: save_file(tensors, str(p))``). If writing fails, the
    old file stays as it was and the temporary one is removed. Returns ``path``."""
    target = AtomicFile(path)
    try:
        if isinstance(content, str):
            target.tmp.write_text(content)
        elif isinstance(content, bytes):
            target.tmp.write_bytes(content)
        else:
            content(target.tmp)
        return target.commit()
    except BaseException:
        target.discard()
        raise


def _sync_folder(folder: Path) -> None:
    """On POSIX a rename is on disk only once its folder is."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
