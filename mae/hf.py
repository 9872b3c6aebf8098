"""transformers' ViTMAE layout, both ways, without importing transformers.

A Hugging Face ``ViTMAEForPreTraining`` folder is ``config.json`` (a ``ViTMAEConfig``)
plus ``model.safetensors`` (or ``pytorch_model.bin``), as ``facebook/vit-mae-base`` on the
Hub. The network is this project's ``MaskedAutoencoderViT`` under other names:

- encoder <-> ``vit.*``: ``cls_token``, ``pos_embed``, ``patch_embed.proj`` are
  ``vit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection}``,
  ``blocks.i`` is ``vit.encoder.layer.i`` and ``norm`` is ``vit.layernorm``;
- decoder <-> ``decoder.*``: ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
  ``decoder_norm``, ``decoder_pred`` keep their names under ``decoder.``, and
  ``decoder_blocks.i`` is ``decoder.decoder_layers.i``;
- in a block, the fused ``attn.qkv`` is ``attention.attention.{query, key, value}`` (split
  in three along the output rows), ``attn.proj`` is ``attention.output.dense``, ``mlp.fc1``
  and ``mlp.fc2`` are ``intermediate.dense`` and ``output.dense``, ``norm1``/``norm2`` are
  ``layernorm_before``/``layernorm_after``.

Files are written in the names of the Hub's released folders, which every transformers
version loads; reading also takes the names transformers 5.x uses in memory and writes
(``vit.layers.i...q_proj``, ``decoder.decoder_encoder.layer.i``). The fixed sin-cos tables
travel as weights: transformers 5.x builds ViTMAE with both tables at zero unless its
initialiser runs, so an all-zero table is refused, never used.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError, load_plain
from .config import ConfigError
from .files import write_atomic
from .models.mae_vit import (
    DECODER_PREFIXES,
    PRESETS,
    MAEConfig,
    MaskedAutoencoderViT,
    checkpoint_filter_fn,
)

HUB_PREFIX = "hf-hub:"  # as timm: hf-hub:<owner>/<name> is a Hub repository, never a local path
ARCHITECTURE = "ViTMAEForPreTraining"
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference; each may be sharded
MAE_KEY = "mae_config"  # this project's own fields in config.json; transformers keeps them as attributes
LAYER_NORM_EPS = 1e-6  # this project's LayerNorms; the Hub's configs say 1e-12, a difference below 1e-6 in the loss

# ours -> the Hub's names, outside the blocks
_TOP = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    **{f"decoder_{m}.{p}": f"decoder.decoder_{m}.{p}" for m in ("embed", "norm", "pred") for p in ("weight", "bias")},
}
_STACKS = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}
# ours -> the Hub's names inside a block; the fused qkv is three of theirs
_IN_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}  # fmt: skip
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# the Hub's and transformers 5.x's names inside a block -> ours (the qkv parts keep the Hub's until fused)
_FROM_HUB = {**{v: k for k, v in _IN_BLOCK.items()}, **{q: q for q in _QKV}, "attention.q_proj": _QKV[0],
             "attention.k_proj": _QKV[1], "attention.v_proj": _QKV[2], "attention.o_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
_LAYER = re.compile(r"^(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)"
                    r"\.(\d+)\.(.+)\.(weight|bias)$")  # fmt: skip
_TABLES = {"pos_embed": _TOP["pos_embed"], "decoder_pos_embed": _TOP["decoder_pos_embed"]}


class HFError(ConfigError):
    """A Hugging Face folder or repository this project cannot use; the message says why in one line."""


# ------------------------------------------------------------------------------ config


def hf_config(cfg: MAEConfig) -> dict[str, Any]:
    """The ``ViTMAEConfig`` (as config.json's dict) of ``cfg``'s network, and ``cfg`` itself
    under ``mae_config`` so an import gives back the same ``MAEConfig``."""
    refuse_unmappable(cfg)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "vit_mae",
        **_encoder_fields(cfg),
        "decoder_hidden_size": cfg.decoder_embed_dim,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_num_attention_heads": cfg.decoder_num_heads,
        "decoder_intermediate_size": int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        "mask_ratio": cfg.mask_ratio,
        "norm_pix_loss": cfg.norm_pix_loss,
        MAE_KEY: asdict(cfg),
    }


def vit_config(cfg: MAEConfig) -> dict[str, Any]:
    """The ``ViTConfig`` of the encoder alone, for ``transformers.ViTModel``."""
    refuse_unmappable(cfg)
    return {"architectures": ["ViTModel"], "model_type": "vit", **_encoder_fields(cfg), MAE_KEY: asdict(cfg)}


def _encoder_fields(cfg: MAEConfig) -> dict[str, Any]:
    return {"hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
            "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio), "hidden_act": "gelu", "qkv_bias": True,
            "layer_norm_eps": LAYER_NORM_EPS, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02, "image_size": cfg.img_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.in_chans}  # fmt: skip


def refuse_unmappable(cfg: MAEConfig) -> None:
    """transformers' ViT blocks are attention blocks with position tables added to the tokens."""
    if "feedforward" in (cfg.mixer, cfg.decoder_mixer):
        raise HFError("a feed-forward (mixer=feedforward) model has no transformers counterpart: "
                      "export its encoder with --format timm")  # fmt: skip
    if cfg.pos_embed == "none":
        raise HFError("pos_embed=none leaves the encoder's position table at zero, which transformers' ViTMAE "
                      "cannot tell from a model whose sin-cos tables were never built: export it with --format timm")  # fmt: skip


def mae_config_from_hf(config: dict[str, Any], where: str) -> MAEConfig:
    """The ``MAEConfig`` of a ViTMAE config.json; one-line errors for what this project's model cannot be."""
    kind = config.get("model_type")
    if kind != "vit_mae":
        names = ", ".join(config.get("architectures") or []) or "no architectures"
        raise HFError(f"{where}: its config.json describes model_type {kind!r} ({names}), not transformers' "
                      f"ViTMAE ({ARCHITECTURE}): give a ViTMAE folder such as hf-hub:facebook/vit-mae-base")  # fmt: skip
    try:
        width, ff = int(config["hidden_size"]), int(config["intermediate_size"])
        dwidth, dff = int(config["decoder_hidden_size"]), int(config["decoder_intermediate_size"])
        size, patch = config.get("image_size", 224), config.get("patch_size", 16)
    except (KeyError, TypeError, ValueError) as err:
        raise HFError(f"{where}: its config.json lacks a usable {err} for a ViTMAE") from None
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
        raise HFError(f"{where}: hidden_act={config.get('hidden_act')!r}, qkv_bias={config.get('qkv_bias')}: "
                      "this project's blocks are exact GELU with a qkv bias")  # fmt: skip
    if ff * dwidth != dff * width:
        raise HFError(f"{where}: encoder MLP {ff}/{width} and decoder MLP {dff}/{dwidth} have other ratios; "
                      "this project's model has one mlp_ratio for both")  # fmt: skip
    sizes = [size, size] if isinstance(size, int) else list(size)
    patches = [patch, patch] if isinstance(patch, int) else list(patch)
    if len(set(sizes)) != 1 or len(set(patches)) != 1:
        raise HFError(f"{where}: image_size {size} / patch_size {patch} are not square, as this project's grids are")
    ours = {k: v for k, v in (config.get(MAE_KEY) or {}).items() if k in {f.name for f in fields(MAEConfig)}}
    shape = dict(img_size=sizes[0], patch_size=patches[0], in_chans=config.get("num_channels", 3), embed_dim=width,
                 depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                 decoder_embed_dim=dwidth, decoder_depth=config["decoder_num_hidden_layers"],
                 decoder_num_heads=config["decoder_num_attention_heads"],
                 mask_ratio=config.get("mask_ratio", 0.75), norm_pix_loss=bool(config.get("norm_pix_loss", False)))  # fmt: skip
    if int(width * ours.get("mlp_ratio", 0)) != ff:  # the recorded ratio, unless the file says otherwise
        shape["mlp_ratio"] = ff / width
    ours.setdefault("timm_name", _timm_name(width))
    try:
        return replace(MAEConfig(), **{**ours, **shape})
    except (TypeError, ValueError) as err:
        raise HFError(f"{where}: its config.json does not give a model of this project: {err}") from None


def _timm_name(width: int) -> str:
    """A timm ViT of that width (the timm kwargs set every size anyway)."""
    same = [p.timm_name for p in PRESETS.values() if p.embed_dim == width]
    return same[0] if same else PRESETS["mae_vit_base_patch16"].timm_name


# --------------------------------------------------------------------------- weights


def to_hf_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """This project's weights in the Hub's ViTMAE names; ``prefix="vit."`` drops the
    decoder and that prefix, which gives ``ViTModel``'s names."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        stack, index, rest = key.split(".", 2)
        module, param = rest.rsplit(".", 1)
        base = f"{_STACKS[stack]}.{index}."
        if module == "attn.qkv":
            for name, part in zip(_QKV, value.chunk(3)):
                out[f"{base}{name}.{param}"] = part
        else:
            out[f"{base}{_IN_BLOCK[module]}.{param}"] = value
    for name, table in _TABLES.items():
        if name in sd:
            check_table(sd[name], table, "the model")
    if prefix:
        out = {k.removeprefix(prefix): v for k, v in out.items() if k.startswith(prefix)}
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The Hub's ViTMAE weights (either transformers generation's names, with or without
    ``vit.`` for an encoder saved alone) in this project's names."""
    if not any(k.startswith(("vit.", "decoder.")) for k in hf):
        hf = {f"vit.{k}": v for k, v in hf.items()}  # a ViTMAEModel: the encoder at the top level
    inverse = {v: k for k, v in _TOP.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list[torch.Tensor | None]] = {}
    unknown = []
    for key, value in hf.items():
        if key in inverse:
            out[inverse[key]] = value
            continue
        found = _LAYER.match(key)
        module = _FROM_HUB.get(found.group(3)) if found else None
        if module is None:
            unknown.append(key)
            continue
        stack = "blocks" if key.startswith("vit.") else "decoder_blocks"
        base, param = f"{stack}.{found.group(2)}.", found.group(4)
        if module in _QKV:
            qkv.setdefault(f"{base}attn.qkv.{param}", [None] * 3)[_QKV.index(module)] = value
        else:
            out[f"{base}{module}.{param}"] = value
    if unknown:
        raise HFError(f"{where}: weights that are not ViTMAE's: {', '.join(unknown[:4])}")
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise HFError(f"{where}: {key} lacks one of query, key and value")
        out[key] = torch.cat(parts)  # type: ignore[arg-type]
    for name, table in _TABLES.items():
        if name in out:
            check_table(out[name], table, where)
    return out


def check_table(table: torch.Tensor, name: str, where: str) -> None:
    """Refuse the all-zero table that a ViTMAE built by transformers 5.x without its initialiser holds."""
    if not table.any():
        raise HFError(f"{where}: {name} is all zeros: transformers 5.x leaves ViTMAE's fixed sin-cos tables at zero "
                      "unless its initialiser runs; save the model after filling them (README, Hugging Face)")  # fmt: skip


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a transformers folder, from safetensors or, failing that, from
    ``pytorch_model.bin`` by ``torch.load(weights_only=True)``; sharded files are merged."""
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        files = [folder / name] if (folder / name).is_file() else []
        if not files and index.is_file():
            files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if files:
            sd: dict[str, torch.Tensor] = {}
            for path in files:
                sd.update(_read_one(path))
            return sd
    raise HFError(f"{folder}: no model.safetensors or pytorch_model.bin beside its config.json")


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        sd = load_plain(path)
    except CheckpointError as err:
        raise HFError(str(err)) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HFError(f"{path}: not a state dict of tensors")
    return sd


# ----------------------------------------------------------------------------- import


def is_hf_mae_folder(source: str | Path) -> bool:
    """A transformers folder (a config.json with a ``model_type``) or an ``hf-hub:`` id: the
    sources that ``load_hf_mae`` reads, or refuses in one line when not a ViTMAE."""
    if str(source).startswith(HUB_PREFIX):
        return True
    path = Path(source)
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config  # timm's config.json has none


def load_hf_mae(source: str | Path, *, weights: bool = True) -> tuple[MAEConfig, dict[str, torch.Tensor]]:
    """The ``MAEConfig`` and (unless ``weights=False``) the weights in this project's names
    of a local ViTMAE folder or ``hf-hub:<repo id>``; the decoder's are there when the
    folder has them (a ``ViTMAEForPreTraining``)."""
    folder = _local(source)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise HFError(f"{source}: cannot read its config.json ({type(err).__name__})") from None
    cfg = mae_config_from_hf(config, str(source))
    return cfg, (from_hf_state_dict(read_weights(folder), str(source)) if weights else {})


def _local(source: str | Path) -> Path:
    """The folder of a source; an ``hf-hub:`` repository is downloaded (safetensors if it has them)."""
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        return Path(source)
    repo = text[len(HUB_PREFIX) :]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HFError(f"{source}: reading from the Hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        folder = Path(snapshot_download(repo, allow_patterns=[CONFIG_FILE, "model*.safetensors*"]))
        if not any(folder.glob("model*.safetensors")):
            folder = Path(snapshot_download(repo, allow_patterns=[CONFIG_FILE, "pytorch_model*.bin*"]))
    except Exception as err:  # the Hub client raises many kinds: offline, no such repo, gated...
        line = (str(err).strip().splitlines() or [""])[0]
        raise HFError(f"{source}: could not download from the Hugging Face Hub ({type(err).__name__}: {line})") from None
    return folder


def init_from_hf(model: MaskedAutoencoderViT, source: str) -> None:
    """Pretraining's ``init_from``: the encoder and decoder of a ViTMAE, into ``model``.
    The widths, depths and heads must agree; position tables at another grid are resized
    as for the official checkpoints (``checkpoint_filter_fn``)."""
    cfg, sd = load_hf_mae(source)
    ours = model.cfg
    keys = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim",
            "decoder_depth", "decoder_num_heads")  # fmt: skip
    wrong = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) != getattr(ours, k)}
    if wrong:
        raise HFError(f"init_from={source} is another shape than the model: set model_overrides "
                      f"{json.dumps(wrong)} (the model has {', '.join(f'{k}={getattr(ours, k)}' for k in wrong)})")  # fmt: skip
    if not any(k.startswith(DECODER_PREFIXES) for k in sd):
        raise HFError(f"init_from={source} has no decoder (an encoder saved alone): pretraining needs a "
                      f"{ARCHITECTURE} folder")  # fmt: skip
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)


# ----------------------------------------------------------------------------- export


def save_hf(model: MaskedAutoencoderViT, out: str | Path, *, encoder_only: bool = False,
            state_dict: dict[str, torch.Tensor] | None = None) -> list[Path]:  # fmt: skip
    """Write ``config.json`` and ``model.safetensors``: a ``ViTMAEForPreTraining`` folder, or
    with ``encoder_only`` a ``ViTModel`` one (no pooler: load it with ``add_pooling_layer=False``)."""
    cfg = model.cfg
    config = vit_config(cfg) if encoder_only else hf_config(cfg)
    sd = to_hf_state_dict(model.state_dict() if state_dict is None else state_dict, "vit." if encoder_only else "")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / CONFIG_FILE, out / WEIGHT_FILES[0]]
    write_atomic(written[0], json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_atomic(written[1], lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    return written
