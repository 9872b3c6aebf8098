"""Metrics reach every tracker under names it accepts, and no tracker can stop a run."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae.metrics import read_metrics, tracker_name

ROOT = Path(__file__).resolve().parents[1]
TINY = ["epochs=1", "batch_size=32", "log_every=1", "model_overrides.depth=1", "data.val=", "data.num_workers=1",
        "progress=false"]  # fmt: skip


@pytest.mark.parametrize("name", ["converted_by_mode/I;16", "skipped_by_reason/no image", "a:b", "/lead//trail/",
                                  "x/./y", "..", "top1_ema", "model_overrides.depth", "ünïcode"])  # fmt: skip
def test_tracker_names_pass_mlflows_own_check_and_keep_valid_names(name):
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    clean = tracker_name(name)
    _validate_metric_name(clean)
    _validate_param_name(clean)
    assert clean == tracker_name(clean)  # stable: a name already clean is kept as it is
    assert all(c.isascii() and (c.isalnum() or c in "_-./") for c in clean)
    if name in ("top1_ema", "model_overrides.depth"):
        assert clean == name


def _folder_with_a_16bit_png(folder: Path) -> None:
    """63 CIFAR-10 JPEGs from the shipped shards and one 16-bit greyscale PNG (PIL mode I;16)."""
    folder.mkdir()
    with tarfile.open(ROOT / "shards" / "cifar10" / "train-000000.tar") as tar:
        jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:63]
    for i, data in enumerate(jpegs):
        (folder / f"img{i:03d}.jpg").write_bytes(data)
    grey = np.asarray(Image.open(io.BytesIO(jpegs[0])).convert("L"), dtype=np.uint16) * 257
    png = Image.fromarray(grey)
    assert png.mode == "I;16"
    png.save(folder / "deep.png")


@pytest.mark.slow
def test_mlflow_run_over_a_16bit_png_logs_every_metric(tmp_path):
    """The count of images converted from mode ``I;16`` has a ``;`` MLflow rejects: the run
    completes with every metric in MLflow's SQLite store, under the name metrics.jsonl uses."""
    from mlflow.tracking import MlflowClient

    _folder_with_a_16bit_png(tmp_path / "photos")
    build = subprocess.run([sys.executable, "-m", "shards", "build", str(tmp_path / "photos"), str(tmp_path / "shards"),
                            "--samples-per-shard", "100", "--workers", "1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", f"output_dir={out}", "report_to=mlflow",
                           f"data.train={tmp_path / 'shards' / 'train-000000.tar'}", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, MLFLOW_TRACKING_URI=uri))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: tracker" not in proc.stderr
    records = [m for m in read_metrics(out) if "loss" in m]
    counts = [m for m in read_metrics(out) if "converted" in m]  # the epochs' lines of data counts
    assert counts[-1]["converted_by_mode"] == {"I_16": 1}  # the name the trackers got too
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mae-pretrain").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx({r["step"]: r["loss"] for r in records})
    assert client.get_metric_history(run.info.run_id, "converted_by_mode/I_16")[-1].value == 1
    assert run.data.params["report_to"] == "mlflow"


REFUSING_RUN = textwrap.dedent('''
    """The pretraining stage with a custom tracker that raises on its first log call, beside TensorBoard."""
    import sys

    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    from mae.config import load_config
    from mae.pretrain import PretrainConfig, pretrain


    class Refusing(GeneralTracker):
        name = "refusing"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()

        @property
        def tracker(self):
            return None

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            raise RuntimeError("the tracking server\\ngoes away")


    cfg = load_config(PretrainConfig, overrides=sys.argv[1:])
    accelerator = Accelerator(cpu=True, log_with=[Refusing(), "tensorboard"], project_dir=cfg.output_dir)
    pretrain(cfg, accelerator)
    accelerator.end_training()
''')


@pytest.mark.slow
def test_a_tracker_that_raises_is_switched_off_and_the_run_goes_on(tmp_path):
    """One warning naming the tracker and its message; the run, metrics.jsonl and TensorBoard go on to the end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = tmp_path / "refusing_run.py"
    script.write_text(REFUSING_RUN)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), f"output_dir={out}",
                           "data.train=shards/cifar10/test-{000000..000001}.tar", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning: tracker" in line]
    assert warnings == [("warning: tracker 'refusing' failed and is off for the rest of this run (metrics.jsonl and "
                         "the other trackers go on): RuntimeError: the tracking server goes away")]  # fmt: skip
    losses = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
    assert len(losses) > 1 and (out / "encoder.safetensors").is_file()
    events = EventAccumulator(str(out / "mae-pretrain"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses)
