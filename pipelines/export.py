"""Publish a pretraining run for transformers or timm users.

    python -m pipelines.export runs/pt --format hf --out runs/pt/hf
    python -m pipelines.export runs/pt/checkpoints/ckpt-00001000 --format hf-encoder --out vit-encoder/
    python -m pipelines.export runs/pt --format timm --out timm-encoder/

hf: a transformers ViTMAEForPreTraining folder (config.json, model.safetensors), encoder
and decoder; hf-encoder: a ViTModel folder (load it with add_pooling_layer=False);
timm: encoder.safetensors with timm's config.json. Each with a README.md model card (the
run's config, images seen, final losses). Feed-forward encoders: --format timm only.
"""

from __future__ import annotations

import argparse
import sys

PROG = "pipelines.export"


def parser() -> argparse.ArgumentParser:
    from mae.export import FORMATS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="pretraining run folder, checkpoint folder, or released MAE checkpoint (.pth)")
    p.add_argument("--format", required=True, choices=FORMATS, help="%(choices)s")
    p.add_argument("--out", required=True, help="folder to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from mae.config import ConfigError
    from mae.export import export

    try:
        written = export(args.source, args.format, args.out)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{PROG}: {', '.join(p.name for p in written)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
