"""What an encoder learned: the ViT paper's Figure 7 analyses and MAE reconstructions.

    python -m pipelines.analyze runs/pt --out runs/pt/analysis
    python -m pipelines.analyze mae_visualize_vit_large.pth photo1.jpg photo2.jpg --out analysis/
    python -m pipelines.analyze vit_base_patch16_224 --weights model.safetensors --out analysis/ --images 128

SOURCE: a pretraining or fine-tuning run folder, a checkpoint folder, an encoder.safetensors,
a released MAE checkpoint ({'model': ...}), or a timm ViT name with --weights. Images: the
files given, else the first --images of --data (shards). Writes PNGs and analysis.json
(the numbers behind them) into --out; mae/analysis.py says how each number is computed.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.reconstruct import add_reconstruction_options, tool_parser
from pipelines.stages import STAGES

PROG = STAGES["analyze"].module


def parser() -> argparse.ArgumentParser:
    from mae.analysis import ANALYSES, MASK_SAMPLINGS
    from mae.data.loader import DataConfig

    p = tool_parser(PROG, __doc__, "run folder, checkpoint, encoder file, released .pth, or timm name (with --weights)",
                    images="*", out="output folder")  # fmt: skip
    p.add_argument("--weights", help="weights file for a timm model name")
    p.add_argument("--data", default=DataConfig().val, help="shards to take images from (default: %(default)s)")
    p.add_argument("--images", type=int, default=64, help="images averaged over, at most (default %(default)s); "
                   "without image files, the first of --data")
    p.add_argument("--only", nargs="+", choices=ANALYSES, metavar="ANALYSIS",
                   help=f"only these: {', '.join(ANALYSES)} (default: all that fit the model)")
    p.add_argument("--describe", metavar="TEXT", help="what analysis.json and the titles call the source "
                   "(default: its kind and the last name of its path, never the whole path)")
    p.add_argument("--maps", type=int, default=8, help="images shown in maps and reconstructions (default %(default)s)")
    add_reconstruction_options(p, default_ratios=[0.5, 0.75, 0.9], default_samplings=list(MASK_SAMPLINGS))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from mae.analysis import NEEDS_IMAGES, AnalysisError, analyze, check_masks, choose_analyses, portable_description
    from mae.sources import SourceError, load_source, read_images, shard_images

    try:
        if args.images < 1 or args.maps < 1:
            raise AnalysisError("--images and --maps must be at least 1")
        check_masks(args.mask_ratio, args.mask_sampling)
        source = load_source(args.source, args.weights, norm_pix_loss=args.norm_pix_loss).to(args.device)
        analyses = choose_analyses(source, args.only)
        images = None
        if any(a in NEEDS_IMAGES for a in analyses):
            size = source.img_size
            if args.image_files:
                images, notes = read_images(args.image_files[: args.images], size)
                for note in notes:
                    print(f"{PROG}: {note}", file=sys.stderr)
            else:
                images = shard_images(args.data, size, args.images)
        described = args.describe or portable_description(source.description, args.source, args.weights)
        numbers = analyze(source, images, args.out, analyses, maps=args.maps, mask_ratios=tuple(args.mask_ratio),
                          mask_samplings=tuple(args.mask_sampling), seed=args.seed, description=described)  # fmt: skip
    except (SourceError, AnalysisError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{PROG}: {source.description}, {numbers['images']} images: "
          f"{', '.join(numbers['files'])} and analysis.json in {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
