"""What an encoder learned: the analyses of the ViT paper's Figure 7 (Dosovitskiy et al.
2021), computed on any timm-style ViT (``patch_embed.proj``, ``pos_embed``, ``blocks``
whose token mixer is ``attn`` or, in the feed-forward encoder, ``patch_mlp``).

- **Mean attention distance** per head and depth: for each query patch i, sum_j A[i, j]
  d(i, j), with d the distance in pixels between patch centres, averaged over query
  patches and images. A is the patch-to-patch part of the attention (class-token row and
  column dropped, rows not renormalised), as the paper and its reference implementations
  (sayakpaul/probing-vits) compute it; the share of attention on the class token, which
  therefore counts as distance 0, is reported beside it.
- **Mean mixing distance** of a feed-forward encoder, whose token mixer is an MLP across
  patches: the same sum with A replaced by the mixer's normalised absolute Jacobian over
  real activations, W[i, j] = mean over channels c of |d y[i, c] / d x[j, c]|, divided by
  its row sum over all tokens (class token included). Both are weighted means of the same
  pixel distances with weights that sum to one over the inputs of the mixer, so the two
  numbers compare directly (identity mixing is 0; uniform mixing gives the grid's mean
  distance). The residual path is left out of both.
- **Position-embedding similarity**: cosine similarity of each patch's position embedding
  with every other patch's.
- **Patch-embedding filters**: the top principal components of the linear patch
  projection's filters (centred over filters), each a p x p x C picture.
- **Class-token maps** of the last block: the class token's attention to each patch, or,
  for a feed-forward encoder, its mixing weight (how strongly each patch feeds it).

Attention probabilities are recomputed from each block's ``qkv`` on the block's real
input (captured with a forward pre-hook): the models use fused attention, which returns
no weights, and their training path stays untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import jacrev, vmap

from .data.transforms import denormalize
from .files import write_atomic
from .models.mae_vit import MaskedAutoencoderViT
from .models.masking import SAMPLINGS as MASK_SAMPLINGS
from .models.masking import check_sampling, mask_noise
from .sources import Source, load_source, read_images
from .visualize import (plot_mean_distance, reconstruct, save_class_token_maps, save_filter_components,
                        save_position_similarity, save_reconstruction_grid)  # fmt: skip

ATTENTION, FEEDFORWARD = "attention", "feedforward"


class AnalysisError(ValueError):
    """An analysis the given model cannot give (e.g. attention maps of a feed-forward encoder)."""


# ------------------------------------------------------------------- the computations


def patch_distances(grid: int, patch_size: int) -> torch.Tensor:
    """[L, L] Euclidean distance in pixels between the centres of patches (row-major grid)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def mean_distance(weights: torch.Tensor, distances: torch.Tensor, prefix: int) -> torch.Tensor:
    """weights [B, H, N, N] (rows: queries, columns: inputs; N = prefix + L) -> [B, H]:
    per image and head, sum_j w[i, j] d(i, j) over patches j, averaged over query patches i.
    The prefix (class token) rows and columns are dropped, not renormalised."""
    w = weights[..., prefix:, prefix:].double()
    return (w * distances.to(w.device)).sum(-1).mean(-1)


def prefix_share(weights: torch.Tensor, prefix: int) -> torch.Tensor:
    """weights [B, H, N, N] -> [B, H]: the weight patch queries give the prefix tokens, on average."""
    return weights[..., prefix:, :prefix].double().sum(-1).mean(-1)


def attention_probabilities(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) [B, H, N, N] of an attention module (this project's or
    timm's: ``qkv``, ``num_heads``, optional ``q_norm``/``k_norm``) on its input x [B, N, C]."""
    B, N, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


def mixing_weights(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, N, N] normalised absolute Jacobian of a token mixer that mixes each channel on its
    own (the feed-forward encoder's patch MLP) on its input x [B, N, D]:
    W[b, i, j] = mean_c |d y[b, i, c] / d x[b, j, c]|, each row divided by its sum."""
    B, N, D = x.shape

    def one_channel(v: torch.Tensor) -> torch.Tensor:  # [N] -> [N]: the mixer on one channel
        return mixer(v[None, :, None])[0, :, 0]

    jac = vmap(jacrev(one_channel))(x.detach().float().transpose(1, 2).reshape(B * D, N))  # [B*D, N(i), N(j)]
    w = jac.abs().reshape(B, D, N, N).mean(1)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def position_similarity(table: torch.Tensor) -> torch.Tensor:
    """[L, D] position embeddings -> [L, L] cosine similarities."""
    t = F.normalize(table.double(), dim=-1)
    return t @ t.T


def filter_components(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal components of patch filters [D, C, p, p] (each filter one sample,
    centred over filters) -> components [k, C, p, p] of unit norm, each signed so that its
    largest entry is positive, and the fraction of the variance each explains [k]."""
    x = weight.detach().double().flatten(1)
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, vh.shape[0])
    comps = vh[:k]
    peak = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True))
    comps = comps * peak.sign()
    var = s**2
    return comps.reshape(k, *weight.shape[1:]), var[:k] / var.sum().clamp_min(1e-300)


# ------------------------------------------------------------------ the encoder walk


def token_mixer(block: nn.Module) -> tuple[str, nn.Module]:
    """A block's token mixer and its kind: attention (``attn`` with ``qkv``, timm's and this
    project's) or the feed-forward encoder's patch MLP (``patch_mlp``)."""
    if hasattr(getattr(block, "attn", None), "qkv"):
        return ATTENTION, block.attn
    if hasattr(block, "patch_mlp"):
        return FEEDFORWARD, block.patch_mlp
    raise AnalysisError(f"a block of type {type(block).__name__} has neither attention (attn.qkv) nor a patch MLP")


def mixer_kind(encoder: nn.Module) -> str:
    kinds = {token_mixer(b)[0] for b in encoder.blocks}
    if len(kinds) != 1:
        raise AnalysisError("the encoder mixes attention and feed-forward blocks: no one distance fits both")
    return kinds.pop()


def num_prefix_tokens(encoder: nn.Module) -> int:
    return int(getattr(encoder, "num_prefix_tokens", 1))


def patch_geometry(encoder: nn.Module) -> tuple[int, int, int]:
    """(img_size, patch_size, grid) of a square-grid ViT."""
    weight = encoder.patch_embed.proj.weight
    p = int(weight.shape[-1])
    grid = int(round((encoder.pos_embed.shape[1] - pos_prefix(encoder)) ** 0.5))
    return grid * p, p, grid


def pos_prefix(encoder: nn.Module) -> int:
    """Prefix tokens that carry a position embedding (timm's ``no_embed_class`` gives none)."""
    return 0 if getattr(encoder, "no_embed_class", False) else num_prefix_tokens(encoder)


@contextmanager
def mixer_inputs(encoder: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, each forward of ``encoder`` appends the input of every block's token mixer."""
    captured: list[torch.Tensor] = []
    hooks = [token_mixer(b)[1].register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
             for b in encoder.blocks]  # fmt: skip
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@dataclass
class TokenMixing:
    """Per depth: mean distance [images, heads] and prefix share [images, heads]; the last
    block's class-token row over the patches [images, heads, L] for the first images."""

    kind: str
    distance: list[list[torch.Tensor]] = field(default_factory=list)
    cls_share: list[list[torch.Tensor]] = field(default_factory=list)
    cls_maps: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def token_mixing(encoder: nn.Module, images: torch.Tensor, *, batch_size: int = 16, maps: int = 8) -> TokenMixing:
    """Distances and class-token maps of every block over ``images`` [N, 3, H, W]."""
    kind = mixer_kind(encoder)
    _, p, grid = patch_geometry(encoder)
    prefix = num_prefix_tokens(encoder)
    dist = patch_distances(grid, p)
    out = TokenMixing(kind, [[] for _ in encoder.blocks], [[] for _ in encoder.blocks])
    device = encoder.pos_embed.device
    if kind == FEEDFORWARD:
        batch_size = max(1, batch_size // 4)  # the Jacobian holds N x N x D values per image
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        with mixer_inputs(encoder) as inputs:
            encoder.forward_features(x)
        for depth, (block, inp) in enumerate(zip(encoder.blocks, inputs)):
            mixer = token_mixer(block)[1]
            if kind == ATTENTION:
                w = attention_probabilities(mixer, inp)
            else:
                w = mixing_weights(mixer, inp)[:, None]  # one "head"
            out.distance[depth].append(mean_distance(w, dist, prefix).cpu())
            out.cls_share[depth].append(prefix_share(w, prefix).cpu())
            if depth == len(encoder.blocks) - 1 and start < maps:
                out.cls_maps.append(w[: maps - start, :, 0, prefix:].float().cpu())
    return out


# ------------------------------------------------------------------------ the report

DISTANCE = {ATTENTION: "attention-distance", FEEDFORWARD: "mixing-distance"}
MAPS = {ATTENTION: "attention-maps", FEEDFORWARD: "mixing-maps"}
ANALYSES = (*DISTANCE.values(), *MAPS.values(), "position", "filters", "reconstructions")
NEEDS_IMAGES = (*DISTANCE.values(), *MAPS.values(), "reconstructions")


def choose_analyses(source: Source, only: list[str] | None) -> list[str]:
    """The analyses asked for (all that fit the model when ``only`` is empty), or a one-line
    refusal for one the model cannot give."""
    kind = mixer_kind(source.encoder)
    fitting = [DISTANCE[kind], MAPS[kind], "position", "filters"] + (["reconstructions"] if source.mae else [])
    for name in only or []:
        if name not in ANALYSES:
            raise AnalysisError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
        if name == "reconstructions":
            source.require_decoder()
        elif name not in fitting:
            words = {ATTENTION: "attention", FEEDFORWARD: "a feed-forward layer across patches"}
            other = FEEDFORWARD if kind == ATTENTION else ATTENTION
            raise AnalysisError(f"{name}: the encoder of {source.description} mixes tokens with {words[kind]}, "
                                f"not {words[other]}; ask for {DISTANCE[kind]} or {MAPS[kind]}")  # fmt: skip
    return [name for name in fitting if not only or name in only]


@torch.no_grad()
def analyze(source: Source, images: torch.Tensor | None, out_dir: str | Path, analyses: list[str], *,
            maps: int = 8, mask_ratios: tuple[float, ...] = (0.5, 0.75, 0.9),
            mask_samplings: tuple[str, ...] = MASK_SAMPLINGS, seed: int = 0,
            components: int = 28, description: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the pictures of ``analyses`` and ``analysis.json`` (the numbers behind them) into
    ``out_dir``; ``images`` [N, 3, H, W] normalised, needed for distances, maps and
    reconstructions. ``description``: what the json and the titles call the source (default:
    ``source.description``). Returns what ``analysis.json`` holds."""
    described = description or source.description
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = source.encoder
    kind = mixer_kind(encoder)
    img_size, p, grid = patch_geometry(encoder)
    numbers: dict[str, Any] = {"source": described, "mixer": kind, "img_size": img_size, "patch_size": p,
                               "grid": grid, "depth": len(encoder.blocks), "analyses": analyses,
                               "images": 0 if images is None else len(images), "files": []}  # fmt: skip
    files: list[Path] = []
    word = "attention" if kind == ATTENTION else "mixing"
    if DISTANCE[kind] in analyses or MAPS[kind] in analyses:
        mixing = token_mixing(encoder, images, maps=maps)
        per_depth = [torch.cat(d).mean(0).tolist() for d in mixing.distance]
        share = [torch.cat(s).mean(0).tolist() for s in mixing.cls_share]
        uniform = patch_distances(grid, p).mean().item()
        if DISTANCE[kind] in analyses:
            numbers[f"mean_{word}_distance"] = per_depth if kind == ATTENTION else [d[0] for d in per_depth]
            numbers[f"class_token_{word}_share"] = share if kind == ATTENTION else [s[0] for s in share]
            numbers["uniform_distance"] = uniform  # every patch weighted equally
            files.append(plot_mean_distance(per_depth, uniform, out / f"{word}_distance.png",
                                            title=f"{described}, {numbers['images']} images",
                                            ylabel=f"mean {word} distance (pixels)"))  # fmt: skip
        if MAPS[kind] in analyses:
            cls_maps = torch.cat(mixing.cls_maps).reshape(-1, mixing.cls_maps[0].shape[1], grid, grid)
            numbers[f"class_token_{word}"] = cls_maps.tolist() if kind == ATTENTION else cls_maps[:, 0].tolist()
            files.append(save_class_token_maps(denormalize(images[: len(cls_maps)]), cls_maps,
                                               out / f"class_token_{word}.png", f"class token {word}"))  # fmt: skip
    if "position" in analyses:
        table = encoder.pos_embed.detach()[0, pos_prefix(encoder) :].cpu()
        if table.norm(dim=-1).min() > 0:
            sim = position_similarity(table).reshape(grid, grid, grid, grid)
            numbers["position_similarity"] = sim.tolist()  # [row][col] of the patch, then [row][col] of the others
            files.append(save_position_similarity(sim, out / "position_similarity.png",
                                                  f"position embedding similarity, {described}"))  # fmt: skip
        else:  # no position embedding (or an all-zero one): nothing to compare
            numbers["position_similarity"] = None
    if "filters" in analyses:
        comps, ratio = filter_components(encoder.patch_embed.proj.weight.cpu(), components)
        numbers["patch_embedding_components"] = comps.tolist()  # [k][channel][row][col], unit norm
        numbers["patch_embedding_explained_variance"] = ratio.tolist()
        files.append(save_filter_components(comps, out / "patch_embedding_components.png"))
    if "reconstructions" in analyses:
        mae = source.require_decoder()
        shown = images[:maps]
        columns = reconstruction_columns(mae, shown, mask_ratios, mask_samplings, seed=seed)
        numbers["reconstruction_loss"] = {label: pics["loss"].item() for label, pics in columns}
        files.append(save_reconstruction_grid(denormalize(shown), columns, out / "reconstructions.png"))
    numbers["files"] = [f.name for f in files]
    _write_json(numbers, out / "analysis.json")
    return numbers


def reconstruction_columns(mae: MaskedAutoencoderViT, images: torch.Tensor, mask_ratios: tuple[float, ...],
                           samplings: tuple[str, ...] = ("random",), *,
                           seed: int = 0) -> list[tuple[str, dict[str, torch.Tensor]]]:  # fmt: skip
    """Reconstructions of ``images`` for each mask sampling and each ratio it can give
    (``mask_columns``), labelled ("75% block"). Every column draws its masks from the same
    seed, so with random sampling the patches hidden at a lower ratio stay hidden at a higher."""
    device = next(mae.parameters()).device
    columns = []
    for sampling, ratio in mask_columns(mask_ratios, samplings, mae.cfg.grid_size):
        g = torch.Generator().manual_seed(seed)
        noise = mask_noise(sampling, len(images), mae.cfg.grid_size, ratio, generator=g)
        pics = reconstruct(mae, images.to(device), noise.to(device), mask_ratio=ratio)
        columns.append((f"{round(100 * ratio)}% {sampling}", {k: v.cpu() for k, v in pics.items()}))
    return columns


def mask_columns(ratios: tuple[float, ...], samplings: tuple[str, ...], grid: int) -> list[tuple[str, float]]:
    """The (sampling, ratio) pairs a sampling can give (grid: 0.75 only), or a one-line
    refusal for a sampling that can give none of the ratios."""
    pairs = []
    for sampling in samplings:
        fitting, reason = [], ""
        for ratio in ratios:
            try:
                check_sampling(sampling, grid, ratio)
                fitting.append((sampling, ratio))
            except ValueError as err:
                reason = str(err)
        if not fitting:
            raise AnalysisError(f"--mask-sampling {sampling}: {reason.removeprefix('mask_sampling=' + sampling + ' ')}")
        pairs += fitting
    return pairs


def check_masks(ratios: tuple[float, ...] | list[float], samplings: tuple[str, ...] | list[str]) -> None:
    """Mask ratios and samplings that exist, or a one-line refusal (before any model loads)."""
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise AnalysisError(f"--mask-ratio {bad[0]}: a mask ratio is the fraction hidden, in [0, 1)")
    unknown = [s for s in samplings if s not in MASK_SAMPLINGS]
    if unknown:
        raise AnalysisError(f"--mask-sampling {unknown[0]}: choose from {', '.join(MASK_SAMPLINGS)}")


def portable_description(description: str, *given: str | None) -> str:
    """``description`` with each path the user gave cut to its last name: ``analysis.json`` and
    the titles travel with the pictures, and a reader elsewhere has none of this machine's folders."""
    for path in sorted({str(Path(g)) for g in given if g}, key=len, reverse=True):
        description = description.replace(path, Path(path).name)
    return description


def reconstruct_files(source: str, paths: list[str], mask_ratios: tuple[float, ...], out: str | Path, *,
                      samplings: tuple[str, ...] = ("random",), norm_pix_loss: bool | None = None, seed: int = 0,
                      device: str | None = None,
                      notes: Callable[[str], None] = print) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """``pipelines.reconstruct``: image files reconstructed by the autoencoder of ``source``
    at each mask ratio, drawn into one PNG; returns its path and the loss per column."""
    check_masks(mask_ratios, samplings)
    src = load_source(source, norm_pix_loss=norm_pix_loss)
    mae = src.require_decoder()
    images, resized = read_images(paths, mae.cfg.img_size)
    for note in resized:
        notes(note)
    src.to(device)
    columns = reconstruction_columns(mae, images, mask_ratios, samplings, seed=seed)
    path = save_reconstruction_grid(denormalize(images), columns, out)
    return path, {label: pics["loss"].item() for label, pics in columns}


def _write_json(data: dict[str, Any], path: Path) -> None:
    """Floats to 6 significant digits (the tensors behind them are float32 at best)."""

    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.6g}")
        if isinstance(value, list):
            return [rounded(v) for v in value]
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return value

    write_atomic(path, json.dumps(rounded(data)) + "\n")
