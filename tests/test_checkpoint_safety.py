"""Torch files that would run code when unpickled are refused where the stages load them:
a checkpoint's ``state.pt`` and ``rng-rank<r>.pt`` on resume, and a ``.pth`` or checkpoint
folder given as ``pretrained=``. The stage exits non-zero with one line naming the file,
and the planted code never runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.train=shards/cifar10/test-{000000..000001}.tar", "data.val=", "batch_size=64", "epochs=1",
        "model_overrides.depth=1", "data.num_workers=1", "progress=false"]  # fmt: skip
TIMM_TINY = ["model=vit_tiny_patch16_224", "model_kwargs.img_size=32", "model_kwargs.patch_size=4",
             "data.train=shards/cifar10/test-{000000..000001}.tar", "data.val=", "progress=false"]  # fmt: skip

pytestmark = pytest.mark.slow


class CreatesFile:
    """Unpickled by a plain ``torch.load``, this opens (creates) ``path``: code from the file runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path: Path, marker: Path, base: object = None) -> None:
    """Overwrite ``path`` with ``base`` (a dict) plus an object whose unpickling creates ``marker``."""
    torch.save(dict(base or {}, payload=CreatesFile(marker)), path)


def stage(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipelines.{name}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    proc = stage("pretrain", f"output_dir={out}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_planted_file_really_runs_code_when_loaded_unsafely(tmp_path):
    """The check below means something: a plain unpickling of the planted file runs its code."""
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def assert_refused(proc: subprocess.CompletedProcess, path: Path, marker: Path) -> None:
    assert proc.returncode != 0
    (line,) = [line for line in proc.stderr.splitlines() if "refused" in line]
    assert str(path) in line and "could run code" in line and "safetensors" in line and "weights_only=True" in line
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    assert not marker.exists(), "the planted code ran"


@pytest.mark.parametrize("victim", ["state.pt", "rng-rank0.pt"])
def test_resume_refuses_a_checkpoint_file_holding_code(tiny_run, tmp_path, victim):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    ckpt = list_checkpoints(out)[-1]
    marker = tmp_path / "ran"
    plant(ckpt / victim, marker, torch.load(ckpt / victim, weights_only=True))
    proc = stage("pretrain", f"output_dir={out}", *TINY, "epochs=2", "resume=auto")
    assert_refused(proc, ckpt / victim, marker)


def test_pretrained_pth_holding_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    weights = tmp_path / "released.pth"
    plant(weights, marker, {"model": {"cls_token": torch.zeros(1, 1, 192)}})
    for name in ("linprobe", "finetune"):
        proc = stage(name, f"pretrained={weights}", f"output_dir={tmp_path / name}", *TIMM_TINY)
        assert_refused(proc, weights, marker)


def test_pretrained_checkpoint_folder_with_code_in_its_state_is_refused(tiny_run, tmp_path):
    """``model=auto`` reads the architecture from a checkpoint's state.pt: that load is guarded too."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(list_checkpoints(tiny_run)[-1], ckpt)
    marker = tmp_path / "ran"
    plant(ckpt / "state.pt", marker, torch.load(ckpt / "state.pt", weights_only=True))
    proc = stage("finetune", f"pretrained={ckpt}", f"output_dir={tmp_path / 'ft'}",
                 "data.train=shards/cifar10/test-{000000..000001}.tar", "data.val=", "progress=false")  # fmt: skip
    assert_refused(proc, ckpt / "state.pt", marker)
