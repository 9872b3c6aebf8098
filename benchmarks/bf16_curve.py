"""Does bf16 autocast train like fp32? Loss curves of the default pretraining run (the
CIFAR preset on the shipped CIFAR-10 shards: 4 epochs, 320 optimiser steps of 64 real
images) in fp32 and in bf16, several seeds each; the bf16 curves should stay inside the
band the fp32 seeds span.

    python benchmarks/bf16_curve.py run --precision no   --seeds 0,1,2 --out OUT/curves
    python benchmarks/bf16_curve.py run --precision bf16 --seeds 0,1,2 --out OUT/curves
    python benchmarks/bf16_curve.py report --out OUT/curves

``run`` trains one arm per seed through the stage's entry point (each arm a fresh
process, as a user runs it); ``report`` compares the curves, smoothed by a trailing mean
over ``--window`` steps, since single-step losses swing with the batch and the masks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mae.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def arm_dir(out: Path, precision: str, seed: int) -> Path:
    return out / f"{precision}-seed{seed}"


def run(out: Path, precision: str, seeds: list[int], extra: list[str]) -> None:
    for seed in seeds:
        folder = arm_dir(out, precision, seed)
        cmd = [sys.executable, "-m", "pipelines.pretrain", f"output_dir={folder}", f"mixed_precision={precision}",
               f"seed={seed}", "log_every=1", "progress=false", "data.val=", *extra]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        wall = time.perf_counter() - start
        write_atomic(folder / "wall.json", json.dumps({"wall_s": wall, "cmd": cmd}))
        print(f"{precision} seed {seed}: {wall:.0f} s; {proc.stdout.splitlines()[0]}")


def losses(folder: Path) -> list[float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def smooth(xs: list[float], window: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i + 1 - window) : i + 1]) for i in range(len(xs))]


def report(out: Path, window: int) -> None:
    arms: dict[str, dict[int, list[float]]] = {}
    for folder in sorted(out.glob("*-seed*")):
        precision, seed = folder.name.rsplit("-seed", 1)
        arms.setdefault(precision, {})[int(seed)] = losses(folder)
    if "no" not in arms or len(arms["no"]) < 2:
        sys.exit("report needs at least two fp32 (precision 'no') seeds to measure a spread")
    steps = min(len(c) for runs in arms.values() for c in runs.values())
    curves = {p: {s: smooth(c[:steps], window) for s, c in runs.items()} for p, runs in arms.items()}
    low = [min(c[i] for c in curves["no"].values()) for i in range(steps)]
    high = [max(c[i] for c in curves["no"].values()) for i in range(steps)]
    checked = range(window - 1, steps)  # from the first full window
    print(f"{steps} steps; curves smoothed over {window} steps; band = min..max of {len(curves['no'])} fp32 seeds")
    print("| arm | seed | loss, step 1 | smoothed loss, last step | steps inside the fp32 band | "
          "largest excursion outside (x band width) | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for precision, runs in curves.items():
        for seed, c in sorted(runs.items()):
            inside = sum(low[i] <= c[i] <= high[i] for i in checked)
            excursion = max(max(low[i] - c[i], c[i] - high[i], 0.0) / max(high[i] - low[i], 1e-9) for i in checked)
            wall = json.loads((arm_dir(out, precision, seed) / "wall.json").read_text())["wall_s"]
            name = "fp32" if precision == "no" else precision
            print(f"| {name} | {seed} | {arms[precision][seed][0]:.4f} | {c[-1]:.4f} | {inside}/{len(checked)} | "
                  f"{excursion:.2f} | {wall:.0f} |")
    width = statistics.fmean(high[i] - low[i] for i in checked)
    for precision, runs in curves.items():
        for seed, c in sorted(runs.items()):
            twin = curves["no"].get(seed)
            if precision != "no" and twin is not None:
                gap = max(abs(c[i] - twin[i]) for i in checked)
                print(f"{precision} seed {seed} against fp32 seed {seed} (same data, masks and start): largest "
                      f"smoothed gap {gap:.4f}, {gap / width:.2f}x the mean fp32 band width ({width:.4f})")
    for precision, runs in curves.items():
        finals = [statistics.fmean(c[-50:]) for c in runs.values()]
        spread = f" ± {statistics.stdev(finals):.4f} (sd over seeds)" if len(finals) > 1 else ""
        print(f"{'fp32' if precision == 'no' else precision}: mean smoothed loss over the last 50 steps "
              f"{statistics.fmean(finals):.4f}{spread}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("run", "report"))
    ap.add_argument("--out", type=Path, required=True, help="folder of the arms")
    ap.add_argument("--precision", default="no", choices=("no", "bf16"), help="run: the arm's mixed_precision")
    ap.add_argument("--seeds", default="0,1,2", help="run: comma-separated seeds")
    ap.add_argument("--window", type=int, default=20, help="report: trailing-mean window in steps")
    ap.add_argument("overrides", nargs="*", help="run: more key=value settings for every arm")
    args = ap.parse_args()
    if args.mode == "run":
        run(args.out, args.precision, [int(s) for s in args.seeds.split(",")], args.overrides)
    else:
        report(args.out, args.window)


if __name__ == "__main__":
    main()
