"""MAE pretraining library: models, data pipeline, training loop and the pieces they share.

Importing it registers the project's timm models (``vit_ff_*``, ``mae.models.vit_ff``) with
timm: at once when timm is already loaded, else as soon as timm is imported. So ``import mae``
alone does not load timm and torch, and tools that only read and write images (``python -m
shards``) start in a fraction of a second.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Runs timm's own loader, then imports ``mae.models`` (which registers ``vit_ff_*``)."""

    def find_spec(self, name, path, target=None):  # importlib's MetaPathFinder protocol
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # once, and never in the way of the lookup below
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        run_timm = spec.loader.exec_module

        def exec_module(module):
            run_timm(module)
            importlib.import_module(f"{__name__}.models")

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    from . import models  # noqa: F401  (registers the timm models)
else:
    sys.meta_path.insert(0, _RegisterWithTimm())
