"""Image transforms of the MAE recipes (torchvision), PIL RGB image -> normalised tensor."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


def pretrain_transform(img_size: int, scale: tuple[float, float] = (0.2, 1.0)) -> Transform:
    """MAE pretraining: RandomResizedCrop (scale 0.2-1, bicubic) and flip, nothing else (He et al. 2021)."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def probe_transform(img_size: int) -> Transform:
    """Linear-probe training: RandomResizedCrop (default scale, bicubic) and flip only (He et al. 2021, A.2)."""
    return T.Compose([
        T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def eval_transform(img_size: int, crop_pct: float = 0.875) -> Transform:
    """Resize the short side to img_size / crop_pct, centre crop (Resize 256 + crop 224 at 224)."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] normalised -> [0, 1] pixels, for pictures."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)
