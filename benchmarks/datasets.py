"""Where the tests and benchmarks find real image archives: the folder ``$MAE_DATASETS``.

The one setting is an environment variable naming a folder that holds

    cifar10/train.tar.gz      CIFAR-10 training set as JPEG class folders, train/<class>/<n>.jpg
    cifar10/test.tar.gz       CIFAR-10 test set, test/<class>/<n>.jpg
    imagenet-sample-256.tar   full-size ImageNet photos, imagenet-sample/<name>.JPEG

(the README's "CIFAR-10 as image folders" writes the first two). Unset, the default, the
tests take their real images from the shipped CIFAR-10 sample in ``shards/cifar10/``, and a
benchmark that needs an archive stops with one line naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MAE_DATASETS"


def dataset(relative: str) -> Path | None:
    """``$MAE_DATASETS/relative`` if the variable is set and the file is there, else None."""
    root = os.environ.get(ENV)
    path = Path(root) / relative if root else None
    return path if path is not None and path.exists() else None


def require(relative: str, who: str) -> Path:
    """The same, or exit with one line saying what to set."""
    path = dataset(relative)
    if path is None:
        where = f"{ENV}={os.environ[ENV]} has no {relative}" if os.environ.get(ENV) else f"{ENV} is not set"
        raise SystemExit(f"{who} needs {relative}: {where}; set {ENV} to a folder holding it "
                         "(layout in benchmarks/datasets.py)")  # fmt: skip
    return path
