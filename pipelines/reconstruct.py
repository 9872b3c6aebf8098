"""MAE reconstructions of any image files, from a pretraining run or a released checkpoint
that has the decoder (the official {'model': ...} files, e.g. mae_visualize_vit_large.pth).

    python -m pipelines.reconstruct runs/pt photo.jpg --mask-ratio 0.5 0.75 0.9 --out rec.png

    python -m pipelines.reconstruct runs/pt photo.jpg --mask-ratio 0.75 --mask-sampling random block grid --out rec.png

One row per image: the original, then for each mask sampling and ratio the masked input
and the output with the visible patches pasted back, in pixels (un-normalised). Images of another size
than the model's are resized (short side, bicubic) and centre-cropped, with a note.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.stages import STAGES

PROG = STAGES["reconstruct"].module


def parser() -> argparse.ArgumentParser:
    p = tool_parser(PROG, __doc__, "pretraining run or checkpoint folder, or a released MAE checkpoint with its decoder",
                    images="+", out="the PNG to write")  # fmt: skip
    add_reconstruction_options(p, default_ratios=[0.75], default_samplings=["random"])
    return p


def tool_parser(prog: str, doc: str, source: str, *, images: str, out: str) -> argparse.ArgumentParser:
    """What the tools' command lines share: SOURCE, image files, --out."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help=source)
    p.add_argument("image_files", nargs=images, metavar="IMAGE", help="image files")
    p.add_argument("--out", required=True, help=out)
    return p


def add_reconstruction_options(p: argparse.ArgumentParser, default_ratios: list[float],
                               default_samplings: list[str]) -> None:  # fmt: skip
    """The options this tool shares with pipelines.analyze."""
    from mae.analysis import MASK_SAMPLINGS

    p.add_argument("--mask-ratio", type=float, nargs="+", default=default_ratios,
                   help="one pair of columns each (default: %(default)s)")  # fmt: skip
    p.add_argument("--mask-sampling", nargs="+", choices=MASK_SAMPLINGS, default=default_samplings,
                   help="which patches are hidden: %(choices)s (default: %(default)s)")  # fmt: skip
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction,
                   help="whether the decoder predicts per-patch normalised pixels (default: as the source says; "
                        "released checkpoints: no)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--device", help="default: cuda when available, else cpu")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from mae.analysis import AnalysisError, reconstruct_files
    from mae.sources import SourceError

    try:
        path, losses = reconstruct_files(
            args.source, args.image_files, tuple(args.mask_ratio), args.out, samplings=tuple(args.mask_sampling),
            norm_pix_loss=args.norm_pix_loss, seed=args.seed, device=args.device,
            notes=lambda note: print(f"{PROG}: {note}", file=sys.stderr),
        )  # fmt: skip
    except (SourceError, AnalysisError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{PROG}: {path} ({', '.join(f'{k}: loss {v:.3f}' for k, v in losses.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
