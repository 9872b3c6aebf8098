"""Writes the table of ``benchmarks/ablations_cifar10.py`` into BENCHMARKS.md from its JSON.

    python benchmarks/ablation_table.py [--results JSON] [--table BENCHMARKS.md] [--steps N]

Replaces the section between the ablation markers (appends it the first time). Numbers are
mean ± sample standard deviation where an arm has several seeds; the commands name the
data and work folders DATA and OUT, never this machine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from mae.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- ablations:start -->", "<!-- ablations:end -->"
METRICS = [("knn_cls", "k-NN cls"), ("knn_avg", "k-NN avg"), ("linear_cls", "linear cls"), ("linear_avg", "linear avg")]
HEADLINE = ("attention", "feedforward")
# (block, arm, what it is); "attention" is the recipe's row in every block it belongs to
ROWS = [
    ("headline", "attention", "attention, MAE-pretrained"),
    ("headline", "feedforward", "feed-forward, MAE-pretrained"),
    ("floor", "random-attention", "attention, random initialisation"),
    ("floor", "random-feedforward", "feed-forward, random initialisation"),
    ("supervised", "supervised-attention", "attention, trained from scratch with labels"),
    ("supervised", "supervised-feedforward", "feed-forward, trained from scratch with labels"),
    ("equal minutes", "equal-minutes-attention", "attention"),
    ("equal minutes", "equal-minutes-feedforward", "feed-forward"),
    ("mask sampling (75%)", "attention", "random"),
    ("mask sampling (75%)", "mask-block", "block-wise (BEiT)"),
    ("mask sampling (75%)", "mask-grid", "grid (one patch per 2x2 cell)"),
    ("mask ratio", "ratio-0.5", "0.5"),
    ("mask ratio", "attention", "0.75"),
    ("mask ratio", "ratio-0.9", "0.9"),
    ("position table", "attention", "sin-cos 2-D"),
    ("position table", "pos-sincos1d", "sin-cos 1-D (patch index)"),
    ("position table", "pos-learned", "learned"),
    ("position table", "pos-none", "none"),
    ("decoder depth", "decoder-1", "1 block"),
    ("decoder depth", "attention", "2 blocks"),
    ("decoder depth", "decoder-4", "4 blocks"),
]


def by_arm(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        out.setdefault(row["arm"], []).append(row)
    return out


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def cell(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return ""
    mean, sd = mean_sd(values)
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def spread(arms: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Per metric, the larger seed standard deviation of the two headline arms."""
    out = {}
    for key, _ in METRICS:
        sds = [mean_sd([r[key] for r in arms.get(a, [])])[1] for a in HEADLINE if len(arms.get(a, [])) > 1]
        if sds:
            out[key] = max(sds)
    return out


def differences(arms: dict[str, list[dict[str, Any]]], sd: dict[str, float]) -> list[str]:
    """Arms that differ from the attention arm's mean by more than twice the headline spread."""
    if "attention" not in arms or not sd:
        return []
    ref = {k: statistics.fmean(r[k] for r in arms["attention"]) for k in sd}
    out = []
    for arm, rows in arms.items():
        if arm == "attention" or arm.startswith(("random-", "supervised-")):
            continue
        beyond = []
        for key, label in METRICS:
            if key in sd:
                diff = statistics.fmean(r[key] for r in rows) - ref[key]
                if abs(diff) > 2 * sd[key]:
                    beyond.append(f"{label} {diff:+.2f}")
        if beyond:
            out.append(f"{arm} ({', '.join(beyond)})")
    return out


def section(results: list[dict[str, Any]], steps: int | None) -> str:
    arms = by_arm(results)
    sd = spread(arms)
    budget = steps or max((r["steps"] for r in arms.get("attention", [])), default=0)
    head = "| block | arm | seeds | steps | minutes | " + " | ".join(label for _, label in METRICS) + " | classifier top-1 |"
    lines = [head, "|---|---|---:|---:|---:|" + "---:|" * (len(METRICS) + 1)]
    for block, arm, what in ROWS:
        rows = arms.get(arm, [])
        name = f"**{what}**" if arm == "attention" else what
        steps_cell = "/".join(sorted({str(r["steps"]) for r in rows}))
        lines.append(f"| {block} | {name} | {len(rows)} | {steps_cell} | {cell(rows, 'minutes')} | "
                     + " | ".join(cell(rows, k) for k, _ in METRICS) + f" | {cell(rows, 'top1')} |")  # fmt: skip
    lift = ""
    if arms.get("attention") and arms.get("random-attention"):
        gain = [statistics.fmean(r[k] for r in arms["attention"]) - arms["random-attention"][0][k] for k in ("knn_cls", "knn_avg")]
        lift = (f"Pretraining lifts the attention encoder's k-NN above its random initialisation by {gain[0]:+.2f} (cls) "
                f"and {gain[1]:+.2f} (avg) points; the table says something only from +8 on.")  # fmt: skip
    times = next((r for r in arms.get("equal-minutes-feedforward", []) if "step_s_attention" in r), None)
    equal = (f"Equal minutes: step times measured back to back in one run, {times['step_s_attention']:.3f} s "
             f"(attention) and {times['step_s_feedforward']:.3f} s (feed-forward).") if times else ""  # fmt: skip
    machines = sorted({r.get("machine", "?") for r in results})
    seeds = sorted({r["seed"] for r in arms.get("attention", [])})
    beyond = differences(arms, sd)
    return "\n".join(x for x in [
        START,
        "## Attention or not, and the other ablations, on CIFAR-10",
        "",
        "Every pretrained arm: the recipe of `pipelines/configs/mae_vit_tiny_cifar10.yaml` on the 50,000",
        f"training images of the CIFAR-10 shards for **{budget} optimiser steps of 64** (the budget, fixed",
        "before the runs), changing one thing. Evaluation on the 10,000 test images: k-NN (k 20) and the",
        "cached linear probe on frozen features, of the cls token and of the average of the patch tokens;",
        f"top-1 in percent, mean ± standard deviation over seeds {', '.join(map(str, seeds)) or '-'} where an arm has several.",
        "Minutes: the pretraining loop's (the fine-tune stage's for the supervised rows, trained for as",
        "many images). The recipe's row (bold) is attention, random masks at 0.75, the 2-D sin-cos",
        "table, a decoder of 2 blocks.",
        f"CPU: {'; '.join(machines)}.",
        "",
        *lines,
        "",
        lift,
        equal,
        "Headline seed spread (the larger standard deviation of the two headline arms): "
        + (", ".join(f"{label} {sd[k]:.2f}" for k, label in METRICS if k in sd) or "not run")
        + ". A difference counts only beyond twice that spread: "
        + ("; ".join(beyond) if beyond else "none does") + ".",
        "",
        "```",
        f"python benchmarks/ablations_cifar10.py --data DATA --work OUT --steps {budget}",
        "python benchmarks/ablation_table.py",
        "```",
        "DATA is the CIFAR-10 shards, OUT a work folder.",
        END,
    ] if x is not None)  # fmt: skip


def write(table: Path, text: str) -> None:
    old = table.read_text() if table.exists() else ""
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text + "\n"
    write_atomic(table, new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "ablations_cifar10.json")
    parser.add_argument("--table", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to write into")
    parser.add_argument("--steps", type=int, help="the step budget, as shown (default: the attention arm's)")
    args = parser.parse_args(argv)
    if not args.results.exists():
        parser.error(f"--results {args.results}: no such file; run benchmarks/ablations_cifar10.py first")
    write(args.table, section(json.loads(args.results.read_text()), args.steps))
    print(f"wrote the ablation table to {args.table}")


if __name__ == "__main__":
    main()
