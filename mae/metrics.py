"""Metrics a user can plot, written by the main process only and continued across resumes:
``metrics.jsonl`` (the project's own record, a JSON object per logged step) and the
experiment trackers Accelerate drives (``report_to``: TensorBoard by default; W&B, MLflow,
Comet, Aim, ClearML, DVCLive... when installed), with the run's resolved config as
hyper-parameters.

Names are made valid for every tracker at once (``tracker_name``), and a tracker that
raises while logging is switched off with one warning: a tracker never stops training."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError
from .files import write_atomic


def tracker_names(report_to: str) -> list[str]:
    """``report_to`` ("tensorboard", "mlflow,tensorboard", "all", "none") as Accelerate's
    ``log_with``; a name Accelerate does not know, or whose package is missing, is a ConfigError."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    known = [t.value for t in LoggerType]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"report_to: unknown tracker {name!r}; Accelerate's trackers: {', '.join(known)}, "
                              "or none")  # fmt: skip
        if name != "all" and name not in available:
            raise ConfigError(f"report_to: tracker {name!r} is not installed (pip install its package, "
                              "or choose another)")  # fmt: skip
    return names


def tracker_project(cfg: Any) -> str:
    """The trackers' project (TensorBoard's sub-folder of output_dir, MLflow's experiment,
    W&B's project): one per stage, e.g. ``mae-pretrain`` for ``PretrainConfig``."""
    return "mae-" + type(cfg).__name__.removesuffix("Config").lower()


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """The resolved config flattened to dotted keys with scalar values, as trackers take them
    (None, lists and empty mappings written as JSON)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix[:-1]] = value
        else:
            flat[prefix[:-1]] = json.dumps(value)

    walk("", dataclasses.asdict(cfg))
    return {tracker_name(k): v for k, v in flat.items()}


_FORBIDDEN = re.compile(r"[^A-Za-z0-9_./-]")


def tracker_name(name: str) -> str:
    """``name`` with what some tracker rejects replaced by ``_``, so one name serves all of them
    and ``metrics.jsonl``. MLflow takes only alphanumerics, ``_ - . / :`` and spaces (no colon on
    Windows), and no empty, ``.`` or ``..`` segment between slashes; DVCLive writes each metric
    to a file of that name; W&B sorts and filters only names of letters, digits and ``_`` (``/``
    groups its panels). TensorBoard, Comet, Aim and ClearML take any string. So: letters, digits
    and ``_ - . /``, with ``/`` only between non-empty segments that are not dots."""
    segments = [_FORBIDDEN.sub("_", part) for part in name.split("/")]
    return "/".join(part for part in segments if part.strip(".")) or "_"


def scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a metrics record, nested counts as ``skipped_by_reason/undecodable``."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = v
    return out


class MetricsLogger:
    """Opens the run's trackers (``accelerator.init_trackers``) and writes every record to
    them and to ``metrics.jsonl``, under the names ``tracker_name`` makes. On resume, lines and
    TensorBoard events after the checkpoint's step are dropped: the resumed run logs those
    steps again. A tracker that raises while storing the config or logging is reported once
    on stderr and dropped from ``accelerator.trackers``; the rest of the run goes on without it."""

    def __init__(self, accelerator: Any, cfg: Any, resume_step: int | None = None) -> None:
        self.acc = accelerator
        self.enabled = accelerator.is_main_process
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", buffering=1)
        init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
        accelerator.init_trackers(tracker_project(cfg), init_kwargs=init_kwargs)
        config = hyperparameters(cfg)
        self._each_tracker(lambda tracker: tracker.store_init_configuration(config))

    def _truncate_after(self, step: int) -> None:
        """Lines logged after the checkpoint we resume from would be logged again: drop them."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass  # a line cut by the kill
        write_atomic(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, **_plain(values)}
        self._file.write(json.dumps(record) + "\n")
        numbers = scalars({k: v for k, v in record.items() if k != "step"})
        self._each_tracker(lambda tracker: tracker.log(numbers, step=step))

    def _each_tracker(self, call: Any) -> None:
        """``call(tracker)`` for every tracker still on; one that raises is switched off."""
        for tracker in list(self.acc.trackers):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001  (any failure of a tracker, never the run's)
                self.acc.trackers.remove(tracker)
                message = " ".join(str(err).split()) or type(err).__name__
                print(f"warning: tracker {tracker.name!r} failed and is off for the rest of this run "
                      f"(metrics.jsonl and the other trackers go on): {type(err).__name__}: {message}",
                      file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        """Closes ``metrics.jsonl``; the trackers end with ``accelerator.end_training()``."""
        if self.enabled:
            self._file.close()


def _plain(v: Any) -> Any:
    """Tensors as numbers, and every key as the trackers get it (a mode ``I;16`` as ``I_16``)."""
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, dict):
        return {tracker_name(str(k)): _plain(x) for k, x in v.items()}
    return v


def describe_data_counts(record: dict[str, Any]) -> str:
    """The epoch's skipped samples (dropped) and converted ones (kept as RGB), in words."""
    def part(total: int, by: dict[str, int]) -> str:
        return f"{total}" + (f" ({', '.join(f'{k} {n}' for k, n in by.items())})" if by else "")

    return (f"skipped {part(record.get('skipped', 0), record.get('skipped_by_reason', {}))}, "
            f"converted to RGB {part(record.get('converted', 0), record.get('converted_by_mode', {}))}")  # fmt: skip


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``output_dir/metrics.jsonl``; a line still being written (a running run)
    or cut by a kill is left out."""
    records = []
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records
