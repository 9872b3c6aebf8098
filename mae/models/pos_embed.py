"""Position embeddings: the fixed 1-D and 2-D sine-cosine tables and resizing to another patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: sines in the first half, cosines in the second.

    Frequencies fall geometrically from 1 to 1/10000 (Vaswani et al. 2017), computed
    in float64 so the table is the same on every device and dtype.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """[grid_h * grid_w (+1), dim] table in row-major patch order.

    The first half of each vector encodes the column, the second half the row, as in
    the official MAE release, so its released ``pos_embed`` and ours agree. The cls
    token, which has no position, gets zeros.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


def sincos_1d_table(dim: int, num_patches: int, cls_token: bool = True) -> torch.Tensor:
    """[num_patches (+1), dim]: the original Transformer's table over the patch index
    (row-major, so it knows neither rows nor columns); the cls token gets zeros."""
    table = sincos_1d(dim, torch.arange(num_patches))
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Bicubic interpolation of [1, prefix + h*w, D] over the patch grid; prefix tokens kept.

    Used when fine-tuning at another resolution or patch grid (Dosovitskiy et al. 2021, 3.2).
    The old grid is taken to be square, as for every model this project writes.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(round(grid.shape[1] ** 0.5))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patches is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
