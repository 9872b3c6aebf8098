"""Shards made by other tools (webdataset's ShardWriter, img2dataset, plain ``tar``), without
this project's index: counted once from their tar headers, the count cached beside them or,
in a read-only folder, in the run's output folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torchvision.transforms as T
import webdataset as wds

from mae.data.loader import ShardLoader
from mae.data.shards import COUNTS_FILE, count_samples, shard_sizes, writable
from mae.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TO_TENSOR = T.Compose([T.Resize((8, 8)), T.ToTensor()])


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    with tarfile.open(ROOT / "shards" / "cifar10" / "train-000000.tar") as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:200]


def shard_writer_shards(folder: Path, jpegs: list[bytes], per_shard: int) -> list[int]:
    """webdataset's ShardWriter, as its users write: ``__key__``, ``jpg``, ``cls``; one sample
    of each shard has no image (a caption only) and is not a training sample."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: list[int] = []
    with wds.ShardWriter(str(folder / "part-%06d.tar"), maxcount=per_shard + 1, verbose=0) as sink:
        for i, data in enumerate(jpegs):
            if i % per_shard == 0:
                sink.write({"__key__": f"caption{i:06d}", "txt": "no image here"})
                counts.append(0)
            sink.write({"__key__": f"sample{i:06d}", "jpg": data, "cls": str(i % 10).encode()})
            counts[-1] += 1
    return counts


def tar_command_shards(folder: Path, jpegs: list[bytes], per_shard: int) -> list[int]:
    """Plain ``tar -cf`` over a folder of ``<key>.jpg`` / ``<key>.cls`` files, as a user would."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = []
    for s in range(0, len(jpegs), per_shard):
        files = folder / f"files{s}"
        files.mkdir()
        for i, data in enumerate(jpegs[s : s + per_shard], start=s):
            (files / f"{i:06d}.jpg").write_bytes(data)
            (files / f"{i:06d}.cls").write_text(str(i % 10))
        subprocess.run(["tar", "--sort=name", "-cf", str(folder / f"shard-{s // per_shard:02d}.tar"), "-C", str(files),
                        "."], check=True)  # fmt: skip
        shutil.rmtree(files)
        counts.append(len(jpegs[s : s + per_shard]))
    return counts


@contextlib.contextmanager
def read_only(folder: Path, how: str = "mount") -> Iterator[None]:
    """``folder`` made read-only for real: a read-only bind mount where this process may mount
    (root in a container), else (or with ``how="mode"``) its mode, which a non-root process
    cannot write through and root is expected to respect. The loader must write nothing there."""
    mounted = how == "mount" and subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)],
                             capture_output=True).returncode == 0  # fmt: skip
    if mounted:
        try:
            if writable_for_real(folder):  # older mounts ignore ro on a bind: remount it so
                subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
            assert not writable_for_real(folder)
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(mode)


def writable_for_real(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


def test_header_counts_of_shard_writer_and_tar_shards_match_what_the_loader_reads(tmp_path, jpegs) -> None:
    """A sample is a run of members sharing a key; only those with an image count, and the
    loader reads exactly that many images."""
    writer = shard_writer_shards(tmp_path / "writer", jpegs[:50], per_shard=20)
    command = tar_command_shards(tmp_path / "tar", jpegs[:50], per_shard=20)
    for folder, counts in ((tmp_path / "writer", writer), (tmp_path / "tar", command)):
        shards = sorted(str(p) for p in folder.glob("*.tar"))
        assert [count_samples(s) for s in shards] == counts == [20, 20, 10]
        loader = ShardLoader(str(folder), TO_TENSOR, batch_size=8, num_workers=1, shuffle=False)
        assert loader.samples_per_epoch == 50 and loader.batches_per_epoch(0) == 7
        loader.set_epoch(0)
        assert sum(len(b["label"]) for b in loader) == 50


def test_counts_are_cached_beside_a_writable_folder_and_a_changed_shard_is_counted_again(tmp_path, jpegs) -> None:
    counts = tar_command_shards(tmp_path, jpegs[:30], per_shard=10)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert list(shard_sizes(shards).values()) == counts
    cache = json.loads((tmp_path / COUNTS_FILE).read_text())
    assert {name: entry["samples"] for name, entry in cache["shards"].items()} == {
        Path(s).name: 10 for s in shards}  # fmt: skip
    cache["shards"][Path(shards[0]).name]["samples"] = 7  # the cache is read, not the headers again
    (tmp_path / COUNTS_FILE).write_text(json.dumps(cache))
    assert list(shard_sizes(shards).values()) == [7, 10, 10]
    with tarfile.open(shards[0], "a") as tar:  # a shard that changes is counted again
        tar.add(tmp_path / Path(shards[1]).name, arcname="extra.jpg")
    assert list(shard_sizes(shards).values()) == [11, 10, 10]


@pytest.mark.parametrize("how", ["mount", "mode"])
def test_read_only_folder_is_left_untouched_and_the_counts_go_to_the_output_folder(tmp_path, jpegs, how) -> None:
    folder, out = tmp_path / "shards", tmp_path / "run"
    counts = shard_writer_shards(folder, jpegs[:40], per_shard=10)
    with read_only(folder, how):
        assert not writable(folder)
        before = sorted(os.listdir(folder))
        loader = ShardLoader(str(folder), TO_TENSOR, batch_size=5, num_workers=2, cache_dir=out)
        assert list(loader.sizes.values()) == counts and loader.batches_per_epoch(0) == 8
        assert sorted(os.listdir(folder)) == before
        cached = json.loads((out / COUNTS_FILE).read_text())["shards"]
        assert sorted(Path(k).name for k in cached) == before
        # without an output folder the counts are read again, and still nothing is written there
        assert list(shard_sizes(sorted(str(p) for p in folder.glob("*.tar"))).values()) == counts
        assert sorted(os.listdir(folder)) == before


def test_img2dataset_stats_give_the_counts(tmp_path, jpegs) -> None:
    """img2dataset writes ``00000_stats.json`` beside ``00000.tar``: its ``successes`` is the count."""
    tar_command_shards(tmp_path, jpegs[:10], per_shard=10)
    shard = tmp_path / "00000.tar"
    (tmp_path / "shard-00.tar").rename(shard)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 12, "successes": 9, "failed_to_download": 3}))
    assert shard_sizes([str(shard)]) == {str(shard): 9}
    assert not (tmp_path / COUNTS_FILE).exists()  # no tar header was read


def test_a_tar_cut_short_counts_the_samples_before_the_cut(tmp_path, jpegs) -> None:
    tar_command_shards(tmp_path, jpegs[:10], per_shard=10)
    shard = tmp_path / "shard-00.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert 0 < count_samples(shard) < 10


@pytest.mark.slow
def test_default_pretraining_trains_on_tar_shards_in_a_read_only_folder(tmp_path, jpegs) -> None:
    """Four shards made with ``tar`` (50 images each) in a read-only folder: pretraining counts
    them into an epoch of 2 workers x ceil(100 / 16) = 14 steps, caching the counts in output_dir."""
    folder, out = tmp_path / "shards", tmp_path / "run"
    tar_command_shards(folder, jpegs, per_shard=50)
    with read_only(folder):
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.pretrain", f"output_dir={out}", f"data.train={folder}", "data.val=",
             "batch_size=16", "epochs=2", "warmup_epochs=1", "log_every=1", "model_overrides.depth=2",
             "progress=false", "num_vis=0"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (folder / COUNTS_FILE).exists()
    assert "14 optimiser steps per epoch, 28 in all" in proc.stdout
    records = [m for m in read_metrics(out) if "loss" in m]
    assert [r["step"] for r in records] == list(range(1, 29))
    assert [r["epoch"] for r in records] == [0] * 14 + [1] * 14
    assert (out / COUNTS_FILE).is_file()
