"""Real pretraining runs on the shipped sample shards: the loss falls, outputs are written,
and a killed or signalled run resumes to exactly the losses of an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from mae.checkpoint import list_checkpoints
from mae.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 32  # 1,000 images in 4 shards, 2 workers x ceil(500 / 32) batches
RUN = [
    "data.train=shards/cifar10/test-{000000..000003}.tar", "data.val=shards/cifar10/test-000000.tar",
    "batch_size=32", "epochs=3", "warmup_epochs=1", "log_every=1", "model_overrides.depth=4",
    "progress=false", "num_vis=4",
]  # fmt: skip

pytestmark = pytest.mark.slow


def stage(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.pretrain", f"output_dir={out}", *RUN, *extra]


def run(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(stage(out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def val_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["val_loss"] for m in read_metrics(out) if "val_loss" in m}


def tensorboard_losses(out: Path) -> dict[int, float]:
    """``loss`` by step as TensorBoard reads the run's events (events purged by a resume dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "mae-pretrain"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {e.step: e.value for e in events.Scalars("loss")}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the point the test waits for"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 3 * STEPS_PER_EPOCH + 1))  # no step lost or repeated
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-6), f"step {step}"
    assert val_losses(b) == pytest.approx(val_losses(a), rel=1e-5)
    wa, wb = load_file(str(a / "encoder.safetensors")), load_file(str(b / "encoder.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run(out)
    return out


def test_short_run_lowers_loss_and_writes_outputs(reference_run):
    out = reference_run
    records = [m for m in read_metrics(out) if "loss" in m]
    assert {"step", "epoch", "loss", "lr", "images_per_sec", "elapsed_s"} <= records[0].keys()
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    vals = list(val_losses(out).values())
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert records[0]["lr"] < records[STEPS_PER_EPOCH - 1]["lr"]  # warm-up rises...
    assert records[-1]["lr"] < 0.01 * max(r["lr"] for r in records)  # ...then cosine decays to ~0
    counts = [m for m in read_metrics(out) if "skipped" in m]  # one line of data counts per epoch
    assert [c["epoch"] for c in counts] == [0, 1, 2] and all(c["skipped"] == c["converted"] == 0 for c in counts)
    assert tensorboard_losses(out) == {r["step"]: pytest.approx(r["loss"]) for r in records}
    hparams = yaml.safe_load(next((out / "mae-pretrain").glob("*/hparams.yml")).read_text())
    assert hparams["batch_size"] == 32 and hparams["model_overrides.depth"] == 4 and hparams["report_to"] == "tensorboard"
    assert hparams["data.train"] == "shards/cifar10/test-{000000..000003}.tar" and hparams["lr"] == "null"
    picture = Image.open(out / "reconstructions" / "epoch-0002.png")
    assert picture.width > 4 * 128 and picture.height > 4 * 128  # 4 columns, 4 images, enlarged
    assert (out / "config.yaml").exists()
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000064", "ckpt-00000096"]  # keep_last=2


def test_a_stage_without_deepspeed_never_imports_it():
    """Accelerate's unwrap_model imports DeepSpeed when it is installed: 2-3 s of every stage's
    start. The stages' accelerator unwraps the model and saves its weights without it."""
    code = """
import sys, torch
from pipelines.launch import make_accelerator
from mae.pretrain import PretrainConfig
acc, _ = make_accelerator(PretrainConfig(output_dir=sys.argv[1], report_to='none'))
model = torch.nn.Linear(3, 2)
prepared = acc.prepare(model)
assert acc.unwrap_model(prepared) is model and set(acc.get_state_dict(prepared)) == {'weight', 'bias'}
print('deepspeed' in sys.modules)
"""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([sys.executable, "-c", code, "unused-run-folder"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_encoder_export_loads_into_timm(reference_run):
    path = reference_run / "encoder.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    vit = timm.create_model(meta["timm_name"], num_classes=0, **json.loads(meta["timm_kwargs"]))
    assert meta["timm_name"] == "vit_tiny_patch16_224"
    vit.load_state_dict(load_file(str(path)), strict=True)


def test_killed_run_resumes_with_the_same_losses(reference_run, tmp_path):
    """SIGKILL after the first checkpoint, resume=auto: the same losses, steps and weights."""
    out = tmp_path / "run"
    proc = subprocess.Popen(stage(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "checkpoints" / f"ckpt-{STEPS_PER_EPOCH:08d}").is_dir(), proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "encoder.safetensors").exists()  # it really was cut short
    run(out, "resume=auto")
    assert_same_run(reference_run, out)


def test_a_resume_that_cannot_keep_the_effective_batch_stops_before_any_work(reference_run, tmp_path):
    """The checkpoint trained with an effective batch of 32; a resume with batch_size=24 could
    only change it (and so the lr and the schedule): one line names both and what would work,
    and the run's checkpoints and metrics are left as they were."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    metrics = (out / "metrics.jsonl").read_bytes()
    proc = run(out, "resume=auto", "batch_size=24", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "effective batch 32" in errors[0] and "batch_size=24 cannot keep it" in errors[0]
    assert "batch_size=32 accum_iter=1 or batch_size=16 accum_iter=2" in errors[0]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    assert after == before and (out / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(reference_run, tmp_path, fraction):
    """SIGTERM mid-epoch (half-way, and 90% in, where the resumed loader skips most of the
    epoch without decoding it): a checkpoint at the next step, exit 75, and an exact resume."""
    out = tmp_path / "run"
    proc = subprocess.Popen(stage(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    mid = STEPS_PER_EPOCH + int(STEPS_PER_EPOCH * fraction)
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= mid, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL: stopped with a checkpoint, resume later
    step = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert step % STEPS_PER_EPOCH != 0  # a mid-epoch checkpoint
    assert max(train_losses(out)) == step
    run(out, "resume=auto")
    assert_same_run(reference_run, out)
    assert tensorboard_losses(out) == pytest.approx(train_losses(out))  # the resumed steps once, as logged


def test_non_finite_loss_stops_without_touching_checkpoints(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    proc = run(out, "resume=checkpoints/x", "epochs=5", "lr=1e30", check=False)
    assert proc.returncode == 2 and "resume=checkpoints/x" in proc.stderr  # a bad resume path is named
    proc = run(out, "resume=auto", "epochs=5", "lr=1e30", check=False)
    assert proc.returncode == 1
    assert "loss is not finite" in proc.stderr
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before


def test_compiled_run_keeps_plain_names_and_resumes_exactly(tmp_path):
    """compile=true compiles the model in place: checkpoints and the encoder keep their names
    (no ``_orig_mod.``), the encoder loads into timm, and a killed run resumes to the same losses."""
    small = ["compile=true", "epochs=2", "model_overrides.depth=1", "data.val=",
             "data.train=shards/cifar10/test-{000000..000001}.tar"]  # 2 workers x ceil(250 / 32) = 16 steps an epoch
    ref, out = tmp_path / "ref", tmp_path / "run"
    run(ref, *small)
    proc = subprocess.Popen(stage(out, *small), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "checkpoints" / "ckpt-00000016").is_dir(), proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "encoder.safetensors").exists()
    run(out, *small, "resume=auto")
    names = set(load_file(str(list_checkpoints(out)[-1] / "model.safetensors")))
    assert "blocks.0.attn.qkv.weight" in names and not any("_orig_mod" in k for k in names)
    la, lb = train_losses(ref), train_losses(out)
    assert sorted(la) == sorted(lb) == list(range(1, 33))
    assert [lb[k] for k in sorted(lb)] == pytest.approx([la[k] for k in sorted(la)], rel=1e-5, abs=1e-6)
    with safe_open(str(out / "encoder.safetensors"), "pt") as f:
        meta = f.metadata()
    vit = timm.create_model(meta["timm_name"], num_classes=0, **json.loads(meta["timm_kwargs"]))
    vit.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=True)


def test_max_minutes_plans_the_schedule_and_resumes_on_it(tmp_path):
    """max_minutes: the step count is planned from the measured step time, saved, and kept by a
    resumed run (SIGTERM after the first plan), which re-plans once at half the budget without a
    jump in the lr. Up to the re-plan every loss equals a run told max_steps=N outright (N the
    first plan), which also ends mid-epoch with its lr at 0 and a checkpoint that resumes inside
    the epoch. (The re-plan itself, and a resume across it, are covered on a fake clock in
    tests/test_step_plan.py.)"""
    from mae.checkpoint import load_plain
    from mae.optim import cosine_progress, lr_at

    small = ["model_overrides.depth=1", "data.val=", "epochs=1000", "warmup_epochs=4",  # 64 steps: past the plan
             "data.train=shards/cifar10/test-{000000..000001}.tar"]  # 16 steps an epoch
    timed, fixed = tmp_path / "timed", tmp_path / "fixed"
    budget = "max_minutes=0.3"  # the plan comes after 10 steps + 40 steps and 0.9 s, or 1.8 s
    proc = subprocess.Popen(stage(timed, *small, budget), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = []
        while not any("optimiser steps planned" in line for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, "the run ended before its plan"
        proc.send_signal(signal.SIGTERM)  # right after the plan
        out, err = proc.communicate(timeout=120)
        out = "".join(lines) + out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-2000:]
    state = load_plain(list_checkpoints(timed)[-1] / "state.pt")
    planned = state["total_steps"]
    assert state["planned"] and state["plans"] == 1 and 50 <= planned < 16 * 1000 and state["elapsed_s"] > 0
    resumed = run(timed, *small, budget, "resume=auto")
    assert "optimiser steps planned" not in resumed.stdout  # the saved plan, not a new one
    final = load_plain(list_checkpoints(timed)[-1] / "state.pt")
    losses = train_losses(timed)
    last = max(losses)
    assert last == final["total_steps"] or ("spent at step" in resumed.stdout and last < final["total_steps"])
    assert sorted(losses) == list(range(1, last + 1))
    elapsed = [m["elapsed_s"] for m in read_metrics(timed) if "loss" in m]
    assert elapsed == sorted(elapsed) and elapsed[-1] < 0.3 * 60 + 10  # carried across the resume
    # each line logs the rate its step used: the first plan's schedule up to the re-plan, then
    # the rest of the same cosine over each re-planned total (at half the budget, then the landing)
    first = dict(base_lr=1.5e-3 * 32 / 256, warmup_steps=64, total_steps=planned)
    schedules = [(0, first)]
    for step, total in re.findall(r"over steps \d+-(\d+) -> (\d+) optimiser steps re-planned", resumed.stdout):
        step, total, now = int(step), int(total), schedules[-1][1]
        if total != now["total_steps"] and step > now["warmup_steps"]:
            schedules.append((step, dict(first, total_steps=total, anchor=(step, cosine_progress(step, **{
                k: now[k] for k in ("warmup_steps", "total_steps")}, anchor=now.get("anchor"))))))  # fmt: skip
    assert schedules[-1][1]["total_steps"] == final["total_steps"]
    assert schedules[-1][1].get("anchor") == pytest.approx(tuple(final["lr_anchor"]) if final["lr_anchor"] else None)
    replanned_at = schedules[1][0] if len(schedules) > 1 else last
    log = [m for m in read_metrics(timed) if "loss" in m]
    assert [m["lr"] for m in log] == pytest.approx(
        [lr_at(m["step"] - 1, **next(sch for start, sch in reversed(schedules) if m["step"] - 1 >= start)) for m in log],
        rel=1e-6)  # fmt: skip
    if final["plans"] >= 2:
        assert "re-planned at half the budget" in resumed.stdout

    run(fixed, *small, f"max_steps={planned}")
    reference = train_losses(fixed)
    assert sorted(reference) == list(range(1, planned + 1))
    same = [k for k in sorted(losses) if k <= min(replanned_at, planned)]
    assert [losses[k] for k in same] == pytest.approx([reference[k] for k in same], rel=1e-5, abs=1e-6)
    assert [m["lr"] for m in read_metrics(fixed) if "loss" in m] == pytest.approx(
        [lr_at(m["step"] - 1, **first) for m in read_metrics(fixed) if "loss" in m], rel=1e-6)
    state = load_plain(list_checkpoints(fixed)[-1] / "state.pt")
    assert (state["step"], state["step_in_epoch"]) == (planned, planned % 16)  # mid-epoch: resumes inside it
    assert (fixed / "encoder.safetensors").exists()


def test_accum_iter_longer_than_an_epoch_is_an_error(tmp_path):
    proc = run(tmp_path / "run", "accum_iter=40", check=False)
    assert proc.returncode == 2
    assert "accum_iter=40" in proc.stderr and "32 batches" in proc.stderr


def test_corrupt_samples_are_skipped_and_counted_in_the_metrics(tmp_path):
    """Undecodable, zero-byte and image-less members planted in real shards are counted as
    skipped; greyscale and CMYK images are kept and counted apart, as converted."""
    import io
    import tarfile

    from mae.data.shard_index import read_index, write_index

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):
        shutil.copy(ROOT / "shards" / "cifar10" / f"test-{i:06d}.tar", shards)
    index = read_index(ROOT / "shards" / "cifar10" / "test-index.json")
    with tarfile.open(shards / "test-000002.tar") as tar:
        jpeg = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg"))
    grey, cmyk = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("L").save(grey, format="PNG")
    Image.open(io.BytesIO(jpeg)).convert("CMYK").save(cmyk, format="JPEG")
    planted = {0: [("a0.jpg", b"not a jpeg"), ("a1.jpg", b"")], 1: [("b0.cls", b"3")],
               2: [("c0.png", grey.getvalue()), ("c1.jpg", cmyk.getvalue())]}  # fmt: skip
    for shard, members in planted.items():
        with tarfile.open(shards / f"test-{shard:06d}.tar", "a") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        index.shards[shard].samples += len(members)
    write_index(shards, index)
    out = tmp_path / "run"
    proc = run(out, f"data.train={shards}/test-{{000000..000003}}.tar", "data.val=", "epochs=1", "batch_size=64",
               "model_overrides.depth=1")  # fmt: skip
    last = [m for m in read_metrics(out) if "skipped" in m][-1]  # the epoch's line of data counts
    assert last["skipped"] == 3
    assert last["skipped_by_reason"] == {"undecodable": 2, "no_image": 1}
    assert last["converted"] == 2
    assert last["converted_by_mode"] == {"CMYK": 1, "L": 1}
    assert "epoch 0 data: skipped 3 (no_image 1, undecodable 2), converted to RGB 2 (CMYK 1, L 1)" in proc.stdout


def test_accelerate_launch_on_cpu_uses_every_core(tmp_path):
    """`accelerate launch` sets OMP_NUM_THREADS=1; the stage gives its one process all the
    node's cores again (a 2-core run would otherwise train at half speed), and cpu_threads wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def launch(out: Path, *extra: str) -> str:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "pipelines.pretrain",
               f"output_dir={out}", *RUN, "epochs=1", "warmup_epochs=0", "model_overrides.depth=1",
               "data.train=shards/cifar10/test-000000.tar", "data.num_workers=1", *extra]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert f"on cpu ({os.cpu_count()} threads)" in launch(tmp_path / "a")
    assert "on cpu (1 threads)" in launch(tmp_path / "b", "cpu_threads=1")


def test_mlflow_tracker_records_the_losses_and_the_config(tmp_path, monkeypatch):
    """report_to=mlflow with a local file store (MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE=true
    to use one): the run's loss per step and its resolved config as parameters, read back with
    MLflow's own client."""
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's client and the stage
    out = tmp_path / "run"
    proc = subprocess.run(stage(out, "report_to=mlflow", "epochs=1", "warmup_epochs=0", "model_overrides.depth=1",
                                "data.val="), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, MLFLOW_TRACKING_URI=uri))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run_info,) = client.search_runs([client.get_experiment_by_name("mae-pretrain").experiment_id])
    history = client.get_metric_history(run_info.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(train_losses(out))
    assert len(history) == STEPS_PER_EPOCH
    params = run_info.data.params
    assert params["batch_size"] == "32" and params["report_to"] == "mlflow" and params["model_overrides.depth"] == "1"
    assert not (out / "mae-pretrain").exists()  # no TensorBoard unless asked for


def test_unknown_or_missing_tracker_is_a_config_error(tmp_path):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    proc = run(tmp_path / "a", "report_to=tensorboard,nosuch", check=False)
    assert proc.returncode == 2 and "config error: report_to: unknown tracker 'nosuch'" in proc.stderr
    available = {str(t) for t in get_available_trackers()}
    missing = next(t.value for t in LoggerType if t.value != "all" and t.value not in available)
    proc = run(tmp_path / "b", f"report_to={missing}", check=False)
    assert proc.returncode == 2 and f"report_to: tracker {missing!r} is not installed" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "b" / "metrics.jsonl").exists()


def test_default_run_on_a_small_folder_of_photos(tmp_path):
    """75 photos, some greyscale, CMYK or palette, built into a single shard as a user with a small
    folder might (the default cuts 2): the command the build prints pretrains with one loader
    worker instead of failing, says so in one warning line, and counts nothing as skipped."""
    import io
    import shlex
    import tarfile

    photos = tmp_path / "photos"
    photos.mkdir()
    with tarfile.open(ROOT / "shards" / "cifar10" / "train-000000.tar") as tar:
        jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:75]
    for i, data in enumerate(jpegs):
        odd = {0: ("L", "PNG"), 1: ("CMYK", "JPEG"), 2: ("P", "PNG")}.get(i % 25)
        if odd is None:
            (photos / f"img{i:03d}.jpg").write_bytes(data)
        else:
            Image.open(io.BytesIO(data)).convert(odd[0]).save(photos / f"img{i:03d}.{odd[1].lower()}", format=odd[1])
    build = subprocess.run([sys.executable, "-m", "shards", "build", str(photos), str(tmp_path / "shards"),
                            "--samples-per-shard", "100"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert "samples: 75" in build.stdout and "skipped: 0" in build.stdout
    command = shlex.split(build.stdout.splitlines()[-1].removeprefix("pretrain on them: "))
    assert command[:4] == ["accelerate", "launch", "-m", "pipelines.pretrain"]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", *command[4:], f"output_dir={out}", "progress=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 1 shard(s) feed 1 process(es) x 1 loader worker(s), not the 2 of "
                        "data.num_workers; more shards would read faster"]  # fmt: skip
    records = [m for m in read_metrics(out) if "loss" in m]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]  # one line per epoch: 2 steps each
    counts = [m for m in read_metrics(out) if "skipped" in m]  # the epochs' lines of data counts
    assert [c["epoch"] for c in counts] == [0, 1, 2, 3]
    assert all(c["skipped"] == 0 and c["converted_by_mode"] == {"CMYK": 3, "L": 3, "P": 3} for c in counts)
    assert (out / "encoder.safetensors").is_file()
