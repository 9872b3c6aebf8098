"""MAE pretraining library: models, data pipeline, training loop and the pieces they share.

Importing it registers the project's timm models (``vit_ff_*``, ``mae.models.vit_ff``).
"""

from . import models  # noqa: F401  (registers the timm models)

__version__ = "0.1.0"
