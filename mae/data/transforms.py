"""Image transforms of the MAE recipes, and the one step that turns loader batches into model input.

The recipes' transforms (RandomResizedCrop + flip, resize + centre crop) take the stored
bytes: the crop is drawn from the header's size first, the image is then decoded at the
smallest DCT scale that leaves the crop at least as large as the output, and the result
leaves the loader workers as uint8 pixels [3, H, W]. Conversion to float and the
ImageNet normalisation happen on the device (``to_model_input``): a quarter of the
bytes cross between processes, and the arithmetic runs where it is cheap.

Any other callable on a PIL image (e.g. timm's fine-tuning transform, whose random
erasing fills with noise in normalised units) still works: it gets the fully decoded
RGB image and its float output is taken as already normalised.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from .decode import decode_pixels, read_header

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BytesTransform:
    """A transform that decodes itself: stored bytes -> (uint8 [3, size, size], stored colour mode)."""

    size: int

    def __call__(self, data: bytes) -> tuple[torch.Tensor, str]:
        raise NotImplementedError


Transform = Union[BytesTransform, Callable[[Image.Image], torch.Tensor]]


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, h, w] (any strides) -> uint8 [3, *size], bicubic with antialiasing, as
    PIL resizes (torch's uint8 kernel, within one grey level of PIL's, several times faster)."""
    if tuple(pixels.shape[1:]) == size:
        return pixels
    return F.interpolate(pixels.unsqueeze(0), size=size, mode="bicubic", antialias=True)[0]


def _hwc(pixels) -> torch.Tensor:
    """[H, W, 3] uint8 array -> a [3, H, W] view (channels last in memory, which the resize prefers)."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


class RandomResizedCropFlip(BytesTransform):
    """torchvision's RandomResizedCrop (bicubic) then a horizontal flip with p=0.5: the same
    random draws in the same order, so for a given torch seed the same crop and flip."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:  # fmt: skip
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, data: bytes) -> tuple[torch.Tensor, str]:
        header = read_header(data)
        width, height = header.size
        # torchvision draws the box from the image's dimensions only: a pixel-less tensor of that shape
        shape_only = torch.empty((0, height, width), dtype=torch.uint8)
        top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < 0.5)
        shrink = max(1.0, min(w, h) / self.size)  # how far the image may shrink: crop >= output
        pixels, mode = decode_pixels(data, header, (math.ceil(width / shrink), math.ceil(height / shrink)))
        sx, sy = pixels.shape[1] / width, pixels.shape[0] / height  # 1 unless decoded at a smaller scale
        x0, y0 = round(left * sx), round(top * sy)
        x1, y1 = max(x0 + 1, round((left + w) * sx)), max(y0 + 1, round((top + h) * sy))
        out = _resize(_hwc(pixels)[:, y0:y1, x0:x1], (self.size, self.size))
        return (out.flip(-1) if flip else out), mode


class ResizeCenterCrop(BytesTransform):
    """Resize the short side to ``resize`` (bicubic), then the centre ``size`` x ``size``,
    as torchvision's Resize + CenterCrop do."""

    def __init__(self, size: int, resize: int) -> None:
        if resize < size:
            raise ValueError(f"resize {resize} is smaller than the crop {size} (crop_pct must be <= 1)")
        self.size, self.resize = size, resize

    def __call__(self, data: bytes) -> tuple[torch.Tensor, str]:
        header = read_header(data)
        width, height = header.size
        if width <= height:  # torchvision's rule for the long side
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        pixels, mode = decode_pixels(data, header, (min(width, new_w), min(height, new_h)))
        out = _resize(_hwc(pixels), (new_h, new_w))
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return out[:, top : top + self.size, left : left + self.size], mode


def pretrain_transform(img_size: int, scale: tuple[float, float] = (0.2, 1.0)) -> BytesTransform:
    """MAE pretraining: RandomResizedCrop (scale 0.2-1, bicubic) and flip, nothing else (He et al. 2021)."""
    return RandomResizedCropFlip(img_size, scale=scale)


def probe_transform(img_size: int) -> BytesTransform:
    """Linear-probe training: RandomResizedCrop (default scale, bicubic) and flip only (He et al. 2021, A.2)."""
    return RandomResizedCropFlip(img_size)


def eval_transform(img_size: int, crop_pct: float = 0.875) -> BytesTransform:
    """Resize the short side to img_size / crop_pct, centre crop (Resize 256 + crop 224 at 224)."""
    return ResizeCenterCrop(img_size, int(round(img_size / crop_pct)))


def to_model_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A loader batch on ``device`` as the model takes it: uint8 pixels become float in
    [0, 1] normalised by the ImageNet mean and std (the same operations as ToTensor +
    Normalize, so the same values); float batches (cached features, timm's fine-tuning
    transform) are already what the model takes and are only moved."""
    x = images.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.float().div_(255).sub_(mean).div_(std)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] normalised -> [0, 1] pixels, for pictures."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)
