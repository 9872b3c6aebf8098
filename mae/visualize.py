"""Pictures: reconstructions (original | masked input | reconstruction | reconstruction
with the visible patches pasted back) and the pictures of the ViT paper's Figure 7 that
``mae.analysis`` computes the numbers for."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .data.transforms import denormalize
from .files import write_atomic
from .models.mae_vit import MaskedAutoencoderViT


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, noise: torch.Tensor,
                mask_ratio: float | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Pictures in [0, 1], each [N, 3, H, W], and the masked-patch ``loss``. With
    ``norm_pix_loss`` the prediction is in per-patch normalised units: each patch is mapped
    back with the mean and variance of the true patch, as the paper's figures do, so the
    picture shows pixels. ``mask_ratio``: the model's own when None."""
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if model.cfg.norm_pix_loss:
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)
    # mask [N, L] -> pixel mask [N, 1, H, W], 1 where a patch was hidden
    p = model.cfg.patch_size
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * model.cfg.in_chans))[:, :1]
    original = denormalize(imgs)
    reconstruction = denormalize(recon)
    grey = torch.full_like(original, 0.5)
    return {
        "original": original,
        "masked": original * (1 - pixel_mask) + grey * pixel_mask,
        "reconstruction": reconstruction,
        "pasted": original * (1 - pixel_mask) + reconstruction * pixel_mask,
        "loss": loss.detach().float(),
    }


def save_reconstructions(pictures: dict[str, torch.Tensor], path: str | Path, min_size: int = 128) -> Path:
    """One row per image, one column per picture kind; small images enlarged (nearest)."""
    cols = [pictures[k] for k in ("original", "masked", "reconstruction", "pasted")]
    return save_tiles([[c[i] for c in cols] for i in range(len(cols[0]))], path, min_size=min_size)


def save_reconstruction_grid(original: torch.Tensor, columns: list[tuple[str, dict[str, torch.Tensor]]],
                             path: str | Path, min_size: int = 96) -> Path:  # fmt: skip
    """One row per image: the original, then for each (label, pictures) the masked input and
    the reconstruction with the visible patches pasted back; labels above the columns."""
    rows = [[original[i]] + [t for _, pics in columns for t in (pics["masked"][i], pics["pasted"][i])]
            for i in range(len(original))]  # fmt: skip
    labels = ["original"] + [f"{label} {kind}" for label, _ in columns for kind in ("input", "output")]
    return save_tiles(rows, path, min_size=min_size, labels=labels)


def save_tiles(rows: list[list[torch.Tensor]], path: str | Path, *, min_size: int = 64, pad: int = 2,
               labels: list[str] | None = None) -> Path:  # fmt: skip
    """A grid of [3, h, w] pictures in [0, 1] (rows of equal length and tile size), small
    tiles enlarged (nearest) to at least ``min_size``, with optional column labels on top."""
    h = rows[0][0].shape[-2]
    scale = max(1, -(-min_size // h))
    lines = []
    for row in rows:
        tiles = [F.interpolate(t[None].float().cpu(), scale_factor=scale, mode="nearest") for t in row]
        lines.append(torch.cat([F.pad(t, (pad, pad, pad, pad), value=1.0) for t in tiles], dim=3))
    grid = torch.cat(lines, dim=2)[0]  # [3, H', W']
    image = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    if labels:
        image = _with_labels(image, labels, tile_width=image.width // len(labels))
    return _save_png(image, path)


def _with_labels(image: Image.Image, labels: list[str], tile_width: int) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(image)
    size = 14  # the largest size (down to 8) at which every label fits its column
    while size > 8 and max(draw.textlength(label, font=ImageFont.load_default(size=size)) for label in labels) > tile_width - 4:
        size -= 1
    font = ImageFont.load_default(size=size)
    band = Image.new("RGB", (image.width, size + 8), "white")
    draw = ImageDraw.Draw(band)
    for i, label in enumerate(labels):
        width = draw.textlength(label, font=font)
        draw.text((i * tile_width + max(0, (tile_width - width) / 2), 3), label, fill="black", font=font)
    out = Image.new("RGB", (image.width, image.height + band.height), "white")
    out.paste(band, (0, 0))
    out.paste(image, (0, band.height))
    return out


def _save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda p: image.save(p, format="PNG", optimize=True))


# ------------------------------------------------------- the ViT paper's Figure 7 pictures


def colourize(values: torch.Tensor, cmap: str = "inferno") -> torch.Tensor:
    """[h, w] values in [0, 1] -> [3, h, w] colours of a matplotlib colour map."""
    from matplotlib import colormaps

    rgb = colormaps[cmap](values.clamp(0, 1).numpy())[..., :3]
    return torch.from_numpy(rgb).permute(2, 0, 1).float()


def save_filter_components(components: torch.Tensor, path: str | Path, per_row: int = 7) -> Path:
    """Principal components [k, 3, p, p] as RGB pictures, each stretched to [0, 1] on its own."""
    flat = components.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    tiles = [((c - a) / (b - a).clamp_min(1e-12)).float() for c, a, b in zip(components, lo, hi)]
    tiles += [torch.ones_like(tiles[0])] * (-len(tiles) % per_row)
    return save_tiles([tiles[i : i + per_row] for i in range(0, len(tiles), per_row)], path, min_size=48)


def save_class_token_maps(images: torch.Tensor, maps: torch.Tensor, path: str | Path, what: str) -> Path:
    """Rows: images [n, 3, H, W] in [0, 1]; columns: the image, the map averaged over heads,
    the image weighted by it, then each head's map; maps [n, heads, g, g], each stretched
    to [0, 1] on its own and enlarged to the image (nearest: one cell per patch)."""
    size = images.shape[-2:]

    def stretch(m: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0]
        return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)

    rows = []
    for image, per_head in zip(images, maps):
        mean = stretch(per_head.mean(0))
        heads = [colourize(stretch(m)) for m in per_head] if len(per_head) > 1 else []
        rows.append([image, colourize(mean), image * mean, *heads])
    labels = ["image", f"{what}", "image x map"] + [f"head {h}" for h in range(len(rows[0]) - 3)]
    return save_tiles(rows, path, min_size=96, labels=labels)


def save_position_similarity(similarity: torch.Tensor, path: str | Path, title: str) -> Path:
    """[g, g, g, g] cosine similarities as the ViT paper draws them: one g x g tile per patch
    position (row, column), with the similarity of its embedding to every other position's."""
    from matplotlib.figure import Figure

    g = similarity.shape[0]
    low = min(0.0, float(similarity.min()))  # the colour scale spans what is there, down to 0 at least
    fig = Figure(figsize=(6.4, 5.6), dpi=100)
    axes = fig.subplots(g, g, gridspec_kw=dict(wspace=0.08, hspace=0.08))
    for r in range(g):
        for c in range(g):
            ax = axes[r][c]
            image = ax.imshow(similarity[r, c].numpy(), vmin=low, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r + 1), fontsize=6, rotation=0, labelpad=6)
            if r == g - 1:
                ax.set_xlabel(str(c + 1), fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("input patch column", fontsize=8)
    fig.supylabel("input patch row", fontsize=8)
    return save_figure(fig, path)


def plot_mean_distance(per_depth: list[list[float]], uniform: float, path: str | Path, *, title: str,
                       ylabel: str) -> Path:  # fmt: skip
    """Mean distance against depth, one dot per head (the ViT paper's Figure 7, right), with
    the distance that mixing every patch equally gives as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.8), dpi=100)
    ax = fig.subplots()
    heads = max(len(d) for d in per_depth)
    for h in range(heads):
        points = [(depth, d[h]) for depth, d in enumerate(per_depth, start=1) if h < len(d)]
        ax.scatter(*zip(*points), s=14, label=f"head {h}" if heads > 1 else None)
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label="uniform mixing")
    ax.set_xlabel("network depth (block)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(1, len(per_depth) + 1))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6, ncol=2 if heads > 6 else 1, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """A matplotlib figure as a PNG, written atomically (a reader never sees half a picture)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return _save_png(Image.open(buffer).convert("RGB"), path)
