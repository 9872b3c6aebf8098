"""The stages under DeepSpeed ZeRO through Accelerate, on CPU: 2 real processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from safetensors import safe_open
from safetensors.torch import load_file

from mae.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RUN = ["data.train=shards/cifar10/test-{000000..000003}.tar", "data.val=shards/cifar10/test-000000.tar",
       "batch_size=16", "model_overrides.depth=2", "progress=false", "log_every=1", "num_vis=2",
       "warmup_epochs=1"]  # an epoch of warm-up whatever `epochs` says: the lr of a 1-epoch run and its resume at 2 agree  # fmt: skip

pytestmark = pytest.mark.slow


def launch(stage_config: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file pipelines/accelerate/<config>`` with 2 processes on CPU."""
    text = (ROOT / "pipelines" / "accelerate" / stage_config).read_text().replace("num_processes: 8", "num_processes: 2")
    config = tmp_path / stage_config
    config.write_text(text)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(29600 + os.getpid() % 1000), "-m", "pipelines.pretrain", *RUN, *overrides]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es), DEEPSPEED" in proc.stdout
    return proc


def check_export(out: Path) -> None:
    path = out / "encoder.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    vit = timm.create_model(meta["timm_name"], num_classes=0, **json.loads(meta["timm_kwargs"]))
    vit.load_state_dict(load_file(str(path)), strict=True)


def test_zero2_saves_resumes_and_exports(tmp_path):
    """ZeRO-2: each rank saves its optimiser part; a resumed run continues the uninterrupted one's losses."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch("deepspeed_zero2.yaml", tmp_path, f"output_dir={straight}", "epochs=2")
    launch("deepspeed_zero2.yaml", tmp_path, f"output_dir={split}", "epochs=1")
    ckpt = split / "checkpoints" / "ckpt-00000032"
    assert {p.name for p in ckpt.iterdir()} >= {"optimizer-rank0.pt", "optimizer-rank1.pt", "model.safetensors"}
    proc = launch("deepspeed_zero2.yaml", tmp_path, f"output_dir={split}", "epochs=2", "resume=auto")
    assert "resumed from" in proc.stdout
    a = {m["step"]: m["loss"] for m in read_metrics(straight) if "loss" in m}
    b = {m["step"]: m["loss"] for m in read_metrics(split) if "loss" in m}
    assert sorted(b) == list(range(1, 65))
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-4)
    check_export(split)


@pytest.mark.parametrize("mixer", ["attention", "feedforward"])
def test_zero3_trains_evaluates_and_exports(tmp_path, mixer):
    """ZeRO-3 shards the weights: evaluation runs in lockstep and the export is gathered whole
    (the feed-forward encoder's patch MLP on visible tokens included)."""
    out = tmp_path / "z3"
    launch("deepspeed_zero3.yaml", tmp_path, f"output_dir={out}", "epochs=1", f"model_overrides.mixer={mixer}")
    assert (out / "reconstructions" / "epoch-0000.png").exists()
    assert [m for m in read_metrics(out) if "val_loss" in m]
    check_export(out)
