"""``python -m shards build|verify`` on real image files and real tar shards."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import webdataset as wds

from mae.data.decode import decode_rgb
from mae.data.shard_index import ShardEntry, ShardIndex, index_path, read_index, write_index
from shards.__main__ import main
from shards.build import SourceError, build_shards
from shards.verify import verify_shard, verify_shards

if TYPE_CHECKING:
    from conftest import ImageTree

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SAMPLE = REPO / "shards" / "cifar10"


def shard_files(out: Path, prefix: str = "train") -> list[Path]:
    return sorted(out.glob(f"{prefix}-*.tar"))


def read_back(out: Path, prefix: str = "train") -> list[dict]:
    """Every sample, through a plain WebDataset pipeline as a trainer would read it."""
    urls = [str(p) for p in shard_files(out, prefix)]
    return list(wds.WebDataset(urls, shardshuffle=False))


def image_bytes(sample: dict) -> bytes:
    (ext,) = [k for k in sample if k in ("jpg", "jpeg", "png")]
    return sample[ext]


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def tiny_jpegs(src: Path, per_class: int, seed: int) -> None:
    """Classes ``a`` and ``b`` of ``per_class`` 8 x 8 JPEGs each, of random flat colours:
    folders of small files, where the parent's share of a build counts most."""
    from PIL import Image

    rng = random.Random(seed)
    for label in ("a", "b"):
        (src / label).mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (8, 8), tuple(rng.randrange(256) for _ in range(3)))
            img.save(src / label / f"{i:03d}.jpg", format="JPEG")


def test_build_verify_and_read_back_with_webdataset(image_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "out"
    index = build_shards(image_tree.root, out, samples_per_shard=16)

    assert index.classes == image_tree.classes
    assert [s.samples for s in index.shards] == [16, 16, 16, 15]
    assert verify_shards(out) == []
    assert read_index(index_path(out, "train")) == index

    by_bytes = {data: cls for cls, data in image_tree.good.values()}
    samples = read_back(out)
    assert len(samples) == len(image_tree.good) == len(by_bytes)
    assert Counter(image_bytes(s) for s in samples) == Counter(list(by_bytes))  # each exactly once
    for sample in samples:
        data = image_bytes(sample)
        assert index.classes[int(sample["cls"])] == by_bytes[data]
        assert decode_rgb(data).mode == "RGB"
    assert sorted(s["__key__"] for s in samples) == [f"{i:06d}" for i in range(len(samples))]
    assert {s["path"] for s in index.skipped} == image_tree.bad
    assert all(s["reason"] for s in index.skipped)


def test_cli_build_prints_report_with_skipped(image_tree: ImageTree, tmp_path: Path, capsys) -> None:
    assert main(["build", str(image_tree.root), str(tmp_path / "out"), "--prefix", "val"]) == 0
    report = capsys.readouterr().out
    assert "samples: 63" in report and f"skipped: {len(image_tree.bad)}" in report
    for rel in image_tree.bad:
        assert rel in report
    assert main(["verify", str(tmp_path / "out"), "--prefix", "val"]) == 0


def test_small_folder_gets_a_shard_per_default_reader_and_the_pretraining_command(
    image_tree: ImageTree, tmp_path: Path, capsys
) -> None:
    """Without --samples-per-shard a small folder is cut so that the default pretraining (one
    process, data.num_workers loader workers) reads it at full speed, and the report ends with
    the command line that pretrains on exactly the shards written."""
    import shlex

    from mae.data.loader import DataConfig
    from mae.data.shards import expand_shards
    from shards.build import DEFAULT_READERS, default_samples_per_shard

    readers = DataConfig().num_workers
    assert DEFAULT_READERS == readers  # the shard tools' copy, kept so that they never load torch
    assert [default_samples_per_shard(n) for n in (1, 75, 1999, 2000, 100_000)] == [1, 38, 1000, 1000, 1000]
    out = tmp_path / "out"
    assert main(["build", str(image_tree.root), str(out)]) == 0
    index = read_index(index_path(out, "train"))
    assert len(index.shards) == readers and index.total == len(image_tree.good)
    command = capsys.readouterr().out.splitlines()[-1].removeprefix("pretrain on them: ")
    argv = shlex.split(command)
    assert argv[:4] == ["accelerate", "launch", "-m", "pipelines.pretrain"] and argv[5] == "data.val="
    assert sorted(expand_shards(argv[4].removeprefix("data.train="))) == [str(p) for p in shard_files(out)]


def test_unlabelled_nested_folder(real_jpegs: dict[str, list[bytes]], tmp_path: Path) -> None:
    src = tmp_path / "flat"
    jpegs = [data for per_class in real_jpegs.values() for data in per_class][:20]
    for i, data in enumerate(jpegs):
        path = src / ("" if i < 5 else f"a/b{i % 3}") / f"img{i}.JPG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    index = build_shards(src, tmp_path / "out")
    assert index.classes is None
    samples = read_back(tmp_path / "out")
    assert sorted(image_bytes(s) for s in samples) == sorted(jpegs)
    assert not any("cls" in s for s in samples)
    assert verify_shards(tmp_path / "out") == []


def test_layout_can_be_forced(image_tree: ImageTree, tmp_path: Path) -> None:
    index = build_shards(image_tree.root, tmp_path / "out", labelled=False)
    assert index.classes is None
    assert not any("cls" in s for s in read_back(tmp_path / "out"))


def test_samples_per_shard_limit(image_tree: ImageTree, tmp_path: Path) -> None:
    index = build_shards(image_tree.root, tmp_path / "out", samples_per_shard=10)
    assert [s.samples for s in index.shards] == [10] * 6 + [3]
    assert [p.name for p in shard_files(tmp_path / "out")] == [f"train-{i:06d}.tar" for i in range(7)]


def test_bytes_per_shard_limit(image_tree: ImageTree, tmp_path: Path) -> None:
    limit = 40_000
    index = build_shards(image_tree.root, tmp_path / "out", bytes_per_shard=limit, samples_per_shard=1000)
    files = shard_files(tmp_path / "out")
    assert len(files) > 2 and index.total == len(image_tree.good)
    assert all(p.stat().st_size <= limit for p in files)
    # Not split too early: the next shard's first sample would not have fitted.
    for this, following in zip(files, files[1:]):
        with tarfile.open(this) as a, tarfile.open(following) as b:
            members = [(m.name, a.extractfile(m).read()) for m in a]
            members += [(m.name, b.extractfile(m).read()) for m in b.getmembers()[:2]]
        write_tar(tmp_path / "merged.tar", members)
        assert (tmp_path / "merged.tar").stat().st_size > limit


def test_sample_larger_than_byte_limit_gets_its_own_shard(image_tree: ImageTree, tmp_path: Path) -> None:
    index = build_shards(image_tree.root, tmp_path / "out", bytes_per_shard=1)
    assert [s.samples for s in index.shards] == [1] * len(image_tree.good)


def test_same_seed_is_byte_identical_other_seed_reorders(image_tree: ImageTree, tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_shards(image_tree.root, tmp_path / name, samples_per_shard=20, seed=seed, source="test")
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    order_a = [image_bytes(s) for s in read_back(tmp_path / "a")]
    order_c = [image_bytes(s) for s in read_back(tmp_path / "c")]
    assert order_a != order_c and sorted(order_a) == sorted(order_c)


def test_no_shuffle_keeps_sorted_path_order(image_tree: ImageTree, tmp_path: Path) -> None:
    index = build_shards(image_tree.root, tmp_path / "out", shuffle=False)
    assert index.seed is None
    expected = [data for _, (_, data) in sorted(image_tree.good.items())]
    assert [image_bytes(s) for s in read_back(tmp_path / "out")] == expected


def test_max_per_class_counts_only_decodable_images(image_tree: ImageTree, tmp_path: Path) -> None:
    index = build_shards(image_tree.root, tmp_path / "out", max_per_class=6)
    labels = Counter(int(s["cls"]) for s in read_back(tmp_path / "out"))
    assert labels == Counter({i: 6 for i in range(len(image_tree.classes))})
    assert index.total == 60


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO to hold the build mid-way")
def test_killed_build_leaves_only_complete_shards(real_jpegs: dict[str, list[bytes]], tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    jpegs = [data for per_class in real_jpegs.values() for data in per_class][:30]
    for i, data in enumerate(jpegs):
        (src / f"{i:03d}.jpg").write_bytes(data)
    fifo = src / "015_blocks.jpg"  # sorted right after 015.jpg: reading it waits forever
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "shards", "build", str(src), str(out), "--no-shuffle", "--samples-per-shard", "5",
           "--workers", "1"]  # fmt: skip  (a worker process blocked on the FIFO would outlive the kill)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (out / "train-000003.tar.tmp").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert [p.name for p in shard_files(out)] == [f"train-{i:06d}.tar" for i in range(3)]
    assert not index_path(out, "train").exists()
    partial = ShardIndex("train", [])
    for path in shard_files(out):
        assert verify_shard(out, ShardEntry(path.name, 5), partial) == []

    fifo.unlink()
    fifo.write_bytes(jpegs[0])  # the file it was waiting for is now there
    finished = {p.name: p.stat().st_mtime_ns for p in shard_files(out)}
    assert main(["build", str(src), str(out), "--no-shuffle", "--samples-per-shard", "5", "--resume"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in shard_files(out)[:3]} == finished  # kept, not rewritten
    assert not list(out.glob("*.tmp")) and not (out / "train-build.json").exists()
    assert verify_shards(out) == [] and read_index(index_path(out, "train")).total == 31
    fresh = tmp_path / "fresh"
    assert main(["build", str(src), str(fresh), "--no-shuffle", "--samples-per-shard", "5"]) == 0
    assert folder_bytes(out) == folder_bytes(fresh)  # the resumed build is the uninterrupted one


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO to hold a worker mid-way")
def test_a_worker_that_dies_ends_the_build_with_a_line_naming_it(tmp_path: Path) -> None:
    """Worker processes killed mid-build (as the OOM killer would) end the build with an error
    saying so, rather than a build that waits forever; finished shards stay, the partial one goes."""
    import multiprocessing
    import signal
    import threading

    tiny_jpegs(tmp_path / "src", 20, seed=2)
    os.mkfifo(tmp_path / "src" / "a" / "010-blocks.jpg")  # sorted right after 009.jpg: its reader waits
    errors: list[str] = []

    def build() -> None:
        try:
            build_shards(tmp_path / "src", tmp_path / "out", shuffle=False, samples_per_shard=5, workers=2)
        except RuntimeError as err:
            errors.append(str(err))

    thread = threading.Thread(target=build, daemon=True)  # a build that hangs must not hang the tests
    thread.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "out" / "train-000001.tar").exists():
        assert thread.is_alive() and time.monotonic() < deadline, errors
        time.sleep(0.05)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert errors == ["a shard build worker process died (killed by signal 9); if it ran out of memory, "
                      "build with fewer --workers"]  # fmt: skip
    assert [p.name for p in shard_files(tmp_path / "out")] == ["train-000000.tar", "train-000001.tar"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_resume_with_other_settings_is_refused_naming_them(image_tree: ImageTree, tmp_path: Path) -> None:
    """A journal of another build's settings: --resume stops, naming what changed."""
    import json

    out = tmp_path / "out"
    build_shards(image_tree.root, out, samples_per_shard=16)
    journal = out / "train-build.json"
    state = {"settings": {"seed": 0, "samples_per_shard": 16}, "next": 16, "shards": [], "skipped": [], "taken": []}
    journal.write_text(json.dumps(state))
    with pytest.raises(SourceError, match="samples_per_shard: 16 then, 10 now"):
        build_shards(image_tree.root, out, samples_per_shard=10, resume=True)


@pytest.mark.parametrize("max_side", [None, 20])
def test_output_is_byte_identical_whatever_the_worker_count(image_tree: ImageTree, tmp_path: Path,
                                                            max_side: int | None) -> None:  # fmt: skip
    """1, 2 and 3 worker processes write the same bytes for the same seed (--max-side too)."""
    outputs = []
    for workers in (1, 2, 3):
        build_shards(image_tree.root, tmp_path / f"w{workers}", samples_per_shard=10, seed=5, workers=workers,
                     max_side=max_side, source="test")  # fmt: skip
        outputs.append(folder_bytes(tmp_path / f"w{workers}"))
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize(("name", "size"), [("000000.jpg", 0), ("000123.cls", 1), ("0012345678.jpeg", 10**9),
                                           ("x" * 100, 511)])  # fmt: skip
def test_member_header_is_the_one_tarfile_writes(name: str, size: int) -> None:
    from shards.build import _tar_info, member_header

    assert member_header(name, size) == _tar_info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_rekey_gives_the_bytes_of_a_sample_written_with_that_key() -> None:
    """Workers key samples ahead of time; renaming one in the parent must leave exactly the
    bytes the new key would have had from the start (names and checksums)."""
    from shards.build import rekey, sample_members

    members = [("jpeg", bytes(range(256)) * 3), ("cls", b"7")]
    for old, new in [("000000", "049999"), ("999999", "000001"), ("0000123", "9876543")]:
        assert rekey(b"".join(sample_members(old, members)), new.encode()) == b"".join(sample_members(new, members))


def test_skips_in_flight_renumber_later_samples_identically(tmp_path: Path) -> None:
    """Undecodable files at the start of the first batches: the samples the workers had keyed
    after them take the next free keys, and 1 and 2 workers write the same shards."""
    tiny_jpegs(tmp_path / "src", 200, seed=1)
    for name in ("000-bad.jpg", "016-bad.jpg", "150-bad.jpg"):  # sorted before 000.jpg, 016.jpg, 150.jpg
        (tmp_path / "src" / "a" / name).write_bytes(b"not a jpeg")
    outputs = []
    for workers in (1, 2):
        index = build_shards(tmp_path / "src", tmp_path / f"w{workers}", samples_per_shard=64, shuffle=False,
                             workers=workers, source="test")  # fmt: skip
        assert index.total == 400 and [s["path"] for s in index.skipped] == ["a/000-bad.jpg", "a/016-bad.jpg",
                                                                              "a/150-bad.jpg"]  # fmt: skip
        outputs.append(folder_bytes(tmp_path / f"w{workers}"))
    assert outputs[0] == outputs[1]
    samples = read_back(tmp_path / "w2")
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(400)]
    assert verify_shards(tmp_path / "w2") == []


def test_shard_tools_start_without_the_model_libraries() -> None:
    """``python -m shards`` loads neither timm nor torch (seconds of start-up), while
    ``import mae`` still registers the vit_ff models with timm once timm is imported."""
    probe = ("import sys, shards.__main__, shards.build, shards.verify, mae; "
             "print(sorted(m for m in ('timm', 'torch') if m in sys.modules)); "
             "import timm; print('vit_ff_tiny_patch16_224' in timm.list_models('vit_ff*'))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["[]", "True"], proc.stderr[-2000:]


def test_many_small_images_are_byte_identical_across_windows_and_workers(tmp_path: Path) -> None:
    """600 tiny JPEGs: several windows of batches in flight at once, with --max-per-class
    filtering them, give the same shards for 1 and 2 workers, with exactly N per class."""
    tiny_jpegs(tmp_path / "src", 300, seed=0)
    outputs = []
    for workers in (1, 2):
        index = build_shards(tmp_path / "src", tmp_path / f"w{workers}", samples_per_shard=97, max_per_class=250,
                             workers=workers, source="test")  # fmt: skip
        assert index.total == 500
        outputs.append(folder_bytes(tmp_path / f"w{workers}"))
    assert outputs[0] == outputs[1]
    assert Counter(s["cls"] for s in read_back(tmp_path / "w2")) == {b"0": 250, b"1": 250}


def test_max_side_resizes_only_larger_images_to_jpeg_95(image_tree: ImageTree, tmp_path: Path) -> None:
    """--max-side 20 stores the 32 x 32 images as 20 x 20 JPEGs; --max-side 32 stores every file untouched."""
    from PIL import Image

    build_shards(image_tree.root, tmp_path / "small", max_side=20)
    samples = read_back(tmp_path / "small")
    assert len(samples) == len(image_tree.good)
    for sample in samples:
        assert "jpg" in sample and "png" not in sample
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.format == "JPEG" and img.size == (20, 20) and img.mode == "RGB"
    build_shards(image_tree.root, tmp_path / "same", max_side=32)
    stored = Counter(image_bytes(s) for s in read_back(tmp_path / "same"))
    assert stored == Counter(data for _, data in image_tree.good.values())


def test_rebuild_removes_shards_the_new_index_does_not_list(image_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_shards(image_tree.root, out, samples_per_shard=5)
    (out / "train-000002.tar.tmp").write_bytes(b"half a shard")
    build_shards(image_tree.root, out, samples_per_shard=50)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-000001.tar", "train-index.json"]
    assert verify_shards(out) == []


@pytest.fixture
def built(image_tree: ImageTree, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    build_shards(image_tree.root, out, samples_per_shard=20)
    return out


def test_verify_fails_on_truncated_shard(built: Path, capsys) -> None:
    shard = built / "train-000001.tar"
    os.truncate(shard, shard.stat().st_size // 2)
    assert main(["verify", str(built)]) == 1
    assert "train-000001.tar: tar read error" in capsys.readouterr().out


def test_verify_fails_on_shard_cut_at_a_member_boundary(built: Path, capsys) -> None:
    shard = built / "train-000002.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[10].offset  # a header boundary: the tar still parses
    os.truncate(shard, cut)
    assert main(["verify", str(built)]) == 1
    out = capsys.readouterr().out
    assert "train-000002.tar: no end-of-archive marker" in out
    assert "train-000002.tar: holds 5 samples, index says 20" in out


def test_verify_fails_on_count_mismatch_missing_and_unlisted_shard(built: Path, capsys) -> None:
    index = read_index(index_path(built, "train"))
    index.shards[0].samples += 1
    write_index(built, index)
    (built / "train-000003.tar").rename(built / "train-000009.tar")
    assert main(["verify", str(built)]) == 1
    out = capsys.readouterr().out
    assert "train-000000.tar: holds 20 samples, index says 21" in out
    assert "train-000003.tar: missing shard file" in out
    assert "train-000009.tar: shard not listed in train-index.json" in out


def test_verify_names_bad_members(real_jpegs: dict[str, list[bytes]], tmp_path: Path) -> None:
    good = real_jpegs["cat"][0]
    write_tar(tmp_path / "x-000000.tar", [
        ("000000.jpg", good), ("000000.cls", b"1"),
        ("000001.jpg", good[:200]), ("000001.cls", b"0"),
        ("000002.txt", b"caption only"), ("000002.cls", b"0"),
        ("000003.jpg", good), ("000003.cls", b"7"),
        ("000004.jpg", good),
    ])
    write_index(tmp_path, ShardIndex("x", [ShardEntry("x-000000.tar", 5)], classes=["a", "b"]))
    problems = [str(p) for p in verify_shards(tmp_path)]
    assert problems[0].startswith("x-000000.tar:000001.jpg: undecodable")
    assert problems[1:] == [
        "x-000000.tar:000002: sample has no image (members: cls, txt)",
        "x-000000.tar:000003.cls: class '7' is not in 0..1",
        "x-000000.tar:000004: labelled set but sample has no .cls",
    ]


def test_cli_missing_source_exits_2_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = subprocess.run(
        [sys.executable, "-m", "shards", "build", str(missing), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_input_errors_exit_2(image_tree: ImageTree, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = [
        (["build", str(empty), str(tmp_path / "o1")], str(empty)),
        (["build", str(image_tree.root), str(a_file)], str(a_file)),
        (["verify", str(empty)], str(empty)),
        (["verify", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        assert named in capsys.readouterr().err


def test_shipped_cifar10_sample() -> None:
    train, test = (read_index(index_path(SHIPPED_SAMPLE, p)) for p in ("train", "test"))
    assert [s.samples for s in train.shards] == [625] * 8
    assert [s.samples for s in test.shards] == [250] * 4
    assert train.classes == test.classes and len(train.classes) == 10
    assert "CIFAR-10" in train.source and train.skipped == [] and test.skipped == []
    assert verify_shards(SHIPPED_SAMPLE) == []
    for prefix, per_class in (("train", 500), ("test", 100)):
        labels = Counter(int(s["cls"]) for s in read_back(SHIPPED_SAMPLE, prefix))
        assert labels == Counter({i: per_class for i in range(10)})
