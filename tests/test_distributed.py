"""Two real processes in one gloo group on CPU, as ``accelerate launch --multi_gpu`` makes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mae.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")

pytestmark = pytest.mark.slow


def launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` as the README says for CPU: --multi_gpu with ACCELERATE_USE_CPU (gloo)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    multi = ["--multi_gpu"] if processes > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000), str(WORKER), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_two_processes_x_b_match_one_process_x_2b(tmp_path):
    """Gradients are averaged across ranks: the same parameters and losses as one process with the whole batch."""
    launch(2, "step-equivalence", str(tmp_path), "4")
    launch(1, "step-equivalence", str(tmp_path), "4")
    one = load_file(str(tmp_path / "params-w1-r0.safetensors"))
    r0, r1 = (load_file(str(tmp_path / f"params-w2-r{r}.safetensors")) for r in (0, 1))
    for k in one:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.allclose(r0[k], one[k], atol=2e-6, rtol=1e-5), k
    l1 = json.loads((tmp_path / "losses-w1.json").read_text())
    l2 = json.loads((tmp_path / "losses-w2.json").read_text())
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert l1[0] != l1[-1]  # the steps did change the model


def test_pretraining_stage_with_two_processes(tmp_path):
    """One group of world size 2: equal parameters on both ranks, each image read once per epoch,
    lr scaled by both processes, one writer of logs and checkpoints."""
    overrides = ["data.train=shards/cifar10/test-{000000..000003}.tar", "data.val=shards/cifar10/test-000000.tar",
                 "batch_size=16", "epochs=1", "model_overrides.depth=2", "data.num_workers=2", "progress=false",
                 "log_every=1", "num_vis=2"]  # fmt: skip
    proc = launch(2, "stage", str(tmp_path), *overrides)
    report = json.loads((tmp_path / "stage-w2.json").read_text())
    assert report["world_size"] == 2
    r0, r1 = (load_file(str(tmp_path / f"params-w2-r{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    prints = report["prints"]
    union = prints[0] + prints[1]
    assert len(union) == 1000 and len(prints[0]) == len(prints[1]) == 500  # every image once, halves per rank
    assert not set(prints[0]) & set(prints[1])
    assert "effective batch 32 / 256 (batch_size 16 x 2 process(es)" in proc.stdout
    steps = [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert steps == list(range(1, report["step"] + 1))  # one line per step: only the main process logs
    assert report["step"] == 32  # 500 images per rank in batches of 16, 2 workers x ceil(250 / 16)
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "rng-rank0.pt", "rng-rank1.pt", "state.pt"]
    assert len(list((tmp_path / "run" / "mae-pretrain").glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_run_resumed_on_another_number_of_processes_keeps_its_schedule(tmp_path, before, after):
    """Stopped mid-epoch on ``before`` processes and resumed on ``after``: accum_iter keeps the
    effective batch of 50, the lr at every logged step and the images seen equal an
    uninterrupted run's, and no image trained on before the stop comes again in that epoch."""
    batch = 25  # 250 images a shard: whole batches on every reader, for 1 process as for 2
    common = ["data.train=shards/cifar10/test-{000000..000003}.tar", "data.val=", "epochs=2", "warmup_epochs=1",
              "model_overrides.depth=1", "data.num_workers=2", "progress=false", "log_every=1", f"batch_size={batch}"]  # fmt: skip
    accum = {1: 2, 2: 1}  # effective batch 50
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    launch(before, "traced", str(whole_dir), "whole", "0", *common, f"accum_iter={accum[before]}")
    launch(before, "traced", str(cut_dir), "first", "7", *common, f"accum_iter={accum[before]}")
    resumed = launch(after, "traced", str(cut_dir), "second", "0", *common, f"accum_iter={accum[before]}",
                     "resume=auto")  # the same command line as before, on another number of processes  # fmt: skip
    assert f"resumed on {after} process(es) instead of {before}: accum_iter={accum[after]}" in resumed.stdout
    whole, first, second = (json.loads((d / f"{n}.json").read_text()) for d, n in
                            ((whole_dir, "whole"), (cut_dir, "first"), (cut_dir, "second")))  # fmt: skip
    assert first["stopped"] and not second["stopped"] and second["step"] == whole["step"] == 40
    lines = {m["step"]: m for m in read_metrics(cut_dir / "run") if "loss" in m}
    reference = {m["step"]: m for m in read_metrics(whole_dir / "run") if "loss" in m}
    assert sorted(lines) == sorted(reference) == list(range(1, 41))
    assert [lines[s]["lr"] for s in sorted(lines)] == pytest.approx([reference[s]["lr"] for s in sorted(lines)], rel=1e-9)

    def images(run: dict, epoch: int) -> list[str]:
        return [fp for rank in run["seen"] for step, fp in rank if step // 20 == epoch]

    assert sum(len(rank) for rank in whole["seen"]) == sum(len(rank) for r in (first, second) for rank in r["seen"])
    before_stop, after_stop = images(first, 0), images(second, 0)
    assert len(before_stop) == 7 * 50 and not set(before_stop) & set(after_stop)  # nothing trained on twice
    assert len(set(before_stop) | set(after_stop)) == len(set(images(whole, 0)))  # the same images in the epoch
