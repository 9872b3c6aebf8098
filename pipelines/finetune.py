"""Supervised fine-tuning of a timm ViT from a pretrained encoder (or from scratch: pretrained=none).

    accelerate launch -m pipelines.finetune pretrained=runs/pretrain [--config FILE] [key=value ...]
"""

from __future__ import annotations

import sys

from pipelines.launch import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("finetune", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
