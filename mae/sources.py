"""What the user points the analysis and reconstruction tools at, made into models and
image tensors, or refused with a one-line reason.

Model sources: a pretraining run folder (latest checkpoint: encoder and decoder), a
fine-tuning run folder, a checkpoint folder of either, an ``encoder.safetensors``, a
released MAE checkpoint (``{'model': ...}``; the architecture is matched to a preset by
its shapes), a transformers ViTMAE folder or ``hf-hub:<repo id>``, or a timm ViT name
with a weights file. The encoder always comes back as a
timm model, so every analysis runs on one kind of module; the whole autoencoder comes
back too when the source has a decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import yaml
from torchvision import transforms as T

from .checkpoint import find_latest, load_weights
from .config import ConfigError, config_from_mapping
from .data.decode import UndecodableImage, decode_rgb
from .data.pipeline import DataError, ShardLoader
from .data.transforms import eval_transform, to_model_input
from .encoder import ENCODER_FILE, encoder_metadata
from .hf import HFError, is_hf_mae_folder, load_hf_mae
from .models.mae_vit import DECODER_PREFIXES, PRESETS, MAEConfig, MaskedAutoencoderViT, encoder_only
from .pretrain import PretrainConfig, model_config

ACCEPTED = ("a pretraining or fine-tuning run folder, a checkpoint folder, an encoder.safetensors, "
            "a released MAE checkpoint ({'model': ...}), a transformers ViTMAE folder or hf-hub:<repo id>, "
            "or a timm model name with --weights")  # fmt: skip


class SourceError(ValueError):
    """A path or name that gives no usable model or image; the message says why in one line."""


@dataclass
class Source:
    """A model to inspect: ``encoder`` (timm, eval mode) and, with a decoder, ``mae``."""

    description: str
    encoder: nn.Module
    mae: MaskedAutoencoderViT | None = None

    @property
    def img_size(self) -> int:
        return int(self.encoder.patch_embed.img_size[0])

    def to(self, device: str | None) -> "Source":
        """On ``device`` (default: cuda when available, else cpu)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder.to(device)
        if self.mae is not None:
            self.mae.to(device)
        return self

    def require_decoder(self) -> MaskedAutoencoderViT:
        if self.mae is None:
            raise SourceError(f"{self.description} has no decoder (an encoder only), so it cannot reconstruct: "
                              "give a pretraining run, a pretraining checkpoint or a released MAE checkpoint "
                              "with its decoder (e.g. mae_visualize_vit_large.pth)")  # fmt: skip
        return self.mae


def load_source(source: str, weights: str | None = None, *, norm_pix_loss: bool | None = None) -> Source:
    """The model behind ``source`` (see the module docstring). ``norm_pix_loss`` overrides
    what the source says about its decoder's target (released checkpoints: raw pixels,
    as the official visualisation checkpoints were trained)."""
    path = Path(source)
    if weights is not None:
        if path.exists():
            raise SourceError(f"--weights goes with a timm model name, not with the path {source}")
        return _timm_source(source, weights)
    if is_hf_mae_folder(source):
        try:
            cfg, sd = load_hf_mae(source)
        except HFError as err:
            raise SourceError(str(err)) from None
        return _mae_source(cfg if norm_pix_loss is None else replace(cfg, norm_pix_loss=norm_pix_loss), sd,
                           f"transformers ViTMAE {source}")  # fmt: skip
    if path.is_dir():
        if (path / "config.yaml").is_file():
            return _run_folder(path, norm_pix_loss)
        if (path / "state.pt").is_file() and (path / "model.safetensors").is_file():
            return _checkpoint_folder(path, norm_pix_loss)
        raise SourceError(f"{source}: a folder with neither config.yaml (a run) nor state.pt (a checkpoint); "
                          f"give {ACCEPTED}")  # fmt: skip
    if path.is_file():
        if path.name == "model.safetensors" and (path.parent / "state.pt").is_file():
            return _checkpoint_folder(path.parent, norm_pix_loss)
        return _weights_file(path, norm_pix_loss)
    if _is_timm_name(source):
        raise SourceError(f"{source} is a timm model name: give its weights with --weights FILE")
    raise SourceError(f"{source}: no such file or folder, and not a timm model name; give {ACCEPTED}")


# -------------------------------------------------------------------------- the kinds


def _run_folder(path: Path, norm_pix_loss: bool | None) -> Source:
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if "model_overrides" in config:  # pretraining: the latest checkpoint has the decoder
        latest = find_latest(path)
        if latest is not None:
            return _checkpoint_folder(latest, norm_pix_loss, run=path)
        if (path / ENCODER_FILE).is_file():
            return _weights_file(path / ENCODER_FILE, norm_pix_loss)
        raise SourceError(f"{path}: a pretraining run with no checkpoint and no {ENCODER_FILE} yet")
    if "layer_decay" in config:  # fine-tuning
        for name in ("model.safetensors", "best.safetensors"):
            if (path / name).is_file():
                return _finetuned(path / name, config, f"fine-tuning run {path} ({name})")
        latest = find_latest(path)
        if latest is not None:
            return _finetuned(latest / "model.safetensors", config, f"fine-tuning run {path} ({latest.name})")
        raise SourceError(f"{path}: a fine-tuning run with no weights yet")
    raise SourceError(f"{path}: its config.yaml is neither a pretraining nor a fine-tuning run's; give {ACCEPTED}")


def _checkpoint_folder(path: Path, norm_pix_loss: bool | None, run: Path | None = None) -> Source:
    config = torch.load(path / "state.pt", map_location="cpu", weights_only=True).get("config", {})
    if "model_overrides" in config:
        where = f"pretraining run {run} ({path.name})" if run else f"pretraining checkpoint {path}"
        try:
            cfg = model_config(config_from_mapping(PretrainConfig, config, str(path / "state.pt")))
        except ConfigError as err:
            raise SourceError(f"{path}: its config no longer builds a model: {err}") from None
        if norm_pix_loss is not None:
            cfg = replace(cfg, norm_pix_loss=norm_pix_loss)
        return _mae_source(cfg, load_weights(path), where)
    if "layer_decay" in config:
        return _finetuned(path / "model.safetensors", config, f"fine-tuning checkpoint {path}")
    raise SourceError(f"{path}: a checkpoint of neither pretraining nor fine-tuning")


def _weights_file(path: Path, norm_pix_loss: bool | None) -> Source:
    sd, meta = _read_weights(path, str(path))
    if meta:  # an exported encoder records its timm architecture
        return Source(f"encoder {path}", _timm_encoder(meta["timm_name"], meta["timm_kwargs"], encoder_only(sd), path))
    if not isinstance(sd, dict) or "patch_embed.proj.weight" not in {k.removeprefix("module.") for k in sd}:
        raise SourceError(f"{path}: holds no ViT weights (no patch_embed.proj.weight); give {ACCEPTED}")
    preset, cfg = _preset_for(sd, path)
    if norm_pix_loss is not None:
        cfg = replace(cfg, norm_pix_loss=norm_pix_loss)
    return _mae_source(cfg, sd, f"{path} (as {preset})")


def _finetuned(weights: Path, config: dict[str, Any], where: str) -> Source:
    name = config.get("model", "auto")
    kwargs = dict(config.get("model_kwargs") or {})
    if name == "auto":
        try:
            meta = encoder_metadata(config.get("pretrained", ""))
        except FileNotFoundError:
            meta = {}
        if not meta:
            raise SourceError(f"{where}: ran with model=auto and its pretrained={config.get('pretrained')} is gone; "
                              f"give the timm name: <name> --weights {weights}")  # fmt: skip
        name, kwargs = meta["timm_name"], {**meta["timm_kwargs"], **kwargs}
    return Source(where, _timm_encoder(name, kwargs, load_weights(weights), weights))


def _timm_source(name: str, weights: str) -> Source:
    if not _is_timm_name(name):
        raise SourceError(f"{name}: not a timm model name (timm.list_models() lists them)")
    path = Path(weights)
    if not path.is_file():
        raise SourceError(f"--weights {weights}: no such file")
    sd, _ = _read_weights(path, f"--weights {weights}")
    return Source(f"{name} with {weights}", _timm_encoder(name, {}, encoder_only(sd), path))


# ------------------------------------------------------------------------ the builders


def _read_weights(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict and, for an exported encoder, its recorded timm architecture."""
    try:
        meta = encoder_metadata(path) if path.suffix == ".safetensors" else {}
        return load_weights(path), meta
    except Exception as err:  # torch and safetensors raise many types for a file that is not weights
        raise SourceError(f"{what}: not a weights file torch or safetensors can read "
                          f"({type(err).__name__}); give {ACCEPTED}") from None  # fmt: skip


def _mae_source(cfg: MAEConfig, sd: dict[str, torch.Tensor], where: str) -> Source:
    """The autoencoder (when the weights have a decoder) and its encoder as a timm model."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    mae = None
    if any(k.startswith(DECODER_PREFIXES) for k in sd):
        mae = MaskedAutoencoderViT(cfg)
        _load(mae, sd, where)
        mae.eval()
    return Source(where, _timm_encoder(cfg.timm_model, cfg.timm_kwargs(), encoder_only(sd), where), mae)


def _timm_encoder(name: str, kwargs: dict[str, Any], sd: dict[str, torch.Tensor], where: Any) -> nn.Module:
    """timm's ``name`` built to fit ``sd``: image and patch size, depth, head and pooling
    are read from the weights; ``kwargs`` give the rest (width, heads...)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "patch_embed.proj.weight" not in sd:
        raise SourceError(f"{where}: holds no ViT weights (no patch_embed.proj.weight)")
    p = sd["patch_embed.proj.weight"].shape[-1]
    kwargs = dict(kwargs, patch_size=p, depth=_depth(sd, "blocks."))
    if "pos_embed" in sd:
        kwargs["img_size"] = _grid_of(sd["pos_embed"].shape[1]) * p
    kwargs["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    kwargs["global_pool"] = "avg" if "fc_norm.weight" in sd else kwargs.get("global_pool", "token")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise SourceError(f"{where}: cannot build timm's {name} with {kwargs}: {err}") from None
    _load(model, sd, where)
    return model.eval()


def _load(model: nn.Module, sd: dict[str, torch.Tensor], where: Any) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:3]
        raise SourceError(f"{where}: the weights do not fit the model: {' '.join(s.strip() for s in first)}") from None


def _preset_for(sd: dict[str, torch.Tensor], path: Path) -> tuple[str, MAEConfig]:
    """For weights that record no architecture (a released checkpoint): the preset of the
    same width, patch and decoder width (which fix the heads), with the depths, MLP ratio
    and image size read from the weights."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    w = sd["patch_embed.proj.weight"]
    shape = dict(embed_dim=w.shape[0], in_chans=w.shape[1], patch_size=w.shape[-1])
    read = dict(depth=_depth(sd, "blocks."), mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / w.shape[0],
                mixer=_mixer(sd, "blocks.0."))  # fmt: skip
    if "decoder_embed.weight" in sd:
        shape["decoder_embed_dim"] = sd["decoder_embed.weight"].shape[0]
        read.update(decoder_depth=_depth(sd, "decoder_blocks."), decoder_mixer=_mixer(sd, "decoder_blocks.0."))
    for name, preset in PRESETS.items():
        if all(getattr(preset, k) == v for k, v in shape.items()):
            grid = _grid_of(sd["pos_embed"].shape[1]) if "pos_embed" in sd else preset.grid_size
            return name, replace(preset, **read, img_size=grid * preset.patch_size, norm_pix_loss=False)
    raise SourceError(f"{path}: no preset has its shapes ({', '.join(f'{k} {v}' for k, v in shape.items())}); "
                      "give a timm model name with --weights (encoder analyses only)")  # fmt: skip


def _mixer(sd: dict[str, torch.Tensor], block: str) -> str:
    """The token mixer of a block's weights: a patch MLP (the feed-forward encoder) or attention."""
    return "feedforward" if f"{block}patch_mlp.fc1.weight" in sd else "attention"


def _depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return 1 + max(int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix))


def _grid_of(tokens: int) -> int:
    """The side of the square patch grid in a position table of ``tokens`` rows (0 or 1 prefix rows)."""
    for prefix in (1, 0):
        side = int(round((tokens - prefix) ** 0.5))
        if tokens > prefix and side * side == tokens - prefix:
            return side
    raise SourceError(f"a position table of {tokens} rows is not a square patch grid")


def _is_timm_name(name: str) -> bool:
    return "/" not in name and timm.is_model(name)


# ------------------------------------------------------------------------------ images


def read_images(paths: list[str], img_size: int) -> tuple[torch.Tensor, list[str]]:
    """Image files -> [N, 3, img_size, img_size] normalised as in training, and one note per
    image that was not already that size: its short side is resized (bicubic) to
    ``img_size`` and the centre cropped, so the whole width or height stays in view."""
    resize = T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size)])
    images, notes = [], []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise SourceError(f"{name}: no such image file")
        try:
            img = decode_rgb(path.read_bytes())
        except UndecodableImage as err:
            raise SourceError(f"{name}: not an image ({err})") from None
        if img.size != (img_size, img_size):
            notes.append(f"{name} is {img.width}x{img.height}, the model takes {img_size}x{img_size}: "
                         f"resized (short side to {img_size}, bicubic) and centre-cropped")  # fmt: skip
            img = resize(img)
        images.append(T.functional.pil_to_tensor(img))  # uint8, normalised below as every batch is
    return to_model_input(torch.stack(images), "cpu"), notes


def shard_images(spec: str, img_size: int, count: int) -> torch.Tensor:
    """The first ``count`` images of shards, in order, with the evaluation transform."""
    try:
        loader = ShardLoader(spec, eval_transform(img_size), batch_size=count, num_workers=0, shuffle=False,
                             every_reader_needs_a_shard=False, samples_per_epoch=count)  # fmt: skip
        batch = next(iter(loader), None)
    except DataError as err:
        raise SourceError(f"--data {spec}: {err}") from None
    if batch is None:
        raise SourceError(f"--data {spec}: no readable image in the shards")
    return to_model_input(batch["image"][:count], "cpu")  # the loader's batches are uint8
