"""What a path or name the user gives is, and the models and images made from it.

``resolve_source`` is the one door: the stages' ``pretrained=`` (``mae.encoder``) and the
tools' SOURCE (analysis, reconstruction) both go through it, so a path means the same
weights everywhere. It answers with a ``ResolvedSource``: the kind, the stage that made
it, its weights, its timm spec and its MAE config (None without a decoder). ``load_source``
builds the tools' models from it: the encoder always as a timm model, so every analysis
runs on one kind of module, and the whole autoencoder when the source has a decoder.

A kind of source is one name in ``SourceKind``, one test in ``source_kind`` and one loader
in ``PATH_KINDS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import timm
import torch
import torch.nn as nn
import yaml
from safetensors import safe_open
from torchvision import transforms as T

from .checkpoint import CheckpointError, find_latest, load_plain, load_weights
from .data.decode import UndecodableImage, decode_rgb
from .data.loader import ShardLoader
from .data.shards import DataError
from .data.transforms import eval_transform, to_model_input
from .hf import HUB_PREFIX, HFError, is_hf_mae_folder, load_hf_mae
from .models.mae_vit import DECODER_PREFIXES, PRESETS, MAEConfig, MaskedAutoencoderViT, encoder_only, model_config

ENCODER_FILE = "encoder.safetensors"  # what pretraining exports at its end
EXPORTS = {"pretrain": ENCODER_FILE, "finetune": "model.safetensors"}  # the file each stage writes at its end
STAGE_WORDS = {"pretrain": "pretraining", "linprobe": "linear-probe", "finetune": "fine-tuning"}
ACCEPTED = ("a pretraining or fine-tuning run folder, a checkpoint folder, an encoder.safetensors, "
            "a released MAE checkpoint ({'model': ...}), a transformers ViTMAE folder (or hf-hub:ID) "
            "or a timm model name with its weights file")  # fmt: skip

SourceKind = Literal["run", "checkpoint", "encoder", "released", "hf", "timm"]


class SourceError(ValueError):
    """A path or name that gives no usable model or image; the message says why in one line."""


@dataclass(frozen=True)
class TimmSpec:
    """``timm.create_model(name, **kwargs)`` builds the encoder (head, image size and depth
    are still read from the weights where they differ)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: MAEConfig) -> TimmSpec:
        """The timm model an autoencoder's encoder is."""
        return cls(cfg.timm_model, cfg.timm_kwargs())


@dataclass
class ResolvedSource:
    """What ``source`` (as the user gave it) is. ``timm`` is None where the weights record no
    architecture and match no preset (``no_timm`` says why); ``mae`` is None where there
    is no decoder; ``stage`` is None for files no stage wrote as its own (encoder files,
    released files, timm weights). The weights are read on first use, once."""

    source: str
    kind: SourceKind
    description: str  # names the weights actually used, e.g. "pretraining run runs/pt (ckpt-00000096)"
    weights_file: Path
    timm: TimmSpec | None
    mae: MAEConfig | None = None
    stage: str | None = None
    no_timm: str = ""
    # how the weights file becomes a state dict in this project's names; None: it already is one
    read: Callable[[Path], dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    _weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All the weights (decoder and head included), DDP's ``module.`` prefix stripped."""
        if self._weights is None:
            sd = (self.read or _read_weights)(self.weights_file)
            self._weights = {k.removeprefix("module."): v for k, v in sd.items()}
        return self._weights

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights in timm names: no decoder, no mask token."""
        return encoder_only(self.state_dict())

    def require_timm(self, hint: str) -> TimmSpec:
        """The timm spec, or a one-line refusal that ends with the caller's ``hint`` (what to give instead)."""
        if self.timm is None:
            raise SourceError(f"{self.description}: {self.no_timm}; {hint}")
        return self.timm


def resolve_source(source: str | Path, weights: str | Path | None = None) -> ResolvedSource:
    """The one answer to "what is this path or name?"; a one-line ``SourceError`` if it is none.

    Precedence: a **run folder** (``config.yaml``) means the weights of its latest complete
    checkpoint, the newest state the run reached, with its decoder; the file the stage
    exports at its end (``encoder.safetensors``, a fine-tuning run's ``model.safetensors``)
    only when no checkpoint is left. The two hold the same weights when a run has ended
    (its last epoch is always checkpointed); while it runs or after it was stopped, only
    the checkpoint is current. A fine-tuning run's ``best.safetensors`` is never implied:
    give the file itself. The stage that made a run or checkpoint is the one it recorded.

    The other kinds: a **checkpoint** folder (``state.pt`` + ``model.safetensors``, or that
    ``model.safetensors`` itself); an **encoder** file (safetensors recording its timm
    model, as pretraining exports it); a **released** file, weights that record no
    architecture (the official ``{'model': ...}`` .pth), matched to a preset by shapes;
    an **hf** folder in transformers' ViTMAE layout, or ``hf-hub:<repo id>``;
    a **timm** model name with a ``weights`` file."""
    kind = source_kind(source, weights)
    if kind == "timm":
        return _timm_name(str(source), Path(weights))
    return PATH_KINDS[kind](Path(source))


def source_kind(source: str | Path, weights: str | Path | None = None) -> SourceKind:
    """Which kind ``source`` is, from what is on disk (no weights read), or a one-line refusal."""
    path = Path(source)
    if weights is not None:
        if path.exists():
            raise SourceError(f"--weights goes with a timm model name, not with the path {source}")
        return "timm"
    if str(source).startswith(HUB_PREFIX):
        return "hf"
    if path.is_dir():
        if (path / "config.yaml").is_file():
            return "run"
        if _is_checkpoint(path):
            return "checkpoint"
        if is_hf_mae_folder(path):
            return "hf"
        raise SourceError(f"{source}: a folder with neither config.yaml (a run) nor state.pt (a checkpoint); "
                          f"give {ACCEPTED}")  # fmt: skip
    if path.is_file():
        if path.name == "model.safetensors" and _is_checkpoint(path.parent):
            return "checkpoint"
        return "encoder" if _timm_metadata(path) else "released"
    if _is_timm_name(str(source)):
        raise SourceError(f"{source} is a timm model name: give its weights with --weights FILE "
                          f"(to a stage: model={source} pretrained=FILE)")  # fmt: skip
    raise SourceError(f"{source}: no such file or folder, and not a timm model name; give {ACCEPTED}")


# -------------------------------------------------------------------------- the kinds


def _run(path: Path) -> ResolvedSource:
    """A run folder: its latest checkpoint, else the file its stage exports (see ``resolve_source``)."""
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SourceError(f"{path}/config.yaml: not a readable run config ({type(err).__name__})") from None
    stage = _stage(config.get("stage"), config, path / "config.yaml")
    _check_leaves_a_model(stage, config, f"{path}")
    latest = find_latest(path)
    if latest is not None:
        return replace(_checkpoint(latest, run=path), kind="run", source=str(path))
    export = EXPORTS.get(stage)
    if not (path / export).is_file():
        raise SourceError(f"{path}: a {STAGE_WORDS[stage]} run with no checkpoint and no {export} yet")
    where = f"{STAGE_WORDS[stage]} run {path} ({export})"
    return _trained("run", str(path), stage, config, path / export, where, decoder=False)


def _checkpoint(path: Path, run: Path | None = None) -> ResolvedSource:
    """A checkpoint folder, or its ``model.safetensors``; ``run``: the run folder it was found in."""
    folder = path if path.is_dir() else path.parent
    try:
        state = load_plain(folder / "state.pt")
    except CheckpointError as err:
        raise SourceError(str(err)) from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise SourceError(f"{folder / 'state.pt'}: records no config, so not a checkpoint of this project")
    config = state["config"]
    stage = _stage(state.get("stage"), config, folder / "state.pt")
    words = STAGE_WORDS.get(stage, stage)
    where = f"{words} run {run} ({folder.name})" if run else f"{words} checkpoint {folder}"
    return _trained("checkpoint", str(path), stage, config, folder / "model.safetensors", where)


def _encoder_file(path: Path) -> ResolvedSource:
    meta = _timm_metadata(path)
    return ResolvedSource(str(path), "encoder", f"encoder {path}", path, TimmSpec(meta["timm_name"], meta["timm_kwargs"]))


def _released(path: Path) -> ResolvedSource:
    """Weights that record no architecture: the preset of the same shapes gives it."""
    sd = {k.removeprefix("module."): v for k, v in _read_weights(path).items()}
    if "patch_embed.proj.weight" not in sd:
        raise SourceError(f"{path}: holds no ViT weights (no patch_embed.proj.weight); give {ACCEPTED}")
    found = _preset_for(sd)
    if isinstance(found, str):
        return ResolvedSource(str(path), "released", str(path), path, None, no_timm=found, _weights=sd)
    preset, cfg = found
    mae = cfg if any(k.startswith(DECODER_PREFIXES) for k in sd) else None
    return ResolvedSource(str(path), "released", f"{path} (as {preset})", path, TimmSpec.of(cfg), mae, _weights=sd)


def _hf_folder(path: Path) -> ResolvedSource:
    """A transformers ViTMAE folder or ``hf-hub:`` id (``mae/hf.py`` maps its names to ours)."""
    source = str(path)
    try:
        cfg, sd = load_hf_mae(source)
    except HFError as err:
        raise SourceError(str(err)) from None
    mae = cfg if any(k.startswith(DECODER_PREFIXES) for k in sd) else None
    return ResolvedSource(source, "hf", f"transformers ViTMAE {source}", path, TimmSpec.of(cfg), mae, _weights=sd)


def _timm_name(name: str, weights: Path) -> ResolvedSource:
    if not _is_timm_name(name):
        raise SourceError(f"{name}: not a timm model name (timm.list_models() lists them)")
    if not weights.is_file():
        raise SourceError(f"--weights {weights}: no such file")
    sd = _read_weights(weights, f"--weights {weights}")
    return ResolvedSource(name, "timm", f"{name} with {weights}", weights, TimmSpec(name), _weights=sd)


PATH_KINDS: dict[SourceKind, Callable[[Path], ResolvedSource]] = {
    "run": _run, "checkpoint": _checkpoint, "encoder": _encoder_file, "released": _released, "hf": _hf_folder,
}  # fmt: skip


# ------------------------------------------------------------- what a stage recorded


def _stage(recorded: str | None, config: dict[str, Any], where: Path) -> str:
    """The stage that wrote ``config``: the one it recorded."""
    if recorded:
        return recorded
    # Runs and checkpoints written before the stage was recorded (no "stage" key): told
    # apart by a setting only their stage has.
    for key, stage in (("model_overrides", "pretrain"), ("layer_decay", "finetune"), ("knn", "linprobe")):
        if key in config:
            return stage
    raise SourceError(f"{where}: records no stage, and its settings are none of pretrain's, finetune's or linprobe's")


def _trained(kind: SourceKind, source: str, stage: str, config: dict[str, Any], weights: Path, where: str, *,
             decoder: bool = True) -> ResolvedSource:  # fmt: skip
    """The weights ``weights`` of a run or checkpoint of ``stage``, described by the config it
    recorded; ``decoder``: whether they hold pretraining's decoder (a checkpoint does, the
    exported encoder does not)."""
    _check_leaves_a_model(stage, config, where)
    if stage == "pretrain":
        try:
            cfg = model_config(config)
        except (KeyError, TypeError, ValueError) as err:
            raise SourceError(f"{where}: its config no longer builds a model: {err}") from None
        return ResolvedSource(source, kind, where, weights, TimmSpec.of(cfg), cfg if decoder else None, stage)
    spec, why = _finetuned_spec(config)  # the stages that leave a model: pretrain, finetune
    return ResolvedSource(source, kind, where, weights, spec, None, stage, no_timm=why)


def _check_leaves_a_model(stage: str, config: dict[str, Any], where: str) -> None:
    """Refuse the runs of a stage that leaves no model of its own to load."""
    if stage == "linprobe":
        raise SourceError(f"{where}: a linear-probe run trains a head on a frozen encoder; give that encoder "
                          f"(its pretrained={config.get('pretrained')})")  # fmt: skip
    if stage not in EXPORTS:
        raise SourceError(f"{where}: made by the {stage} stage, which leaves no model to load; give {ACCEPTED}")


def _finetuned_spec(config: dict[str, Any]) -> tuple[TimmSpec | None, str]:
    """A fine-tuning run's timm model: the one it named, or with ``model=auto`` the one of the
    encoder it started from (if that is still there); else None and why."""
    kwargs = dict(config.get("model_kwargs") or {})
    if config.get("model", "auto") != "auto":
        return TimmSpec(config["model"], kwargs), ""
    pretrained = config.get("pretrained", "none")
    try:
        base = resolve_source(pretrained).timm if pretrained != "none" else None
    except SourceError:
        base = None
    if base is None:
        return None, f"it ran with model=auto and its pretrained={pretrained} no longer names a timm model"
    return TimmSpec(base.name, {**base.kwargs, **kwargs}), ""


# ---------------------------------------------------------------------------- reading


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "state.pt").is_file() and (folder / "model.safetensors").is_file()


def _timm_metadata(path: Path) -> dict[str, Any]:
    """The timm model an exported encoder records in its metadata; {} for any other file."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not safetensors after all: reading the weights will say so
        return {}
    if "timm_name" not in meta:
        return {}
    return {"timm_name": meta["timm_name"], "timm_kwargs": json.loads(meta.get("timm_kwargs", "{}"))}


def _read_weights(path: Path, what: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict, or a one-line refusal (a torch file holding code keeps its own message)."""
    try:
        sd = load_weights(path)
    except CheckpointError as err:
        if "refused to load" in str(err):  # a file holding code: its own message names the danger
            raise SourceError(str(err)) from None
        raise SourceError(f"{what or path}: not a weights file torch or safetensors can read; give {ACCEPTED}") from None
    except Exception as err:  # torch and safetensors raise many types for a file that is not weights
        raise SourceError(f"{what or path}: not a weights file torch or safetensors can read "
                          f"({type(err).__name__}); give {ACCEPTED}") from None  # fmt: skip
    if not isinstance(sd, dict):
        raise SourceError(f"{what or path}: holds a {type(sd).__name__}, not a state dict; give {ACCEPTED}")
    return sd


def _preset_for(sd: dict[str, torch.Tensor]) -> tuple[str, MAEConfig] | str:
    """For weights that record no architecture (a released checkpoint): the preset of the
    same width, patch and decoder width (which fix the heads), with the depths, MLP ratio
    and image size read from the weights; else why none fits."""
    w = sd["patch_embed.proj.weight"]
    shape = dict(embed_dim=w.shape[0], in_chans=w.shape[1], patch_size=w.shape[-1])
    if "blocks.0.mlp.fc1.weight" not in sd:
        return "records no architecture and its blocks are not a plain ViT's"
    read = dict(depth=_depth(sd, "blocks."), mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / w.shape[0],
                mixer=_mixer(sd, "blocks.0."))  # fmt: skip
    if "decoder_embed.weight" in sd:
        shape["decoder_embed_dim"] = sd["decoder_embed.weight"].shape[0]
        read.update(decoder_depth=_depth(sd, "decoder_blocks."), decoder_mixer=_mixer(sd, "decoder_blocks.0."))
    for name, preset in PRESETS.items():
        if all(getattr(preset, k) == v for k, v in shape.items()):
            grid = _grid_of(sd["pos_embed"].shape[1]) if "pos_embed" in sd else preset.grid_size
            return name, replace(preset, **read, img_size=grid * preset.patch_size, norm_pix_loss=False)
    return f"records no architecture and no preset has its shapes ({', '.join(f'{k} {v}' for k, v in shape.items())})"


# ------------------------------------------------------------------ the tools' models


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
    """The models behind ``source`` (``resolve_source`` says which weights). ``norm_pix_loss``
    overrides what the source says about its decoder's target (released checkpoints: raw
    pixels, as the official visualisation checkpoints were trained)."""
    src = resolve_source(source, weights)
    spec = src.require_timm(f"give a timm model name with them: NAME --weights {src.weights_file} "
                            "(encoder analyses only)")  # fmt: skip
    sd = src.state_dict()
    mae = None
    if src.mae is not None:
        mae = MaskedAutoencoderViT(src.mae if norm_pix_loss is None else replace(src.mae, norm_pix_loss=norm_pix_loss))
        _load(mae, sd, src.description)
        mae.eval()
    return Source(src.description, _timm_encoder(spec.name, spec.kwargs, encoder_only(sd), src.description), mae)


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
