"""The k-NN monitor of pretraining and the one-page picture of a run: its settings, the
monitor data it refuses, the picture of finished, running and resumed runs; slow: a run
with the monitor trains exactly as one without it, on one process and on two."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mae.config import ConfigError, load_config
from mae.data.shards import DataError
from mae.metrics import read_metrics
from mae.monitor import SHIPPED_MONITOR, monitor_shards, read_monitor_set
from mae.pretrain import PretrainConfig
from mae.summary import SUMMARY_FILE, RunCurves, run_history, write_summary
from pipelines import summary

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- settings


def test_monitor_is_on_for_the_shipped_sample_and_off_for_other_data():
    assert monitor_shards(PretrainConfig().monitor, PretrainConfig().data) == SHIPPED_MONITOR
    other = load_config(PretrainConfig, None, ["data.train=shards/cifar10/test-000000.tar"])
    assert monitor_shards(other.monitor, other.data) == ""
    off = load_config(PretrainConfig, None, ["monitor.every=0"])
    assert monitor_shards(off.monitor, off.data) == ""
    given = load_config(PretrainConfig, None, ["data.train=x.tar", "monitor.data=y.tar"])
    assert monitor_shards(given.monitor, given.data) == "y.tar"


@pytest.mark.parametrize("override, words", [
    ("monitor.every=1.5", "monitor.every counts epochs"), ("monitor.every=-1", "monitor.every must be >= 0"),
    ("monitor.queries=0", "monitor.queries must be at least 1"), ("monitor.temperature=0", "monitor.temperature"),
    ("monitor.bank=many", "monitor.bank"),
])  # fmt: skip
def test_bad_monitor_settings_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(PretrainConfig, None, [override])


def test_monitor_every_counts_minutes_under_max_minutes():
    assert load_config(PretrainConfig, None, ["monitor.every=1.5", "max_minutes=10"]).monitor.every == 1.5


# --------------------------------------------------------------------- monitor data


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(path: Path, samples: list[dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_monitor_set_takes_queries_first_then_the_bank(tmp_path):
    spec = _shard(tmp_path / "a.tar", [{"jpg": _jpeg((i * 20, 0, 0)), "cls": str(i % 3).encode()} for i in range(10)])
    data, labels, classes, queries = read_monitor_set(spec, queries=4, bank=100)
    assert (len(data), queries, classes) == (10, 4, 3)  # a smaller bank where the shards hold fewer
    assert labels.tolist() == [i % 3 for i in range(10)]


@pytest.mark.parametrize("samples, words", [
    ([{"jpg": b"x"}], "has no .cls label"),
    ([{"jpg": b"x", "cls": b"cat"}], "has label 'cat', not a class number"),
    ([], "holds 0 labelled image"),
])  # fmt: skip
def test_bad_monitor_data_is_one_line_naming_monitor_data(tmp_path, samples, words):
    spec = _shard(tmp_path / "bad.tar", samples)
    with pytest.raises(DataError, match=words) as err:
        read_monitor_set(spec, queries=1, bank=1)
    message = str(err.value)
    assert message.startswith("monitor.data:") and "monitor.every=0" in message and "\n" not in message


def test_missing_monitor_shards_name_monitor_data(tmp_path):
    with pytest.raises(DataError, match=r"^monitor.data: .*does not exist"):
        read_monitor_set(str(tmp_path / "none-{000000..000001}.tar"), queries=1, bank=1)


# ------------------------------------------------------------------------ the picture


def _train(step: int, epoch: int, loss: float) -> dict:
    return {"step": step, "epoch": epoch, "loss": loss, "lr": 1e-3 * step, "images_per_sec": 100.0,
            "elapsed_s": step * 0.64, "skipped": 0, "converted": 0}  # 64 images per step at 100 images/s


def _write(path: Path, records: list[dict], tail: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_summary_of_a_resumed_run_still_running(tmp_path):
    """A resumed run that logged steps 6-8 again and is writing a line now: the steps logged
    before the stop from 6 on are dropped, the monitor lines before it stay, the cut line is skipped."""
    first = [_train(s, (s - 1) // 4, 2.0 - 0.1 * s) for s in range(1, 9)]
    first.insert(4, {"step": 4, "epoch": 0, "val_loss": 1.5, "knn_cls": 20.0, "knn_avg": 21.0, "monitor_s": 1.0})
    again = [_train(s, (s - 1) // 4, 1.0) for s in range(6, 9)]
    run = tmp_path / "run"
    _write(run, first + again, tail='{"step": 9, "epoch": 2, "lo')
    records = read_metrics(run)
    history = run_history(records)
    assert [r["step"] for r in history if "loss" in r] == list(range(1, 9))
    assert [r["loss"] for r in history if r["step"] >= 6 and "loss" in r] == [1.0, 1.0, 1.0]
    assert [r["knn_cls"] for r in history if "knn_cls" in r] == [20.0]
    curves = RunCurves(records)
    steps, _ = curves.series("knn_cls")
    assert curves.images(steps).tolist() == pytest.approx([256.0])  # 4 steps x 64 images
    assert write_summary(run) == run / SUMMARY_FILE
    picture = Image.open(run / SUMMARY_FILE)
    assert picture.width >= 1200 and picture.height >= 700


def test_summary_command_draws_several_runs_and_refuses_a_folder_without_metrics(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 0.9)):
        _write(tmp_path / name, [_train(s, 0, scale * (2 - 0.1 * s)) for s in range(1, 6)])
    out = tmp_path / "both.png"
    assert summary.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert Image.open(out).width >= 1200
    assert summary.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing/metrics.jsonl does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------- real runs (slow)

RUN = ["data.train=shards/cifar10/test-{000000..000003}.tar", "data.val=shards/cifar10/test-000000.tar",
       "batch_size=32", "epochs=2", "log_every=1", "model_overrides.depth=2", "progress=false", "num_vis=2",
       f"monitor.data={SHIPPED_MONITOR}", "monitor.queries=200", "monitor.bank=300"]  # fmt: skip


def _run(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", f"output_dir={out}", *RUN, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_monitor_leaves_the_training_exactly_as_without_it(tmp_path):
    """Same losses at every step and the same validation losses: no random stream or batch moved."""
    _run(tmp_path / "with", "monitor.every=1")
    proc = _run(tmp_path / "without", "monitor.every=0")
    with_, without = read_metrics(tmp_path / "with"), read_metrics(tmp_path / "without")
    for key in ("loss", "val_loss"):
        a = {r["step"]: r[key] for r in with_ if key in r}
        assert a == {r["step"]: r[key] for r in without if key in r} and len(a) > 1, key
    knn = [r for r in with_ if "knn_cls" in r]
    assert [r["epoch"] for r in knn] == [0, 1]
    assert all(0 < r["knn_cls"] <= 100 and 0 < r["knn_avg"] <= 100 and r["monitor_s"] > 0 for r in knn)
    assert not [r for r in without if "knn_cls" in r] and "knn_cls" not in proc.stdout
    assert (tmp_path / "with" / SUMMARY_FILE).is_file() and (tmp_path / "without" / SUMMARY_FILE).is_file()


@pytest.mark.slow
def test_bad_monitor_data_stops_the_stage_before_it_trains(tmp_path):
    bad = _shard(tmp_path / "unlabelled.tar", [{"jpg": _jpeg((9, 9, 9))}])
    proc = _run(tmp_path / "run", f"monitor.data={bad}", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "monitor.data" in line]
    assert len(errors) == 1 and "has no .cls label" in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resumed_run_keeps_its_monitor_history(tmp_path):
    """A run stopped after epoch 0 and resumed: the monitor line of epoch 0 stays, epoch 1 adds its own."""
    out = tmp_path / "run"
    _run(out, "monitor.every=1", "max_steps=32", "epochs=2")  # stops at the end of epoch 0
    _run(out, "monitor.every=1", "resume=auto")
    assert [r["epoch"] for r in read_metrics(out) if "knn_cls" in r] == [0, 1]


@pytest.mark.slow
def test_monitor_on_two_processes(tmp_path):
    """Extraction split across two ranks and gathered: one monitor line, from the main process."""
    from tests.test_distributed import launch

    proc = launch(2, "stage", str(tmp_path), *RUN, "epochs=1", "monitor.every=1", "data.num_workers=1")
    knn = [r for r in read_metrics(tmp_path / "run") if "knn_cls" in r]
    assert len(knn) == 1 and 0 < knn[0]["knn_cls"] <= 100 and 0 < knn[0]["knn_avg"] <= 100
    assert proc.stdout.count("knn_cls") == 1  # printed once
    assert (tmp_path / "run" / SUMMARY_FILE).is_file()
