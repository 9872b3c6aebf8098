"""Publishing a pretraining run: a folder for transformers (``hf``: ViTMAEForPreTraining,
``hf-encoder``: ViTModel) or for timm (``timm``: encoder.safetensors with timm's
config.json), each with a README.md model card that says what the run was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import yaml

from .checkpoint import load_plain
from .config import ConfigError
from .hf import save_hf
from .metrics import read_metrics
from .models.mae_vit import MaskedAutoencoderViT
from .pretrain import save_encoder
from .sources import ENCODER_FILE, SourceError, load_source, resolve_source

FORMATS = ("hf", "hf-encoder", "timm")
CARD = "README.md"


def export(source: str, fmt: str, out: str | Path) -> list[Path]:
    """Write ``source`` (a pretraining run, a checkpoint of one, or a released MAE
    checkpoint) into ``out`` in format ``fmt``; returns the files written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    try:
        mae = load_source(source).mae
    except SourceError as err:
        raise ConfigError(str(err)) from None
    if mae is None:
        raise ConfigError(f"{source}: no pretraining checkpoint with the whole model (an encoder alone); "
                          "export a pretraining run or checkpoint folder")  # fmt: skip
    out = Path(out)
    if fmt == "timm":
        out.mkdir(parents=True, exist_ok=True)
        written = [save_encoder(mae, out / ENCODER_FILE), _timm_config(mae, out / "config.json")]
    else:
        written = save_hf(mae, out, encoder_only=fmt == "hf-encoder")
    card = out / CARD
    card.write_text(model_card(source, fmt, mae))
    return [*written, card]


def _timm_config(mae: MaskedAutoencoderViT, path: Path) -> Path:
    """timm's own config.json for the encoder (``pretrained_cfg`` and the model arguments)."""
    from timm.models._hub import save_config_for_hf

    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    cfg = mae.cfg
    model = timm.create_model(cfg.timm_model, pretrained=False, num_classes=0, **cfg.timm_kwargs())
    data = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic", "crop_pct": 0.875,
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size)}  # fmt: skip
    save_config_for_hf(model, str(path), model_args=cfg.timm_kwargs(), data_config=data)
    written = json.loads(path.read_text())
    for key in ("tag", "license"):  # those of timm's default weights for the name, not of these
        written["pretrained_cfg"].pop(key, None)
    path.write_text(json.dumps(written, indent=2) + "\n")
    return path


# -------------------------------------------------------------------------- the card


def run_record(source: str) -> dict[str, Any]:
    """What the source's run recorded: its config, step, images seen and last losses ({} when none)."""
    try:
        resolved = resolve_source(source)  # the checkpoint a run folder means, by the one rule
    except SourceError:
        return {}
    ckpt = resolved.weights_file.parent
    if resolved.kind not in ("run", "checkpoint") or not (ckpt / "state.pt").is_file():
        return {}
    state = load_plain(ckpt / "state.pt")
    config, step = state.get("config", {}), int(state.get("step", 0))
    # what the checkpoint records of its launch; older ones: every process wrote its RNG state
    launch = state.get("run") or {"world": len(list(ckpt.glob("rng-rank*.pt"))) or 1}
    world = launch["world"]
    images = launch.get("images_seen", step * config.get("batch_size", 0) * config.get("accum_iter", 1) * world)
    record: dict[str, Any] = {"checkpoint": ckpt.name, "config": config, "step": step, "processes": world,
                              "images_seen": images}  # fmt: skip
    run = ckpt.parent.parent
    if (run / "metrics.jsonl").is_file():
        lines = [r for r in read_metrics(run) if r.get("step", 0) <= step]
        for key in ("loss", "val_loss"):
            last = [r for r in lines if key in r]
            if last:
                record[key] = (last[-1][key], last[-1]["step"])
    return record


def model_card(source: str, fmt: str, mae: MaskedAutoencoderViT) -> str:
    """A README.md for the exported folder: how to load it, what the run was."""
    cfg, rec = mae.cfg, run_record(source)
    name = Path(source).resolve().name
    library = "timm" if fmt == "timm" else "transformers"
    load = {
        "hf": "from transformers import ViTMAEForPreTraining\nmodel = ViTMAEForPreTraining.from_pretrained(FOLDER)",
        "hf-encoder": "from transformers import ViTModel\nmodel = ViTModel.from_pretrained(FOLDER, add_pooling_layer=False)",
        "timm": (f"import json, timm\ncfg = json.load(open(FOLDER + '/config.json'))\n"
                 f"model = timm.create_model(cfg['architecture'], pretrained=True, **cfg['model_args'],  # num_classes=0: features\n"
                 f"    pretrained_cfg_overlay=dict(cfg['pretrained_cfg'], file=FOLDER + '/{ENCODER_FILE}'))"),
    }[fmt]  # fmt: skip
    lines = ["---", f"library_name: {library}", "tags: [mae, masked-autoencoder, vision, self-supervised]", "---", "",
             f"# MAE {cfg.embed_dim}-wide, {cfg.depth}-block ViT, {cfg.patch_size}-pixel patches at {cfg.img_size} px: {name}", "",
             f"A masked autoencoder (He et al. 2021) exported with `python -m pipelines.export {name} --format {fmt}`.",
             "", "Load it (`FOLDER`: the path of this folder):", "", "```python", load, "```", "",
             f"- Pixel target: {'each patch normalised by its own mean and variance (norm_pix_loss)' if cfg.norm_pix_loss else 'raw pixels'}; mask ratio {cfg.mask_ratio}.",
             "- Inputs: RGB scaled to [0, 1], normalised with ImageNet's mean and std."]  # fmt: skip
    if not rec:
        lines.append(f"- Source: {name} (no training record beside it).")
    else:
        lines.append(f"- Images seen: {rec['images_seen']:,} ({rec['step']} optimiser steps x batch "
                     f"{rec['config'].get('batch_size')} x accum_iter {rec['config'].get('accum_iter', 1)} x "
                     f"{rec['processes']} process(es)), checkpoint {rec['checkpoint']}.")  # fmt: skip
        for key, what in (("loss", "Final training loss"), ("val_loss", "Final validation loss")):
            if key in rec:
                lines.append(f"- {what}: {rec[key][0]:.4f} (step {rec[key][1]}).")
        lines += ["", "## Run config", "", "```yaml", yaml.safe_dump(rec["config"], sort_keys=True).rstrip(), "```"]
    return "\n".join(lines) + "\n"
