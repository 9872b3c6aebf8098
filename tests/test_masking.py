"""Mask sampling: random (unchanged), BEiT's blocks and the 2 x 2 grid; every sample of a
batch keeps the same number of patches, and the model keeps exactly the sampled ones."""

from __future__ import annotations

import random

import pytest
import torch

from mae.models import MAEConfig, MaskedAutoencoderViT
from mae.models.masking import block_mask, grid_mask, mask_noise, num_kept
from mae.visualize import reconstruct


def official_random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """The masking as the project (and the official release) wrote it before samplings existed."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


@pytest.fixture
def model() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(MAEConfig(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))  # fmt: skip


def test_random_sampling_is_bit_identical_to_the_masking_before(model):
    """Same noise, same kept tokens, mask and restore order; and the sampler draws what the model draws."""
    x = torch.randn(6, 64, 5)
    for ratio in (0.5, 0.75, 0.9):
        noise = mask_noise("random", 6, 8, ratio, generator=torch.Generator().manual_seed(3))
        assert torch.equal(noise, torch.rand(6, 64, generator=torch.Generator().manual_seed(3)))
        for ours, theirs in zip(model.random_masking(x, ratio, noise), official_random_masking(x, ratio, noise)):
            assert torch.equal(ours, theirs)
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(7)
    a = model(imgs)
    torch.manual_seed(7)
    b = model(imgs, noise=mask_noise("random", 2, 8, 0.75))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("sampling,ratio", [("random", 0.75), ("block", 0.5), ("block", 0.75), ("block", 0.9), ("grid", 0.75)])
def test_every_sample_hides_exactly_the_budget_and_the_model_keeps_the_sampled_set(model, sampling, ratio):
    torch.manual_seed(1)
    noise = mask_noise(sampling, 32, 8, ratio)
    hide = 64 - num_kept(64, ratio)
    if sampling != "random":
        assert torch.equal((noise >= 1).sum(1), torch.full((32,), hide))
    _, mask, ids_restore = model.random_masking(torch.zeros(32, 64, 4), ratio, noise)
    assert torch.equal(mask.sum(1), torch.full((32,), float(hide)))
    if sampling != "random":
        assert torch.equal(mask.bool(), noise >= 1)


def _components(hidden: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected groups of hidden patches."""
    g = hidden.shape[0]
    seen, sizes = set(), []
    for start in zip(*torch.nonzero(hidden, as_tuple=True)):
        start = tuple(int(v) for v in start)
        if start in seen:
            continue
        stack, size = [start], 0
        seen.add(start)
        while stack:
            r, c = stack.pop()
            size += 1
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < g and 0 <= cc < g and hidden[rr, cc] and (rr, cc) not in seen:
                    seen.add((rr, cc))
                    stack.append((rr, cc))
        sizes.append(size)
    return sizes


def test_block_masks_are_contiguous_rectangles():
    """BEiT's masks are a few large connected blocks, unlike random masks of the same count."""
    block_parts, random_parts = [], []
    for seed in range(50):
        hidden = block_mask(14, 98, random.Random(seed))  # 14 x 14 grid at 50%, BEiT's setting
        assert int(hidden.sum()) == 98
        block_parts.append(len(_components(hidden)))
        largest = max(_components(hidden))
        assert largest >= 16  # at least one whole block of BEiT's minimal area
        rand = torch.zeros(196, dtype=torch.bool)
        rand[torch.randperm(196, generator=torch.Generator().manual_seed(seed))[:98]] = True
        random_parts.append(len(_components(rand.view(14, 14))))
    assert sum(block_parts) / 50 < 6 < sum(random_parts) / 50


def test_grid_keeps_one_patch_per_2x2_cell_at_one_offset():
    offsets = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    hidden = grid_mask(8, offsets)
    for (dr, dc), h in zip(offsets.tolist(), hidden):
        kept = torch.nonzero(~h).tolist()
        assert len(kept) == 16
        assert all(r % 2 == dr and c % 2 == dc for r, c in kept)
        cells = h.view(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4)
        assert torch.equal((~cells).sum(1), torch.ones(16, dtype=torch.long))
    drawn = mask_noise("grid", 64, 8, 0.75, generator=torch.Generator().manual_seed(0)) < 1
    first = [tuple(torch.nonzero(d.view(8, 8))[0].tolist()) for d in drawn]
    assert set(first) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # the offset is drawn per sample


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="mask_sampling must be one of"):
        mask_noise("stripes", 2, 8, 0.75)
    with pytest.raises(ValueError, match="mask_ratio=0.75"):
        mask_noise("grid", 2, 8, 0.5)
    with pytest.raises(ValueError, match="even patch grid"):
        mask_noise("grid", 2, 7, 0.75)


@pytest.mark.parametrize("sampling", ["block", "grid"])
def test_reconstruction_pictures_grey_out_exactly_the_sampled_patches(model, sampling):
    imgs = torch.randn(3, 3, 32, 32)
    noise = mask_noise(sampling, 3, 8, 0.75, generator=torch.Generator().manual_seed(5))
    pictures = reconstruct(model.eval(), imgs, noise)
    grey = (pictures["masked"] == 0.5).all(1)  # [N, H, W]
    per_patch = grey.view(3, 8, 4, 8, 4).all(4).all(2).flatten(1)
    assert torch.equal(per_patch, noise >= 1)


def test_the_pretraining_stage_names_a_bad_sampling_setting():
    from mae.config import ConfigError, load_config
    from mae.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match="mask_sampling must be one of"):
        load_config(PretrainConfig, overrides=["mask_sampling=stripes"])
    with pytest.raises(ConfigError, match="mask_sampling=grid .* mask_ratio=0.75"):
        load_config(PretrainConfig, overrides=["mask_sampling=grid", "mask_ratio=0.5"])
    assert load_config(PretrainConfig, overrides=["mask_sampling=block", "mask_ratio=0.9"]).mask_sampling == "block"


@pytest.mark.parametrize("sampling", ["block", "grid"])
def test_structured_masks_follow_torchs_generator_only(sampling):
    """Block and grid masks are a function of torch's RNG state (which checkpoints save, so a
    resumed run draws the same masks) and leave Python's global generator alone."""
    py_state = random.getstate()
    torch.manual_seed(11)
    a = mask_noise(sampling, 16, 8, 0.75)
    torch.manual_seed(11)
    b = mask_noise(sampling, 16, 8, 0.75)
    assert torch.equal(a, b) and not torch.equal(a, mask_noise(sampling, 16, 8, 0.75))
    assert random.getstate() == py_state
