"""The streaming shard reader on real tar files, read by real DataLoader worker processes."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mae.data.loader import ShardLoader
from mae.data.plan import Position
from mae.data.shards import DataError, expand_shards, shard_sizes
from mae.data.shard_index import ShardEntry, ShardIndex, write_index
from mae.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomResizedCropFlip, eval_transform,
                                  pretrain_transform, to_model_input)  # fmt: skip

SHIPPED_SAMPLE = Path(__file__).resolve().parents[1] / "shards" / "cifar10"


# ---------------------------------------------------------------------------- helpers


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def id_png(sample_id: int) -> bytes:
    """A tiny lossless image whose colour spells its sample id."""
    return encoded(Image.new("RGB", (4, 4), (sample_id % 256, sample_id // 256, 0)), "PNG")


def colour_id(img: Image.Image) -> torch.Tensor:
    """Transform: the sample id read back from the pixels (module level: workers may pickle it)."""
    r, g, _ = img.getpixel((0, 0))
    return torch.tensor(r + 256 * g)


def write_id_shards(folder: Path, sizes: list[int], prefix: str = "train", index: bool = True) -> list[int]:
    """Shards of id-coloured PNGs whose ``.cls`` is the same unique id; returns all ids."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, next_id = [], 0
    for n, size in enumerate(sizes):
        members = []
        for sample_id in range(next_id, next_id + size):
            members += [(f"{sample_id:06d}.png", id_png(sample_id)), (f"{sample_id:06d}.cls", str(sample_id).encode())]
        name = f"{prefix}-{n:06d}.tar"
        write_tar(folder / name, members)
        entries.append(ShardEntry(name, size))
        next_id += size
    if index:
        write_index(folder, ShardIndex(prefix=prefix, shards=entries))
    return list(range(next_id))


def read_ids(loader: ShardLoader, epoch: int = 0) -> tuple[list[int], int]:
    """One epoch: the ids in the order delivered, and the number of batches."""
    loader.set_epoch(epoch)
    ids, batches = [], 0
    for batch in loader:
        pixels, labels = batch["image"].tolist(), batch["label"].tolist()
        assert pixels == labels, "an image was paired with another sample's label"
        ids += labels
        batches += 1
    return ids, batches


def only_images_and_labels(batches: list[dict]) -> list[dict]:
    """What the loop gets: images and labels, the data counts asked of the loader."""
    assert all(b.keys() == {"image", "label"} for b in batches)
    return batches


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """Eight indexed shards of uneven size (9..16 samples), every sample id unique."""
    folder = tmp_path_factory.mktemp("id_shards")
    ids = write_id_shards(folder, [9, 10, 11, 12, 13, 14, 15, 16])
    return folder, ids


def id_loader(folder: Path, **kw) -> ShardLoader:
    kw = {"batch_size": 4, "num_workers": 2, "shuffle_buffer": 8} | kw
    return ShardLoader(str(folder / "train-{000000..000007}.tar"), colour_id, **kw)


# -------------------------------------------------------------------- finite epochs


def test_finite_epoch_reads_every_sample_exactly_once_across_ranks_and_workers(id_shards) -> None:
    """2 ranks x 2 workers together read each sample once per epoch; epochs differ in order."""
    folder, all_ids = id_shards
    orders = {}
    for epoch in (0, 1):
        union = []
        for rank in (0, 1):
            loader = id_loader(folder, rank=rank, world_size=2)
            ids, batches = read_ids(loader, epoch)
            assert batches == loader.rank_batches(epoch, rank)
            assert loader.batches_per_epoch(epoch) <= batches
            union += ids
        assert len(union) == len(set(union)), f"duplicates: {[i for i, c in Counter(union).items() if c > 1]}"
        assert sorted(union) == all_ids
        orders[epoch] = union
    assert orders[0] != orders[1]


def test_batches_per_epoch_is_what_each_rank_yields_when_shards_divide_evenly(tmp_path: Path) -> None:
    """With equal shards, every rank yields exactly ``batches_per_epoch`` batches."""
    write_id_shards(tmp_path, [8] * 8)
    for rank in (0, 1):
        loader = id_loader(tmp_path, rank=rank, world_size=2)
        ids, batches = read_ids(loader, epoch=3)
        assert batches == loader.batches_per_epoch(3) == 8  # 2 workers x 2 shards x 8 samples / 4
        assert loader.unseen_per_epoch(3) == 0
        assert len(ids) == 32


def test_same_seed_and_epoch_repeat_the_order_other_seed_changes_it(id_shards) -> None:
    """The delivered order is a function of (seed, epoch, rank) only."""
    folder, _ = id_shards
    first, _ = read_ids(id_loader(folder, seed=7), epoch=2)
    again, _ = read_ids(id_loader(folder, seed=7), epoch=2)
    other, _ = read_ids(id_loader(folder, seed=8), epoch=2)
    assert first == again
    assert other != first and sorted(other) == sorted(first)


def test_fewer_shards_than_readers_lowers_the_workers_fewer_than_processes_is_an_error(tmp_path: Path, capsys) -> None:
    """3 shards for 2 ranks x 2 workers: each rank reads with 1 worker, every sample once, and one
    warning line says so; 1 shard for 2 ranks cannot work and is a DataError naming the fix."""
    write_id_shards(tmp_path, [5, 5, 5])
    spec = str(tmp_path / "train-{000000..000002}.tar")
    union = []
    for rank in (0, 1):
        loader = ShardLoader(spec, colour_id, batch_size=2, num_workers=2, rank=rank, world_size=2)
        assert loader.num_workers == 1
        ids, batches = read_ids(loader)
        assert batches == loader.rank_batches(0, rank)
        union += ids
    assert sorted(union) == list(range(15))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: 3 shard(s) feed 2 process(es) x 1 loader worker(s), "
                                                   "not the 2 of data.num_workers")  # rank 0 only
    single = str(tmp_path / "train-000000.tar")
    with pytest.raises(DataError, match=r"1 shard\(s\) cannot feed 2 process\(es\).*--samples-per-shard"):
        ShardLoader(single, colour_id, batch_size=2, num_workers=2, rank=0, world_size=2)
    ShardLoader(single, colour_id, batch_size=2, num_workers=2, rank=0, world_size=2, resampled=True)  # fine resampled


# ------------------------------------------------------------------- corrupt input


@pytest.fixture
def corrupt_shards(tmp_path: Path, real_jpegs: dict[str, list[bytes]]) -> tuple[Path, set[int], dict[str, dict]]:
    """Four shards of real JPEGs with broken and odd-mode members; returns the good labels
    and the expected counts (skipped by reason, converted by mode).

    Read unshuffled by 2 workers at batch size 4, each worker's last full batch comes
    before its trailing failures (an undecodable member, the cut in the truncated tar).
    """
    jpegs = [data for name in sorted(real_jpegs) for data in real_jpegs[name]]
    sample = Image.open(io.BytesIO(jpegs[0]))
    good: set[int] = set()
    counter = iter(range(1000))

    def member(data: bytes, ext: str = "jpg", is_good: bool = True) -> list[tuple[str, bytes]]:
        n = next(counter)  # keys and labels unique across all shards
        if is_good:
            good.add(n)
        return [(f"s{n:04d}.{ext}", data), (f"s{n:04d}.cls", str(n).encode())]

    def goods(k: int) -> list[tuple[str, bytes]]:
        return [m for _ in range(k) for m in member(jpegs[len(good)])]

    shard0 = goods(4) + member(b"this is not a jpeg\n", is_good=False) + member(b"", is_good=False)
    shard1 = (
        goods(4)
        + member(encoded(sample.convert("L"), "PNG"), "png")
        + member(encoded(sample.convert("CMYK"), "JPEG"))
        + member(encoded(sample.convert("RGBA"), "PNG"), "png")
        + [(f"s{next(counter):04d}.cls", b"3")]  # a sample with no image
    )
    shard2 = goods(4)
    cut_at = len(jpegs[len(good)]) // 2
    shard2 += [m for _ in range(3) for m in member(jpegs[len(good)], is_good=False)]  # lost: the cut one, later ones
    shard3 = goods(5) + member(jpegs[0][:200], is_good=False)  # a truncated JPEG, last
    for n, members in enumerate((shard0, shard1, shard2, shard3)):
        write_tar(tmp_path / f"bad-{n:06d}.tar", members)
    # cut shard 2 in the middle of its fifth image's data
    data = (tmp_path / "bad-000002.tar").read_bytes()
    with tarfile.open(tmp_path / "bad-000002.tar") as tar:
        fifth = [m for m in tar.getmembers() if m.name.endswith(".jpg")][4]
    (tmp_path / "bad-000002.tar").write_bytes(data[: fifth.offset_data + cut_at])
    expected = {"skipped": {"undecodable": 3, "no_image": 1, "unreadable_tar": 1},
                "converted": {"L": 1, "CMYK": 1, "RGBA": 1}}  # fmt: skip
    return tmp_path, good, expected


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])  # fmt: skip
def test_tar_members_read_as_tarfile_reads_them_and_faults_are_errors(tmp_path: Path, fmt: int) -> None:
    """The loader's tar reader gives every regular member's name and bytes as tarfile does,
    long names (ustar prefix, GNU L member, pax path) and non-ASCII names included, skips
    directories and links, and raises ReadError for a bad header or a cut archive."""
    from mae.data.tar_members import read_members

    deep = "/".join(["folder"] * 12)  # 83 characters of directories: a name past 100 bytes
    members = [(f"{deep}/s{k:03d}.{ext}", bytes([k]) * (k * 97 % 1500)) for k in range(6) for ext in ("jpg", "cls")]
    members.append(("caf\u00e9-\u00e7a/\u00e9t\u00e9.jpg", b"\xff\xd8 accents"))
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, members[0][0]
        tar.addfile(link)
    with open(path, "rb") as f:
        assert list(read_members(f)) == members
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        third = tar.getmember(members[2][0])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: third.offset_data + 10])  # in the middle of the third member's bytes
    with open(cut, "rb") as f, pytest.raises(tarfile.ReadError, match="cut short"):
        list(read_members(f))
    broken = bytearray(data)
    broken[third.offset + 10] ^= 0x55  # a flipped bit in a name: the header's checksum no longer holds
    (tmp_path / "broken.tar").write_bytes(bytes(broken))
    with open(tmp_path / "broken.tar", "rb") as f, pytest.raises(tarfile.ReadError, match="checksum"):
        list(read_members(f))


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_corrupt_members_and_truncated_tar_are_skipped_counted_and_converted(corrupt_shards, shuffle: bool) -> None:
    """Bad members and a cut tar never stop an epoch; each is counted as skipped; odd modes
    become RGB and are counted apart, as converted (kept), never as skipped."""
    folder, good, expected = corrupt_shards
    transform = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    loader = ShardLoader(str(folder), transform, batch_size=4, num_workers=2, shuffle=shuffle, samples_per_epoch=99)
    batches = only_images_and_labels(list(loader))
    labels = [label for b in batches for label in b["label"].tolist()]
    assert sorted(labels) == sorted(good)
    assert all(b["image"].shape[1:] == (3, 8, 8) for b in batches)
    assert loader.data_counts()["skipped"] == expected["skipped"]
    assert loader.data_counts()["converted"] == expected["converted"]


def test_greyscale_png_comes_out_as_three_equal_channels(corrupt_shards) -> None:
    """An L-mode PNG is expanded to RGB, not dropped or left single-channel."""
    folder, _, _ = corrupt_shards
    loader = ShardLoader(str(folder / "bad-000001.tar"), T.ToTensor(), batch_size=16, num_workers=0, shuffle=False,
                         samples_per_epoch=8)  # fmt: skip
    (batch,) = list(loader)
    grey = batch["image"][4]  # the fifth sample of shard 1
    assert grey.shape == (3, 32, 32)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert loader.data_counts() == {"skipped": {"no_image": 1}, "converted": {"CMYK": 1, "L": 1, "RGBA": 1}}


def test_training_loader_gives_every_rank_its_planned_batches_despite_corrupt_samples(tmp_path: Path) -> None:
    """The index promises 10 samples in shard 0, 2 of which do not decode: with fill_to_plan
    (training) its worker still delivers 10, repeating its latest good ones, so each rank
    yields exactly the batches the epoch was planned with and ranks never wait on each other."""
    ids = write_id_shards(tmp_path, [8, 8, 8, 8])
    with tarfile.open(tmp_path / "train-000000.tar", "a") as tar:
        for name, data in (("bad0.png", b"not a png"), ("bad0.cls", b"0"), ("bad1.png", b""), ("bad1.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(tmp_path, ShardIndex(prefix="train", shards=[ShardEntry("train-000000.tar", 10)] +
                                     [ShardEntry(f"train-{n:06d}.tar", 8) for n in (1, 2, 3)]))  # fmt: skip
    def loader(rank: int, **kw) -> ShardLoader:
        return ShardLoader(str(tmp_path), colour_id, batch_size=4, num_workers=2, shuffle_buffer=8, rank=rank,
                           world_size=2, **kw)  # fmt: skip

    seen, planned, without = [], [], []
    for rank in (0, 1):
        got, batches = read_ids(loader(rank, fill_to_plan=True), epoch=0)
        planned.append(loader(rank).rank_batches(0, rank))
        assert batches == planned[-1] >= loader(rank).batches_per_epoch(0)
        seen += got
        without.append(read_ids(loader(rank), epoch=0)[1])  # a plain loader reads what is there
    assert len(seen) == 34 and set(seen) == set(ids)  # every good sample, plus 2 repeats for the 2 lost
    assert without != planned


def test_training_loader_without_a_decodable_sample_names_the_shards(tmp_path: Path) -> None:
    write_tar(tmp_path / "train-000000.tar", [("a.png", b"junk"), ("a.cls", b"0")])
    loader = ShardLoader(str(tmp_path / "train-000000.tar"), colour_id, batch_size=2, num_workers=0,
                         samples_per_epoch=4, fill_to_plan=True)  # fmt: skip
    with pytest.raises(DataError, match="train-000000.tar"):
        read_ids(loader)


# ----------------------------------------------------------------------- resampled


def test_resampled_epoch_yields_exactly_the_batch_budget(tmp_path: Path) -> None:
    """With samples_per_epoch fixed, a resampled epoch is budget batches, shard sizes aside."""
    write_id_shards(tmp_path, [7, 5, 9], index=False)  # 21 samples: divides by nothing used here
    spec = str(tmp_path / "train-{000000..000002}.tar")
    for world_size, expected in ((1, 11), (2, 5)):  # 44 // (world_size * 4)
        loader = ShardLoader(spec, colour_id, batch_size=4, num_workers=2, rank=0, world_size=world_size,
                             resampled=True, samples_per_epoch=44, shuffle_buffer=4)  # fmt: skip
        assert loader.batches_per_epoch(0) == expected
        ids, batches = read_ids(loader)
        assert batches == expected
        assert len(ids) == expected * 4  # endless streams: every batch is full
        assert set(ids) <= set(range(21))


def test_resampled_without_index_or_samples_per_epoch_raises(tmp_path: Path) -> None:
    """Remote shards (URLs) give no epoch length to resample to: DataError naming samples_per_epoch.
    (Local shards without an index are counted: see the tests of other tools' shards.)"""
    write_id_shards(tmp_path, [4, 4], index=False)
    with pytest.raises(DataError, match="samples_per_epoch"):
        ShardLoader(f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar", colour_id, batch_size=2, num_workers=1,
                    resampled=True)  # fmt: skip


def test_resampled_with_index_defaults_to_the_indexed_total(tmp_path: Path) -> None:
    """An indexed set resamples one indexed total of samples per epoch by default."""
    write_id_shards(tmp_path, [7, 5, 9])
    loader = ShardLoader(str(tmp_path), colour_id, batch_size=4, num_workers=1, resampled=True)
    assert loader.samples_per_epoch == 21
    assert read_ids(loader)[1] == loader.batches_per_epoch(0) == 5


# --------------------------------------------------------------------- shard lists


def test_expand_shards_braces_joins_globs_folders(tmp_path: Path) -> None:
    """Brace patterns, '::' lists, globs and folders expand to the local tar paths."""
    write_id_shards(tmp_path, [1, 1, 1, 1])
    (tmp_path / "notes.txt").write_text("not a shard\n")
    paths = [str(tmp_path / f"train-{n:06d}.tar") for n in range(4)]
    assert expand_shards(str(tmp_path / "train-{000000..000003}.tar")) == paths
    assert expand_shards(f"{paths[2]}::{tmp_path}/train-{{000000..000001}}.tar") == [paths[2], *paths[:2]]
    assert expand_shards(str(tmp_path / "train-00000[13].tar")) == [paths[1], paths[3]]
    assert expand_shards(str(tmp_path / "*.tar")) == paths
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards([paths[3], paths[0]]) == [paths[3], paths[0]]
    assert shard_sizes(paths) == dict.fromkeys(paths, 1)


def test_expand_shards_names_what_is_missing(tmp_path: Path) -> None:
    """A missing file, an empty glob and a folder without tars each raise DataError naming them."""
    write_id_shards(tmp_path, [1, 1])
    missing = tmp_path / "train-000002.tar"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        expand_shards(str(tmp_path / "train-{000000..000002}.tar"))
    with pytest.raises(DataError, match="val-"):
        expand_shards(str(tmp_path / "val-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar files"):
        expand_shards(str(tmp_path / "empty"))


def test_pipe_urls_read_end_to_end_given_samples_per_epoch(tmp_path: Path) -> None:
    """``pipe:cat`` URLs stream through worker processes; without an index the epoch length is given."""
    all_ids = write_id_shards(tmp_path, [6, 7, 8, 9])
    spec = f"pipe:cat {tmp_path}/train-{{000000..000003}}.tar"
    assert expand_shards(spec)[0] == f"pipe:cat {tmp_path}/train-000000.tar"
    with pytest.raises(DataError, match="samples_per_epoch"):
        ShardLoader(spec, colour_id, batch_size=4, num_workers=2)
    loader = ShardLoader(spec, colour_id, batch_size=4, num_workers=2, samples_per_epoch=30)
    assert loader.sizes is None and loader.batches_per_epoch(0) == 7
    ids, _ = read_ids(loader)
    assert sorted(ids) == all_ids


# ------------------------------------------------------------------- shipped sample


def test_shipped_cifar10_sample_reads_as_normalised_pretrain_batches() -> None:
    """The repo's CIFAR-10 train shards give [B,3,32,32] uint8 batches, labels 0..9, which
    ``to_model_input`` normalises."""
    index = json.loads((SHIPPED_SAMPLE / "train-index.json").read_text())
    loader = ShardLoader(str(SHIPPED_SAMPLE / "train-{000000..000007}.tar"), pretrain_transform(32),
                         batch_size=64, num_workers=2, shuffle_buffer=100)  # fmt: skip
    assert loader.samples_per_epoch == index["total"] == 5000
    images, labels = [], []
    for batch in loader:
        assert batch["image"].shape == (64, 3, 32, 32) and batch["image"].dtype == torch.uint8
        images.append(to_model_input(batch["image"], "cpu"))
        labels.append(batch["label"])
        if len(images) == 4:
            break
    x, y = torch.cat(images), torch.cat(labels)
    assert 0 <= y.min() and y.max() <= 9 and len(y.unique()) == 10
    assert x.min() < -1.5 and x.max() > 1.5  # not [0, 1] pixels
    assert -2.2 < x.min() and x.max() < 2.7  # within (0 - mean) / std .. (1 - mean) / std
    assert abs(x.mean().item()) < 0.5
    assert loader.data_counts() == {"skipped": {}, "converted": {}}


# ------------------------------------------- uint8 batches, decoding at the crop's scale


def torchvision_pretrain(size: int, scale: tuple[float, float] = (0.2, 1.0)) -> T.Compose:
    """Today's float path: what ``pretrain_transform`` replaces, step for step."""
    return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip


GREY_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one step of uint8, in normalised units


def test_uint8_batches_normalised_on_the_device_equal_the_float_path(real_jpegs) -> None:
    """For the same torch seed, pretrain and eval transforms + ``to_model_input`` give the
    values of torchvision's PIL + ToTensor + Normalize path: the same crops and flips, and
    pixels within one grey level (torch's uint8 bicubic against PIL's, each rounding on its
    own), nearly all equal; a rare pixel two levels apart (2 of 184,320 in the shipped sample's
    eval crops)."""
    jpegs = [data for name in sorted(real_jpegs) for data in real_jpegs[name]]
    pairs = (
        (pretrain_transform(32), torchvision_pretrain(32)),
        (eval_transform(32), T.Compose([T.Resize(37, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                                        T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])),  # fmt: skip
    )
    for ours, theirs in pairs:
        equal = total = apart = 0
        for k, data in enumerate(jpegs):
            torch.manual_seed(k)
            pixels, mode = ours(data)
            torch.manual_seed(k)
            expected = theirs(Image.open(io.BytesIO(data)).convert("RGB"))
            assert pixels.dtype == torch.uint8 and mode == "RGB"
            got = to_model_input(pixels.unsqueeze(0), "cpu")[0]
            assert got.dtype == torch.float32 and got.shape == expected.shape
            diff = (got - expected).abs()
            assert diff.max() <= 2 * GREY_LEVEL + 1e-5, k
            equal, total = equal + int((diff < 1e-6).sum()), total + diff.numel()
            apart += int((diff > GREY_LEVEL + 1e-5).sum())
        assert equal / total > 0.99 and apart / total < 1e-4
    # the conversion itself is exactly ToTensor + Normalize
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    reference = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(p.float().div(255)) for p in pixels])
    assert torch.equal(to_model_input(pixels, "cpu"), reference)
    features = torch.randn(4, 16)
    assert to_model_input(features, "cpu") is features or torch.equal(to_model_input(features, "cpu"), features)


def test_batches_handed_over_through_shared_slots_equal_pytorchs_own_hand_over(
        tmp_path: Path, real_jpegs, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Workers stack uint8 batches into shared slots that are reused many times per epoch;
    every batch the loader gave stays what it was (copied out before its slot is reused)
    and equals, pixel for pixel and in order, the batches of PyTorch's per-batch hand-over."""
    from mae.data.batch_slots import BatchSlots

    jpegs = [data for name in sorted(real_jpegs) for data in real_jpegs[name]]
    for n in range(2):
        members = [m for k in range(32) for m in ((f"{n}{k:03d}.jpg", jpegs[(n * 32 + k) % len(jpegs)]),
                                                    (f"{n}{k:03d}.cls", str(n * 32 + k).encode()))]  # fmt: skip
        write_tar(tmp_path / f"train-{n:06d}.tar", members)
    write_index(tmp_path, ShardIndex(prefix="train", shards=[ShardEntry(f"train-{n:06d}.tar", 32) for n in range(2)]))

    def epoch() -> tuple[list[dict], ShardLoader]:
        loader = ShardLoader(str(tmp_path), pretrain_transform(16), batch_size=2, num_workers=2, shuffle_buffer=8)
        loader.set_epoch(1)
        return list(loader), loader  # 16 batches per worker: each of its 5 slots is used 3 or 4 times

    slotted, loader = epoch()
    assert loader.collate.slots is not None and loader.collate.slots.slots == 5
    monkeypatch.setattr(BatchSlots, "fit", staticmethod(lambda *shape: False))
    plain, loader = epoch()
    assert loader.collate.slots is None
    assert len(slotted) == len(plain) == 32
    for a, b in zip(slotted, plain):
        assert a["image"].dtype == torch.uint8 and a["image"].shape == (2, 3, 16, 16)
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])
    assert len({a["image"].data_ptr() for a in slotted}) == 32  # each batch a tensor of its own


def test_jpeg_headers_read_by_libjpeg_turbo_agree_with_pils(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast header path gives PIL's size, mode and format for colour and greyscale JPEGs;
    CMYK JPEGs, other formats, broken JPEGs and decompression bombs go through PIL."""
    from mae.data.decode import UndecodableImage, read_header

    picture = Image.new("RGB", (40, 30), (200, 30, 90))
    for image, fmt, fast in ((picture, "JPEG", True), (picture.convert("L"), "JPEG", True),
                             (picture.convert("CMYK"), "JPEG", False), (picture, "PNG", False)):  # fmt: skip
        data = encoded(image, fmt)
        header, pil = read_header(data), Image.open(io.BytesIO(data))
        assert (header.size, header.mode, header.format) == (pil.size, pil.mode, pil.format)
        assert (header.image is None) == fast, (image.mode, fmt)
    with pytest.raises(UndecodableImage):
        read_header(b"\xff\xd8 not a jpeg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 - 1)  # PIL's bomb check still applies
    with pytest.raises(UndecodableImage, match="DecompressionBomb"):
        read_header(encoded(picture, "JPEG"))


def gradient_jpeg(width: int, height: int) -> bytes:
    """Red rises left to right, green top to bottom: a crop's box can be read off its pixels."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)
    return encoded(Image.fromarray(rgb), "JPEG")


def read_box(image: torch.Tensor) -> tuple[float, float, float, float, bool]:
    """(left, right, top, bottom) in 0..255 units and whether it was flipped, from a gradient crop."""
    img = image.float()
    if img.min() < 0:  # normalised: back to 0..255
        img = (img * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255
    r0, r1 = img[0, :, 0].mean().item(), img[0, :, -1].mean().item()
    g0, g1 = img[1, 0, :].mean().item(), img[1, -1, :].mean().item()
    return min(r0, r1), max(r0, r1), g0, g1, r0 > r1


def test_crops_drawn_from_the_header_match_torchvision_random_resized_crop() -> None:
    """On a 1600 x 1200 JPEG (decoded at 1/2 to 1/8 for most crops), the crop boxes and flips
    are torchvision's RandomResizedCrop's with the same seed, and so their distribution."""
    data = gradient_jpeg(1600, 1200)
    ours, theirs = pretrain_transform(64), torchvision_pretrain(64)
    header = Image.open(io.BytesIO(data))
    full = header.convert("RGB")
    ours_boxes, their_boxes, shrinks, areas = [], [], [], []
    for k in range(150):
        torch.manual_seed(k)
        top, left, h, w = T.RandomResizedCrop.get_params(header, [0.2, 1.0], [3 / 4, 4 / 3])
        shrinks.append(min(w, h) / 64)
        areas.append(w * h / (1600 * 1200))
        torch.manual_seed(k)
        ours_boxes.append(read_box(ours(data)[0]))
        torch.manual_seed(k)
        their_boxes.append(read_box(theirs(full)))
    assert sum(s >= 2 for s in shrinks) > 140  # nearly every crop decoded at a reduced scale
    a, b = np.array(ours_boxes), np.array(their_boxes)
    assert (a[:, 4] == b[:, 4]).all() and 0.35 < a[:, 4].mean() < 0.65  # same flips, about half
    assert np.abs(a[:, :4] - b[:, :4]).max() < 3.0  # same boxes, to 3/255 of the side
    widths, heights = a[:, 1] - a[:, 0], a[:, 3] - a[:, 2]
    area = widths * heights / 255**2  # spans between pixel centres: a shade under the boxes' areas
    assert 0.18 < area.min() and area.max() <= 1.0 and abs(area.mean() - np.mean(areas)) < 0.03


def test_decoding_at_the_crop_scale_stays_close_to_a_full_size_decode(real_jpegs) -> None:
    """A 1024 x 1024 photo mosaic (CIFAR tiles enlarged 4x, JPEG quality 75): each crop decoded
    at a reduced DCT scale against torchvision's crop of the full-size decode, both at 224.
    Stated tolerance, set for this hard case (sharp tile edges everywhere; a 2000 x 1500
    photo stays within 3 grey levels and above 33 dB): mean absolute difference under 8
    grey levels for every crop and under 4 on average, PSNR above 25 dB."""
    tiles = [Image.open(io.BytesIO(d)).convert("RGB") for name in sorted(real_jpegs) for d in real_jpegs[name]]
    mosaic = Image.new("RGB", (256, 256))
    for i, tile in enumerate(tiles[:64]):
        mosaic.paste(tile, ((i % 8) * 32, (i // 8) * 32))
    data = encoded(mosaic.resize((1024, 1024), Image.BICUBIC), "JPEG")  # quality 75, PIL's default
    ours, theirs = pretrain_transform(224, scale=(0.2, 1.0)), torchvision_pretrain(224)
    errors, psnrs, reduced = [], [], 0
    for k in range(40):
        torch.manual_seed(k)
        top, left, h, w = T.RandomResizedCrop.get_params(Image.open(io.BytesIO(data)), [0.2, 1.0], [3 / 4, 4 / 3])
        reduced += min(w, h) >= 2 * 224
        torch.manual_seed(k)
        got = to_model_input(ours(data)[0].unsqueeze(0), "cpu")[0]
        torch.manual_seed(k)
        expected = theirs(Image.open(io.BytesIO(data)).convert("RGB"))
        diff = (got - expected) * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # grey levels
        errors.append(diff.abs().mean().item())
        psnrs.append(10 * math.log10(255**2 / diff.pow(2).mean().item()) if diff.abs().max() > 0 else 99.0)
    assert reduced >= 10  # the comparison covers crops decoded at 1/2
    assert max(errors) < 8.0 and np.mean(errors) < 4.0, errors
    assert min(psnrs) > 25.0, psnrs


# ---------------------------------------------------------------- resume without decoding


class LoggingCrop(RandomResizedCropFlip):
    """The real transform, noting a digest of every image it decodes in a file (workers too)."""

    def __init__(self, size: int, log: Path) -> None:
        super().__init__(size, scale=(0.2, 1.0))
        self.log = log

    def __call__(self, data: bytes) -> tuple[torch.Tensor, str]:
        with open(self.log, "a") as f:
            f.write(hashlib.sha1(data).hexdigest() + "\n")
        return super().__call__(data)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_90_percent_skips_without_decoding_and_yields_the_same_batches(
    tmp_path: Path, real_jpegs, num_workers: int
) -> None:
    """``set_epoch(e, Position(...))`` of the same shape, k batches in: the batches after the first k are the uninterrupted
    read's, pixel for pixel (augmentations included), and no image of the first k batches
    is decoded. Shards of uneven size, so workers run out at different batches."""
    jpegs = [data for name in sorted(real_jpegs) for data in real_jpegs[name]]
    digest_label, entries, n = {}, [], 0
    for s, size in enumerate([14, 9, 17, 10]):
        members = []
        for _ in range(size):
            members += [(f"{n:06d}.jpg", jpegs[n]), (f"{n:06d}.cls", str(n).encode())]
            digest_label[hashlib.sha1(jpegs[n]).hexdigest()] = n
            n += 1
        write_tar(tmp_path / f"train-{s:06d}.tar", members)
        entries.append(ShardEntry(f"train-{s:06d}.tar", size))
    write_index(tmp_path, ShardIndex(prefix="train", shards=entries))
    log = tmp_path / "decoded.log"

    def loader() -> ShardLoader:
        return ShardLoader(str(tmp_path / "train-{000000..000003}.tar"), LoggingCrop(32, log), batch_size=4,
                           num_workers=num_workers, seed=3, shuffle_buffer=6)  # fmt: skip

    full = loader()
    full.set_epoch(1)
    reference = list(full)
    assert len(reference) == full.batches_per_epoch(1) == 13  # ceil over each worker's shards
    skip = round(0.9 * len(reference))
    log.unlink()
    resumed = loader()
    resumed.set_epoch(1, Position(1, 4, num_workers, skip))
    batches = list(resumed)
    assert len(batches) == len(reference) - skip
    for got, want in zip(batches, reference[skip:]):
        assert torch.equal(got["label"], want["label"]) and torch.equal(got["image"], want["image"])
    decoded = {digest_label[line] for line in log.read_text().split()}
    trained = {label for b in reference[:skip] for label in b["label"].tolist()}
    assert decoded == {label for b in batches for label in b["label"].tolist()}
    assert not decoded & trained
    # after any number of batches, odd ones too (the next batch then belongs to another
    # worker than the loader's first), the rest comes in the uninterrupted order
    for k in range(1, len(reference)):
        resumed.set_epoch(1, Position(1, 4, num_workers, k))
        assert [b["label"].tolist() for b in resumed] == [b["label"].tolist() for b in reference[k:]], f"skip {k}"


@pytest.mark.parametrize(("before", "after"), [((2, 2, 4), (1, 2, 8)), ((1, 2, 8), (2, 1, 4))], ids=["2to1", "1to2"])
def test_resume_on_another_world_reads_none_of_the_samples_the_stopped_run_took(id_shards, before, after) -> None:
    """Real tars and loader workers: a run of ``before`` (processes, workers, batch) stops 4
    batches into the epoch; resumed as ``after`` (the same effective batch), its ranks read
    the epoch's remaining batches, none of the samples taken, none twice."""
    folder, all_ids = id_shards
    (old_world, old_workers, old_batch), (new_world, new_workers, new_batch) = before, after
    taken: list[int] = []
    for rank in range(old_world):
        loader = id_loader(folder, batch_size=old_batch, num_workers=old_workers, rank=rank, world_size=old_world,
                           fill_to_plan=True)  # fmt: skip
        loader.set_epoch(2)
        batches = iter(loader)
        taken += [label for _ in range(4) for label in next(batches)["label"].tolist()]
        del batches
    position = Position(old_world, old_batch, old_workers, 4)
    read: list[int] = []
    for rank in range(new_world):
        loader = id_loader(folder, batch_size=new_batch, num_workers=new_workers, rank=rank, world_size=new_world,
                           fill_to_plan=True)  # fmt: skip
        loader.set_epoch(2, position)
        batches = only_images_and_labels(list(loader))
        assert len(batches) == loader.batches_per_epoch(2) - 4 * old_world * old_batch // (new_world * new_batch)
        read += [label for b in batches for label in b["label"].tolist()]
    assert len(taken) == len(set(taken)) == 4 * old_world * old_batch
    assert len(read) == len(set(read)), "a sample read twice after the resume"
    assert not set(read) & set(taken), "a sample the stopped run took was read again"
    assert set(read) | set(taken) == set(all_ids)  # these shards divide: nothing is left unread
