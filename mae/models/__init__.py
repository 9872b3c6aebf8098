"""Models by name. ``create_model('mae_vit_base_patch16')`` builds a preset; importing this
package registers the feed-forward ViTs (``vit_ff_*``) with timm."""

from . import vit_ff  # noqa: F401  (registers the timm models)
from .mae_vit import (
    PRESETS, MAEConfig, MaskedAutoencoderViT, checkpoint_filter_fn, create_model, model_config, preset_config,
)  # fmt: skip

__all__ = ["PRESETS", "MAEConfig", "MaskedAutoencoderViT", "checkpoint_filter_fn", "create_model", "model_config",
           "preset_config"]
