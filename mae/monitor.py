"""A k-NN monitor of the encoder during pretraining: MAE's loss says little about the features,
so every ``monitor.every`` epochs (minutes under ``max_minutes``) the current encoder embeds a
fixed query set and a fixed bank of labelled images (no augmentation, eval mode, the run's
precision) and the k-NN top-1 of the queries is logged, on the cls token (``knn_cls``) and on
the patch average (``knn_avg``), with its cost in seconds (``monitor_s``).

It never changes the training: the images are decoded once at the start, and every run of it
leaves the torch, CUDA, numpy and Python random streams as it found them.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .collectives import gather_all, main_rank_says
from .data.decode import UndecodableImage, image_key
from .data.loader import DataConfig
from .data.shards import DataError, expand_shards, shard_classes
from .data.steps import TarSamples
from .data.transforms import eval_transform, to_model_input
from .evaluation import extract_features, knn_classify
from .metrics import read_metrics

# The shipped sample's labelled shards: the test set first (queries), then the training set (bank).
SHIPPED_MONITOR = "shards/cifar10/test-{000000..000003}.tar::shards/cifar10/train-{000000..000007}.tar"
FIX = "give labelled shards (python -m shards build from class folders), or turn it off with monitor.every=0"


@dataclass
class MonitorConfig:
    """The k-NN monitor. Its images are read in order from ``data``: the first ``queries``
    labelled images are the queries, the next ``bank`` the bank (fewer when the shards hold fewer)."""

    # "auto": the shipped sample's labelled shards (test, then train) when data.train is the
    # shipped sample, else off; "" off; or a shard spec as data.train takes it
    data: str = "auto"
    # epochs between runs (minutes under max_minutes); 0 turns it off. The last epoch always runs
    # it. Each run embeds queries + bank images with the whole encoder (no masking: 4x the tokens
    # of a training forward): 1,000 cost about 4 s on 2 cores, so the 4-epoch default run pays
    # for one, at its end (BENCHMARKS.md, "The k-NN monitor's cost")
    every: float = 4
    queries: int = 300
    bank: int = 700
    batch_size: int = 250  # images per forward
    k: int = 20
    temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"monitor.every must be >= 0 (0 turns the monitor off), got {self.every}")
        for name in ("queries", "bank", "batch_size", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"monitor.{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"monitor.temperature must be positive, got {self.temperature}")


def check_monitor(monitor: MonitorConfig, max_minutes: float | None) -> None:
    """What only the whole config can say: ``every`` counts whole epochs unless ``max_minutes`` is set."""
    if max_minutes is None and monitor.every != int(monitor.every):
        raise ValueError(f"monitor.every counts epochs (max_minutes is not set): give a whole number, got {monitor.every}")


def monitor_shards(monitor: MonitorConfig, data: DataConfig) -> str:
    """The shard spec the monitor reads, "" when it is off."""
    if monitor.every == 0:
        return ""
    if monitor.data == "auto":
        return SHIPPED_MONITOR if data.train == DataConfig().train else ""
    return monitor.data


def _labelled_samples(spec: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, sample) of the shards in order; a shard that cannot be read is a DataError
    (``read_monitor_set`` has checked that they exist)."""

    def fail(exn: Exception) -> bool:
        raise DataError(f"monitor.data: cannot read {spec!r}: {exn}; {FIX}")

    for sample in TarSamples(fail)({"url": u} for u in expand_shards(spec)):
        yield f"{Path(sample.get('__url__', '?')).name}:{sample.get('__key__', '?')}", sample


def read_monitor_set(spec: str, queries: int, bank: int) -> tuple[list[bytes], torch.Tensor, int, int]:
    """The encoded images and labels of the first ``queries + bank`` labelled samples, the
    number of classes and how many are queries. One clear DataError for a sample without
    ``.cls``, a label that is not a class number, or too few images."""
    try:
        classes = shard_classes(spec.split("::")[0])
    except DataError as err:
        raise DataError(f"monitor.data: {err}; {FIX}") from err
    data: list[bytes] = []
    labels: list[int] = []
    for where, sample in _labelled_samples(spec):
        ext = image_key(sample)
        if ext is None:
            continue
        if "cls" not in sample:
            raise DataError(f"monitor.data: sample {where} has no .cls label; {FIX}")
        text = sample["cls"].decode(errors="replace").strip() if isinstance(sample["cls"], bytes) else str(sample["cls"])
        if not text.isdigit() or (classes is not None and int(text) >= len(classes)):
            span = f"0..{len(classes) - 1}" if classes is not None else "0, 1, ..."
            raise DataError(f"monitor.data: sample {where} has label {text!r}, not a class number in {span}; {FIX}")
        data.append(sample[ext])
        labels.append(int(text))
        if len(data) == queries + bank:
            break
    if len(data) <= queries:
        raise DataError(f"monitor.data: {spec!r} holds {len(data)} labelled image(s); the monitor needs more than "
                        f"monitor.queries={queries} (queries first, then the bank): {FIX}, or lower monitor.queries")  # fmt: skip
    num_classes = len(classes) if classes is not None else max(labels) + 1
    return data, torch.tensor(labels), num_classes, queries


@contextlib.contextmanager
def untouched_rng(device: torch.device) -> Iterator[None]:
    """Whatever runs inside leaves the torch (CPU and the device's), numpy and Python streams as they were."""
    devices = [device] if device.type == "cuda" else []
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class KnnMonitor:
    """Holds this rank's share of the decoded images (rank r: every world-th image), runs the
    encoder over them when due, gathers the features and scores the queries against the bank."""

    def __init__(self, cfg: Any, accelerator: Any, img_size: int) -> None:
        self.cfg, self.acc, self.mon = cfg, accelerator, cfg.monitor
        self.period = None if cfg.max_minutes is None else self.mon.every * 60.0
        self._last_slot: int | None = None
        start = time.perf_counter()
        with untouched_rng(accelerator.device):
            data, labels, self.num_classes, n_queries = read_monitor_set(
                monitor_shards(cfg.monitor, cfg.data), self.mon.queries, self.mon.bank)  # fmt: skip
            rank, world = accelerator.process_index, accelerator.num_processes
            transform = eval_transform(img_size)
            self.parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for name, span in (("queries", range(n_queries)), ("bank", range(n_queries, len(data)))):
                mine = list(span)[rank::world]
                pixels, kept = [], []
                for i in mine:
                    try:
                        pixels.append(transform(data[i])[0])
                        kept.append(int(labels[i]))
                    except UndecodableImage:
                        pass  # this rank's rows shrink; the forwards stay in lockstep (mae.evaluation.lockstep)
                shape = (0, 3, img_size, img_size)
                self.parts[name] = (torch.stack(pixels) if pixels else torch.empty(shape, dtype=torch.uint8),
                                    torch.tensor(kept, dtype=torch.long))  # fmt: skip
        self.sizes = (n_queries, len(data) - n_queries)
        self.setup_s = time.perf_counter() - start  # part of what the monitor costs a run

    def describe(self) -> str:
        unit = "minute(s)" if self.period is not None else "epoch(s)"
        return (f"monitor: k-NN (k {self.mon.k}, T {self.mon.temperature:g}) of {self.sizes[0]} queries against a bank "
                f"of {self.sizes[1]}, every {self.mon.every:g} {unit} and at the end (images read and decoded in "
                f"{self.setup_s:.2f} s)")  # fmt: skip

    def due(self, epoch: int, elapsed_s: float, last: bool) -> bool:
        """Epochs: every ``every``-th epoch. Minutes: the first epoch end in each new ``every``-minute
        slot of the run's clock, decided on the main process (clocks differ across ranks)."""
        if self.period is None:
            return last or (epoch + 1) % int(self.mon.every) == 0
        slot = int(elapsed_s // self.period)
        if self._last_slot is None:
            self._last_slot = self._resumed_slot() if self.cfg.resume else 0
        due = main_rank_says(self.acc, last or slot > self._last_slot)
        if due:
            self._last_slot = slot
        return due

    def _resumed_slot(self) -> int:
        """The clock slot of the last monitor line the stopped run wrote, so the cadence goes on."""
        path = Path(self.cfg.output_dir)
        if not (self.acc.is_main_process and (path / "metrics.jsonl").exists()):
            return 0
        records = read_metrics(path)
        steps = [r["step"] for r in records if "knn_cls" in r]
        if not steps:
            return 0
        clock = [r["elapsed_s"] for r in records if "elapsed_s" in r and r["step"] <= steps[-1]]
        return int(max(clock, default=0.0) // self.period)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """``knn_cls``, ``knn_avg`` (top-1, %) and ``monitor_s``; every rank takes part."""
        start = time.perf_counter()
        net = self.acc.unwrap_model(model)
        was_training = net.training
        net.eval()
        with untouched_rng(self.acc.device):
            feats = {name: self._features(net, name) for name in ("queries", "bank")}
        net.train(was_training)
        out = {}
        for i, key in enumerate(("knn_cls", "knn_avg")):
            (q, ql), (b, bl) = ((f[i], f[2]) for f in (feats["queries"], feats["bank"]))
            out[key] = knn_classify(b, bl, q, ql, self.num_classes, k=self.mon.k,
                                    temperature=self.mon.temperature)["knn_top1"]  # fmt: skip
        out["monitor_s"] = round(time.perf_counter() - start, 3)
        return out

    def _features(self, net: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's cls-token and patch-average features [N, D] and labels [N], gathered."""
        pixels, labels = self.parts[name]
        size, dim = self.mon.batch_size, net.cfg.embed_dim
        batches = ({"image": pixels[i : i + size], "label": labels[i : i + size]} for i in range(0, len(pixels), size))

        def cls_and_average(x: torch.Tensor) -> torch.Tensor:
            tokens = net.forward_features(x)  # [n, 1 + L, D]
            return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)

        feats, kept = extract_features(cls_and_average, batches, self.acc, tuple(pixels.shape[1:]))
        if not len(feats):  # this rank's share was empty
            feats = torch.empty(0, 2 * dim)
        return tuple(gather_all(t, self.acc) for t in (feats[:, :dim], feats[:, dim:], kept))  # type: ignore[return-value]
