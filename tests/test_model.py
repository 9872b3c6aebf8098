"""The MAE model: masking, loss, patch layout, position tables, and weight compatibility
with timm and the official release."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from mae.checkpoint import load_weights
from mae.models import PRESETS, MAEConfig, MaskedAutoencoderViT, checkpoint_filter_fn, create_model
from mae.models.pos_embed import resize_pos_embed, sincos_2d

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)  # fmt: skip


@pytest.fixture
def model() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(MAEConfig(**SMALL))


def test_masking_keeps_exact_count_and_restore_inverts_shuffle(model):
    """Each sample keeps int(L * (1 - ratio)) patches; ids_restore undoes the shuffle; the mask marks the rest."""
    N, L, D = 5, model.cfg.num_patches, 7
    x = torch.arange(N * L, dtype=torch.float).reshape(N, L, 1).expand(N, L, D).contiguous()
    for ratio in (0.0, 0.5, 0.75, 0.9):
        kept, mask, ids_restore = model.random_masking(x, ratio)
        len_keep = int(L * (1 - ratio))
        assert kept.shape == (N, len_keep, D)
        assert torch.equal(mask.sum(1), torch.full((N,), float(L - len_keep)))
        # the kept tokens are exactly the positions the mask marks 0
        kept_pos = kept[..., 0].long() - torch.arange(N).unsqueeze(1) * L
        for n in range(N):
            assert set(kept_pos[n].tolist()) == set(torch.nonzero(mask[n] == 0).flatten().tolist())
        # restoring: kept tokens followed by placeholders, gathered by ids_restore, are back in order
        full = torch.cat([kept, torch.full((N, L - len_keep, D), -1.0)], dim=1)
        restored = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
        visible = mask == 0
        assert torch.equal(restored[visible], x[visible])
        assert torch.all(restored[~visible] == -1)


def test_masks_differ_per_sample_and_follow_noise(model):
    """Masks are random per sample, and a given noise fixes them."""
    x = torch.zeros(8, model.cfg.num_patches, 4)
    _, m1, _ = model.random_masking(x, 0.75)
    assert len({tuple(r.tolist()) for r in m1}) > 1
    noise = torch.rand(8, model.cfg.num_patches)
    _, a, _ = model.random_masking(x, 0.75, noise)
    _, b, _ = model.random_masking(x, 0.75, noise)
    assert torch.equal(a, b)
    # small noise is kept
    assert torch.equal(a[0] == 0, noise[0] <= noise[0].sort().values[int(x.shape[1] * 0.25) - 1])


def test_loss_counts_masked_patches_only(model):
    """Changing predictions of visible patches leaves the loss unchanged; the loss equals a hand computation."""
    torch.manual_seed(1)
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = model(imgs)
    tampered = pred.detach().clone()
    tampered[mask == 0] += 100.0
    assert torch.allclose(model.forward_loss(imgs, tampered, mask), loss, atol=1e-6)
    tampered[mask == 1] += 1.0
    assert not torch.allclose(model.forward_loss(imgs, tampered, mask), loss)
    target = model.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask == 1].mean(), atol=1e-6)


def test_norm_pix_target_is_normalised_per_patch(model):
    t = model.pixel_target(torch.rand(2, 3, 32, 32) * 5 + 3)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 64), atol=1e-3)
    raw = MaskedAutoencoderViT(MAEConfig(**SMALL, norm_pix_loss=False))
    imgs = torch.rand(2, 3, 32, 32)
    assert torch.equal(raw.pixel_target(imgs), raw.patchify(imgs))


def test_patchify_layout_and_round_trip(model):
    """Patch 0 is the top-left p x p block in (row, col, channel) order; unpatchify inverts it."""
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 64, 4 * 4 * 3)
    assert torch.equal(patches[0, 0], imgs[0, :, :4, :4].permute(1, 2, 0).reshape(-1))
    assert torch.equal(patches[1, 9], imgs[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))  # row 1, col 1
    assert torch.equal(model.unpatchify(patches), imgs)


def test_sincos_values_match_the_formula():
    """Column in the first half, row in the second; sin then cos; frequencies 1/10000^(i/(D/4)); cls zeros."""
    D, g = 16, 3
    table = sincos_2d(D, g, g, cls_token=True)
    assert table.shape == (1 + g * g, D)
    assert torch.all(table[0] == 0)
    q = D // 4
    for row in range(g):
        for col in range(g):
            v = table[1 + row * g + col]
            for i in range(q):
                w = 1 / 10000 ** (i / q)
                assert math.isclose(v[i], math.sin(col * w), abs_tol=1e-6)
                assert math.isclose(v[q + i], math.cos(col * w), abs_tol=1e-6)
                assert math.isclose(v[2 * q + i], math.sin(row * w), abs_tol=1e-6)
                assert math.isclose(v[3 * q + i], math.cos(row * w), abs_tol=1e-6)


def test_fixed_position_embeddings_are_not_trained(model):
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.decoder_pred.weight.grad is not None
    learned = MaskedAutoencoderViT(MAEConfig(**SMALL, pos_embed="learned"))
    learned(torch.randn(2, 3, 32, 32))[0].backward()
    assert learned.pos_embed.grad is not None


def test_model_config_rejects_bad_choices():
    for bad in (dict(mixer="conv"), dict(decoder_mixer="conv"), dict(pos_embed="rope"), dict(global_pool="max"), dict(patch_size=5), dict(mask_ratio=1.0)):
        with pytest.raises(ValueError):
            MAEConfig(**{**SMALL, **bad})
    with pytest.raises(ValueError, match="unknown model setting"):
        create_model("mae_vit_tiny_patch4_32", depthh=3)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("mae_vit_gigantic")


def test_forward_rejects_wrong_noise_shape_and_mask_ratio(model):
    """A noise tensor not [N, num_patches] or a ratio outside [0, 1) is named at the boundary,
    not left to fail later in a size mismatch deep inside the encoder."""
    imgs = torch.randn(2, 3, 32, 32)
    L = model.cfg.num_patches
    for shape in ((2, L - 1), (3, L), (2, L, 1)):
        with pytest.raises(ValueError, match=rf"noise must have shape \[N, num_patches\] = \[2, {L}\].*got \[{', '.join(map(str, shape))}\]"):
            model(imgs, noise=torch.rand(*shape))
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"mask_ratio must be in \[0, 1\), got {ratio}"):
            model(imgs, mask_ratio=ratio)
    _, pred, mask = model(imgs, mask_ratio=0.0, noise=torch.rand(2, L))  # the edge that is allowed
    assert pred.shape[:2] == (2, L) and mask.sum() == 0


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch4_32", "mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16"])
def test_encoder_loads_strictly_into_timm_with_equal_features(name):
    """The encoder's weights are timm VisionTransformer weights: strict load, same features."""
    torch.manual_seed(0)
    mae = create_model(name).eval()
    c = mae.cfg
    vit = timm.create_model(c.timm_name, pretrained=False, num_classes=0, **c.timm_kwargs()).eval()
    vit.load_state_dict(mae.encoder_state_dict(), strict=True)
    x = torch.randn(2, 3, c.img_size, c.img_size)
    with torch.no_grad():
        ours, theirs = mae.forward_features(x), vit.forward_features(x)
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.allclose(mae.pool(ours), vit(x), atol=1e-5)


@pytest.mark.parametrize("name", ["mae_vit_large_patch16", "mae_vit_huge_patch14"])
def test_large_encoders_load_strictly_into_timm(name):
    mae = create_model(name)
    with torch.device("meta"):  # timm's model only for its names and shapes
        vit = timm.create_model(mae.cfg.timm_name, pretrained=False, num_classes=0, **mae.cfg.timm_kwargs())
    vit.load_state_dict(mae.encoder_state_dict(), strict=True, assign=True)


def official_state_dict(cfg: MAEConfig) -> dict[str, torch.Tensor]:
    """Names and shapes of the official release's MaskedAutoencoderViT, written out by hand."""
    D, Dd, L, p = cfg.embed_dim, cfg.decoder_embed_dim, cfg.num_patches, cfg.patch_size
    sd = {"cls_token": (1, 1, D), "pos_embed": (1, L + 1, D), "patch_embed.proj.weight": (D, 3, p, p),
          "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,),
          "mask_token": (1, 1, Dd), "decoder_pos_embed": (1, L + 1, Dd), "decoder_embed.weight": (Dd, D),
          "decoder_embed.bias": (Dd,), "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
          "decoder_pred.weight": (p * p * 3, Dd), "decoder_pred.bias": (p * p * 3,)}  # fmt: skip
    for prefix, depth, w in (("blocks", cfg.depth, D), ("decoder_blocks", cfg.decoder_depth, Dd)):
        h = int(w * cfg.mlp_ratio)
        for i in range(depth):
            b = f"{prefix}.{i}."
            sd.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                       b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                       b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.fc1.weight": (h, w),
                       b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (w, h), b + "mlp.fc2.bias": (w,)})  # fmt: skip
    return {k: torch.randn(shape) for k, shape in sd.items()}


def test_official_release_checkpoint_loads_strictly(tmp_path, model):
    """A ``{'model': state_dict}`` file with the official names loads with strict=True, values intact."""
    sd = official_state_dict(model.cfg)
    path = tmp_path / "mae_pretrain_official.pth"
    torch.save({"model": sd, "epoch": 799}, path)
    loaded = checkpoint_filter_fn(load_weights(path), model)
    model.load_state_dict(loaded, strict=True)
    assert torch.equal(model.decoder_pred.weight, sd["decoder_pred.weight"])
    assert torch.equal(model.blocks[1].attn.qkv.bias, sd["blocks.1.attn.qkv.bias"])


def test_checkpoint_filter_resizes_position_tables(model):
    """Weights from a 16x16 grid load into an 8x8 model; prefix tokens are kept."""
    big = MaskedAutoencoderViT(MAEConfig(**{**SMALL, "img_size": 64}))
    sd = checkpoint_filter_fn({"module." + k: v for k, v in big.state_dict().items()}, model)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.pos_embed[:, 0], big.pos_embed[:, 0])
    same = resize_pos_embed(big.pos_embed, (16, 16))
    assert same is big.pos_embed


def test_presets_match_the_paper():
    """ViT sizes (Dosovitskiy et al. 2021) and the 512-wide, 8-block, 16-head decoder of the MAE paper."""
    expect = {"mae_vit_base_patch16": (768, 12, 12, 16), "mae_vit_large_patch16": (1024, 24, 16, 16),
              "mae_vit_huge_patch14": (1280, 32, 16, 14)}  # fmt: skip
    for name, (width, depth, heads, patch) in expect.items():
        c = PRESETS[name]
        assert (c.embed_dim, c.depth, c.num_heads, c.patch_size) == (width, depth, heads, patch)
        assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (512, 8, 16)
    base = create_model("mae_vit_base_patch16")
    assert abs(sum(p.numel() for p in base.parameters()) / 1e6 - 111.9) < 0.1  # official MAE-Base: 111.9M


def test_masked_encoder_embeds_like_timm_patch_conv(model):
    """The encoder embeds cut-out patches with the conv's weight as a linear map: the same
    tokens as timm's patch conv over the image, and with nothing masked and the order kept,
    the same features as the unmasked path (forward_features)."""
    torch.manual_seed(2)
    imgs = torch.randn(2, 3, 32, 32)
    proj = model.patch_embed.proj
    conv = torch.nn.functional.conv2d(imgs, proj.weight, proj.bias, stride=4).flatten(2).transpose(1, 2)
    assert torch.allclose(model.patch_embed(model.patch_pixels(imgs)), conv, atol=1e-5)
    L = model.cfg.num_patches
    noise = torch.arange(L, dtype=torch.float).expand(2, L)  # ascending: keeps every patch in order
    latent, mask, _ = model.forward_encoder(imgs, 0.0, noise)
    assert mask.sum() == 0
    assert torch.allclose(latent, model.forward_features(imgs), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        model.forward_encoder(torch.randn(2, 3, 48, 48), 0.75)


# ------------------------------------------------------------ feed-forward mixer, position tables


@pytest.mark.parametrize("mixer", ["attention", "feedforward"])
def test_hidden_patches_never_reach_the_encoder(mixer):
    """Changing the pixels of the masked patches leaves the encoder's output unchanged."""
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(MAEConfig(**SMALL, mixer=mixer)).eval()
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 64)
    latent, mask, _ = mae.forward_encoder(imgs, 0.75, noise)
    pixel_mask = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48))  # 1 on hidden pixels
    changed = imgs + pixel_mask * torch.randn_like(imgs) * 10
    assert not torch.equal(changed, imgs)
    assert torch.equal(mae.forward_encoder(changed, 0.75, noise)[0], latent)
    visible_changed = imgs + (1 - pixel_mask) * 0.1
    assert not torch.allclose(mae.forward_encoder(visible_changed, 0.75, noise)[0], latent)


def test_feedforward_block_is_the_authors_block():
    """Feature MLP, then LayerNorm over tokens and an MLP across tokens (tokens -> 4 x tokens
    -> tokens, GELU), each residual: a hand-written version of Melas-Kyriazi's block."""
    from mae.models.mae_vit import FeedForwardBlock

    torch.manual_seed(0)
    blk = FeedForwardBlock(dim=8, num_tokens=5, mlp_ratio=4.0)
    pm = blk.patch_mlp
    assert (pm.fc1.in_features, pm.fc1.out_features, pm.norm.normalized_shape) == (5, 20, (5,))
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 5, 8)
    f = torch.nn.functional
    y = x + blk.mlp.fc2(f.gelu(blk.mlp.fc1(f.layer_norm(x, (8,), blk.norm1.weight, blk.norm1.bias, 1e-6))))
    t = f.layer_norm(y.transpose(1, 2), (5,), pm.norm.weight, pm.norm.bias, 1e-6)  # [B, D, N]: over tokens
    want = y + (f.gelu(t @ pm.fc1.weight.T + pm.fc1.bias) @ pm.fc2.weight.T + pm.fc2.bias).transpose(1, 2)
    assert torch.allclose(blk(x), want, atol=1e-5)


def test_patch_mlp_on_visible_tokens_uses_their_weights_scaled_as_inverted_dropout():
    """On a subset, the patch MLP equals the layer cut down to those tokens (norm, fc1 columns,
    fc2 rows), with the patch columns of fc1 scaled by patches / visible patches; with every
    token in order it equals the plain layer."""
    from mae.models.mae_vit import PatchMlp

    torch.manual_seed(0)
    pm = PatchMlp(num_tokens=9)  # cls + 8 patches
    for p in pm.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 6)
    ids = torch.tensor([[0, 5, 2], [0, 1, 8]])
    got = pm(x, ids)
    for n in range(2):
        sub = PatchMlp(num_tokens=3, hidden_ratio=12.0)  # the full layer's 36 hidden units
        keep = ids[n]
        scale = torch.tensor([1.0, 8 / 2, 8 / 2])
        with torch.no_grad():
            sub.norm.weight.copy_(pm.norm.weight[keep]), sub.norm.bias.copy_(pm.norm.bias[keep])
            sub.fc1.weight.copy_(pm.fc1.weight[:, keep] * scale), sub.fc1.bias.copy_(pm.fc1.bias)
            sub.fc2.weight.copy_(pm.fc2.weight[keep]), sub.fc2.bias.copy_(pm.fc2.bias[keep])
        assert torch.allclose(got[n], sub(x[n : n + 1])[0], atol=1e-5)
    full = torch.randn(2, 9, 6)
    assert torch.allclose(pm(full, torch.arange(9).expand(2, 9)), pm(full), atol=1e-5)


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch4_32", "mae_vit_tiny_patch16", "mae_vit_small_patch16"])
def test_feedforward_encoder_loads_strictly_into_the_registered_timm_model(name):
    """mixer=feedforward exports under vit_ff_* names; strict load, same features, same pooled output."""
    torch.manual_seed(0)
    mae = create_model(name, mixer="feedforward", depth=2).eval()
    c = mae.cfg
    assert c.timm_model == c.timm_name.replace("vit_", "vit_ff_")
    vit = timm.create_model(c.timm_model, pretrained=False, num_classes=0, **c.timm_kwargs()).eval()
    vit.load_state_dict(mae.encoder_state_dict(), strict=True)
    x = torch.randn(2, 3, c.img_size, c.img_size)
    with torch.no_grad():
        ours = mae.forward_features(x)
        assert torch.allclose(ours, vit.forward_features(x), atol=1e-5)
        assert torch.allclose(mae.pool(ours), vit(x), atol=1e-5)
        in_order = torch.arange(c.num_patches, dtype=torch.float).expand(2, -1)  # nothing hidden, order kept
        assert torch.allclose(mae.forward_encoder(x, 0.0, in_order)[0], ours, atol=1e-5)


def test_registered_feedforward_models_match_the_report_and_train_at_cifar_size():
    """FF-tiny 7.7M and FF-base 62M parameters (Melas-Kyriazi 2021, Table 1); other sizes via img_size/patch_size."""
    counts = {}
    for name in ("vit_ff_tiny_patch16_224", "vit_ff_base_patch16_224"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in timm.create_model(name).parameters()) / 1e6
    assert counts["vit_ff_tiny_patch16_224"] == pytest.approx(7.7, abs=0.05)
    assert counts["vit_ff_base_patch16_224"] == pytest.approx(62.0, abs=0.1)
    small = timm.create_model("vit_ff_small_patch16_224", img_size=32, patch_size=4, num_classes=10, depth=2)
    assert small.blocks[0].patch_mlp.fc1.weight.shape == (4 * 65, 65)
    small(torch.randn(2, 3, 32, 32)).sum().backward()
    assert small.blocks[0].patch_mlp.fc1.weight.grad is not None
    with pytest.raises(ValueError, match="no feed-forward timm model"):
        create_model("mae_vit_large_patch16", mixer="feedforward")


def test_sincos1d_table_follows_the_patch_index():
    """The Transformer's table over the patch index: sin(i w_k) then cos(i w_k), cls zeros."""
    from mae.models.pos_embed import sincos_1d_table

    D, L = 8, 6
    table = sincos_1d_table(D, L)
    assert table.shape == (L + 1, D) and torch.all(table[0] == 0)
    for i in range(L):
        for k in range(D // 2):
            w = 1 / 10000 ** (k / (D / 2))
            assert math.isclose(table[1 + i, k], math.sin(i * w), abs_tol=1e-6)
            assert math.isclose(table[1 + i, D // 2 + k], math.cos(i * w), abs_tol=1e-6)


@pytest.mark.parametrize("kind", ["sincos", "sincos1d", "learned", "none"])
@pytest.mark.parametrize("mixer", ["attention", "feedforward"])
def test_every_position_table_exports_and_loads_into_timm(kind, mixer):
    """Fixed tables stay fixed, ``none`` is zeros; each loads strictly into timm with equal features."""
    from mae.models.pos_embed import sincos_1d_table

    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch4_32", pos_embed=kind, mixer=mixer, depth=1)
    expected = {"sincos": sincos_2d(192, 8, 8), "sincos1d": sincos_1d_table(192, 64), "none": torch.zeros(65, 192)}
    if kind in expected:
        assert torch.equal(mae.pos_embed[0], expected[kind])
    mae(torch.randn(2, 3, 32, 32))[0].backward()
    assert (mae.pos_embed.grad is not None) == (kind == "learned")
    assert torch.equal(mae.decoder_pos_embed[0], sincos_2d(128, 8, 8)) == (kind != "learned")
    c = mae.eval().cfg
    vit = timm.create_model(c.timm_model, pretrained=False, num_classes=0, **c.timm_kwargs()).eval()
    vit.load_state_dict(mae.encoder_state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(mae.forward_features(x), vit.forward_features(x), atol=1e-5)


@pytest.mark.parametrize("layout", ["row_major", "transposed", "strided"])
def test_onednn_linear_forward_and_gradients_match_an_fp64_reference(layout: str) -> None:
    """The fp32 products the model runs on CPU (oneDNN, transposed operands read in place,
    other layouts copied first) give F.linear's output and gradients to fp32 rounding."""
    from mae.models.linear import linear, onednn_applies

    torch.manual_seed(0)
    w = torch.randn(96, 80, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    base = torch.randn(300, 80) if layout != "transposed" else torch.randn(80, 300)
    x = {"row_major": base, "transposed": base.t(), "strided": base[::3]}[layout].detach().requires_grad_()
    assert onednn_applies(x, w) == torch.backends.mkldnn.is_available()
    out = linear(x, w, b)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.nn.functional.linear(x64, w64, b64)
    ref.backward(grad.double())
    for got, want in ((out, ref), (x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max(), layout


def test_attention_under_cpu_bf16_autocast_runs_in_fp32() -> None:
    """On CPU under bf16 autocast the attention is computed in fp32 (faster there, and more
    precise): the same values as fp32 attention of the bf16 q, k, v, gradients included."""
    from mae.models.mae_vit import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.float32
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    out.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    plain = attention(q.detach().float(), k.detach().float(), v.detach().float())  # no autocast: as given
    assert plain.dtype == torch.float32
