"""Data path throughput: this project's loader against torchvision's, the shard builder's
scaling with workers, and the pretraining stage end to end against its own bare step.

    MAE_DATASETS=DATASETS python benchmarks/data_pipeline.py --parts loader,build,stage --json OUT/data_pipeline.json

loader  decode + augmentation (RandomResizedCrop 224, scale 0.2-1, bicubic, flip) of the 256
        ImageNet photos of $MAE_DATASETS/imagenet-sample-256.tar, (a) as they are, each
        read 4 times per pass (--repeat-a), and (b) upscaled to 4032 x 3024 and saved as JPEG
        quality 90 (a phone camera's size). Peer:
        torchvision's ImageFolder + DataLoader with the same transform ending in ToTensor +
        Normalize. Ours: ShardLoader over shards of the same files, uint8 batches normalised
        by ``to_model_input`` in the main process. One loader worker each, so img/s is per
        core of decoding and augmentation; passes alternate between the two, each in a new
        process, with glibc's malloc fresh and warm (--malloc; see MALLOC below).
build   ``python -m shards build`` timed as a whole command (start-up included), with
        ``--workers 1`` and ``--workers 2``, alternating, on two kinds of image: the 50,000
        CIFAR-10 training JPEGs of 32 x 32 (small files, where per-file overhead counts;
        --cifar, a train.tar.gz of train/<class>/<n>.jpg or its extracted folder, by default
        $MAE_DATASETS/cifar10/train.tar.gz) and the (b) photos (large files, where decoding
        counts). The outputs of 1 and 2 workers must be byte-identical.
scales  why decoding uses the DCT scales 1, 1/2, 1/4, 1/8 only: libjpeg-turbo's decode speed
        of the (a) photos at each n/8, and how far each scale's pixels are from the full-size
        decode resized (bicubic, antialiased) to the same size, in mean absolute grey levels.
stage   ``accelerate launch -m pipelines.pretrain`` with its defaults (shipped CIFAR shards,
        its default loader workers) for 2 epochs: img/s from its metrics, against the bare
        training step (the same model, batch and threads, batches already in memory)
        timed in the same run before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mae.data.loader import ShardLoader  # noqa: E402
from mae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform, to_model_input  # noqa: E402
from benchmarks.datasets import require  # noqa: E402
from benchmarks.pretrain_step import cpu_name  # noqa: E402
from shards.build import build_shards  # noqa: E402

PHOTOS = "imagenet-sample-256.tar"  # under $MAE_DATASETS
SIZE, BATCH = 224, 64


def prepare(work: Path) -> dict[str, Path]:
    """ImageFolder layouts of the photos (a) and their 4032 x 3024 versions (b)."""
    folders = {"a": work / "photos-a" / "all", "b": work / "photos-b" / "all"}  # ImageFolder: one class
    if not folders["a"].exists():
        folders["a"].mkdir(parents=True)
        with tarfile.open(require(PHOTOS, "the loader, build and scales parts")) as tar:
            for m in tar:
                if m.isfile():
                    (folders["a"] / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    if not folders["b"].exists():
        folders["b"].mkdir(parents=True)
        for path in sorted(folders["a"].iterdir()):
            img = Image.open(path).convert("RGB")
            img = img.resize((4032, 3024) if img.width >= img.height else (3024, 4032), Image.BICUBIC)
            img.save(folders["b"] / path.name, format="JPEG", quality=90)
    return folders


def loader_inputs(work: Path, repeat: dict[str, int]) -> dict[str, tuple[Path, Path]]:
    """Per case, the ImageFolder torchvision reads and one shard of the same files for ours.
    Each photo appears ``repeat[case]`` times (hard links), so that a pass of the small (a)
    photos lasts long enough to time: 256 photos are 4 batches, of which the steady rate
    counts 3 (about a third of a second), and single passes then varied by 30%."""
    out = {}
    for case, originals in prepare(work).items():
        folder = work / f"photos-{case}-x{repeat[case]}" / "all"
        if not folder.exists():
            folder.mkdir(parents=True)
            for k in range(repeat[case]):
                for path in sorted(originals.iterdir()):
                    os.link(path, folder / f"{k}-{path.name}")
        shards = work / f"shards-{case}-x{repeat[case]}"
        if not (shards / "train-index.json").exists():
            build_shards(folder.parent, shards, samples_per_shard=256 * repeat[case], shuffle=False, labelled=True,
                         workers=2)  # fmt: skip
        out[case] = (folder, shards / "train-000000.tar")
    return out


def timed(batches) -> dict[str, float]:
    """img/s of a pass, whole (worker start-up included) and steady (after the first batch
    arrived: what an epoch of a real dataset runs at; on 256 photos the start-up of the
    worker process is a third of the pass)."""
    start, n, first = time.perf_counter(), 0, None
    for size in batches:
        if first is None:
            first, n_first = time.perf_counter(), size
        n += size
    end = time.perf_counter()
    return {"whole": n / (end - start), "steady": (n - n_first) / (end - first)}


def torchvision_pass(folder: Path) -> dict[str, float]:
    tf = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip
    loader = DataLoader(datasets.ImageFolder(str(folder.parent), tf), batch_size=BATCH, shuffle=True, num_workers=1)
    return timed(len(images) for images, _ in loader)


def ours_pass(shard: Path, epoch: int) -> dict[str, float]:
    loader = ShardLoader(str(shard), pretrain_transform(SIZE), batch_size=BATCH, num_workers=1, shuffle_buffer=256)
    loader.set_epoch(epoch)
    return timed(len(to_model_input(batch["image"], "cpu")) for batch in loader)


# glibc's malloc serves large blocks with fresh mmaps (page faults on every touch) until
# the process has freed one, then raises its threshold (up to 32 MiB); loader workers are
# forked with their parent's state. A training process has freed many large tensors
# ("warm"); a bare script has not ("fresh"). torchvision's pass of the 12-megapixel photos
# runs 1.7x faster warm, so each pass runs in a new process in a stated state.
MALLOC = {"fresh": {}, "warm": {"MALLOC_MMAP_THRESHOLD_": str(128 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}}


def one_pass(side: str, source: Path, epoch: int, malloc: str) -> dict[str, float]:
    """One pass of ``side`` (torchvision or ours) in a new Python process with glibc's malloc ``malloc``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | MALLOC[malloc]
    cmd = [sys.executable, __file__, "--one-pass", side, "--source", str(source), "--epoch", str(epoch)]
    proc = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loader_part(work: Path, passes: dict[str, int], repeat: dict[str, int], mallocs: list[str]) -> dict:
    out = {}
    for malloc in mallocs:
        for case, (folder, shard) in loader_inputs(work, repeat).items():
            theirs, ours = [], []
            for p in range(passes[case]):
                theirs.append(one_pass("torchvision", folder, p, malloc))
                ours.append(one_pass("ours", shard, p, malloc))
            key = f"{case}-{malloc}"
            out[key] = {"images_per_pass": 256 * repeat[case], "torchvision_img_s": theirs, "ours_img_s": ours}
            for kind in ("steady", "whole"):
                mine, peer = statistics.median(r[kind] for r in ours), statistics.median(r[kind] for r in theirs)
                out[key][f"ratio_of_medians_{kind}"] = mine / peer
                print(f"loader ({case}, malloc {malloc}, {kind}): torchvision {peer:.1f} img/s, ours {mine:.1f} img/s, "
                      f"ratio {mine / peer:.2f}", flush=True)
    return out


def cifar_folder(work: Path, cifar: Path) -> Path:
    """The CIFAR-10 training JPEGs as class folders: ``cifar`` itself, or extracted from it once."""
    if cifar.is_dir():
        return cifar
    if not cifar.is_file():
        sys.exit(f"--cifar {cifar}: no such archive or folder; pass the CIFAR-10 train.tar.gz or its extracted "
                 "folder, or set MAE_DATASETS to the folder holding cifar10/train.tar.gz")  # fmt: skip
    folder = work / "cifar-train"
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        with tarfile.open(cifar) as tar:
            tar.extractall(folder, filter="data")
        (folder / "done").touch()
    (top,) = [p for p in folder.iterdir() if p.is_dir()]  # train/<class>/<n>.jpg
    return top


def build_part(work: Path, rounds: int, cifar: Path) -> dict:
    """Whole ``python -m shards build`` commands, 1 against 2 workers, on small and on large images."""
    sources = {"cifar10-train": (cifar_folder(work, cifar), []), "photos-b": (prepare(work)["b"].parent,
               ["--samples-per-shard", "64"])}  # fmt: skip
    out = {}
    for case, (src, extra) in sources.items():
        walls: dict[int, list[float]] = {1: [], 2: []}
        outputs = {}
        for _ in range(rounds):
            for workers in (1, 2):
                dest = work / f"build-{case}-{workers}"
                shutil.rmtree(dest, ignore_errors=True)
                cmd = [sys.executable, "-m", "shards", "build", str(src), str(dest), "--workers", str(workers),
                       "--source", "bench", *extra]  # fmt: skip
                start = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
                walls[workers].append(time.perf_counter() - start)
                outputs[workers] = {p.name: p.read_bytes() for p in sorted(dest.iterdir())}
        identical = outputs[1] == outputs[2]
        one, two = statistics.median(walls[1]), statistics.median(walls[2])
        print(f"build {case}: 1 worker {one:.2f} s, 2 workers {two:.2f} s, speed-up {one / two:.2f}x, "
              f"byte-identical: {identical}", flush=True)
        out[case] = {"wall_s_1": walls[1], "wall_s_2": walls[2], "speedup_of_medians": one / two,
                     "byte_identical": identical}  # fmt: skip
    return out


def scales_part(work: Path) -> dict:
    import numpy as np
    import simplejpeg

    files = [p.read_bytes() for p in sorted(prepare(work)["a"].iterdir())]
    files = [d for d in files if simplejpeg.decode_jpeg_header(d)[2] == "YCbCr"]
    out = {}
    for n in range(8, 0, -1):
        start = time.perf_counter()
        decoded = []
        for data in files:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            decoded.append(simplejpeg.decode_jpeg(data, min_width=-(-width * n // 8), min_height=-(-height * n // 8)))
        rate = len(files) / (time.perf_counter() - start)
        errors = []
        for data, small in zip(files[:64], decoded[:64]):
            full = torch.from_numpy(simplejpeg.decode_jpeg(data)).permute(2, 0, 1).unsqueeze(0)
            ref = torch.nn.functional.interpolate(full, size=small.shape[:2], mode="bicubic", antialias=True)[0]
            errors.append((ref.permute(1, 2, 0).float() - torch.from_numpy(small).float()).abs().mean().item())
        out[f"{n}/8"] = {"img_s": rate, "mean_abs_diff": float(np.mean(errors))}
        print(f"scale {n}/8: {rate:.0f} img/s, {np.mean(errors):.2f} grey levels from the full decode resized", flush=True)
    return out


def bare_step(steps: int, peer: bool = False) -> float:
    """The default pretraining step (model, batch 64, AdamW, all cores, fp32) on batches already
    in memory; ``peer``: HF's ViTMAE of the same shape instead, with fused AdamW (its Trainer's default)."""
    from mae.optim import param_groups
    from mae.pretrain import PretrainConfig, build_model

    cfg = PretrainConfig()
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(cfg).train()
    if peer:
        from benchmarks.pretrain_step import adamw, peer_model

        net = peer_model(model.cfg)
        forward = lambda x: net(pixel_values=x).loss  # noqa: E731
        opt = adamw(net)
    else:
        forward = lambda x: model(x)[0]  # noqa: E731
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, model.no_weight_decay()), lr=1e-4, betas=(0.9, 0.95))
    size = model.cfg.img_size
    batches = [torch.randint(0, 256, (cfg.batch_size, 3, size, size), dtype=torch.uint8) for _ in range(4)]
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        loss = forward(to_model_input(batches[i % 4], "cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return cfg.batch_size / statistics.median(times)


def stage_part(work: Path, epochs: int, steps: int, stage_args: list[str]) -> dict:
    before, hf_before = bare_step(steps), bare_step(steps, peer=True)
    out = work / "stage"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "pipelines.pretrain",
           f"output_dir={out}", f"epochs={epochs}", "progress=false", *stage_args]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after, hf_after = bare_step(steps), bare_step(steps, peer=True)
    hf = (hf_before + hf_after) / 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_sec"] for r in records if "images_per_sec" in r]
    bare = (before + after) / 2
    stage = statistics.median(rates)
    print(f"stage: median {stage:.1f} img/s over {len(rates)} logged windows (mean {statistics.mean(rates):.1f}), "
          f"bare step {before:.1f} before / {after:.1f} after, ratio {stage / bare:.3f} "
          f"(mean window {statistics.mean(rates) / bare:.3f}); wall {wall:.0f} s", flush=True)
    print(f"stage {' '.join(stage_args) or '(defaults)'} against HF ViTMAE's bare fp32 step ({hf_before:.1f} before / "
          f"{hf_after:.1f} after): ratio {stage / hf:.3f}", flush=True)
    return {"stage_args": stage_args, "window_img_s": rates, "bare_before": before, "bare_after": after,
            "ratio_median": stage / bare, "ratio_mean": statistics.mean(rates) / bare, "wall_s": wall,
            "hf_bare_before": hf_before, "hf_bare_after": hf_after, "ratio_to_hf_bare": stage / hf}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="loader,build,stage")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "data_pipeline_bench"))
    parser.add_argument("--passes-a", type=int, default=3)
    parser.add_argument("--passes-b", type=int, default=1)
    parser.add_argument("--repeat-a", type=int, default=4, help="times each (a) photo is read in one pass")
    parser.add_argument("--repeat-b", type=int, default=1)
    parser.add_argument("--build-rounds", type=int, default=1)
    parser.add_argument("--cifar", type=Path, default=Path(os.environ.get("MAE_DATASETS", "DATASETS"), "cifar10", "train.tar.gz"),
                        help="build: the CIFAR-10 training JPEGs, train.tar.gz or its extracted folder "
                             "(default: $MAE_DATASETS/cifar10/train.tar.gz)")  # fmt: skip
    parser.add_argument("--stage-epochs", type=int, default=2)
    parser.add_argument("--stage-args", default="", help="extra key=value settings of the stage, e.g. compile=true")
    parser.add_argument("--bare-steps", type=int, default=20)
    parser.add_argument("--malloc", default="fresh,warm", help="glibc malloc states of the loader passes")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one-pass", choices=("torchvision", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--epoch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_pass:  # a child of loader_part
        side = torchvision_pass(Path(args.source)) if args.one_pass == "torchvision" else ours_pass(
            Path(args.source), args.epoch)
        print(json.dumps(side))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    print(f"{report['cpu']}, {report['cores']} cores, torch {report['torch']}", flush=True)
    parts = args.parts.split(",")
    if "loader" in parts:
        report["loader"] = loader_part(work, {"a": args.passes_a, "b": args.passes_b},
                                       {"a": args.repeat_a, "b": args.repeat_b}, args.malloc.split(","))
    if "build" in parts:
        report["build"] = build_part(work, args.build_rounds, args.cifar)
    if "scales" in parts:
        report["scales"] = scales_part(work)
    if "stage" in parts:
        report["stage"] = stage_part(work, args.stage_epochs, args.bare_steps, args.stage_args.split())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
