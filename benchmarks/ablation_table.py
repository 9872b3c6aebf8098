"""Writes the ablation table of ``benchmarks/ablations_cifar10.sh`` into a Markdown file.

Usage: python benchmarks/ablation_table.py OUT TABLE.md --data DATA
Reads OUT/<arm>/{pt,lp_cls,lp_avg,ft} and OUT/runs.tsv; replaces the section between the
ablation markers in TABLE.md (appends it the first time). The commands are written with the
placeholders OUT and DATA in place of this machine's folders, so a reader can paste them.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
from pathlib import Path

from mae.files import write_atomic

START, END = "<!-- ablations:start -->", "<!-- ablations:end -->"

# (block, arm, what it is); the baseline row appears in every block it belongs to
ROWS = [
    ("encoder", "baseline", "attention, MAE-pretrained"),
    ("encoder", "feedforward", "feed-forward, MAE-pretrained"),
    ("encoder", "scratch", "attention, random init / fine-tuned from scratch"),
    ("encoder", "scratch_ff", "feed-forward, random init / fine-tuned from scratch"),
    ("mask sampling (75%)", "baseline", "random"),
    ("mask sampling (75%)", "block", "block-wise (BEiT)"),
    ("mask sampling (75%)", "grid", "grid (one patch per 2x2 cell)"),
    ("mask ratio", "ratio0.5", "0.5"),
    ("mask ratio", "baseline", "0.75"),
    ("mask ratio", "ratio0.9", "0.9"),
    ("position table", "baseline", "sin-cos 2-D"),
    ("position table", "sincos1d", "sin-cos 1-D (patch index)"),
    ("position table", "learned", "learned"),
    ("position table", "nopos", "none"),
]
COLUMNS = [("pt", "val_loss", "pretrain val loss"), ("lp_cls", "knn_top1", "k-NN cls"), ("lp_avg", "knn_top1", "k-NN avg"),
           ("lp_cls", "top1", "probe cls"), ("lp_avg", "top1", "probe avg"), ("ft", "top1", "fine-tune")]  # fmt: skip


def measure(out: Path, arm: str, stage: str, key: str) -> float | None:
    """One number of one run, None where the arm has no such stage."""
    folder = out / arm / stage
    if stage == "pt":
        path = folder / "metrics.jsonl"
        if not path.exists():
            return None
        losses = [m[key] for m in map(json.loads, path.read_text().splitlines()) if key in m]
        return losses[-1] if losses else None
    path = folder / "results.json"
    return json.loads(path.read_text()).get(key) if path.exists() else None


def fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def runs(out: Path) -> list[list[str]]:
    path = out / "runs.tsv"
    return [line.split("\t", 3) for line in path.read_text().splitlines()] if path.exists() else []


def cpu() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{info.get('Model name', platform.processor()).strip()}, {info.get('CPU(s)', '?').strip()} cores, {' '.join(wanted)}"


def with_placeholders(command: str, folders: dict[str, str]) -> str:
    """``command`` with each folder (as the script was given it) written as its placeholder,
    wherever it starts a word or a ``key=`` value."""
    for folder, name in sorted(folders.items(), key=lambda kv: len(kv[0]), reverse=True):
        pattern = r"(^|[\s='\"])" + re.escape(folder.rstrip("/")) + r"(?=/|$|[\s'\"])"
        command = re.sub(pattern, lambda m: m.group(1) + name, command)
    return command


def section(out: Path, script: str, folders: dict[str, str]) -> str:
    head = "| block | arm | " + " | ".join(c[2] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * 2 + "---:|" * len(COLUMNS)]
    for block, arm, what in ROWS:
        values = [fmt(measure(out, arm, s, k), 3 if s == "pt" else 2) for s, k, _ in COLUMNS]
        name = f"**{what}**" if arm == "baseline" else what
        lines.append(f"| {block} | {name} | " + " | ".join(values) + " |")
    spread = []
    for s, k, label in COLUMNS:
        a, b = measure(out, "baseline", s, k), measure(out, "seed1", s, k)
        if a is not None and b is not None:
            spread.append(f"{label} {fmt(a, 3 if s == 'pt' else 2)} vs {fmt(b, 3 if s == 'pt' else 2)} "
                          f"(|diff| {fmt(abs(a - b), 3 if s == 'pt' else 2)})")  # fmt: skip
    timing = ["| arm | stage | wall time (s) |", "|---|---|---:|"] + [f"| {r[0]} | {r[1]} | {r[2]} |" for r in runs(out)]
    commands = [with_placeholders(r[3], folders) for r in runs(out)]
    total = sum(int(r[2]) for r in runs(out))
    return "\n".join([
        START,
        "## Ablations on CIFAR-10: attention or not, mask sampling, mask ratio, position table",
        "",
        f"`{script}` (budget and recipe in the script's header, fixed before running; one seed",
        "per arm). Accuracies are top-1 in percent on 2,500 CIFAR-10 test images; the baseline",
        "(bold) is attention, random masks at 0.75, the 2-D sin-cos table. k-NN and probe",
        "columns are on frozen features (cls token or average of patch tokens); fine-tune only",
        "for the encoder block. From-scratch rows: the probe and k-NN of the randomly",
        "initialised encoder, and fine-tuning from scratch.",
        f"CPU: {cpu()}. Total wall time of the stages: {total / 60:.0f} min.",
        "",
        *lines,
        "",
        "Seed-to-seed spread (baseline, seed 0 vs seed 1, pretraining and evaluation): "
        + ("; ".join(spread) if spread else "not run") + ".",
        "Differences between arms smaller than this spread say nothing.",
        "",
        "<details><summary>Wall time per stage and the commands</summary>",
        "",
        *timing,
        "",
        "```",
        *commands,
        "```",
        "</details>",
        END,
    ])  # fmt: skip


def write(table: Path, text: str) -> None:
    old = table.read_text() if table.exists() else ""
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text + "\n"
    write_atomic(table, new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the script's OUT folder, as the script was given it")
    parser.add_argument("table", type=Path, help="Markdown file to write the section into")
    parser.add_argument("--data", default=None, help="the script's DATA folder, as the script was given it")
    parser.add_argument("--script", default="bash benchmarks/ablations_cifar10.sh DATA OUT", help="the command, as shown")
    args = parser.parse_args()
    folders = {args.out: "OUT", **({args.data: "DATA"} if args.data else {})}
    write(args.table, section(Path(args.out), args.script, folders))
    print(f"wrote the ablation table to {args.table}")


if __name__ == "__main__":
    main()
