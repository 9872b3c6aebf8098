"""Pack a folder of images into WebDataset tar shards plus a ``<prefix>-index.json``.

Training reads shards, not folders, because a few large sequential files stream
far better than many small ones. Every image is decoded once here with the same
``decode_rgb`` that training uses, so a bad file is reported at build time
instead of being skipped silently in the middle of an epoch.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import re
import shlex
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from mae.data.decode import IMAGE_EXTENSIONS, UndecodableImage, decode_rgb
from mae.data.shard_index import ShardEntry, ShardIndex, write_index
from mae.files import TMP_SUFFIX, AtomicFile, write_atomic

SHARD_DIGITS = 6
BLOCK = tarfile.BLOCKSIZE  # 512
TAR_END = 2 * BLOCK  # end-of-archive marker: two zero blocks
RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to whole 10 KiB records
SAMPLES_PER_SHARD = 1000  # the default for folders large enough to give every reader a shard
RESIZED_QUALITY = 95  # JPEG quality of images stored smaller (--max-side)


class SourceError(ValueError):
    """A problem with the command's input or output folder (the CLI exits 2 on it)."""


# The loader workers of the default pretraining (``DataConfig().num_workers``, which a test
# checks this against), written here so that the shard tools never load torch.
DEFAULT_READERS = 2


@dataclass(frozen=True)
class SourceImage:
    path: str  # plain strings, not Paths: a folder of 50,000 small images is scanned in the parent
    rel: str  # posix path relative to SRC: stable across machines, used in reports
    label: int | None


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:0{SHARD_DIGITS}d}.tar"


def shard_pattern(prefix: str) -> re.Pattern[str]:
    """Final shard names of one set, e.g. ``train-000003.tar``."""
    return re.compile(rf"{re.escape(prefix)}-\d{{{SHARD_DIGITS}}}\.tar")


def tar_size(members_total: int) -> int:
    """Exact size of a closed tar whose members take ``members_total`` bytes."""
    return -(-(members_total + TAR_END) // RECORD) * RECORD


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _images_below(folder: Path) -> list[str]:
    """Image files below ``folder``, as posix paths relative to it, in a stable (sorted) order;
    hidden entries are left out because they are editor and OS litter (``.DS_Store``,
    ``._x.jpg``), not data."""
    found = []
    top = len(str(folder)) + 1
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        below = Path(root[top:]).as_posix() + "/" if len(root) >= top else ""
        found += [below + f for f in sorted(files) if not f.startswith(".") and _is_image(f)]
    return found


def _visible_entries(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if not p.name.startswith("."))


def detect_labelled(src: Path) -> bool:
    """Labelled (ImageFolder layout) when every entry of SRC is a folder holding images."""
    entries = _visible_entries(src)
    return bool(entries) and all(p.is_dir() and _images_below(p) for p in entries)


def scan_source(src: Path, labelled: bool | None) -> tuple[list[SourceImage], list[str] | None]:
    """List the candidate images and, for a labelled source, the sorted class names."""
    if not src.exists():
        raise SourceError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise SourceError(f"source {src} is not a folder")
    if labelled is None:
        labelled = detect_labelled(src)
    if not labelled:
        images = [SourceImage(os.path.join(src, rel), rel, None) for rel in _images_below(src)]
        if not images:
            raise SourceError(f"source folder {src} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return images, None
    entries = _visible_entries(src)
    stray = [p.name for p in entries if not p.is_dir() and _is_image(p.name)]
    if stray:
        raise SourceError(
            f"source folder {src} has images outside class folders (e.g. {stray[0]}); "
            "move them into a class folder or build with --unlabelled"
        )
    classes = [p.name for p in entries if p.is_dir()]
    if not classes:
        raise SourceError(f"source folder {src} has no class sub-folders")
    images = []
    for label, name in enumerate(classes):
        found = _images_below(src / name)
        if not found:
            raise SourceError(f"class folder {src / name} holds no image files")
        images += [SourceImage(os.path.join(src, name, rel), f"{name}/{rel}", label) for rel in found]
    return images, classes


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A header with nothing that varies between machines or runs, so builds are byte-identical."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_HEADER = _tar_info("", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
_CHECKSUM = slice(148, 156)  # the header's checksum field; name is [0, 100), size [124, 136)


def member_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for ``_tar_info(name, size)``, byte for byte, from a
    template: ``tarfile.addfile`` costs more per member than the build's decoding of a small
    image, and the parent writes every member."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"member name {name!r} is longer than a USTAR name field")
    header = encoded.ljust(100, b"\0") + _HEADER[100:124] + b"%011o\0" % size + _HEADER[136:148] + b" " * 8 + _HEADER[156:]
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


class _ShardWriter:
    """Writes numbered shards, each under a temporary name until it is complete.

    A reader (or a crashed build) therefore never sees a ``.tar`` that is half written.
    Members are written as ``tarfile`` would write them (``member_header``, data, zero
    padding to whole blocks; the end marker and record padding on close).
    """

    def __init__(self, out: Path, prefix: str, samples_per_shard: int, bytes_per_shard: int,
                 entries: list[ShardEntry] | None = None, on_close: Callable[[int], None] | None = None):  # fmt: skip
        self.out, self.prefix = out, prefix
        self.samples_per_shard, self.bytes_per_shard = samples_per_shard, bytes_per_shard
        self.entries: list[ShardEntry] = list(entries or [])  # finished shards (kept by --resume)
        self.on_close = on_close  # called with the position of the first image not in a finished shard
        self._next = 0
        self._file: BinaryIO | None = None
        self._shard: AtomicFile | None = None
        self._samples = 0
        self._bytes = 0

    @property
    def _final(self) -> Path:
        return self.out / shard_name(self.prefix, len(self.entries))

    def add(self, key: str, members: list[tuple[str, bytes]], position: int = 0) -> None:
        """Add a sample; ``position`` is its image's place in the build order."""
        blob = b"".join(part for ext, data in members
                        for part in (member_header(f"{key}.{ext}", len(data)), data, bytes(-len(data) % BLOCK)))  # fmt: skip
        size = len(blob)  # a header block per member, data padded to whole blocks
        # Start a new shard rather than overshoot the byte limit; a sample larger than
        # the limit still gets a shard of its own.
        if self._file is not None and tar_size(self._bytes + size) > self.bytes_per_shard:
            self._next = position
            self.close_shard()
        if self._file is None:
            self._shard = AtomicFile(self._final)
            self._file = open(self._shard.tmp, "wb")
        self._file.write(blob)  # one write a sample: on folders of small images the parent's share is the limit
        self._samples += 1
        self._bytes += size
        self._next = position + 1
        if self._samples >= self.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self._file is None:
            return
        self._file.write(bytes(tar_size(self._bytes) - self._bytes))  # end marker, padded to whole records
        self._file.close()
        self.entries.append(ShardEntry(self._shard.commit().name, self._samples))  # synced, then named
        self._file = self._shard = None
        self._samples = self._bytes = 0
        if self.on_close is not None:
            self.on_close(self._next)

    def abandon(self) -> None:
        """Drop the shard in progress after an error, keeping the completed ones."""
        if self._file is not None:
            self._file.close()
            self._shard.discard()
        self._file = self._shard = None


def _prepare_out(out: Path, prefix: str) -> None:
    if out.exists() and not out.is_dir():
        raise SourceError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{prefix}-*.tar{TMP_SUFFIX}"):
        stale.unlink()  # left by an interrupted build


def _reason(err: Exception) -> str:
    """Why a file was skipped, without object addresses (``<_io.BytesIO object at 0x7f..>``)
    that PIL puts in its messages and that would make two identical builds differ."""
    text = str(err) if isinstance(err, UndecodableImage) else f"unreadable: {err}"
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text)


def _select(images: list[SourceImage], shuffle: bool, seed: int) -> list[SourceImage]:
    images = list(images)
    if shuffle:
        random.Random(seed).shuffle(images)
    return images


def default_samples_per_shard(samples: int) -> int:
    """``SAMPLES_PER_SHARD``, or fewer for a small folder, so that each loader worker of the
    default pretraining (one process, ``data.num_workers`` workers) gets a shard of its own."""
    return max(1, min(SAMPLES_PER_SHARD, -(-samples // DEFAULT_READERS)))


def _stored(path: str, max_side: int | None) -> tuple[str, bytes] | str:
    """One image as it goes into a shard, (extension, bytes), or why it is skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = decode_rgb(data)
    except (OSError, UndecodableImage) as err:
        return _reason(err)
    if max_side is None or max(img.size) <= max_side:
        return path.rsplit(".", 1)[-1].lower(), data  # stored untouched
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    buf = io.BytesIO()
    img.resize(size, Image.LANCZOS, reducing_gap=3.0).save(buf, format="JPEG", quality=RESIZED_QUALITY)
    return "jpg", buf.getvalue()


def _stored_batch(task: tuple[list[str], int | None]) -> list[tuple[str, bytes] | str]:
    """``_stored`` of a batch of paths. Runs in the build's worker processes: reading and
    decoding are the work that parallelises, and a batch per message keeps the parent's
    share (sending paths, receiving bytes) small on folders of small images."""
    paths, max_side = task
    return [_stored(path, max_side) for path in paths]


def _in_order(order: list[SourceImage], start: int, workers: int, max_side: int | None,
              wanted: Callable[[SourceImage], bool]) -> Iterator[tuple[int, SourceImage, tuple[str, bytes] | str]]:  # fmt: skip
    """(position, image, stored) from ``start`` on, in build order whatever the worker count,
    so the shards are byte-identical. Images go out in windows, so that ``wanted`` (classes
    already full under --max-per-class) spares the workers most needless decoding and at most
    two windows of image bytes wait in memory; the next window is handed out before the
    current one is read, so the workers never wait for the parent. A window goes out in
    batches, about 8 per worker, so large photos still spread evenly; without workers, image
    by image."""
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    window = 128 * workers

    def hand_out(begin: int) -> tuple[list[list[int]], Iterator[list[tuple[str, bytes] | str]]]:
        chosen = [p for p in range(begin, min(len(order), begin + window)) if wanted(order[p])]
        size = max(1, len(chosen) // (8 * workers)) if pool is not None else 1  # alone, nothing to send
        batches = [chosen[i : i + size] for i in range(0, len(chosen), size)]
        tasks = [([order[p].path for p in batch], max_side) for batch in batches]
        return batches, pool.imap(_stored_batch, tasks) if pool is not None else map(_stored_batch, tasks)

    def read(batches: list[list[int]], results: Iterator[list[tuple[str, bytes] | str]]) -> Iterator[tuple[int, SourceImage, tuple[str, bytes] | str]]:  # fmt: skip
        for batch, stored in zip(batches, results):
            for position, result in zip(batch, stored):
                yield position, order[position], result

    try:
        queued: deque = deque()
        for begin in range(start, len(order), window):
            queued.append(hand_out(begin))
            if len(queued) == 2:
                yield from read(*queued.popleft())
        while queued:
            yield from read(*queued.popleft())
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def journal_path(out: Path, prefix: str) -> Path:
    """Progress of an unfinished build, for --resume; removed when the index is written."""
    return out / f"{prefix}-build.json"


def _resume_state(journal: Path, settings: dict) -> dict | None:
    if not journal.exists():
        return None
    state = json.loads(journal.read_text())
    changed = sorted(k for k in settings.keys() | state["settings"].keys()
                     if settings.get(k) != state["settings"].get(k))  # fmt: skip
    if changed:
        raise SourceError(
            f"--resume: the interrupted build in {journal.parent} used other settings ("
            + ", ".join(f"{k}: {state['settings'].get(k)!r} then, {settings.get(k)!r} now" for k in changed)
            + "); rerun with the same ones, or without --resume to start over"
        )
    for entry in state["shards"]:
        if not (journal.parent / entry["name"]).is_file():
            raise SourceError(f"--resume: finished shard {journal.parent / entry['name']} is missing; "
                              "rerun without --resume to start over")  # fmt: skip
    return state


def build_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str = "train",
    samples_per_shard: int | None = None,
    bytes_per_shard: int = 1_000_000_000,
    shuffle: bool = True,
    seed: int = 0,
    labelled: bool | None = None,
    max_per_class: int | None = None,
    source: str | None = None,
    workers: int = 1,
    max_side: int | None = None,
    resume: bool = False,
) -> ShardIndex:
    """Write ``{prefix}-NNNNNN.tar`` shards and their index into ``out``; return the index.

    ``samples_per_shard=None`` takes ``default_samples_per_shard`` of the images to write.
    ``labelled=None`` detects the layout. With ``max_per_class`` the first N images per
    class that decode are taken, in shuffled order, so each class gets exactly N when it
    has that many good images. Undecodable files are skipped and listed in
    ``index.skipped``; the build fails only when nothing at all could be written.
    ``workers`` processes read and check the images; the output does not depend on how
    many. ``max_side`` stores images whose longer side exceeds it resized to it (JPEG,
    quality 95); the others are stored untouched. After each finished shard the build
    notes its progress in ``<prefix>-build.json``; ``resume=True`` continues from there.
    """
    src, out = Path(src), Path(out)
    if (samples_per_shard is not None and samples_per_shard < 1) or bytes_per_shard < 1:
        raise SourceError("--samples-per-shard and --bytes-per-shard must be at least 1")
    if max_per_class is not None and max_per_class < 1:
        raise SourceError("--max-per-class must be at least 1")
    if workers < 1:
        raise SourceError(f"--workers must be at least 1, got {workers}")
    if max_side is not None and max_side < 1:
        raise SourceError(f"--max-side must be at least 1, got {max_side}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", prefix):
        raise SourceError(f"prefix {prefix!r} must be letters, digits, '_' or '-' (no dots or slashes)")
    images, classes = scan_source(src, labelled)
    if max_per_class is not None and classes is None:
        raise SourceError("--max-per-class needs a labelled source (class sub-folders)")
    _prepare_out(out, prefix)

    order = _select(images, shuffle, seed)
    if samples_per_shard is None:
        wanted = len(order)
        if max_per_class is not None:
            wanted = sum(min(n, max_per_class) for n in Counter(image.label for image in order).values())
        samples_per_shard = default_samples_per_shard(wanted)
    key_digits = max(6, len(str(len(order))))
    settings = {"src": str(src.resolve()), "images": len(order), "classes": classes, "shuffle": shuffle, "seed": seed,
                "samples_per_shard": samples_per_shard, "bytes_per_shard": bytes_per_shard,
                "max_per_class": max_per_class, "max_side": max_side}  # fmt: skip
    journal = journal_path(out, prefix)
    state = _resume_state(journal, settings) if resume else None
    if state is None:
        journal.unlink(missing_ok=True)
        state = {"next": 0, "shards": [], "skipped": [], "taken": []}
    taken: Counter[int | None] = Counter({label: n for label, n in state["taken"]})
    skipped: list[tuple[int, dict[str, str]]] = [(p, s) for p, s in state["skipped"]]
    current = {"position": -1, "label": None}

    def save_progress(next_position: int) -> None:
        """After each finished shard: what a resumed build needs to go on from ``next_position``."""
        done = Counter(taken)
        if current["position"] < next_position and current["position"] >= 0:
            done[current["label"]] += 1  # the sample just added, not counted in ``taken`` yet
        progress = {"settings": settings, "next": next_position, "shards": [asdict(e) for e in writer.entries],
                    "skipped": [[p, s] for p, s in skipped if p < next_position],
                    "taken": sorted(done.items(), key=lambda kv: -1 if kv[0] is None else kv[0])}  # fmt: skip
        write_atomic(journal, json.dumps(progress) + "\n")

    entries = [ShardEntry(e["name"], e["samples"]) for e in state["shards"]]
    writer = _ShardWriter(out, prefix, samples_per_shard, bytes_per_shard, entries, save_progress)

    def wanted(image: SourceImage) -> bool:
        return max_per_class is None or taken[image.label] < max_per_class

    written = sum(taken.values())  # samples in the shards so far: the next sample's key
    try:
        for position, image, stored in _in_order(order, state["next"], workers, max_side, wanted):
            if not wanted(image):
                continue
            if isinstance(stored, str):
                skipped.append((position, {"path": image.rel, "reason": stored}))
                continue
            members = [stored]
            if image.label is not None:
                members.append(("cls", str(image.label).encode("ascii")))
            current.update(position=position, label=image.label)
            writer.add(f"{written:0{key_digits}d}", members, position)
            taken[image.label] += 1
            written += 1
            current["position"] = -1
        writer.close_shard()
    except BaseException:
        writer.abandon()
        raise
    if not writer.entries:
        raise SourceError(f"no image in {src} could be decoded ({len(skipped)} skipped)")

    index = ShardIndex(
        prefix=prefix,
        shards=writer.entries,
        classes=classes,
        skipped=[s for _, s in skipped],
        source=source if source is not None else str(src),
        seed=seed if shuffle else None,
    )
    write_index(out, index)
    journal.unlink(missing_ok=True)
    _remove_extra_shards(out, index)
    return index


def unlisted_shards(folder: Path, index: ShardIndex) -> list[Path]:
    """Shard files of the index's set that it does not list: a reader that globs
    ``train-*.tar`` would read samples the index does not count."""
    listed, pattern = set(index.counts()), shard_pattern(index.prefix)
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.name not in listed)


def _remove_extra_shards(out: Path, index: ShardIndex) -> None:
    """Delete shards left from an earlier, larger build of the same prefix."""
    for path in unlisted_shards(out, index):
        path.unlink()


def format_report(index: ShardIndex, out: str | os.PathLike) -> str:
    """The build summary printed by the CLI."""
    names = [s.name for s in index.shards]
    lines = [
        f"wrote {len(names)} shard(s) to {out}: {names[0]} .. {names[-1]}",
        f"samples: {index.total}",
    ]
    if index.classes is None:
        lines.append("classes: none (unlabelled)")
    else:
        lines.append(f"classes ({len(index.classes)}): {', '.join(index.classes)}")
    lines.append(f"skipped: {len(index.skipped)}")
    lines += [f"  {s['path']}: {s['reason']}" for s in index.skipped]
    lines.append(f"pretrain on them: {pretrain_command(index, out)}")
    return "\n".join(lines)


def shards_spec(index: ShardIndex, out: str | os.PathLike) -> str:
    """The index's shards as one ``data.train`` value: a brace pattern over their numbers."""
    names = [s.name for s in index.shards]
    if names != [shard_name(index.prefix, n) for n in range(len(names))]:  # not numbered 0..n-1
        return "::".join(os.path.join(out, name) for name in names)
    if len(names) == 1:
        return os.path.join(out, names[0])
    return os.path.join(out, f"{index.prefix}-{{{0:0{SHARD_DIGITS}d}..{len(names) - 1:0{SHARD_DIGITS}d}}}.tar")


def pretrain_command(index: ShardIndex, out: str | os.PathLike) -> str:
    """The command line that pretrains the default model on the shards just built (no validation set)."""
    return f"accelerate launch -m pipelines.pretrain {shlex.quote('data.train=' + shards_spec(index, out))} data.val=''"
