"""Handing the encoder on: export -> timm, resolution changes, and the probe and fine-tune stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from mae.config import ConfigError
from mae.encoder import create_vit
from mae.evaluation import knn_classify, topk_correct
from mae.finetune import optimizer_groups
from mae.linprobe import LinearProbe, lars_for
from mae.metrics import read_metrics
from mae.models import create_model
from mae.models.pos_embed import resize_pos_embed
from mae.pretrain import save_encoder
from mae.sources import resolve_source

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = ["data.train=shards/cifar10/test-{000000..000003}.tar", "data.val=shards/cifar10/test-000000.tar",
              "progress=false"]  # fmt: skip


def stage(name: str, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"pipelines.{name}", f"output_dir={out}", *SMALL_DATA, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """A short real pretraining run (ViT-Tiny at 32 px, 4 blocks) on the sample shards."""
    out = tmp_path_factory.mktemp("pt") / "run"
    stage("pretrain", out, "epochs=2", "batch_size=32", "model_overrides.depth=4", "data.val=")
    return out


@pytest.fixture(scope="module")
def encoder_224(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16")
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    save_encoder(mae, path)
    return path, mae


def test_export_loads_into_timm_with_identical_features(encoder_224):
    path, mae = encoder_224
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()  # fmt: skip
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), mae.eval().forward_features(x), atol=1e-5)
    classifier = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=7,
                                   pretrained_cfg_overlay=dict(file=str(path)))  # fmt: skip
    assert classifier.head.out_features == 7
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=7)
    result = plain.load_state_dict(load_file(str(path)), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys


def test_position_interpolation_keeps_the_grid():
    """A checkerboard of 2x2-patch squares over an 8x8 grid, resized to 16x16, is a checkerboard of 4x4 squares."""
    g, D = 8, 6
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    board = (((rows // 2) + (cols // 2)) % 2 * 2 - 1).float()  # +1 / -1
    pos = torch.cat([torch.full((1, 1, D), 7.0), board.reshape(1, g * g, 1).expand(1, g * g, D)], dim=1)
    out = resize_pos_embed(pos, (16, 16))
    assert out.shape == (1, 1 + 256, D)
    assert torch.equal(out[:, 0], pos[:, 0])  # the cls token's entry is kept
    grid = out[0, 1:, 0].reshape(16, 16)
    r, c = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    expect = (((r // 4) + (c // 4)) % 2 * 2 - 1).float()
    assert torch.equal(torch.sign(grid), expect)


@pytest.mark.parametrize(("img_size", "grid"), [(256, 16), (384, 24)])
def test_224_encoder_fine_tunes_at_higher_resolution(encoder_224, img_size, grid):
    path, mae = encoder_224
    vit = create_vit("auto", str(path), num_classes=10, img_size=img_size)
    assert vit.pos_embed.shape == (1, 1 + grid * grid, 192)
    assert torch.equal(vit.pos_embed[:, 0], mae.pos_embed[:, 0])
    assert torch.equal(vit.blocks[3].mlp.fc1.weight, mae.blocks[3].mlp.fc1.weight)
    loss = torch.nn.functional.cross_entropy(vit(torch.randn(2, 3, img_size, img_size)), torch.tensor([1, 2]))
    loss.backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.slow
def test_224_encoder_fine_tunes_at_the_cifar_resolution(encoder_224, tmp_path):
    """At 32 px with 4-pixel patches: filters resampled, the 14x14 table resized to 8x8; the stage runs."""
    path, _ = encoder_224
    vit = create_vit("auto", str(path), num_classes=10, img_size=32, patch_size=4)
    assert vit.pos_embed.shape == (1, 65, 192) and vit.patch_embed.proj.weight.shape == (192, 3, 4, 4)
    out = tmp_path / "ft"
    stage("finetune", out, f"pretrained={path}", "img_size=32", "model_kwargs.patch_size=4", "epochs=1",
          "batch_size=64", "data.train=shards/cifar10/test-000000.tar", "data.num_workers=1")  # fmt: skip
    assert (out / "model.safetensors").exists()


def test_official_release_checkpoint_feeds_both_stages(tmp_path):
    """A ``{'model': ...}`` file with decoder weights (the released format) initialises probe and fine-tune models."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch4_32")
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae.state_dict()}, path)
    sd = resolve_source(path).encoder_state_dict()
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    for pool in ("token", "avg"):
        vit = create_vit("vit_tiny_patch16_224", str(path), num_classes=10, img_size=32, patch_size=4, global_pool=pool)
        assert torch.equal(vit.blocks[5].attn.proj.weight, mae.blocks[5].attn.proj.weight)


def test_layer_decay_scales_each_block():
    """Block i gets decay^(depth - i), the embeddings decay^(depth + 1), the head 1 (BEiT/MAE rule)."""
    depth, decay = 4, 0.65
    model = timm.create_model("vit_tiny_patch16_224", depth=depth, img_size=32, patch_size=4, num_classes=10)
    groups = optimizer_groups(model, 0.05, decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for i in range(depth):
        assert scale_of[id(named[f"blocks.{i}.attn.qkv.weight"])] == pytest.approx(decay ** (depth - i))
    for name in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert scale_of[id(named[name])] == pytest.approx(decay ** (depth + 1))
    assert scale_of[id(named["head.weight"])] == pytest.approx(1.0)
    assert decay_of[id(named["blocks.0.attn.qkv.weight"])] == 0.05
    assert decay_of[id(named["pos_embed"])] == 0.0 and decay_of[id(named["blocks.0.norm1.weight"])] == 0.0


def test_probe_keeps_the_encoder_frozen_and_bn_without_affine():
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=4, num_classes=0)
    probe = LinearProbe(encoder, 10)
    bn = probe.head[0]
    assert bn.weight is None and bn.bias is None and bn.eps == 1e-6
    before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    head_before = probe.head[1].weight.clone()
    opt = lars_for(probe.head, lr=0.1, weight_decay=0.0)
    probe.train()
    assert not probe.encoder.training and probe.head.training
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(probe(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = probe.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, probe.head[1].weight)
    assert all(p.grad is None for p in probe.encoder.parameters())


def test_knn_votes_by_weighted_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.0]])
    out = knn_classify(bank, labels, queries, torch.tensor([0, 1, 1]), num_classes=2, k=3)
    assert out["knn_top1"] == pytest.approx(200 / 3)
    assert topk_correct(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), (1, 2)) == [0, 1]


@pytest.mark.slow
def test_probe_and_knn_beat_chance(pretrained_run, tmp_path):
    out = tmp_path / "lp"
    stage("linprobe", out, f"pretrained={pretrained_run}", "batch_size=128")
    results = json.loads((out / "results.json").read_text())
    assert results["top1"] > 20.0 and results["knn_top1"] > 20.0  # chance is 10%
    assert {"top1", "top5"} <= read_metrics(out)[-1].keys()


@pytest.mark.slow
def test_short_probe_without_a_warmup_setting_runs(pretrained_run, tmp_path):
    """``epochs=2`` alone: the default warm-up (10 of 90 epochs) shrinks to fit instead of stopping the stage."""
    out = tmp_path / "lp2"
    stage("linprobe", out, f"pretrained={pretrained_run}", "epochs=2", "knn=false")
    assert "top1" in json.loads((out / "results.json").read_text())
    lrs = [m["lr"] for m in read_metrics(out) if "lr" in m]
    assert lrs[-1] < max(lrs)  # warmed up, then decayed within the 2 epochs


@pytest.mark.slow
def test_cached_feature_probe_equals_the_probe_on_the_fly(pretrained_run, tmp_path):
    """Without augmentation and shuffling, training on stored features gives the same head as encoding each step."""
    common = [f"pretrained={pretrained_run}", "epochs=2", "warmup_epochs=1", "batch_size=100", "augment=false", "data.shuffle=false",
              "data.num_workers=1", "knn=false", "data.train=shards/cifar10/test-{000000..000001}.tar",
              "mixed_precision=no"]  # fp32 both ways: under bf16 autocast the on-the-fly head would run in bf16  # fmt: skip
    stage("linprobe", tmp_path / "cached", *common, "cached_features=true")
    stage("linprobe", tmp_path / "fly", *common, "cached_features=false")
    cached, fly = load_file(str(tmp_path / "cached" / "head.safetensors")), load_file(str(tmp_path / "fly" / "head.safetensors"))
    assert cached.keys() == fly.keys()
    for k in cached:
        assert torch.allclose(cached[k], fly[k], rtol=1e-4, atol=1e-6), k
    a = [m["loss"] for m in read_metrics(tmp_path / "cached") if "loss" in m]
    b = [m["loss"] for m in read_metrics(tmp_path / "fly") if "loss" in m]
    assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.slow
def test_finetune_beats_chance_and_keeps_best_and_last(pretrained_run, tmp_path):
    out = tmp_path / "ft"
    stage("finetune", out, f"pretrained={pretrained_run}", "epochs=2", "ema=true", "ema_decay=0.9")
    results = json.loads((out / "results.json").read_text())
    assert results["top1"] > 15.0
    assert {"top1", "top5", "top1_ema"} <= [m for m in read_metrics(out) if "top1" in m][-1].keys()
    assert (out / "best.safetensors").exists() and (out / "model.safetensors").exists()
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert (ckpt / "ema.safetensors").exists()


@pytest.mark.slow
def test_finetune_from_scratch_with_a_hybrid_timm_model(tmp_path):
    """pretrained=none with a ResNet+ViT hybrid: the supervised stage on its own."""
    out = tmp_path / "hybrid"
    stage("finetune", out, "pretrained=none", "model=vit_tiny_r_s16_p8_224", "img_size=32", "epochs=1",
          "batch_size=64", "data.train=shards/cifar10/test-000000.tar", "data.num_workers=1")  # fmt: skip
    assert json.loads((out / "results.json").read_text())["top1"] >= 0.0
    assert [m for m in read_metrics(out) if "loss" in m]


@pytest.mark.slow
def test_stage_without_pretrained_weights_says_so(tmp_path):
    proc = stage("linprobe", tmp_path / "lp", f"pretrained={tmp_path}/missing", check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr


def test_feedforward_encoder_is_picked_up_by_model_auto(tmp_path):
    """An exported feed-forward encoder names its vit_ff model: model=auto builds it and loads
    it strictly (same features); another image size is refused with the reason."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch4_32", mixer="feedforward", depth=2).eval()
    path = save_encoder(mae, tmp_path / "encoder.safetensors")
    vit = create_vit("auto", str(path), num_classes=0, global_pool="token").eval()
    assert type(vit.blocks[0]).__name__ == "FeedForwardBlock" and vit.patch_embed.img_size == (32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(x), mae.pool(mae.forward_features(x)), atol=1e-5)
    with pytest.raises(ConfigError, match="feed-forward"):
        create_vit("auto", str(path), num_classes=10, img_size=64)


@pytest.mark.slow
def test_feedforward_pretraining_feeds_the_probe_and_fine_tuning(tmp_path):
    """The user's path for the feed-forward encoder: MAE pretraining (grid masks), then the probe
    and fine-tuning from that run; and the vit_ff model trained from scratch."""
    pt = tmp_path / "pt-ff"
    stage("pretrain", pt, "model_overrides.mixer=feedforward", "model_overrides.depth=2", "mask_sampling=grid",
          "epochs=1", "batch_size=64")  # fmt: skip
    assert (pt / "reconstructions" / "epoch-0000.png").exists()
    stage("linprobe", tmp_path / "lp", f"pretrained={pt}", "epochs=1", "warmup_epochs=0", "global_pool=avg")
    stage("finetune", tmp_path / "ft", f"pretrained={pt}", "epochs=1")
    stage("finetune", tmp_path / "scratch", "pretrained=none", "model=vit_ff_tiny_patch16_224", "model_kwargs.img_size=32",
          "model_kwargs.patch_size=4", "model_kwargs.depth=2", "epochs=1")  # fmt: skip
    for run in ("lp", "ft", "scratch"):
        assert json.loads((tmp_path / run / "results.json").read_text())["top1"] >= 0.0
    for run in ("ft", "scratch"):
        weights = load_file(str(tmp_path / run / "model.safetensors"))
        assert weights["blocks.1.patch_mlp.fc1.weight"].shape == (260, 65)
