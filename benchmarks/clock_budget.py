"""Does ``max_minutes`` keep its word? The CIFAR-10 recipe run for a few budgets, and for each:
where the first plan, the re-plan at half the budget and the landing put the end, where the
training loop really ended against the budget, and the lr there.

    python benchmarks/clock_budget.py --data DATA --minutes 3 10 --work OUT/clock --json OUT/clock.json

DATA holds the CIFAR-10 shards (``train-*.tar`` with their index, and ``test-*.tar``), as
``python -m shards build`` makes them. Each budget is one run of
``python -m pipelines.pretrain --config pipelines/configs/mae_vit_tiny_cifar10.yaml``; the loop's
own clock (``elapsed_s`` in ``metrics.jsonl``) is what the budget counts.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from mae.files import write_atomic
from mae.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "pipelines/configs/mae_vit_tiny_cifar10.yaml"
PLAN = re.compile(r"-> (\d+) optimiser steps (planned|re-planned)")


def run_budget(minutes: float, data: Path, work: Path, extra: list[str]) -> dict[str, Any]:
    out = work / f"minutes-{minutes:g}"
    cmd = [sys.executable, "-m", "pipelines.pretrain", "--config", RECIPE, f"output_dir={out}", f"max_minutes={minutes}",
           f"data.train={data}/train-*.tar", f"data.val={data}/test-*.tar", "progress=false",
           "report_to=none", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{minutes} min: the stage failed\n{proc.stderr[-3000:]}")
    plans = [(int(n), kind) for n, kind in PLAN.findall(proc.stdout)]
    lines = [m for m in read_metrics(out) if "loss" in m]
    last = lines[-1]
    budget = minutes * 60
    return {
        "minutes": minutes,
        "first_plan": plans[0][0] if plans else None,
        "re_plan": plans[1][0] if len(plans) > 1 else None,
        "landing": plans[2][0] if len(plans) > 2 else None,
        "last_step": last["step"],
        "ended_by": "time" if "spent at step" in proc.stdout else "plan",
        "loop_s": last["elapsed_s"],
        "loop_share_of_budget": last["elapsed_s"] / budget,
        "last_logged_lr": last["lr"],
        "peak_lr": max(m["lr"] for m in lines),
        "command": " ".join(cmd[1:]).replace(str(data), "DATA").replace(str(work), "OUT"),  # no machine's folders
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of the CIFAR-10 shards")
    parser.add_argument("--minutes", type=float, nargs="+", default=[3.0, 10.0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more settings for the stage")
    args = parser.parse_args()
    results = []
    for minutes in args.minutes:
        result = run_budget(minutes, args.data, args.work, args.set)
        print(json.dumps({k: v for k, v in result.items() if k != "command"}), flush=True)
        results.append(result)
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
