"""Linear probe of a pretrained encoder (frozen), with a k-NN measure of its features.

    accelerate launch -m pipelines.linprobe pretrained=runs/pretrain [--config FILE] [key=value ...]
"""

from __future__ import annotations

import sys

from pipelines.launch import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("linprobe", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
