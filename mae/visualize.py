"""Reconstruction pictures: for fixed images, original | masked input | reconstruction |
reconstruction with the visible patches pasted back."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .data.transforms import denormalize
from .models.mae_vit import MaskedAutoencoderViT


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pictures in [0, 1], each [N, 3, H, W]. With ``norm_pix_loss`` the prediction is in
    per-patch normalised units: each patch is mapped back with the mean and variance of
    the true patch, as the paper's figures do, so the picture shows pixels."""
    _, pred, mask = model(imgs, noise=noise)
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
    }


def save_reconstructions(pictures: dict[str, torch.Tensor], path: str | Path, min_size: int = 128) -> Path:
    """One row per image, one column per picture kind; small images enlarged (nearest)."""
    cols = [pictures[k] for k in ("original", "masked", "reconstruction", "pasted")]
    n, _, h, w = cols[0].shape
    scale = max(1, -(-min_size // h))
    pad = 2
    rows = []
    for i in range(n):
        tiles = [F.interpolate(c[i : i + 1].cpu(), scale_factor=scale, mode="nearest") for c in cols]
        tiles = [F.pad(t, (pad, pad, pad, pad), value=1.0) for t in tiles]
        rows.append(torch.cat(tiles, dim=3))
    grid = torch.cat(rows, dim=2)[0]  # [3, H', W']
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)
    return path
