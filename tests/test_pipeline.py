"""The streaming shard reader on real tar files, read by real DataLoader worker processes."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mae.data.pipeline import DataError, ShardLoader, expand_shards, shard_sizes
from mae.data.shard_index import ShardEntry, ShardIndex, write_index
from mae.data.transforms import pretrain_transform

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


def latest_counts(batches: list[dict], kind: str = "skipped") -> Counter:
    """``skipped`` or ``converted`` counts summed over workers, each worker's latest batch counting."""
    latest = {b["worker"]: b[kind] for b in batches}
    return sum((Counter(s) for s in latest.values()), Counter())


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


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_corrupt_members_and_truncated_tar_are_skipped_counted_and_converted(corrupt_shards, shuffle: bool) -> None:
    """Bad members and a cut tar never stop an epoch; each is counted as skipped; odd modes
    become RGB and are counted apart, as converted (kept), never as skipped."""
    folder, good, expected = corrupt_shards
    transform = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    loader = ShardLoader(str(folder), transform, batch_size=4, num_workers=2, shuffle=shuffle, samples_per_epoch=99)
    batches = list(loader)
    labels = [label for b in batches for label in b["label"].tolist()]
    assert sorted(labels) == sorted(good)
    assert all(b["image"].shape[1:] == (3, 8, 8) for b in batches)
    assert dict(latest_counts(batches, "skipped")) == expected["skipped"]
    assert dict(latest_counts(batches, "converted")) == expected["converted"]


def test_greyscale_png_comes_out_as_three_equal_channels(corrupt_shards) -> None:
    """An L-mode PNG is expanded to RGB, not dropped or left single-channel."""
    folder, _, _ = corrupt_shards
    loader = ShardLoader(str(folder / "bad-000001.tar"), T.ToTensor(), batch_size=16, num_workers=0, shuffle=False,
                         samples_per_epoch=8)  # fmt: skip
    (batch,) = list(loader)
    grey = batch["image"][4]  # the fifth sample of shard 1
    assert grey.shape == (3, 32, 32)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert batch["skipped"] == {"no_image": 1}
    assert batch["converted"] == {"L": 1, "CMYK": 1, "RGBA": 1}


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
    """Unindexed shards give no epoch length to resample to: DataError naming samples_per_epoch."""
    write_id_shards(tmp_path, [4, 4], index=False)
    with pytest.raises(DataError, match="samples_per_epoch"):
        ShardLoader(str(tmp_path), colour_id, batch_size=2, num_workers=1, resampled=True)


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
    """The repo's CIFAR-10 train shards give [B,3,32,32] normalised batches, labels 0..9."""
    index = json.loads((SHIPPED_SAMPLE / "train-index.json").read_text())
    loader = ShardLoader(str(SHIPPED_SAMPLE / "train-{000000..000007}.tar"), pretrain_transform(32),
                         batch_size=64, num_workers=2, shuffle_buffer=100)  # fmt: skip
    assert loader.samples_per_epoch == index["total"] == 5000
    images, labels = [], []
    for batch in loader:
        assert batch["image"].shape == (64, 3, 32, 32) and batch["image"].dtype == torch.float32
        images.append(batch["image"])
        labels.append(batch["label"])
        if len(images) == 4:
            break
    x, y = torch.cat(images), torch.cat(labels)
    assert 0 <= y.min() and y.max() <= 9 and len(y.unique()) == 10
    assert x.min() < -1.5 and x.max() > 1.5  # not [0, 1] pixels
    assert -2.2 < x.min() and x.max() < 2.7  # within (0 - mean) / std .. (1 - mean) / std
    assert abs(x.mean().item()) < 0.5
    assert not batch["skipped"]
    assert not batch["converted"]
