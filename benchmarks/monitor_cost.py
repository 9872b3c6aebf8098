"""What the k-NN monitor costs: the default pretraining (``accelerate launch -m pipelines.pretrain``
on the shipped sample, 4 epochs) timed as a whole command with the monitor at its defaults and
with ``monitor.every=0``, alternating, each in a new process.

    python benchmarks/monitor_cost.py --rounds 6 --work OUT/monitor_cost --json OUT/monitor_cost.json

The issue's target: the monitor adds at most 5% to the run's wall time on 2 cores. Two readings:
- **In the run**: what the monitor itself took (reading and decoding its images at the start,
  printed by the stage, plus every run's ``monitor_s``) as a share of that run's wall time. A
  machine whose pace drifts between runs cannot move it.
- **Whole commands**: each round's difference, with the monitor minus without, and their mean
  and standard deviation; the training loop's seconds a step on each side show whether the
  monitor slowed the steps around it.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pretrain_step import cpu_name  # noqa: E402
from mae.files import write_atomic  # noqa: E402
from mae.metrics import read_metrics  # noqa: E402

SIDES = {"monitor": [], "no monitor": ["monitor.every=0"]}


def timed_run(out: Path, extra: list[str]) -> dict[str, Any]:
    cmd = ["accelerate", "launch", "-m", "pipelines.pretrain", f"output_dir={out}", "progress=false",
           "report_to=none", *extra]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    records = read_metrics(out)
    knn = [r for r in records if "knn_cls" in r]
    steps = [r for r in records if "elapsed_s" in r and "step" in r]
    found = re.search(r"images read and decoded in ([0-9.]+) s", proc.stdout)
    if knn and found is None:  # a monitored run must say its start-up, or the share would leave it out
        raise SystemExit(f"{' '.join(cmd)}: no 'images read and decoded in' line in its output")
    setup = float(found.group(1)) if found else None
    monitor_s = sum(r["monitor_s"] for r in knn) + (setup or 0.0)
    # seconds a step between the first and the last logged step (the first window holds the warm-up)
    step_s = (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (steps[-1]["step"] - steps[0]["step"])
    return {"wall_s": round(wall, 2), "monitor_s": round(monitor_s, 2), "share": round(monitor_s / wall, 4),
            "setup_s": setup, "monitor_runs": len(knn),
            "step_s": round(step_s, 4), "last": {k: knn[-1][k] for k in ("knn_cls", "knn_avg")} if knn else None,
            "last_line": proc.stdout.strip().splitlines()[-1]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--work", type=Path, required=True, help="folder for the runs (replaced run by run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side, extra in (SIDES.items() if r % 2 == 0 else reversed(SIDES.items())):
            result = timed_run(args.work / f"{side.replace(' ', '-')}-{r}", extra)
            runs[side].append(result)
            print(json.dumps({"side": side, "round": r, **result}), flush=True)
    walls = {side: statistics.median(x["wall_s"] for x in results) for side, results in runs.items()}
    diffs = [a["wall_s"] - b["wall_s"] for a, b in zip(runs["monitor"], runs["no monitor"])]
    shares = [x["share"] for x in runs["monitor"]]
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "in_run_share": {"median": statistics.median(shares), "max": max(shares)},
        "monitor_s_median": statistics.median(x["monitor_s"] for x in runs["monitor"]),
        "median_wall_s": walls,
        "ratio": round(walls["monitor"] / walls["no monitor"], 4),
        "paired_diff_s": {"mean": round(statistics.mean(diffs), 2),
                          "sd": round(statistics.stdev(diffs), 2) if len(diffs) > 1 else None},
        "step_s_median": {side: statistics.median(x["step_s"] for x in results) for side, results in runs.items()},
        "runs": runs,
        "command": "python benchmarks/monitor_cost.py " + f"--rounds {args.rounds} --work OUT/monitor_cost",
    }  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
