"""Masked autoencoder with a ViT encoder (He et al. 2021, "Masked Autoencoders Are
Scalable Vision Learners").

Reads top to bottom: config, building blocks, the model in the order its forward runs
(patchify, random_masking, forward_encoder, forward_decoder, forward_loss), then the
named presets. Parameter names follow timm's ``VisionTransformer`` for the encoder and
the official MAE release for the decoder, so encoder weights load into timm with
``strict=True`` and released MAE checkpoints load into this model.

Token mixers (``MAEConfig.mixer``, the ``MIXERS`` table): ``attention`` is the ViT block;
``feedforward`` is the block of Melas-Kyriazi 2021 ("Do You Even Need Attention?"), in
the author's order: a feature MLP, then a patch MLP across tokens. Its weights, per
block ``blocks[i]`` (a ``FeedForwardBlock``):

- ``norm1`` (LayerNorm over features) and ``mlp`` (``fc1``, ``fc2``: D -> 4D -> D), as in ViT;
- ``patch_mlp`` (a ``PatchMlp``): ``norm`` is a LayerNorm over the token axis (weight [T]),
  ``fc1.weight`` [4T, T] and ``fc2.weight`` [T, 4T] mix tokens, with T = 1 + L tokens in
  the encoder's order: index 0 the class token, index 1 + r * g + c the patch at row r,
  column c of the g x g grid. Column j of ``fc1.weight`` is how token j feeds the hidden
  units, row i of ``fc2.weight`` how the hidden units feed token i; the token-to-token map
  of a block is their composition through the GELU.

MAE pretraining of the feed-forward encoder (design (b) in docs/PAPERS.md): the encoder runs on
the class token and the visible patches only, and each patch MLP uses the rows and
columns of its weights at those tokens' positions (``PatchMlp.forward`` with
``token_ids``). Why this and not the others:

- it keeps MAE's point, an encoder that never sees the hidden patches and does a quarter
  of the work (MAE Table 2: with mask tokens in the encoder, 2.8x the time and a worse
  fine-tune). (a), mask tokens on the full sequence, gives that up, and (c), a fixed
  lattice, works for one sampling at one ratio only, while (b) serves every sampling and
  ratio (and the grid one too);
- the weights keep the full sequence's shape, so the exported encoder is exactly the
  supervised ``vit_ff_*`` timm model's and loads strictly for the probe and fine-tuning.

The price is a train/test gap, which two choices keep small: the LayerNorm over tokens
normalises over the visible tokens (the same per-channel statistics, estimated from a
quarter of them), and the patch tokens' columns of ``fc1`` are scaled by
L / visible, as inverted dropout scales the units it keeps, so a hidden unit's expected
input over random masks equals its input on the full sequence that the probe and
fine-tuning give it. With nothing hidden the scale is 1 and the path equals the plain one.
The decoder keeps attention (``decoder_mixer``) unless asked: it is discarded after
pretraining, and the question is the encoder's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

from .linear import linear, use_onednn_linears
from .masking import num_kept
from .pos_embed import resize_pos_embed, sincos_1d_table, sincos_2d

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
    mixer: str = "attention"  # token mixer of every encoder block; see MIXERS
    decoder_mixer: str = "attention"  # token mixer of every decoder block
    # encoder position table: "sincos" (fixed 2-D, as the paper), "sincos1d" (fixed, over the
    # patch index, as the Transformer), "learned", or "none" (zeros, not trained). The
    # decoder's table is learned when the encoder's is, else the fixed 2-D one: without
    # positions the decoder could not tell its mask tokens apart.
    pos_embed: str = "sincos"
    global_pool: str = "token"  # pooled feature: "token" (cls) or "avg" (mean of patches)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # target = each patch normalised by its own mean and variance
    drop_path_rate: float = 0.0
    timm_name: str = "vit_base_patch16_224"  # timm architecture the encoder matches

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for key in ("mixer", "decoder_mixer"):
            if getattr(self, key) not in MIXERS:
                raise ValueError(f"{key} must be one of {sorted(MIXERS)}, got {getattr(self, key)!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBEDS)}, got {self.pos_embed!r}")
        if self.mixer == "feedforward" and not self.timm_model.startswith("vit_ff_"):
            raise ValueError(f"mixer=feedforward: no feed-forward timm model for {self.timm_name}; "
                             "use a tiny, small or base preset")
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

    @property
    def timm_model(self) -> str:
        """The timm name of the encoder: ``timm_name``, or its ``vit_ff_`` twin for the
        feed-forward mixer (registered by ``mae.models.vit_ff``)."""
        if self.mixer == "feedforward":
            return FF_TIMM_NAMES.get(self.timm_name, self.timm_name)
        return self.timm_name

    def timm_kwargs(self) -> dict[str, Any]:
        """Arguments that make ``timm.create_model(self.timm_model, **kwargs)`` match the encoder."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, global_pool=self.global_pool)


POS_EMBEDS = ("sincos", "sincos1d", "learned", "none")
# timm names of the feed-forward encoders, by the attention model of the same size
FF_TIMM_NAMES = {f"vit_{size}_patch16_224": f"vit_ff_{size}_patch16_224" for size in ("tiny", "small", "base")}

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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention; on CPU under bf16 autocast computed in fp32, which is
    both more precise and, with torch's CPU flash-attention kernel at ViT head sizes, 1.3 to
    3.6x faster than in bf16 (forward and backward; BENCHMARKS.md, issue 10)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return F.scaled_dot_product_attention(q, k, v)


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
        x = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block; the token mixer keeps timm's name ``attn``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, T, D]; attention needs no positions, so ``token_ids`` goes unused."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TokenNorm(nn.LayerNorm):
    """LayerNorm over the token axis (the last one of [N, D, K]); on a subset of tokens
    (``token_ids`` [N, K]) it normalises over those and takes their weights and biases."""

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_ids is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # nn.LayerNorm's own
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x * self.weight[token_ids].unsqueeze(1) + self.bias[token_ids].unsqueeze(1)


class TokensIn(nn.Linear):
    """tokens -> hidden; on a subset, the weight's columns at ``token_ids``, the patch
    columns scaled by patches / visible patches (inverted dropout; index 0 is the class token)."""

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_ids is None:
            return F.linear(x, self.weight, self.bias)  # nn.Linear's own
        scale = torch.where(token_ids == 0, 1.0, (self.in_features - 1) / (token_ids.shape[1] - 1))  # [N, K]
        w = self.weight.t()[token_ids] * scale.unsqueeze(-1).to(x.dtype)  # [N, K, hidden]
        return torch.baddbmm(self.bias.to(x.dtype), x, w)  # [N, D, K] @ [N, K, hidden]


class TokensOut(nn.Linear):
    """hidden -> tokens; on a subset, only the outputs (weight rows, biases) at ``token_ids``."""

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_ids is None:
            return F.linear(x, self.weight, self.bias)  # nn.Linear's own
        w = self.weight[token_ids].transpose(1, 2)  # [N, hidden, K]
        return torch.baddbmm(self.bias[token_ids].unsqueeze(1).to(x.dtype), x, w)  # [N, D, K]


class PatchMlp(nn.Module):
    """The feed-forward layer across tokens (Melas-Kyriazi 2021): per feature channel, a
    LayerNorm over the token axis, then tokens -> 4 x tokens -> tokens with GELU.

    ``token_ids`` [N, K] (positions in the full sequence of ``num_tokens``, 0 the class
    token) runs it on a subset, with each layer's weights at those positions (the model
    docstring says why). Each layer does its own product, so DeepSpeed ZeRO-3, which
    gathers a module's weights when that module is called, sees it; on the full sequence
    each calls ``F.layer_norm``/``F.linear`` itself, as its base class would, because
    TorchScript cannot compile ``super().forward``.
    """

    def __init__(self, num_tokens: int, hidden_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(num_tokens * hidden_ratio)
        self.norm = TokenNorm(num_tokens, eps=1e-6)
        self.fc1 = TokensIn(num_tokens, hidden)
        self.act = nn.GELU()
        self.fc2 = TokensOut(hidden, num_tokens)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[N, K, D] -> [N, K, D]; K = num_tokens unless ``token_ids`` names the K tokens."""
        x = x.transpose(1, 2)  # [N, D, K]: the token axis last, where norm and linears act
        x = self.fc2(self.act(self.fc1(self.norm(x, token_ids), token_ids)), token_ids)
        return x.transpose(1, 2)


class FeedForwardBlock(nn.Module):
    """Attention replaced by a patch MLP (Melas-Kyriazi 2021), pre-norm and residual, in the
    author's order: feature MLP, then patch MLP. ``mlp`` keeps timm's names."""

    def __init__(self, dim: int, num_tokens: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.patch_mlp = PatchMlp(num_tokens, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:  # fmt: skip
        """x [N, T, D]: all ``num_tokens`` tokens, or the ones ``token_ids`` [N, T] names.
        ``attn_mask`` and ``is_causal`` are the arguments timm's ``VisionTransformer`` gives
        its blocks (FX tracing passes them as placeholders); a patch MLP mixes every token,
        so there is nothing to mask: a real mask or ``is_causal=True`` is refused."""
        if isinstance(attn_mask, torch.Tensor) or (isinstance(is_causal, bool) and is_causal):
            raise ValueError("FeedForwardBlock: attn_mask/is_causal given, but a patch MLP has no attention to mask; "
                             "drop them or use an attention ViT")  # fmt: skip
        x = x + self.drop_path(self.mlp(self.norm1(x)))
        return x + self.drop_path(self.patch_mlp(x, token_ids))


# Blocks by token mixer (MAEConfig.mixer, decoder_mixer), built from
# (dim, num_heads, num_tokens, mlp_ratio, drop_path); each takes what it needs.
MIXERS: dict[str, Callable[[int, int, int, float, float], nn.Module]] = {
    "attention": lambda dim, heads, tokens, ratio, dp: Block(dim, heads, ratio, dp),
    "feedforward": lambda dim, heads, tokens, ratio, dp: FeedForwardBlock(dim, tokens, ratio, dp),
}


# ------------------------------------------------------------------------------- model


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, Dd, L = cfg.embed_dim, cfg.decoder_embed_dim, cfg.num_patches
        learned = cfg.pos_embed == "learned"  # the decoder's table follows: learned or fixed

        # encoder, named as timm's VisionTransformer
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D), requires_grad=learned)
        dpr = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # stochastic depth rule
        self.blocks = nn.ModuleList(MIXERS[cfg.mixer](D, cfg.num_heads, L + 1, cfg.mlp_ratio, dpr[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)

        # decoder, named as the official MAE release; narrower and shallower than the encoder
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, Dd), requires_grad=learned)
        self.decoder_blocks = nn.ModuleList(
            MIXERS[cfg.decoder_mixer](Dd, cfg.decoder_num_heads, L + 1, cfg.mlp_ratio, 0.0) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size**2 * cfg.in_chans)
        use_onednn_linears(self)  # fp32 products on CPU by oneDNN (mae/models/linear.py)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As the official release: sin-cos tables, xavier-uniform linears, normal(0.02) tokens."""
        cfg = self.cfg
        g = cfg.grid_size
        if cfg.pos_embed == "learned":
            trunc_normal_(self.pos_embed, std=0.02)
            trunc_normal_(self.decoder_pos_embed, std=0.02)
        else:
            tables = {"sincos": lambda: sincos_2d(cfg.embed_dim, g, g), "none": lambda: torch.zeros(1 + g * g, cfg.embed_dim),
                      "sincos1d": lambda: sincos_1d_table(cfg.embed_dim, g * g)}  # fmt: skip
            self.pos_embed.data.copy_(tables[cfg.pos_embed]()[None])
            self.decoder_pos_embed.data.copy_(sincos_2d(cfg.decoder_embed_dim, g, g)[None])
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

    def masking_ids(
        self, batch: int, mask_ratio: float, noise: torch.Tensor | None = None, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which patches each sample keeps: the ``len_keep`` of smallest noise.

        Sorting uniform noise gives every sample its own random permutation; other
        samplings (``mae.models.masking``) shape the noise. Returns ids_keep [N, len_keep]
        (patch indices in the order the encoder sees them), the mask [N, L] (0 keep,
        1 remove, in the original patch order) and ids_restore [N, L] that undoes the shuffle.
        """
        L = self.cfg.num_patches
        len_keep = num_kept(L, mask_ratio)
        if noise is None:
            noise = torch.rand(batch, L, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(batch, L, device=noise.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_shuffle[:, :len_keep], mask, ids_restore

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep ``(1 - mask_ratio)`` of each sample's tokens x [N, L, D]: the kept tokens
        [N, len_keep, D], the mask [N, L] and ids_restore [N, L] (see ``masking_ids``)."""
        ids_keep, mask, ids_restore = self.masking_ids(x.shape[0], mask_ratio, noise, x.device)
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return x_kept, mask, ids_restore

    # -- encoder

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heavy part runs on the cls token plus visible patches only: [N, 1 + len_keep, D]."""
        # Mask first, embed after: the patch projection acts on each patch alone, so only the
        # visible quarter needs it (the same result as timm's conv over every patch, for less).
        N = imgs.shape[0]
        ids_keep, mask, ids_restore = self.masking_ids(N, mask_ratio, noise, imgs.device)
        tokens = torch.cat([self.patch_pixels(imgs), self.pos_embed[:, 1:].expand(N, -1, -1)], dim=-1)
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        pixels, pos = tokens.split([tokens.shape[-1] - self.cfg.embed_dim, self.cfg.embed_dim], dim=-1)
        x = self.patch_embed(pixels) + pos  # [N, len_keep, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1)
        x = torch.cat([cls, x], dim=1)
        # each token's place in the full sequence (cls 0, patch i at 1 + i), for the patch MLP
        token_ids = torch.cat([ids_keep.new_zeros(N, 1), ids_keep + 1], dim=1)
        for blk in self.blocks:
            x = blk(x, token_ids)
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


# a pretraining run's settings that are MAEConfig fields too, besides model and model_overrides
RUN_MODEL_KEYS = ("mask_ratio", "norm_pix_loss")


def model_config(run: Mapping[str, Any]) -> MAEConfig:
    """The autoencoder a pretraining run builds, from its settings: the stage's config as a
    mapping, its ``config.yaml`` or the config its checkpoints record. Only ``model``,
    ``model_overrides``, ``mask_ratio`` and ``norm_pix_loss`` are read, so a model is rebuilt
    here, next to the presets, without importing the stage or checking its other keys."""
    settings = {k: run[k] for k in RUN_MODEL_KEYS if k in run}
    return preset_config(run["model"], **settings, **(run.get("model_overrides") or {}))
