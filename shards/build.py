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
import signal
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import BinaryIO, NoReturn

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


def _holds_image(folder: Path) -> bool:
    """Whether ``_images_below(folder)`` would find any, stopping at the first: the layout is
    detected before the real scan, and a class folder can hold thousands of files."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") and _is_image(f) for f in files):
            return True
    return False


def detect_labelled(src: Path) -> bool:
    """Labelled (ImageFolder layout) when every entry of SRC is a folder holding images."""
    entries = _visible_entries(src)
    return bool(entries) and all(p.is_dir() and _holds_image(p) for p in entries)


def scan_source(src: Path, labelled: bool | None) -> tuple[list[SourceImage], list[str] | None]:
    """List the candidate images and, for a labelled source, the sorted class names."""
    if not src.exists():
        raise SourceError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise SourceError(f"source {src} is not a folder")
    if labelled is None:
        labelled = detect_labelled(src)
    if not labelled:
        base = os.path.join(src, "")  # joined once: os.path.join per image of a Path is most of a scan
        images = [SourceImage(base + rel, rel, None) for rel in _images_below(src)]
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
        base = os.path.join(src, name, "")
        images += [SourceImage(base + rel, f"{name}/{rel}", label) for rel in found]
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
# A header's fields: name [0, 100), size [124, 136) (11 octal digits), checksum [148, 156) (6).
_MODE_TO_SIZE, _MTIME_TO_CHECKSUM, _AFTER_CHECKSUM = _HEADER[100:124], _HEADER[136:148], _HEADER[156:]
# The ustar checksum is the plain sum of the header's bytes with its own field read as spaces:
# the template's share of it is summed once, a member's name and size add theirs.
_TEMPLATE_SUM = sum(_MODE_TO_SIZE) + sum(_MTIME_TO_CHECKSUM) + sum(b" " * 8) + sum(_AFTER_CHECKSUM)


def member_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for ``_tar_info(name, size)``, byte for byte, from a
    template: ``tarfile.addfile`` costs more per member than the build's decoding of a small
    image."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"member name {name!r} is longer than a USTAR name field")
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(encoded) + sum(size_field)
    return b"".join((encoded.ljust(100, b"\0"), _MODE_TO_SIZE, size_field, _MTIME_TO_CHECKSUM,
                     b"%06o\0 " % checksum, _AFTER_CHECKSUM))  # fmt: skip


def sample_members(key: str, members: list[tuple[str, bytes]]) -> list[bytes]:
    """A sample's members as a shard holds them, each a header, its data and zero padding to
    whole blocks; joined, the bytes ``tarfile`` would write for them."""
    return [part for ext, data in members for part in (member_header(f"{key}.{ext}", len(data)), data, bytes(-len(data) % BLOCK))]  # fmt: skip


def rekey(sample: bytes | memoryview, key: bytes) -> bytes:
    """``sample`` (``sample_members`` joined) with its key replaced by ``key`` of the same width:
    the start of each member's name, and its checksum moved by the difference of the byte sums.
    Workers name a batch's samples with the keys they will take if nothing in flight before
    them is skipped; the parent renames the few that moved."""
    out = bytearray(sample)
    shift = sum(key) - sum(out[: len(key)])
    at = 0
    while at < len(out):
        out[at : at + len(key)] = key
        out[at + 148 : at + 156] = b"%06o\0 " % (int(out[at + 148 : at + 154], 8) + shift)
        size = int(out[at + 124 : at + 135], 8)
        at += BLOCK + size + (-size % BLOCK)
    return bytes(out)


class _ShardWriter:
    """Writes numbered shards, each under a temporary name until it is complete.

    A reader (or a crashed build) therefore never sees a ``.tar`` that is half written.
    Samples come with their members laid out as ``tarfile`` would write them
    (``sample_members``); the end marker and record padding are written on close.
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

    def add(self, sample: bytes | memoryview, position: int = 0) -> None:
        """Add a sample, its members as ``sample_members`` lays them out; ``position`` is its
        image's place in the build order."""
        size = len(sample)
        # Start a new shard rather than overshoot the byte limit; a sample larger than
        # the limit still gets a shard of its own.
        if self._file is not None and tar_size(self._bytes + size) > self.bytes_per_shard:
            self._next = position
            self.close_shard()
        if self._file is None:
            self._shard = AtomicFile(self._final)
            self._file = open(self._shard.tmp, "wb")
        self._file.write(sample)
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


Batch = tuple[int, bytes, list]  # first key, the samples' bytes, per image its bytes' length or why it was skipped


def _stored_batch(task: tuple[list[str], list[int | None], int | None, int, int]) -> Batch:
    """A batch of images as shard bytes: each readable image, ``_stored``, as ``sample_members``
    keyed from ``first_key`` on, all joined; and per image the length of its bytes or why it
    is skipped. Runs in the build's worker processes: reading, decoding and laying out the
    members are the work that parallelises, and one bytes object a batch leaves the parent
    little to do per image, which on folders of small images is what limits the workers."""
    paths, labels, max_side, first_key, key_digits = task
    parts: list[bytes] = []
    layout: list[int | str] = []
    key = first_key
    for path, label in zip(paths, labels):
        stored = _stored(path, max_side)
        if isinstance(stored, str):
            layout.append(stored)
            continue
        members = [stored] if label is None else [stored, ("cls", str(label).encode("ascii"))]
        sample = sample_members(f"{key:0{key_digits}d}", members)
        parts += sample
        layout.append(sum(map(len, sample)))
        key += 1
    return first_key, b"".join(parts), layout


def _work(tasks: multiprocessing.Queue, results) -> None:
    """A worker process: ``_stored_batch`` of each numbered task until ``None``, each result
    (or the exception it raised) sent back with its number."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to report; it ends the workers
    for number, task in iter(tasks.get, None):
        try:
            result = _stored_batch(task)
        except Exception as err:  # a bug, not a bad file (those are skip reasons): raised in the parent
            result = err
        results.send((number, result))


class _Workers:
    """Processes running ``_stored_batch``; the results are read, in the order the tasks were
    given, by the calling thread itself.

    Not ``multiprocessing.Pool``: its worker-handler thread wakes whenever a result waits in
    the pipe and spins until the result-handler thread has read it; on the 10,000 CIFAR-10
    test JPEGs that spinning cost the parent 0.2-0.3 s of CPU (measured per thread), a third
    of all it did, taken from the workers on a 2-core machine.
    """

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context()
        self._tasks = ctx.Queue()  # sent by a feeder thread, so giving out tasks never blocks
        self._results: dict = {}  # the receiving end of each worker's pipe: its worker
        for _ in range(count):
            # A pipe made just before its worker starts, so that no other worker holds its
            # sending end: when its worker dies, the pipe reads as ended.
            receive, send = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_work, args=(self._tasks, send), daemon=True)
            process.start()
            send.close()
            self._results[receive] = process
        self._given = 0
        self._arrived: dict[int, Batch | Exception] = {}

    def give(self, task: tuple) -> int:
        """Queue ``task``; returns its number for ``result``."""
        self._tasks.put((self._given, task))
        self._given += 1
        return self._given - 1

    def result(self, number: int) -> Batch:
        while number not in self._arrived:
            ready = wait([*self._results, *(process.sentinel for process in self._results.values())])
            for conn, process in self._results.items():
                if conn in ready:
                    try:
                        arrived, result = conn.recv()
                    except (EOFError, OSError):  # the pipe ended, maybe mid-message: its worker died
                        self._died(process)
                    self._arrived[arrived] = result
                elif process.sentinel in ready:  # ended with nothing left to read
                    self._died(process)
        result = self._arrived.pop(number)
        if isinstance(result, Exception):
            raise result
        return result

    @staticmethod
    def _died(process: multiprocessing.Process) -> NoReturn:
        process.join()  # it has ended: this reads its exit status
        how = f"killed by signal {-process.exitcode}" if process.exitcode < 0 else f"exit code {process.exitcode}"
        raise RuntimeError(f"a shard build worker process died ({how}); if it ran out of memory, "
                           "build with fewer --workers")  # fmt: skip

    def stop(self) -> None:
        for process in self._results.values():
            process.terminate()
        for process in self._results.values():
            process.join()
        self._tasks.cancel_join_thread()  # tasks left unread are dropped, not waited for
        self._tasks.close()
        for conn in self._results:
            conn.close()


def _in_order(order: list[SourceImage], start: int, workers: int, max_side: int | None,
              wanted: Callable[[SourceImage], bool], key_digits: int,
              next_key: Callable[[], int]) -> Iterator[tuple[list[int], Batch]]:  # fmt: skip
    """(positions, ``_stored_batch`` of them) from ``start`` on, in build order whatever the
    worker count, so the shards are byte-identical. Images go out in windows, so that
    ``wanted`` (classes already full under --max-per-class) spares the workers most needless
    decoding and at most two windows of image bytes wait in memory; the next window is handed
    out before the current one is read, so the workers never wait for the parent. A window
    goes out in batches, about 8 per worker, so large photos still spread evenly, keyed from
    ``next_key()`` (the next sample's key) plus the images handed out before them and not yet
    read; without workers, image by image, each keyed when its turn comes."""
    pool = _Workers(workers) if workers > 1 else None
    window = 128 * workers
    ahead = 0  # images handed out and not read yet: the keys ahead of the next window's

    def task(batch: list[int], first_key: int) -> tuple[list[str], list[int | None], int | None, int, int]:
        return [order[p].path for p in batch], [order[p].label for p in batch], max_side, first_key, key_digits

    def hand_out(begin: int) -> tuple[list[list[int]], Iterator[Batch]]:
        nonlocal ahead
        chosen = [p for p in range(begin, min(len(order), begin + window)) if wanted(order[p])]
        if pool is None:  # alone, nothing to send: each image is read when the last one is written
            batches = [[p] for p in chosen]
            return batches, (_stored_batch(task(batch, next_key())) for batch in batches)
        size = max(1, len(chosen) // (8 * workers))
        batches = [chosen[i : i + size] for i in range(0, len(chosen), size)]
        first, numbers = next_key() + ahead, []
        for batch in batches:
            numbers.append(pool.give(task(batch, first)))
            first += len(batch)
        ahead += len(chosen)
        return batches, map(pool.result, numbers)

    def read(batches: list[list[int]], results: Iterator[Batch]) -> Iterator[tuple[list[int], Batch]]:
        nonlocal ahead
        for batch, result in zip(batches, results):
            ahead -= len(batch)
            yield batch, result

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
            pool.stop()


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
        for positions, (key, blob, layout) in _in_order(order, state["next"], workers, max_side, wanted, key_digits,
                                                        lambda: written):  # fmt: skip
            view, at = memoryview(blob), 0
            for position, stored in zip(positions, layout):
                image = order[position]
                if isinstance(stored, str):
                    if wanted(image):
                        skipped.append((position, {"path": image.rel, "reason": stored}))
                    continue
                sample, at = view[at : at + stored], at + stored
                keyed, key = key, key + 1  # the key the worker gave it
                if not wanted(image):
                    continue
                if keyed != written:  # an image in flight before it was skipped or not wanted
                    sample = rekey(sample, b"%0*d" % (key_digits, written))
                current.update(position=position, label=image.label)
                writer.add(sample, position)
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
