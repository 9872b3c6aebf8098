"""Attention or not, and the seed's other ablations, on CIFAR-10 at a budget where MAE
pretraining has learned (issue 20, section 1).

    python benchmarks/ablations_cifar10.py --data DATA --work OUT --calibrate 10   # once: the step budget
    python benchmarks/ablations_cifar10.py --data DATA --work OUT --steps 3500     # the grid, resumable
    python benchmarks/ablation_table.py                                            # the table in BENCHMARKS.md

DATA is the CIFAR-10 shards: train-*.tar (the 50,000 training images) with train-index.json,
and test-*.tar or val-*.tar (the 10,000 test images) with its index. OUT holds every run's
folder. Each arm pretrains with the recipe of ``pipelines/configs/mae_vit_tiny_cifar10.yaml``
for the same ``--steps`` optimiser steps (batch 64), changing one thing, then is evaluated
on the test images by k-NN (k 20) and the cached linear probe of the linprobe stage, on the
cls token and on the average of the patch tokens. Arms:

- ``attention``, ``feedforward``: the headline, seeds 0, 1, 2 (``--seeds``);
- ``random-attention``, ``random-feedforward``: the encoder as MAE initialises it (the floor);
- ``supervised-attention``, ``supervised-feedforward``: the ViT trained from scratch by the
  fine-tune stage for the same number of images (steps x 64), its classifier's ``top1`` and
  its frozen features probed like the others;
- ``equal-minutes-attention``, ``equal-minutes-feedforward``: each block given ``--minutes``
  of pretraining, its steps = minutes / its step time, both step times measured back to back
  in one timing run (kept in OUT/step_times.json, so a resumed grid uses the same);
- one seed each: ``mask-block``, ``mask-grid``; ``ratio-0.5``, ``ratio-0.9``; ``pos-sincos1d``,
  ``pos-learned``, ``pos-none``; ``decoder-1``, ``decoder-4`` (the recipe: random masks,
  ratio 0.75, 2-D sin-cos table, decoder depth 2, i.e. ``attention``).

Each finished run appends one object to ``--results`` (benchmarks/results/ablations_cifar10.json):
arm, seed, steps, minutes (the training loop's), knn_cls, knn_avg, linear_cls, linear_avg,
and the machine; runs already there are skipped, so the grid can be stopped and continued.
Run it alone on the machine: the minutes are part of the table. A smoke run of the script
(numbers meaningless): ``--data shards/cifar10 --steps 2 --timing-steps 12 --minutes 0.05
--set compile=false --results OUT/abl.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "pipelines/configs/mae_vit_tiny_cifar10.yaml"
PRESET = "mae_vit_tiny_patch4_32"
BATCH = 64  # the recipe's
SCRATCH = {"attention": "vit_tiny_patch16_224", "feedforward": "vit_ff_tiny_patch16_224"}
SCRATCH_KWARGS = ["model_kwargs.img_size=32", "model_kwargs.patch_size=4"]
COMMON = ["progress=false", "report_to=none"]
RESULTS = ROOT / "benchmarks" / "results" / "ablations_cifar10.json"


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # pretrain, random, supervised, equal-minutes
    mixer: str = "attention"
    overrides: tuple[str, ...] = ()
    headline: bool = False  # run with every seed of --seeds; the others with the first only


FF = ("model_overrides.mixer=feedforward",)
ARMS = [
    Arm("attention", "pretrain", headline=True),
    Arm("feedforward", "pretrain", "feedforward", FF, headline=True),
    Arm("random-attention", "random"),
    Arm("random-feedforward", "random", "feedforward"),
    Arm("supervised-attention", "supervised"),
    Arm("supervised-feedforward", "supervised", "feedforward"),
    Arm("equal-minutes-attention", "equal-minutes"),
    Arm("equal-minutes-feedforward", "equal-minutes", "feedforward", FF),
    Arm("mask-block", "pretrain", overrides=("mask_sampling=block",)),
    Arm("mask-grid", "pretrain", overrides=("mask_sampling=grid",)),
    Arm("ratio-0.5", "pretrain", overrides=("mask_ratio=0.5",)),
    Arm("ratio-0.9", "pretrain", overrides=("mask_ratio=0.9",)),
    Arm("pos-sincos1d", "pretrain", overrides=("model_overrides.pos_embed=sincos1d",)),
    Arm("pos-learned", "pretrain", overrides=("model_overrides.pos_embed=learned",)),
    Arm("pos-none", "pretrain", overrides=("model_overrides.pos_embed=none",)),
    Arm("decoder-1", "pretrain", overrides=("model_overrides.decoder_depth=1",)),
    Arm("decoder-4", "pretrain", overrides=("model_overrides.decoder_depth=4",)),
]  # fmt: skip
BY_NAME = {arm.name: arm for arm in ARMS}


# -- the results file


def load_results(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Add one run's object; the list is written whole and atomically, so an interrupted
    write leaves the previous list."""
    rows = load_results(path) + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(rows, indent=1) + "\n")


def pending(arms: list[Arm], seeds: list[int], results: list[dict[str, Any]]) -> list[tuple[Arm, int]]:
    """The (arm, seed) runs of the grid that the results do not hold yet, in grid order."""
    done = {(r["arm"], r["seed"]) for r in results}
    runs = [(arm, seed) for arm in arms for seed in (seeds if arm.headline else seeds[:1])]
    return [(arm, seed) for arm, seed in runs if (arm.name, seed) not in done]


# -- data and stages


def shard_patterns(data: Path) -> tuple[str, str]:
    """Brace patterns of the training and test shards named by their index files."""
    found = {}
    for prefixes in (("train",), ("test", "val")):
        index = next((data / f"{p}-index.json" for p in prefixes if (data / f"{p}-index.json").exists()), None)
        if index is None:
            raise SystemExit(f"--data {data}: no {' or '.join(p + '-index.json' for p in prefixes)}; "
                             "give the folder of the CIFAR-10 shards (python -m shards build ...)")  # fmt: skip
        names = [s["name"] for s in json.loads(index.read_text())["shards"]]
        prefix = index.name.removesuffix("-index.json")
        found[prefixes[0]] = f"{data}/{prefix}-{{{names[0][-10:-4]}..{names[-1][-10:-4]}}}.tar"
    return found["train"], found["test"]


def stage(name: str, args: list[str]) -> None:
    cmd = ["accelerate", "launch", "-m", f"pipelines.{name}", *args, *COMMON]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def loop_minutes(run: Path) -> tuple[int, float]:
    """Steps and minutes of a run's training loop, from its metrics.jsonl."""
    from mae.metrics import read_metrics

    timed = [m for m in read_metrics(run) if "elapsed_s" in m and "step" in m]
    return timed[-1]["step"], round(timed[-1]["elapsed_s"] / 60, 2)


def pretrain(run: Path, train: str, steps: int, seed: int, overrides: list[str]) -> tuple[int, float]:
    if not (run / "encoder.safetensors").exists():
        stage("pretrain", ["--config", RECIPE, f"output_dir={run}", f"data.train={train}", "data.val=",
                           f"max_steps={steps}", "max_minutes=null", f"seed={seed}", *overrides])  # fmt: skip
    return loop_minutes(run)


def probe(run: Path, train: str, test: str, seed: int, encoder: list[str]) -> dict[str, float]:
    """k-NN and the cached linear probe on the cls token and on the average of the patch tokens."""
    scores = {}
    for pool, global_pool in (("cls", "token"), ("avg", "avg")):
        out = run / f"probe-{pool}"
        if not (out / "results.json").exists():
            stage("linprobe", [*encoder, f"global_pool={global_pool}", f"output_dir={out}", f"data.train={train}",
                               f"data.val={test}", f"seed={seed}"])  # fmt: skip
        result = json.loads((out / "results.json").read_text())
        scores[f"knn_{pool}"] = round(result["knn_top1"], 2)
        scores[f"linear_{pool}"] = round(result["top1"], 2)
    return scores


def random_encoder(run: Path, mixer: str, seed: int) -> Path:
    """The preset's encoder as MAE initialises it, exported as pretraining exports it."""
    import torch

    from mae.models.mae_vit import MaskedAutoencoderViT, preset_config
    from mae.pretrain import save_encoder

    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return save_encoder(MaskedAutoencoderViT(preset_config(PRESET, mixer=mixer)), run / "encoder.safetensors")


def headless(model_file: Path) -> Path:
    """A trained classifier's weights without its head: the encoder the probe loads."""
    from safetensors.torch import load_file, save_file

    out = model_file.with_name("encoder.safetensors")
    save_file({k: v for k, v in load_file(str(model_file)).items() if not k.startswith("head.")}, str(out))
    return out


def step_times(work: Path, train: str, steps: int, recipe: list[str]) -> dict[str, float]:
    """Seconds per optimiser step of each block, measured back to back in one run (after the
    first logged window: compilation and caches) and kept, so the equal-minutes pair shares them."""
    path = work / "step_times.json"
    if path.exists():
        return json.loads(path.read_text())
    from mae.metrics import read_metrics

    times = {}
    for mixer in ("attention", "feedforward"):
        run = work / f"timing-{mixer}"
        stage("pretrain", ["--config", RECIPE, f"output_dir={run}", f"data.train={train}", "data.val=",
                           f"max_steps={steps}", "max_minutes=null", "log_every=10", *recipe, f"model_overrides.mixer={mixer}"])  # fmt: skip
        timed = [m for m in read_metrics(run) if "elapsed_s" in m and "step" in m]
        first, last = timed[0], timed[-1]
        times[mixer] = (last["elapsed_s"] - first["elapsed_s"]) / max(1, last["step"] - first["step"])
    write_atomic(path, json.dumps(times, indent=1) + "\n")
    return times


def run_arm(arm: Arm, seed: int, args: argparse.Namespace, train: str, test: str) -> dict[str, Any]:
    run = args.work / f"{arm.name}-s{seed}"
    row: dict[str, Any] = {"arm": arm.name, "seed": seed}
    if arm.kind == "random":
        row.update(steps=0, minutes=0.0)
        encoder = [f"pretrained={random_encoder(run, arm.mixer, seed)}"]
    elif arm.kind == "supervised":
        scratch = [f"model={SCRATCH[arm.mixer]}", *SCRATCH_KWARGS]
        if not (run / "model.safetensors").exists():
            stage("finetune", ["pretrained=none", *scratch, "layer_decay=1.0", f"batch_size={BATCH}",
                               f"max_steps={args.steps}", f"output_dir={run}", f"data.train={train}",
                               f"data.val={test}", f"seed={seed}"])  # fmt: skip
        steps, minutes = loop_minutes(run)
        top1 = json.loads((run / "results.json").read_text())["top1"]
        row.update(steps=steps, minutes=minutes, top1=round(top1, 2))
        encoder = [f"pretrained={headless(run / 'model.safetensors')}", *scratch]
    else:
        steps = args.steps
        if arm.kind == "equal-minutes":
            times = step_times(args.work, train, args.timing_steps, args.set)
            steps = max(1, round(args.minutes * 60 / times[arm.mixer]))
            row.update({f"step_s_{mixer}": round(t, 4) for mixer, t in times.items()})
        steps, minutes = pretrain(run / "pretrain", train, steps, seed, [*args.set, *arm.overrides])
        row.update(steps=steps, minutes=minutes)
        encoder = [f"pretrained={run / 'pretrain'}"]
    row.update(probe(run, train, test, seed, encoder))
    from benchmarks.pretrain_step import cpu_name

    row["machine"] = f"{cpu_name()}, {os.cpu_count()} cores"
    return row


def calibrate(args: argparse.Namespace, train: str) -> None:
    """The attention arm's step count in ``--calibrate`` minutes of this machine: the budget."""
    run = args.work / "calibrate"
    stage("pretrain", ["--config", RECIPE, f"output_dir={run}", f"data.train={train}", "data.val=",
                       f"max_minutes={args.calibrate:g}", *args.set])  # fmt: skip
    steps, minutes = loop_minutes(run)
    print(f"attention: {steps} steps of {BATCH} in {minutes:g} min: use --steps {steps}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the CIFAR-10 shards (train-* and test-* or val-*)")
    ap.add_argument("--work", type=Path, required=True, help="folder for every run")
    ap.add_argument("--steps", type=int, help="optimiser steps of every arm (fixed before the runs)")
    ap.add_argument("--minutes", type=float, default=10.0, help="budget of the equal-minutes pair")
    ap.add_argument("--timing-steps", type=int, default=100, help="steps per block when measuring step times")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the headline arms; the others take the first")
    ap.add_argument("--arms", default=",".join(a.name for a in ARMS), help="comma-separated subset, in grid order")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSON list the runs are appended to")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="pretraining overrides for every arm (a smoke run: compile=false); not for the study")
    ap.add_argument("--calibrate", type=float, metavar="MINUTES", help="only measure the step budget and stop")
    args = ap.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in BY_NAME]
    if unknown:
        ap.error(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    train, test = shard_patterns(args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        return calibrate(args, train)
    if not args.steps or args.steps < 1:
        ap.error("--steps: give the fixed step budget (--calibrate 10 measures it once)")
    chosen = [BY_NAME[a] for a in args.arms.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = pending(chosen, seeds, load_results(args.results))
    print(f"{len(todo)} runs to do: " + ", ".join(f"{a.name}/s{s}" for a, s in todo), flush=True)
    for arm, seed in todo:
        row = run_arm(arm, seed, args, train, test)
        append_result(args.results, row)
        print("result: " + json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
