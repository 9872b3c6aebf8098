"""Shared fixtures: small folders of real images, with the broken files real folders contain."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.datasets import dataset

CIFAR10_TEST = dataset("cifar10/test.tar.gz")  # None unless $MAE_DATASETS holds it
SHIPPED_SAMPLE = Path(__file__).resolve().parents[1] / "shards" / "cifar10"
PER_CLASS = 6


def _jpegs_from_tar(tar: tarfile.TarFile, per_class: int) -> dict[str, list[bytes]]:
    """First ``per_class`` JPEGs of each class from a ``test/<class>/<n>.jpg`` archive."""
    found: dict[str, list[bytes]] = defaultdict(list)
    for member in tar:
        parts = member.name.split("/")
        if member.isfile() and len(parts) == 3 and len(found[parts[1]]) < per_class:
            found[parts[1]].append(tar.extractfile(member).read())
    return dict(found)


def _jpegs_from_shards(folder: Path, per_class: int) -> dict[str, list[bytes]]:
    """The same from the repo's shipped test shards, for machines without the dataset."""
    classes = json.loads((folder / "test-index.json").read_text())["classes"]
    found: dict[str, list[bytes]] = defaultdict(list)
    for shard in sorted(folder.glob("test-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                label = classes[int(members[name[: -len("jpg")] + "cls"])]
                if len(found[label]) < per_class:
                    found[label].append(data)
    return dict(found)


@pytest.fixture(scope="session")
def real_jpegs() -> dict[str, list[bytes]]:
    """Real CIFAR-10 test JPEGs, ``PER_CLASS`` per class, keyed by class name."""
    if CIFAR10_TEST is not None:
        with tarfile.open(CIFAR10_TEST, "r:gz") as tar:
            return _jpegs_from_tar(tar, PER_CLASS)
    return _jpegs_from_shards(SHIPPED_SAMPLE, PER_CLASS)


@dataclass
class ImageTree:
    root: Path
    classes: list[str]
    good: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # rel path -> (class, bytes)
    bad: set[str] = field(default_factory=set)  # rel paths a reader must reject

    def add(self, rel: str, data: bytes, *, good: bool) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if good:
            self.good[rel] = (rel.split("/")[0], data)
        else:
            self.bad.add(rel)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_tree(tmp_path: Path, real_jpegs: dict[str, list[bytes]]) -> ImageTree:
    """A class-folder tree of real JPEGs plus planted files.

    Rejected: a truncated JPEG, a zero-byte ``.jpg``, a text file named ``.png``.
    Accepted (odd colour modes a reader converts): greyscale PNG, CMYK JPEG, RGBA PNG.
    Ignored: a ``notes.txt`` and a hidden ``.DS_Store``.
    """
    classes = sorted(real_jpegs)
    tree = ImageTree(tmp_path / "images", classes)
    for name in classes:
        for i, data in enumerate(real_jpegs[name]):
            tree.add(f"{name}/{i:03d}.jpg", data, good=True)
    sample = Image.open(io.BytesIO(real_jpegs[classes[0]][0]))
    tree.add(f"{classes[1]}/truncated.jpg", real_jpegs[classes[1]][0][:300], good=False)
    tree.add(f"{classes[2]}/empty.jpg", b"", good=False)
    tree.add(f"{classes[3]}/not-an-image.png", b"this is a text file\n", good=False)
    tree.add(f"{classes[4]}/grey.png", _encoded(sample.convert("L"), "PNG"), good=True)
    tree.add(f"{classes[5]}/cmyk.jpg", _encoded(sample.convert("CMYK"), "JPEG"), good=True)
    tree.add(f"{classes[6]}/rgba.png", _encoded(sample.convert("RGBA"), "PNG"), good=True)
    (tree.root / classes[0] / "notes.txt").write_text("not an image\n")
    (tree.root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return tree
