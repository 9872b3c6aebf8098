"""Masked autoencoder with a ViT encoder (He et al. 2021, "Masked Autoencoders Are
Scalable Vision Learners").

Reads top to bottom: config, building blocks, the model in the order its forward runs
(patchify, random_masking, forward_encoder, forward_decoder, forward_loss), then the
named presets. Parameter names follow timm's ``VisionTransformer`` for the encoder and
the official MAE release for the decoder, so encoder weights load into timm with
``strict=True`` and released MAE checkpoints load into this model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

from .linear import linear, use_onednn_linears
from .pos_embed import resize_pos_embed, sincos_2d

# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MAEConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mixer: str = "attention"  # token mixer of every block; see MIXERS
    pos_embed: str = "sincos"  # "sincos" (fixed, as the paper) or "learned"
    global_pool: str = "token"  # pooled feature: "token" (cls) or "avg" (mean of patches)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # target = each patch normalised by its own mean and variance
    drop_path_rate: float = 0.0
    timm_name: str = "vit_base_patch16_224"  # timm architecture the encoder matches

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {self.mixer!r}")
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {self.pos_embed!r}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for width, heads, where in ((self.embed_dim, self.num_heads, ""), (self.decoder_embed_dim, self.decoder_num_heads, "decoder_")):
            if width % heads:
                raise ValueError(f"{where}embed_dim {width} is not divisible by {where}num_heads {heads}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def timm_kwargs(self) -> dict[str, Any]:
        """Arguments that make ``timm.create_model(self.timm_name, **kwargs)`` match the encoder."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, global_pool=self.global_pool)


# --------------------------------------------------------------------- building blocks


class PatchProjection(nn.Conv2d):
    """timm's patch conv, applied to patches already cut out of the image: [N, K, C*p*p] -> [N, K, D].

    A conv whose stride equals its kernel is one linear map per patch, so the encoder can
    embed only the visible patches. The weight keeps the conv's shape [D, C, p, p] for timm.
    The product happens in this module's own forward so that DeepSpeed ZeRO-3, which
    gathers a module's weights when that module is called, sees it.
    """

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return linear(patches, self.weight.flatten(1), self.bias)


class PatchEmbed(nn.Module):
    """Holds the projection under timm's name, ``patch_embed.proj``."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = PatchProjection(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class Attention(nn.Module):
    """Multi-head self-attention over whatever tokens it is given (visible ones only, in MAE)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # Split on the [B, N, 3, heads, head_dim] view and transpose each part: the backward
        # pass then writes the q, k, v gradients straight into the fused layout (no extra copy).
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


# Token mixers by name. A new mixer (such as the feed-forward-across-patches layer of
# Melas-Kyriazi 2021) registers here and becomes a value of MAEConfig.mixer.
MIXERS: dict[str, Callable[[int, int], nn.Module]] = {"attention": Attention}


class Block(nn.Module):
    """Pre-norm transformer block; the token mixer keeps timm's name ``attn``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mixer: str = "attention", drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MIXERS[mixer](dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ------------------------------------------------------------------------------- model


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, Dd, L = cfg.embed_dim, cfg.decoder_embed_dim, cfg.num_patches
        learned = cfg.pos_embed == "learned"

        # encoder, named as timm's VisionTransformer
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D), requires_grad=learned)
        dpr = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # stochastic depth rule
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.mixer, dpr[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)

        # decoder, named as the official MAE release; narrower and shallower than the encoder
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, Dd), requires_grad=learned)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.mixer) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size**2 * cfg.in_chans)
        use_onednn_linears(self)  # fp32 products on CPU by oneDNN (mae/models/linear.py)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As the official release: sin-cos tables, xavier-uniform linears, normal(0.02) tokens."""
        cfg = self.cfg
        if cfg.pos_embed == "sincos":
            self.pos_embed.data.copy_(sincos_2d(cfg.embed_dim, cfg.grid_size, cfg.grid_size)[None])
            self.decoder_pos_embed.data.copy_(sincos_2d(cfg.decoder_embed_dim, cfg.grid_size, cfg.grid_size)[None])
        else:
            trunc_normal_(self.pos_embed, std=0.02)
            trunc_normal_(self.decoder_pos_embed, std=0.02)
        # the patch projection is a linear layer applied per patch: initialise it as one
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters besides norms and biases that weight decay must not shrink."""
        return {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}

    # -- pixels <-> patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], each patch's pixels in (row, col, channel) order."""
        p, c = self.cfg.patch_size, self.cfg.in_chans
        N, _, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(N, c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * c)

    def patch_pixels(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, C*p*p] in the (channel, row, col) order of the patch
        projection's flattened weight; checks the size the position table was built for."""
        p, c, size = self.cfg.patch_size, self.cfg.in_chans, self.cfg.img_size
        N, C, H, W = imgs.shape
        if (C, H, W) != (c, size, size):
            raise ValueError(f"expected images of shape [N, {c}, {size}, {size}], got {list(imgs.shape)}")
        x = imgs.reshape(N, c, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(N, (H // p) * (W // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]; the inverse of patchify for square grids."""
        p, c = self.cfg.patch_size, self.cfg.in_chans
        h = w = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # -- masking

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random ``(1 - mask_ratio)`` of each sample's patches.

        x: [N, L, D]. Sorting uniform noise gives every sample its own random
        permutation; the first ``len_keep`` positions are kept.
        Returns the kept tokens [N, len_keep, D], the mask [N, L] (0 keep, 1 remove,
        in the original patch order) and ids_restore [N, L] that undoes the shuffle.
        """
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    # -- encoder

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heavy part runs on the cls token plus visible patches only: [N, 1 + len_keep, D]."""
        # Mask first, embed after: the patch projection acts on each patch alone, so only the
        # visible quarter needs it (the same result as timm's conv over every patch, for less).
        N = imgs.shape[0]
        tokens = torch.cat([self.patch_pixels(imgs), self.pos_embed[:, 1:].expand(N, -1, -1)], dim=-1)
        tokens, mask, ids_restore = self.random_masking(tokens, mask_ratio, noise)
        pixels, pos = tokens.split([tokens.shape[-1] - self.cfg.embed_dim, self.cfg.embed_dim], dim=-1)
        x = self.patch_embed(pixels) + pos  # [N, len_keep, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All tokens, no masking: [N, 1 + L, D], as timm's ``forward_features``."""
        x = self.patch_embed(self.patch_pixels(imgs)) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, 1 + L, D] -> [N, D] by the configured pooling."""
        return tokens[:, 0] if self.cfg.global_pool == "token" else tokens[:, 1:].mean(dim=1)

    # -- decoder

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """[N, 1 + len_keep, D] -> predicted pixels of every patch [N, L, p*p*C]."""
        x = self.decoder_embed(x)  # [N, 1 + len_keep, Dd]
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd], still in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop the cls token

    # -- loss

    def pixel_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] regression target, normalised per patch when norm_pix_loss is on."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only; visible ones carry no loss."""
        per_patch = ((pred.float() - self.pixel_target(imgs).float()) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred [N, L, p*p*C], mask [N, L]). ``noise`` [N, L] fixes the masks."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
        if noise is not None and tuple(noise.shape) != (imgs.shape[0], self.cfg.num_patches):
            raise ValueError(f"noise must have shape [N, num_patches] = [{imgs.shape[0]}, {self.cfg.num_patches}] "
                             f"for these images, got {list(noise.shape)}")  # fmt: skip
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # -- hand-off

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder alone, in timm ``VisionTransformer`` names (no decoder, no head)."""
        return encoder_only(self.state_dict())


DECODER_PREFIXES = ("decoder_", "mask_token")


def encoder_only(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the decoder's weights (and DDP's ``module.`` prefix) from a full MAE state dict."""
    out = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return {k: v for k, v in out.items() if not k.startswith(DECODER_PREFIXES)}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    """Adapt weights from elsewhere to ``model``: unwrap ``{'model': ...}`` (the official
    release), strip DDP's ``module.`` prefix, resize position tables to the model's grid."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if k in ("pos_embed", "decoder_pos_embed") and v.shape != getattr(model, k).shape:
            v = resize_pos_embed(v, (model.cfg.grid_size, model.cfg.grid_size))
        out[k] = v
    return out


# ----------------------------------------------------------------------------- presets

# Encoders as ViT (Dosovitskiy et al. 2021) and DeiT; decoder 512 wide, 8 blocks,
# 16 heads as the MAE paper uses for B, L and H.
PRESETS: dict[str, MAEConfig] = {
    "mae_vit_tiny_patch16": MAEConfig(embed_dim=192, depth=12, num_heads=3, timm_name="vit_tiny_patch16_224"),
    "mae_vit_small_patch16": MAEConfig(embed_dim=384, depth=12, num_heads=6, timm_name="vit_small_patch16_224"),
    "mae_vit_base_patch16": MAEConfig(embed_dim=768, depth=12, num_heads=12, timm_name="vit_base_patch16_224"),
    "mae_vit_large_patch16": MAEConfig(embed_dim=1024, depth=24, num_heads=16, timm_name="vit_large_patch16_224"),
    "mae_vit_huge_patch14": MAEConfig(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, timm_name="vit_huge_patch14_224"
    ),
    # CIFAR scale: 32x32 images in 4x4 patches (an 8x8 grid), a ViT-Tiny encoder and a
    # small decoder, so a run on two CPU cores takes minutes.
    "mae_vit_tiny_patch4_32": MAEConfig(
        img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, timm_name="vit_tiny_patch16_224",
    ),
}  # fmt: skip


def create_model(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    """A preset by name, with any ``MAEConfig`` field overridden."""
    return MaskedAutoencoderViT(preset_config(name, **overrides))


def preset_config(name: str, **overrides: Any) -> MAEConfig:
    """A preset's config with fields overridden; unknown names and fields are errors."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(MAEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return replace(PRESETS[name], **overrides)
