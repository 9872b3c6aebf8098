"""The one-page picture of one or more runs on shared axes, from their ``metrics.jsonl``.

    python -m pipelines.summary RUN [RUN ...] --out FILE

Each RUN is a run's output folder; it may be finished, still running or resumed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mae.metrics import read_metrics
from mae.summary import plot_runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipelines.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", nargs="+", type=Path, help="run output folders (each with a metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("summary.png"), help="the picture to write (PNG)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    runs = {}
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            print(f"pipelines.summary: error: {run / 'metrics.jsonl'} does not exist; give a run's output_dir", file=sys.stderr)
            return 2
        name = run.name if [r.name for r in args.runs].count(run.name) == 1 else str(run)
        runs[name] = read_metrics(run)
    print(f"wrote {plot_runs(runs, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
