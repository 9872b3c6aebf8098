"""MAE pretraining stage.

    accelerate launch -m pipelines.pretrain [--config FILE] [key=value ...]

With no arguments it pretrains the CIFAR-scale model on the shipped sample shards.
"""

from __future__ import annotations

import sys

from pipelines.launch import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
