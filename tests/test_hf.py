"""transformers' ViTMAE layout both ways: export loads in transformers and computes the same
loss, Hub-style folders feed every stage, the round trip is exact, unsafe files are refused.

The transformers models are built here with random weights and saved with
``save_pretrained``; no test needs the network but the one marked for the Hub.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTModel

from benchmarks.pretrain_step import peer_model
from mae.checkpoint import load_weights
from mae.config import ConfigError
from mae.encoder import create_vit
from mae.export import export
from mae.hf import HFError, load_hf_mae, save_hf
from mae.models import create_model
from mae.models.mae_vit import encoder_only, preset_config
from mae.models.pos_embed import resize_pos_embed
from mae.pretrain import PretrainConfig, build_model, save_encoder
from mae.sources import SourceError, load_source
from pipelines import analyze as analyze_cli
from pipelines import reconstruct as reconstruct_cli

ROOT = Path(__file__).resolve().parents[1]
CIFAR = "mae_vit_tiny_patch4_32"
BASE = "mae_vit_base_patch16"
# the CIFAR preset whole, and ViT-Base's widths, heads and 224-px grid with fewer blocks (2 + 1) to stay fast
SHAPES = {"cifar": (CIFAR, {}), "base": (BASE, {"depth": 2, "decoder_depth": 1})}


def hub_model(preset: str, overrides: dict, *, norm_pix_loss: bool, eps: float = 1e-6, seed: int = 0) -> ViTMAEForPreTraining:
    """A random ViTMAEForPreTraining with HF's own sin-cos tables (``peer_model`` reruns HF's
    initialisers, which transformers 5.x skips), every trained weight perturbed so a
    swapped name cannot go unseen, and ``layer_norm_eps`` as given (the Hub's is 1e-12)."""
    torch.manual_seed(seed)
    model = peer_model(preset_config(preset, norm_pix_loss=norm_pix_loss, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    model.config.layer_norm_eps = eps
    return model.eval()


def saved(model: nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def batch(cfg, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g), torch.rand(n, cfg.num_patches, generator=g)


def assert_same_outputs(ours: nn.Module, theirs: ViTMAEForPreTraining, cfg, logits_tol: float = 1e-5) -> None:
    """Loss within 1e-5 relative and logits within ``logits_tol`` of their largest, in fp32, with the same images and noise."""
    images, noise = batch(cfg)
    with torch.no_grad():
        loss, pred, mask = ours.eval()(images, noise=noise)
        out = theirs.eval()(pixel_values=images, noise=noise)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(mask, out.mask, rtol=0, atol=0)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=logits_tol * out.logits.abs().max().item())


def one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and text
    return text


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_export_loads_in_transformers_strictly_with_equal_loss_and_logits(shape, norm_pix_loss, tmp_path):
    preset, overrides = SHAPES[shape]
    torch.manual_seed(0)
    ours = create_model(preset, norm_pix_loss=norm_pix_loss, **overrides)
    save_hf(ours, tmp_path)
    theirs, info = ViTMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert theirs.config.norm_pix_loss is norm_pix_loss and theirs.config.mask_ratio == ours.cfg.mask_ratio
    assert torch.equal(theirs.vit.embeddings.position_embeddings, ours.pos_embed)  # the tables, written
    assert theirs.decoder.decoder_pos_embed.any()
    assert_same_outputs(ours, theirs, ours.cfg)


def test_hf_encoder_loads_strictly_into_vit_model_with_the_encoders_features(tmp_path):
    torch.manual_seed(0)
    ours = create_model(CIFAR, depth=2)
    save_hf(ours, tmp_path, encoder_only=True)
    vit, info = ViTModel.from_pretrained(tmp_path, add_pooling_layer=False, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    images, _ = batch(ours.cfg)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(pixel_values=images).last_hidden_state, ours.eval().forward_features(images),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    # with transformers' default pooler, only the pooler (which MAE never trained) is missing
    _, info = ViTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}


def test_feedforward_and_position_free_models_are_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    ff = create_model(CIFAR, depth=1, mixer="feedforward")
    released = tmp_path / "ff.pth"
    torch.save({"model": ff.state_dict()}, released)
    for fmt in ("hf", "hf-encoder"):
        with pytest.raises(ConfigError) as err:
            export(str(released), fmt, tmp_path / fmt)
        assert "--format timm" in one_line(err.value) and not (tmp_path / fmt).exists()
    written = export(str(released), "timm", tmp_path / "timm")  # what the refusal points to works
    assert {p.name for p in written} == {"encoder.safetensors", "config.json", "README.md"}
    with pytest.raises(HFError, match="pos_embed=none"):
        save_hf(create_model(CIFAR, depth=1, pos_embed="none"), tmp_path / "none")


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_pretraining_init_from_a_hub_folder_starts_at_hfs_loss(shape, norm_pix_loss, tmp_path):
    """init_from gives encoder and decoder: the loss at step 0 is transformers' on the same batch and noise."""
    preset, overrides = SHAPES[shape]
    theirs = hub_model(preset, overrides, norm_pix_loss=norm_pix_loss)
    folder = saved(theirs, tmp_path / "hub")
    cfg = PretrainConfig(model=preset, model_overrides=overrides, norm_pix_loss=norm_pix_loss, init_from=str(folder))
    ours = build_model(cfg)  # what the stage builds
    assert_same_outputs(ours, theirs, ours.cfg)


def test_hub_layer_norm_eps_keeps_the_loss_within_tolerance(tmp_path):
    """The Hub's configs say layer_norm_eps 1e-12, this project's norms use 1e-6: the loss
    stays within 1e-5, single logits move by up to ~2e-5 of the largest."""
    theirs = hub_model(CIFAR, {}, norm_pix_loss=True, eps=1e-12)
    cfg, sd = load_hf_mae(saved(theirs, tmp_path))
    ours = create_model(CIFAR)
    ours.load_state_dict(sd)
    assert_same_outputs(ours, theirs, cfg, logits_tol=1e-4)


def test_in_memory_names_of_transformers_5_import_the_same(tmp_path):
    """save_pretrained writes the Hub's legacy names; a state_dict() saved by hand has 5.x's (q_proj, layers)."""
    theirs = hub_model(CIFAR, {"depth": 2}, norm_pix_loss=True)
    legacy = saved(theirs, tmp_path / "legacy")
    modern = tmp_path / "modern"
    modern.mkdir()
    (modern / "config.json").write_text((legacy / "config.json").read_text())
    sd = theirs.state_dict()
    assert any(".q_proj." in k for k in sd) and not any(".q_proj." in k for k in load_file(str(legacy / "model.safetensors")))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(modern / "model.safetensors"))
    a, b = load_hf_mae(legacy)[1], load_hf_mae(modern)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_is_bit_identical_and_the_probe_sees_the_same_features(tmp_path):
    torch.manual_seed(0)
    ours = create_model(CIFAR, depth=3, norm_pix_loss=False)
    save_hf(ours, tmp_path / "hf")
    cfg, sd = load_hf_mae(tmp_path / "hf")
    assert cfg == ours.cfg
    assert sd.keys() == ours.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in ours.state_dict().items())
    back = create_model(CIFAR, depth=3, norm_pix_loss=False)
    back.load_state_dict(sd)
    save_hf(back, tmp_path / "again")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    # a probe of the re-imported encoder: the same timm model, the same features as from encoder.safetensors
    save_encoder(ours, tmp_path / "encoder.safetensors")
    images, _ = batch(ours.cfg)
    probes = [create_vit("auto", str(p), num_classes=0).eval() for p in (tmp_path / "hf", tmp_path / "encoder.safetensors")]
    with torch.no_grad():
        assert torch.equal(probes[0](images), probes[1](images))


def test_probe_and_fine_tune_models_take_a_hub_folder_with_resized_tables(tmp_path):
    theirs = hub_model(CIFAR, {"depth": 2}, norm_pix_loss=True)
    folder = saved(theirs, tmp_path)
    vit = create_vit("auto", str(folder), num_classes=10)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, theirs.vit.layers[1].mlp.fc2.weight)
    q, k, v = (getattr(theirs.vit.layers[0].attention, n).weight for n in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(vit.blocks[0].attn.qkv.weight, torch.cat([q, k, v]))
    table = theirs.vit.embeddings.position_embeddings
    bigger = create_vit("auto", str(folder), num_classes=10, img_size=48)  # a 12 x 12 grid
    assert torch.equal(bigger.pos_embed.data, resize_pos_embed(table, (12, 12)))


def test_init_from_at_another_grid_resizes_and_another_shape_says_what_to_set(tmp_path):
    folder = saved(hub_model(CIFAR, {"depth": 2}, norm_pix_loss=True), tmp_path)
    hf_table = load_hf_mae(folder)[1]["decoder_pos_embed"]
    model = build_model(PretrainConfig(model_overrides={"depth": 2, "img_size": 48}, init_from=str(folder)))
    assert torch.equal(model.decoder_pos_embed.data, resize_pos_embed(hf_table, (12, 12)))
    with pytest.raises(HFError) as err:
        build_model(PretrainConfig(init_from=str(folder)))  # 12 blocks, the folder has 2
    assert 'model_overrides {"depth": 2}' in one_line(err.value)


def test_all_zero_sin_cos_tables_are_refused(tmp_path):
    """What transformers 5.x saves from a ViTMAE built without its initialiser."""
    config = ViTMAEConfig(**{k: v for k, v in peer_model(preset_config(CIFAR, depth=1)).config.to_dict().items()
                             if k in ViTMAEConfig().to_dict()})  # fmt: skip
    blank = ViTMAEForPreTraining(config)
    assert not blank.vit.embeddings.position_embeddings.any()
    folder = saved(blank, tmp_path)
    with pytest.raises(HFError) as err:
        load_hf_mae(folder)
    assert "all zeros" in one_line(err.value) and "position_embeddings" in str(err.value)


class _WritesAFile:
    """Unpickling it calls open(marker, 'w'): what an unsafe torch.load would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_that_would_run_code_are_refused(tmp_path):
    theirs = hub_model(CIFAR, {"depth": 1}, norm_pix_loss=True)
    folder = tmp_path / "hub"
    theirs.save_pretrained(folder, safe_serialization=True)
    (folder / "model.safetensors").unlink()
    sd = {k: v.contiguous() for k, v in load_hf_mae(saved(theirs, tmp_path / "ref"))[1].items()}
    # a plain pytorch_model.bin (tensors only, the Hub's own names) loads by weights_only
    torch.save({k: v.contiguous() for k, v in theirs.state_dict().items()}, folder / "pytorch_model.bin")
    plain = load_hf_mae(folder)[1]
    assert all(torch.equal(plain[k], sd[k]) for k in sd)
    # one with an object that writes a file when unpickled
    marker = tmp_path / "code-ran"
    torch.save({"vit.embeddings.cls_token": _WritesAFile(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(HFError) as err:
        load_hf_mae(folder)
    assert "refused to load" in one_line(err.value) and "open" in str(err.value)
    assert not marker.exists()
    with open(folder / "pytorch_model.bin", "rb") as f:  # the file is real: unpickling it unsafely runs the code
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_a_folder_of_another_architecture_gets_one_line(tmp_path):
    from transformers import ViTConfig

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=4)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(SourceError) as err:
        load_source(str(tmp_path))
    assert "model_type 'vit' (ViTModel), not transformers' ViTMAE" in one_line(err.value)
    with pytest.raises(ConfigError) as err:
        create_vit("auto", str(tmp_path), num_classes=10)
    one_line(err.value)


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _hub_reachable(), reason="needs the Hugging Face Hub over the network (huggingface.co:443 unreachable)")
def test_hub_repo_id_imports_the_released_base_model():
    cfg, sd = load_hf_mae("hf-hub:facebook/vit-mae-base")
    assert (cfg.embed_dim, cfg.depth, cfg.decoder_embed_dim, cfg.decoder_depth) == (768, 12, 512, 8)
    create_model(BASE, norm_pix_loss=cfg.norm_pix_loss).load_state_dict(sd)


# ------------------------------------------------------------------------- the tools


@pytest.fixture
def images(tmp_path, real_jpegs) -> list[Path]:
    paths = []
    for i, data in enumerate([jpegs[0] for jpegs in real_jpegs.values()][:2]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    return paths


def test_analyze_and_reconstruct_take_a_hub_folder(tmp_path, images, capsys):
    theirs = hub_model(CIFAR, {"depth": 2}, norm_pix_loss=True)
    folder = str(saved(theirs, tmp_path / "hub"))
    source = load_source(folder)
    assert torch.equal(source.encoder.pos_embed, theirs.vit.embeddings.position_embeddings)
    assert source.mae is not None and source.mae.cfg.norm_pix_loss
    out = tmp_path / "analysis"
    assert analyze_cli.main([folder, *map(str, images), "--out", str(out), "--only", "attention-distance", "position",
                             "--maps", "2", "--device", "cpu"]) == 0, capsys.readouterr().err  # fmt: skip
    assert (out / "analysis.json").exists()
    code = reconstruct_cli.main([folder, *map(str, images), "--out", str(tmp_path / "rec.png"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "rec.png").size[0] > 32


# ---------------------------------------------------------------------- the stages


def stage(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


SMALL = ["data.train=shards/cifar10/test-000000.tar", "data.val=shards/cifar10/test-000001.tar", "epochs=1",
         "batch_size=64", "data.num_workers=1", "progress=false"]  # fmt: skip


@pytest.mark.slow
def test_every_stage_starts_from_a_hub_folder(tmp_path):
    folder = saved(hub_model(CIFAR, {"depth": 2}, norm_pix_loss=True), tmp_path / "hub")
    stage("pipelines.pretrain", f"output_dir={tmp_path / 'pt'}", "model_overrides.depth=2", f"init_from={folder}", *SMALL)
    stage("pipelines.linprobe", f"output_dir={tmp_path / 'lp'}", f"pretrained={folder}", "warmup_epochs=0", *SMALL)
    stage("pipelines.finetune", f"output_dir={tmp_path / 'ft'}", f"pretrained={folder}", "warmup_epochs=0", *SMALL)
    assert (tmp_path / "pt" / "encoder.safetensors").exists() and (tmp_path / "ft" / "model.safetensors").exists()


@pytest.mark.slow
def test_export_of_a_run_in_every_format(tmp_path):
    run = tmp_path / "pt"
    stage("pipelines.pretrain", f"output_dir={run}", "model_overrides.depth=2", *SMALL)
    for fmt in ("hf", "hf-encoder", "timm"):
        stage("pipelines.export", str(run), "--format", fmt, "--out", str(tmp_path / fmt))
    ours = load_source(str(run)).mae
    theirs = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf")
    assert_same_outputs(ours, theirs, ours.cfg)
    card = (tmp_path / "hf" / "README.md").read_text()
    checkpoint = max((run / "checkpoints").iterdir())
    step = torch.load(checkpoint / "state.pt", weights_only=True)["step"]
    assert f"Images seen: {step * 64:,} ({step} optimiser steps" in card
    assert "Final training loss:" in card and "Final validation loss:" in card and "model_overrides:" in card
    ViTModel.from_pretrained(tmp_path / "hf-encoder", add_pooling_layer=False)
    timm_cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    vit = timm.create_model(timm_cfg["architecture"], pretrained=True, **timm_cfg["model_args"],
                            pretrained_cfg_overlay=dict(timm_cfg["pretrained_cfg"], file=str(tmp_path / "timm" / "encoder.safetensors")))  # fmt: skip
    assert torch.equal(vit.pos_embed, encoder_only(load_weights(checkpoint))["pos_embed"])
    assert "tag" not in timm_cfg["pretrained_cfg"] and vit.num_classes == 0
    card = (tmp_path / "timm" / "README.md").read_text()  # its loading snippet runs as written
    code = card.split("```python\n")[1].split("```")[0]
    namespace = {"FOLDER": str(tmp_path / "timm")}
    exec(code, namespace)  # noqa: S102 - the card's own snippet, on the exported folder
    assert torch.equal(namespace["model"].pos_embed, vit.pos_embed)
