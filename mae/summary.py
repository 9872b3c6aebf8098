"""The one-page picture of a run (``summary.png``): losses against images seen and against
minutes, the lr, the k-NN monitor, the images/s and the skipped and converted samples. It reads
``metrics.jsonl`` only, so it draws finished, running and resumed runs, and several runs on
shared axes (``python -m pipelines.summary``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import read_metrics

SUMMARY_FILE = "summary.png"


def run_history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the run as it went on: where a resumed run logged a step again, what was
    logged from that step on before the stop is dropped (``MetricsLogger`` does the same on resume)."""
    out: list[dict[str, Any]] = []
    last = 0
    for r in records:
        step = r.get("step", 0)
        if "loss" in r:
            if step <= last:
                out = [o for o in out if o.get("step", 0) < step]
            last = step
        out.append(r)
    return out


def images_per_step(train: list[dict[str, Any]]) -> float:
    """Images one optimiser step takes, from consecutive lines of an epoch (images/s x seconds / steps);
    ``images_seen`` is used where the loop logs it."""
    rates = [b["images_per_sec"] * (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
             for a, b in zip(train, train[1:])
             if a.get("epoch") == b.get("epoch") and b["step"] > a["step"] and "elapsed_s" in a and "elapsed_s" in b]  # fmt: skip
    return statistics.median(rates) if rates else 0.0


class RunCurves:
    """One run's series against step, and the maps from step to images seen and to minutes."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = run_history(records)
        self.train = [r for r in self.records if "loss" in r]
        steps = [r["step"] for r in self.train]
        if self.train and all("images_seen" in r for r in self.train):
            self._images = (steps, [r["images_seen"] for r in self.train])
        else:
            per = images_per_step(self.train)
            self._images = (steps, [s * per for s in steps])
        timed = [r for r in self.train if "elapsed_s" in r]
        self._minutes = ([r["step"] for r in timed], [r["elapsed_s"] / 60 for r in timed])

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        steps, values = zip(*pts) if pts else ((), ())
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)

    def images(self, steps: np.ndarray) -> np.ndarray:
        return np.interp(steps, *self._images) if self._images[0] else steps

    def minutes(self, steps: np.ndarray) -> np.ndarray:
        return np.interp(steps, *self._minutes) if self._minutes[0] else np.full_like(steps, np.nan)


PANELS = (
    # title, x axis, [(key, label, line style)]
    ("loss", "images", [("loss", "train", "-"), ("val_loss", "validation", "o--")]),
    ("loss", "minutes", [("loss", "train", "-"), ("val_loss", "validation", "o--")]),
    ("k-NN top-1 (%)", "images", [("knn_cls", "cls token", "o-"), ("knn_avg", "patch average", "s--")]),
    ("learning rate", "images", [("lr", "lr", "-")]),
    ("images/s", "minutes", [("images_per_sec", "images/s", "-")]),
    ("samples skipped / converted", "images", [("skipped", "skipped", "-"), ("converted", "converted to RGB", "--")]),
)


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """The summary picture of one or more runs (name -> metrics records) on shared axes: colour is
    the run, the line style the series."""
    from matplotlib.figure import Figure

    from .visualize import save_figure

    curves = {name: RunCurves(records) for name, records in runs.items()}
    fig = Figure(figsize=(13.5, 7.6), dpi=100)
    axes = fig.subplots(2, 3).ravel()
    colours = [f"C{i}" for i in range(10)]
    for ax, (title, xaxis, keys) in zip(axes, PANELS):
        drawn = False
        for i, (name, c) in enumerate(curves.items()):
            for key, label, style in keys:
                steps, values = c.series(key)
                if not len(steps):
                    continue
                x = c.images(steps) if xaxis == "images" else c.minutes(steps)
                single = len(curves) == 1
                colour = colours[(keys.index((key, label, style)) if single else i) % 10]
                tag = label if single else f"{name}: {label}" if len(keys) > 1 else name
                ax.plot(x, values, style, color=colour, label=tag, markersize=4, linewidth=1.4)
                drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("images seen" if xaxis == "images" else "minutes", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if xaxis == "images":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        if keys[0][0] == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if keys[0][0] == "knn_cls" and drawn:  # percent: from 0, so that a single point reads as a level
            ax.set_ylim(bottom=0, top=min(100.0, ax.get_ylim()[1] * 1.15))
        if keys[0][0] == "skipped":  # counts: from 0, whole numbers
            from matplotlib.ticker import MaxNLocator

            ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            ax.legend(fontsize=7, loc="best")
        else:
            msg = "no k-NN monitor in this run" if keys[0][0] == "knn_cls" else "nothing logged"
            ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")
    fig.suptitle(_headline(curves), fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def _headline(curves: dict[str, RunCurves]) -> str:
    """The last numbers of each run, for the top of the page."""
    lines = []
    for name, c in curves.items():
        parts = [name]
        if c.train:
            steps = np.asarray([c.train[-1]["step"]], dtype=float)
            parts.append(f"{c.images(steps)[0]:,.0f} images, {c.minutes(steps)[0]:.1f} min")
        for key in ("val_loss", "knn_cls", "knn_avg"):
            _, values = c.series(key)
            if len(values):
                parts.append(f"{key} {values[-1]:.4g}")
        lines.append(", ".join(parts))
    return "\n".join(lines[:4]) + (f"\n(+{len(lines) - 4} more)" if len(lines) > 4 else "")


def write_summary(output_dir: str | Path) -> Path | None:
    """``output_dir/summary.png`` from its ``metrics.jsonl``. A picture that cannot be drawn
    never stops a run: one warning line, and None."""
    output_dir = Path(output_dir)
    try:
        return plot_runs({output_dir.name: read_metrics(output_dir)}, output_dir / SUMMARY_FILE)
    except Exception as err:  # a side product: the run goes on
        print(f"warning: {output_dir / SUMMARY_FILE} not written: {type(err).__name__}: {err}")
        return None
