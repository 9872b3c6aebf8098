"""How fast the cached-feature linear probe trains its head, and what the whole probe
costs against the augmented one.

    # 1. features of a pretrained encoder, once (the stage's own encoder pass)
    python benchmarks/probe_speed.py features --pretrained ENC --train SHARDS --val SHARDS --out DIR
    # 2. the head trained on those same features by the stage's own loop, fit_head_on_features
    #    (the shared-loop arm BENCHMARKS.md compares it with is gone with FeatureLoader)
    python benchmarks/probe_speed.py heads --out DIR
    # 3. the whole stage, wall clock: cached (90 epochs) against augmented (--aug-epochs);
    #    with --aug-epochs 90 both run the same epochs (on a subset of the shards, to fit in minutes)
    python benchmarks/probe_speed.py stage --pretrained ENC --train SHARDS --val SHARDS --out DIR

The head uses LinprobeConfig's defaults (90 epochs, batch 256, LARS, blr 6.4, 10 warm-up
epochs) in fp32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mae.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def features(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from mae.data.loader import DataConfig, make_loaders
    from mae.data.shards import shard_classes
    from mae.data.transforms import eval_transform
    from mae.encoder import create_vit
    from mae.linprobe import LinearProbe, LinprobeConfig, _encode
    from mae.precision import resolve_precision

    torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", torch.device("cpu"))
    acc = Accelerator(mixed_precision=precision.mode, cpu=True)
    encoder = create_vit("auto", args.pretrained, num_classes=0)
    probe = LinearProbe(encoder, len(shard_classes(args.train)))
    size = encoder.patch_embed.img_size[0]
    data = DataConfig(train=args.train, val=args.val, shuffle=False)
    train, val = make_loaders(data, eval_transform(size), eval_transform(size), batch_size=256, seed=0, rank=0,
                              world_size=1)  # fmt: skip
    start = time.perf_counter()
    out = _encode(probe, LinprobeConfig(data=data, batch_size=256), acc, train, val, size)
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "features.pt", lambda p: torch.save({"train": out["train"], "val": out["val"]}, p))
    n = len(out["train"][0]) + len(out["val"][0])
    print(f"encoded {n} images in {wall:.1f} s ({n / wall:.0f} img/s, {precision.describe()})")
    (args.out / "encode.json").write_text(json.dumps({"images": n, "wall_s": wall, "precision": precision.describe()}))


def heads(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from mae.data.features import CachedFeatures
    from mae.engine import base_lr, effective_batch
    from mae.linprobe import LinprobeConfig, ProbeHead, ProbeTask, fit_head_on_features, lars_for

    torch.set_num_threads(args.threads)
    saved = torch.load(args.out / "features.pt", weights_only=True)
    (tf, tl), (vf, vl) = saved["train"], saved["val"]
    acc = Accelerator(mixed_precision="no", cpu=True)
    cfg = LinprobeConfig(output_dir=str(args.out / "fast"), progress=False, mixed_precision="no")
    torch.manual_seed(cfg.seed)
    head = ProbeHead(tf.shape[1], int(tl.max()) + 1)
    opt = lars_for(head, base_lr(cfg, 1), cfg.weight_decay)
    start = time.perf_counter()
    train = CachedFeatures(tf, tl, batch_size=effective_batch(cfg, 1), seed=cfg.seed)
    result = fit_head_on_features(cfg, acc, head, opt, train, [vf, vl], ProbeTask(acc, None, {}, (tf.shape[1],)))
    scores = {k: result.last_metrics[k] for k in ("top1", "top5")}
    wall = time.perf_counter() - start
    print(f"fast: {wall:.1f} s for {result.step} steps ({cfg.epochs} epochs of {len(tf)} features), "
          f"top1 {scores['top1']:.2f}, top5 {scores['top5']:.2f}")
    (args.out / "heads.json").write_text(json.dumps({"fast": {"wall_s": wall, **scores, "steps": result.step}}, indent=1))


def stage(args: argparse.Namespace) -> None:
    common = [f"pretrained={args.pretrained}", f"data.train={args.train}", f"data.val={args.val}", "knn=false",
              "progress=false", *args.set]  # fmt: skip
    # the augmented arm's default warm-up keeps the recipe's share (10 of 90 epochs) over its shorter run
    arms = {"cached": ["cached_features=true"], "augmented": ["cached_features=false", f"epochs={args.aug_epochs}"]}
    walls = {}
    for arm in args.arms.split(","):
        cmd = [sys.executable, "-m", "pipelines.linprobe", f"output_dir={args.out / ('stage-' + arm)}", *common,
               *arms[arm]]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        walls[arm] = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"{arm} failed:\n{proc.stderr[-3000:]}")
        print(f"{arm}: {walls[arm]:.0f} s  ({' '.join(arms[arm])}); {proc.stdout.strip().splitlines()[-1]}")
    (args.out / f"stage-{args.arms.replace(',', '-')}.json").write_text(json.dumps(walls))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("features", "heads", "stage"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pretrained", help="features/stage: encoder file or run folder")
    ap.add_argument("--train", help="features/stage: labelled train shards")
    ap.add_argument("--val", help="features/stage: labelled validation shards")
    ap.add_argument("--arms", default="cached,augmented", help="stage: cached,augmented")
    ap.add_argument("--aug-epochs", type=int, default=1, help="stage: epochs of the augmented probe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="stage: a setting for both arms, e.g. eval_every=10 (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.mode == "heads":
        heads(args)
    elif args.mode == "stage":
        stage(args)
    else:
        features(args)


if __name__ == "__main__":
    main()
