"""The one atomic write: a reader finds the old file or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mae.files import AtomicFile, write_atomic


def test_text_bytes_and_a_writer_function_all_land_under_the_final_name(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a.json", '{"top1": 1.0}\n')
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    write_atomic(tmp_path / "c.safetensors", lambda p: save_file(tensors, str(p)))
    assert (tmp_path / "a.json").read_text() == '{"top1": 1.0}\n'
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["w"], tensors["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "c.safetensors"]


def test_a_writer_failing_half_way_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "best.json"
    write_atomic(path, "old\n")

    def half_then_fail(p: Path) -> None:
        p.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]


def test_an_interrupt_mid_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))

    def interrupted(p: Path) -> None:
        save_file({"w": torch.ones(2)}, str(p))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, interrupted)
    assert torch.equal(load_file(str(path))["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]


def test_a_file_filled_over_many_calls_is_invisible_until_committed(tmp_path: Path) -> None:
    shard = AtomicFile(tmp_path / "train-000000.tar")
    with open(shard.tmp, "wb") as f:
        f.write(b"first part")
        assert not shard.path.exists()
        f.write(b", second part")
    assert shard.commit() == shard.path
    assert shard.path.read_bytes() == b"first part, second part" and not shard.tmp.exists()
    dropped = AtomicFile(tmp_path / "train-000001.tar")
    dropped.tmp.write_bytes(b"half")
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
