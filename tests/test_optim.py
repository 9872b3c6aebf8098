"""Optimiser pieces: weight-decay groups, the scaling rule, the schedule, fused AdamW."""

from __future__ import annotations

import math

import pytest
import torch

from mae.engine import RunConfig, base_lr
from mae.models import MAEConfig, MaskedAutoencoderViT
from mae.optim import adamw, fused_available, lr_at, param_groups


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


def _tiny_mae() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(MAEConfig(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))  # fmt: skip


def _train(model: MaskedAutoencoderViT, opt: torch.optim.Optimizer, steps: int = 5) -> list[float]:
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        images, noise = torch.randn(8, 3, 32, 32, generator=g), torch.rand(8, 64, generator=g)
        loss = model(images, noise=noise)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fused_adamw_takes_the_same_steps_as_the_reference_adamw():
    """The stages' AdamW is fused on CPU; five steps land where torch's for-each AdamW lands."""
    assert fused_available("cpu")
    fused_model, ref_model = _tiny_mae(), _tiny_mae()
    fused = adamw(param_groups(fused_model, 0.05), lr=1e-3, device="cpu", betas=(0.9, 0.95))
    assert fused.defaults["fused"]
    ref = torch.optim.AdamW(param_groups(ref_model, 0.05), lr=1e-3, betas=(0.9, 0.95), foreach=True)
    assert _train(fused_model, fused) == pytest.approx(_train(ref_model, ref), rel=1e-5)
    for (name, a), b in zip(fused_model.named_parameters(), ref_model.parameters()):
        if name.endswith("qkv.bias"):  # the key bias's gradient is zero in theory (softmax ignores a
            d = len(a) // 3  # shift), so Adam turns float noise into full steps: compare q and v
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_found_inf_cancels_a_fused_step_on_the_device():
    """What the loop's non-finite guard relies on: a step with found_inf=1 changes neither
    the weights nor the optimiser state, and the next step is counted as the first."""
    model = _tiny_mae()
    opt = adamw(param_groups(model, 0.05), lr=1e-3, device="cpu")
    _train(model, opt, steps=1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = {k: v.clone() for k, v in opt.state[model.cls_token].items()}
    model.cls_token.grad = torch.full_like(model.cls_token, float("nan"))
    opt.grad_scale, opt.found_inf = None, torch.ones(())
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert all(torch.equal(state[k], v) for k, v in opt.state[model.cls_token].items())
