"""Which patches MAE hides: the samplers behind the pretraining stage's ``mask_sampling``.

A sampler returns *noise* [N, L], the model's masking input: each sample keeps its
``num_kept(L, ratio)`` patches of smallest noise (``MaskedAutoencoderViT.random_masking``).
Hidden patches get noise in [1, 2), kept ones in [0, 1), so the model keeps exactly the
sampled set, in a random order, and training, evaluation and reconstruction pictures
all mask through the same path.

- ``random``: uniform noise, exactly what the model draws itself (He et al. 2021).
- ``block``: BEiT's block-wise masking (Bao et al. 2021; MAE Table 1f): rectangles of
  at least 16 patches, aspect ratio log-uniform in [0.3, 1/0.3], until the budget is met.
- ``grid``: one kept patch in every 2 x 2 cell, a regular lattice (MAE Table 1f, UM-MAE);
  only at mask ratio 0.75.

Every sample hides the same number of patches, so the encoder's batch stays rectangular.
"""

from __future__ import annotations

import math
import random

import torch

SAMPLINGS = ("random", "block", "grid")
BLOCK_MIN_PATCHES = 16  # BEiT's smallest block
BLOCK_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
BLOCK_ATTEMPTS = 10  # placements tried per block before the loop gives up


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches every sample keeps: ``int(L * (1 - ratio))``, as the official release."""
    return int(num_patches * (1 - mask_ratio))


def check_sampling(sampling: str, grid_size: int, mask_ratio: float) -> None:
    """A clear error for a sampling that cannot give this grid and ratio."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"mask_sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if sampling == "grid" and (grid_size % 2 or mask_ratio != 0.75):
        raise ValueError(
            f"mask_sampling=grid keeps one patch per 2 x 2 cell: it needs mask_ratio=0.75 (got {mask_ratio}) "
            f"and an even patch grid (got {grid_size} x {grid_size})"
        )


def mask_noise(
    sampling: str, batch: int, grid_size: int, mask_ratio: float, *,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Noise [batch, grid_size**2] whose ``num_kept`` smallest entries are the kept patches.

    ``random`` draws ``torch.rand`` with ``generator`` on ``device``: the same numbers the
    model draws itself, so passing it changes nothing. ``block`` and ``grid`` draw on the
    CPU (``generator``, else torch's default one) and move the result to ``device``.
    """
    check_sampling(sampling, grid_size, mask_ratio)
    L = grid_size**2
    if sampling == "random":
        return torch.rand(batch, L, generator=generator, device=device)
    hide = L - num_kept(L, mask_ratio)
    if sampling == "block":
        seeds = torch.randint(2**62, (batch,), generator=generator).tolist()
        hidden = torch.stack([block_mask(grid_size, hide, random.Random(s)) for s in seeds]).flatten(1)
    else:
        hidden = grid_mask(grid_size, torch.randint(2, (batch, 2), generator=generator)).flatten(1)
    order = torch.rand(batch, L, generator=generator)  # a random order within the kept and the hidden set
    return (hidden.float() + order).to(device)


def block_mask(grid_size: int, num_hidden: int, rng: random.Random) -> torch.Tensor:
    """[grid, grid] bool, True = hidden, exactly ``num_hidden`` True.

    BEiT's loop: place a block of area uniform between 16 and the remaining budget,
    aspect ratio log-uniform, at a random position;
    accept it if it hides at least one new patch and no more than the budget left; give
    up a block after 10 failed placements, and stop when a block cannot be placed. That
    loop can stop short of the budget; the remaining patches are then hidden at random
    among the visible ones, so every sample hides the same number (the blocks stay whole,
    a few single patches are added).
    """
    hidden = torch.zeros(grid_size, grid_size, dtype=torch.bool)
    count = 0
    while count < num_hidden:
        added = _place_block(hidden, num_hidden - count, rng)
        if added == 0:
            break
        count += added
    if count < num_hidden:
        visible = torch.nonzero(~hidden.flatten()).flatten().tolist()
        extra = rng.sample(visible, num_hidden - count)
        hidden.view(-1)[extra] = True
    return hidden


def _place_block(hidden: torch.Tensor, budget: int, rng: random.Random) -> int:
    """One block of BEiT's loop; returns how many patches it newly hid (0: none placed)."""
    size = hidden.shape[0]
    for _ in range(BLOCK_ATTEMPTS):
        area = rng.uniform(BLOCK_MIN_PATCHES, budget)  # either order, as random.uniform allows
        aspect = math.exp(rng.uniform(*BLOCK_LOG_ASPECT))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (0 < h < size and 0 < w < size):
            continue
        top, left = rng.randint(0, size - h), rng.randint(0, size - w)
        block = hidden[top : top + h, left : left + w]
        new = h * w - int(block.sum())
        if 0 < new <= budget:
            block.fill_(True)
            return new
    return 0


def grid_mask(grid_size: int, offsets: torch.Tensor) -> torch.Tensor:
    """[N, grid, grid] bool, True = hidden: each sample keeps the patch at its offset
    (row, col in {0, 1}, ``offsets`` [N, 2]) of every 2 x 2 cell. The offset is drawn per
    sample, so the lattice shifts between images and every position gets seen."""
    idx = torch.arange(grid_size)
    rows = (idx[None, :] % 2) == offsets[:, :1]  # [N, grid]
    cols = (idx[None, :] % 2) == offsets[:, 1:]
    return ~(rows[:, :, None] & cols[:, None, :])
