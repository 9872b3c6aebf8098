"""Handing the pretrained encoder to timm models: adapt the weights, load them, build the
model. Which weights a ``pretrained=`` names is ``mae.sources.resolve_source``'s answer,
the same one the analysis tools get.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_patch_embed

from .config import ConfigError
from .models.pos_embed import resize_pos_embed
from .sources import ResolvedSource, SourceError, resolve_source


def _pretrained_source(pretrained: str | Path) -> ResolvedSource:
    """``resolve_source`` for a stage's ``pretrained=``: a refusal is a config error."""
    try:
        return resolve_source(pretrained)
    except SourceError as err:
        raise ConfigError(f"pretrained: {err}") from None


def adapt_to(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit encoder weights to a timm ViT: position table resized (bicubic) to its patch grid
    with prefix tokens kept; patch filters resampled to another patch size; the final
    ``norm`` dropped where the model pools through ``fc_norm`` instead, as MAE
    fine-tuning with global average pooling does."""
    out = dict(sd)
    if "pos_embed" in out and hasattr(model, "patch_embed"):
        prefix = getattr(model, "num_prefix_tokens", 1)
        grid = tuple(model.patch_embed.grid_size)
        if out["pos_embed"].shape != model.pos_embed.shape:
            out["pos_embed"] = resize_pos_embed(out["pos_embed"], grid, prefix)
    if not isinstance(getattr(model, "norm", None), nn.LayerNorm):
        out = {k: v for k, v in out.items() if not k.startswith("norm.")}
    if "patch_embed.proj.weight" in out and hasattr(model, "patch_embed"):
        have, want = out["patch_embed.proj.weight"].shape, model.patch_embed.proj.weight.shape
        if have[:2] != want[:2]:
            raise ConfigError(
                f"the pretrained patch embedding {tuple(have)} does not fit the model's {tuple(want)}: "
                "choose a model with the encoder's width and input channels"
            )
        if have != want:  # another patch size: resample the filters (FlexiViT, Beyer et al. 2023)
            out["patch_embed.proj.weight"] = resample_patch_embed(out["patch_embed.proj.weight"], list(want[2:]))
    return out


def load_encoder(model: nn.Module, source: str | Path | ResolvedSource) -> Any:
    """Load pretrained encoder weights into a timm ViT; returns the missing/unexpected keys,
    and refuses weights that would leave anything but the head and fc_norm untrained."""
    if not isinstance(source, ResolvedSource):
        source = _pretrained_source(source)
    try:
        sd = adapt_to(source.encoder_state_dict(), model)
    except SourceError as err:
        raise ConfigError(f"pretrained: {err}") from None
    name = source.source
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:  # e.g. a feed-forward encoder's patch MLP, tied to its token count, at another img_size
        raise ConfigError(f"pretrained={name} does not fit the model's shapes: {', '.join(wrong[:4])}; "
                          "a feed-forward (vit_ff) encoder keeps the img_size and patch_size it was pretrained at")
    result = model.load_state_dict(sd, strict=False)
    fresh = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm.", "head_drop."))]
    if fresh or result.unexpected_keys:
        raise ConfigError(
            f"pretrained={name} does not match the model: missing {fresh[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    return result


def create_vit(
    model: str, pretrained: str, *, num_classes: int, model_kwargs: dict[str, Any] | None = None, **overrides: Any
) -> nn.Module:
    """A timm model, initialised from a pretrained encoder unless ``pretrained`` is "none".

    ``model="auto"`` takes the timm name and arguments (image and patch size...) of the
    pretrained source (``resolve_source``'s timm spec); ``model_kwargs`` and non-None ``overrides`` (img_size, global_pool,
    drop_path_rate...) change them, e.g. a larger img_size to fine-tune at 384.
    """
    import timm

    source = _pretrained_source(pretrained) if pretrained != "none" else None
    spec = source.timm if source is not None else None
    if model == "auto":
        if source is None:
            raise ConfigError("model=auto needs pretrained weights that record their timm model; set model=<timm name>")
        try:
            spec = source.require_timm("set model=<timm name>")
        except SourceError as err:
            raise ConfigError(f"model=auto: {err}") from None
    name = spec.name if model == "auto" else model
    kwargs = dict(spec.kwargs) if spec is not None and name == spec.name else {}
    kwargs.update(model_kwargs or {})
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        vit = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ConfigError(f"model={name}: {err}") from err
    if source is not None:
        load_encoder(vit, source)
    return vit
