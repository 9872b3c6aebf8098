"""Optimiser pieces: weight-decay groups, the scaling rule, the schedule."""

from __future__ import annotations

import math

import pytest

from mae.engine import RunConfig, base_lr
from mae.models import MAEConfig, MaskedAutoencoderViT
from mae.optim import lr_at, param_groups


def test_no_weight_decay_on_norms_biases_position_embeddings_and_tokens():
    model = MaskedAutoencoderViT(MAEConfig(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                           pos_embed="learned"))  # fmt: skip
    decay, undecayed = param_groups(model, 0.05, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decay["params"]}
    undecayed_names = {names[id(p)] for p in undecayed["params"]}
    assert decay["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    assert {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "norm.weight", "norm.bias",
            "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "decoder_pred.bias"} <= undecayed_names  # fmt: skip
    assert {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "patch_embed.proj.weight",
            "decoder_embed.weight", "decoder_pred.weight"} <= decayed_names  # fmt: skip
    assert decayed_names.isdisjoint(undecayed_names)
    assert len(decayed_names) + len(undecayed_names) == len(list(model.parameters()))


def test_fixed_position_tables_are_left_out_of_the_optimiser():
    model = MaskedAutoencoderViT(MAEConfig(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))  # fmt: skip
    params = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert id(model.pos_embed) not in params and id(model.decoder_pos_embed) not in params


def test_lr_scales_with_the_effective_batch():
    cfg = RunConfig(blr=1.5e-4, batch_size=64, accum_iter=2)
    assert base_lr(cfg, num_processes=8) == pytest.approx(1.5e-4 * 64 * 8 * 2 / 256)
    assert base_lr(RunConfig(lr=0.01), num_processes=8) == 0.01


def test_schedule_warms_up_linearly_then_follows_a_half_cosine():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
