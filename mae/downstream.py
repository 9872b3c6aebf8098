"""What the probe and fine-tune stages share: the keys that choose the encoder and the
set-up both stages open with (seed, labelled shards, the timm model from the encoder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .config import ConfigError
from .data.shards import shard_classes
from .encoder import create_vit
from .engine import RunConfig


@dataclass
class DownstreamConfig(RunConfig):
    """The encoder a downstream stage starts from; each stage's config extends it."""

    pretrained: str = "runs/pretrain"  # run folder, checkpoint, encoder file, released .pth (mae.sources), or "none"
    model: str = "auto"  # any timm ViT name (hybrids, vit_ff_* too); "auto" takes it from the pretrained encoder
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    global_pool: str = "token"  # features: "token" (cls) or "avg" (mean of patch tokens)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")


def setup(cfg: DownstreamConfig, what: str, *, head: bool, **overrides: Any) -> tuple[list[str], nn.Module, int]:
    """Seed, the class names of the labelled shards, and the timm model built from the
    encoder: with a classification head when ``head``, else pooled features only.
    ``overrides`` go to ``create_vit``. Returns (classes, model, input image size)."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    classes = shard_classes(cfg.data.train)
    if not classes:
        raise ConfigError(f"data.train={cfg.data.train}: {what} needs labelled shards (an index with class names)")
    model = create_vit(cfg.model, cfg.pretrained, num_classes=len(classes) if head else 0,
                       model_kwargs=cfg.model_kwargs, global_pool=cfg.global_pool, **overrides)  # fmt: skip
    size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else overrides.get("img_size") or 224
    return classes, model, size
