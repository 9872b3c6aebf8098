"""Handing the pretrained encoder to timm models: find the weights, adapt them, load them.

Accepted sources: a pretraining run folder (its ``encoder.safetensors``, else its latest
checkpoint), a checkpoint folder, an ``encoder.safetensors`` file, or a released MAE
checkpoint (``{'model': state_dict}`` with decoder weights), or a transformers ViTMAE
folder or ``hf-hub:<repo id>`` (``mae.hf``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from timm.layers import resample_patch_embed

from .checkpoint import find_latest, load_plain, load_weights
from .config import ConfigError
from .hf import is_hf_mae_folder, load_hf_mae
from .models.mae_vit import PRESETS, MAEConfig, encoder_only
from .models.pos_embed import resize_pos_embed

ENCODER_FILE = "encoder.safetensors"


def resolve_pretrained(source: str | Path) -> Path:
    """The weights file behind a run folder, checkpoint folder or file; a clear error if none."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / ENCODER_FILE).exists():
            return path / ENCODER_FILE
        if (path / "model.safetensors").exists():
            return path / "model.safetensors"
        latest = find_latest(path)
        if latest is not None:
            return latest / "model.safetensors"
        raise FileNotFoundError(f"pretrained={source}: no {ENCODER_FILE} and no checkpoint in that folder")
    raise FileNotFoundError(f"pretrained={source}: no such file or folder")


def encoder_metadata(source: str | Path) -> dict[str, Any]:
    """timm name and arguments stored in an exported encoder or a ViTMAE config; {} for other sources."""
    if is_hf_mae_folder(source):
        cfg, _ = load_hf_mae(source, weights=False)
        return {"timm_name": cfg.timm_model, "timm_kwargs": cfg.timm_kwargs()}
    path = resolve_pretrained(source)
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "timm_name" not in meta:
        if path.name == "model.safetensors" and (path.parent / "state.pt").exists():
            return _metadata_from_checkpoint(path.parent)
        return {}
    return {"timm_name": meta["timm_name"], "timm_kwargs": json.loads(meta.get("timm_kwargs", "{}"))}


def _metadata_from_checkpoint(folder: Path) -> dict[str, Any]:
    """A pretraining checkpoint records its config, from which the timm name follows."""
    config = load_plain(folder / "state.pt").get("config", {})
    if config.get("model") not in PRESETS:
        return {}
    known = set(MAEConfig.__dataclass_fields__)
    overrides = {k: v for k, v in config.get("model_overrides", {}).items() if k in known}
    cfg = replace(PRESETS[config["model"]], **overrides)
    return {"timm_name": cfg.timm_model, "timm_kwargs": cfg.timm_kwargs()}


def encoder_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Encoder weights in timm names: decoder and mask token dropped, DDP prefixes stripped."""
    if is_hf_mae_folder(source):
        return encoder_only(load_hf_mae(source)[1])
    return encoder_only(load_weights(resolve_pretrained(source)))


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


def load_encoder(model: nn.Module, source: str | Path) -> Any:
    """Load pretrained encoder weights into a timm ViT; returns the missing/unexpected keys,
    and refuses weights that would leave anything but the head and fc_norm untrained."""
    sd = adapt_to(encoder_state_dict(source), model)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:  # e.g. a feed-forward encoder's patch MLP, tied to its token count, at another img_size
        raise ConfigError(f"pretrained={source} does not fit the model's shapes: {', '.join(wrong[:4])}; "
                          "a feed-forward (vit_ff) encoder keeps the img_size and patch_size it was pretrained at")
    result = model.load_state_dict(sd, strict=False)
    fresh = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm.", "head_drop."))]
    if fresh or result.unexpected_keys:
        raise ConfigError(
            f"pretrained={source} does not match the model: missing {fresh[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    return result


def create_vit(
    model: str, pretrained: str, *, num_classes: int, model_kwargs: dict[str, Any] | None = None, **overrides: Any
) -> nn.Module:
    """A timm model, initialised from a pretrained encoder unless ``pretrained`` is "none".

    ``model="auto"`` takes the timm name and arguments (image and patch size...) recorded
    in the encoder; ``model_kwargs`` and non-None ``overrides`` (img_size, global_pool,
    drop_path_rate...) change them, e.g. a larger img_size to fine-tune at 384.
    """
    import timm

    meta = encoder_metadata(pretrained) if pretrained != "none" else {}
    name = meta.get("timm_name") if model == "auto" else model
    if name is None:
        raise ConfigError("model=auto needs pretrained weights that record their timm model; set model=<timm name>")
    kwargs = dict(meta.get("timm_kwargs", {})) if name == meta.get("timm_name") else {}
    kwargs.update(model_kwargs or {})
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        vit = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ConfigError(f"model={name}: {err}") from err
    if pretrained != "none":
        load_encoder(vit, pretrained)
    return vit
