"""The feed-forward-only ViT (Melas-Kyriazi 2021) as timm models: ``vit_ff_tiny_patch16_224``,
``vit_ff_small_patch16_224`` and ``vit_ff_base_patch16_224``, registered with timm when
``mae`` is imported, so ``timm.create_model`` and the fine-tune stage build them by name.

Each is timm's ``VisionTransformer`` with ``FeedForwardBlock`` (``mae.models.mae_vit``, the
block the MAE encoder uses) as its block, so an MAE encoder with ``mixer=feedforward``
loads into it strictly. The patch MLP is tied to the number of tokens, which follows
from ``img_size`` and ``patch_size``: give both to build it for another input, e.g.
``timm.create_model("vit_ff_tiny_patch16_224", img_size=32, patch_size=4)``.

They pass timm's own model tests (tests/test_models.py of pytorch-image-models): forward,
backward at the fixed input size, configs, ``forward_intermediates`` and ``features_only``,
FX feature extraction and TorchScript.
"""

from __future__ import annotations

from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .mae_vit import FF_TIMM_NAMES, FeedForwardBlock

SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # width, heads (heads unused: no attention)

# No released weights: the configs give timm the input size, normalisation and layer names; the
# patch MLP ties a model to one token count, which timm's fixed_input_size says.
default_cfgs = generate_default_cfgs({
    name: dict(num_classes=1000, input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               fixed_input_size=True, first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
    for name in FF_TIMM_NAMES.values()
})  # fmt: skip


def ff_block_fn(num_tokens: int) -> Callable[..., FeedForwardBlock]:
    """timm's ``block_fn`` for a sequence of ``num_tokens``; the block keeps timm's ViT
    defaults (LayerNorm eps 1e-6, GELU) and has no use for the attention arguments."""

    def build(dim: int, mlp_ratio: float, drop_path: float, device: Any = None, dtype: Any = None,
              **attention_args: Any) -> FeedForwardBlock:  # fmt: skip
        return FeedForwardBlock(dim, num_tokens, mlp_ratio, drop_path).to(device=device, dtype=dtype)

    return build


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    if kwargs.get("dynamic_img_size") or kwargs.get("patch_drop_rate"):
        raise ValueError(f"{variant}: the patch MLP needs a fixed token count (no dynamic_img_size, no patch_drop_rate)")
    grid = [i // p for i, p in zip(to_2tuple(kwargs.get("img_size", 224)), to_2tuple(kwargs["patch_size"]))]
    prefix = int(kwargs.get("class_token", True)) + kwargs.get("reg_tokens", 0)
    block_fn = ff_block_fn(grid[0] * grid[1] + prefix)
    # features_only as timm's ViTs do it: the blocks' outputs through forward_intermediates
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter")
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, block_fn=block_fn, **kwargs)  # fmt: skip


def _model_args(size: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    width, heads = SIZES[size]
    return dict(dict(patch_size=16, embed_dim=width, depth=12, num_heads=heads), **kwargs)


@register_model
def vit_ff_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """FF-tiny: ViT-Ti/16 with feed-forward layers across patches (61.4% ImageNet top-1 in the report)."""
    return _create("vit_ff_tiny_patch16_224", pretrained, **_model_args("tiny", kwargs))


@register_model
def vit_ff_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """FF-small: ViT-S/16 with feed-forward layers across patches."""
    return _create("vit_ff_small_patch16_224", pretrained, **_model_args("small", kwargs))


@register_model
def vit_ff_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """FF-base: ViT-B/16 with feed-forward layers across patches (74.9% ImageNet top-1 in the report)."""
    return _create("vit_ff_base_patch16_224", pretrained, **_model_args("base", kwargs))
