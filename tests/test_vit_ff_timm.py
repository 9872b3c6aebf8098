"""The feed-forward ViTs used as timm models, the way timm's own model tests use them
(tests/test_models.py of pytorch-image-models): at their fixed input size, through
forward_intermediates, FX feature extraction and TorchScript."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import create_feature_extractor

import mae  # noqa: F401  (registers the vit_ff_* models)

NAME = "vit_ff_tiny_patch16_224"


def tiny(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(NAME, depth=3, **kwargs)


@pytest.mark.parametrize("name", ["vit_ff_tiny_patch16_224", "vit_ff_small_patch16_224", "vit_ff_base_patch16_224"])
def test_configs_declare_the_fixed_input_size(name):
    """timm's tools read fixed_input_size to keep a model at its token count; the patch MLP needs it."""
    assert timm.get_pretrained_cfg_value(name, "fixed_input_size") is True
    assert timm.get_pretrained_cfg_value(name, "input_size") == (3, 224, 224)


def test_backward_at_the_fixed_size_reaches_every_parameter():
    model = tiny(num_classes=42).train()
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_forward_intermediates_are_the_blocks_outputs_and_end_in_forward_features():
    model = tiny().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        assert torch.equal(final, model.forward_features(x))
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk, got in zip(model.blocks, inter):
            h = blk(h)
            assert torch.equal(got, h[:, 1:])
        _, maps = model.forward_intermediates(x)  # NCHW: the 14 x 14 grid
        assert [m.shape for m in maps] == [(1, 192, 14, 14)] * 3
        feats = timm.create_model(NAME, depth=3, features_only=True, out_indices=(0, 1, 2)).eval()(x)
        assert len(feats) == 3 and feats[-1].shape == (1, 192, 14, 14)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fx_feature_extractor_and_torchscript_compute_the_eager_model():
    model = tiny().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
        fx = create_feature_extractor(model, return_nodes={"blocks.2": "last", "head": "logits"})
        got = fx(x)
        assert torch.equal(got["logits"], want)
        assert got["last"].shape == (1, 197, 192)
        with timm.set_scriptable(True):
            scripted = torch.jit.script(tiny().eval())
        assert torch.allclose(scripted(x), want, atol=1e-5)


def test_a_real_attention_mask_is_refused():
    """timm passes attn_mask/is_causal to its blocks; a patch MLP cannot honour a mask."""
    model = tiny().eval()
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(ValueError, match="no attention to mask"):
        model.forward_features(x, attn_mask=torch.ones(197, 197, dtype=torch.bool))
    with pytest.raises(ValueError, match="no attention to mask"):
        model.forward_features(x, is_causal=True)
