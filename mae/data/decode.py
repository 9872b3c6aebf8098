"""Turning stored image bytes into RGB pictures, with every way that can fail named.

Shared by the training reader and ``shards build/verify`` so that what the build
accepts is exactly what training can read.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

DCT_SHRINK = (1, 2, 4, 8)  # the JPEG scales decoding may use: 1/1, 1/2, 1/4, 1/8
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")


class UndecodableImage(ValueError):
    """Raised for bytes that are not an image PIL can fully decode."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully and convert any colour mode (L, CMYK, RGBA, P, I;16...) to RGB."""
    return decode_with_mode(data)[0]


def _undecodable(err: Exception) -> UndecodableImage:
    # PIL's messages name the BytesIO object by address; keep reasons reproducible
    reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
    return UndecodableImage(f"{type(err).__name__}: {reason}")


def open_header(data: bytes) -> Image.Image:
    """The image with only its header read: size, mode and format, no pixels decoded yet."""
    if not data:
        raise UndecodableImage("zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Exception as err:  # PIL raises many unrelated types for bad input
        raise _undecodable(err) from err


@dataclass(frozen=True)
class Header:
    """What a transform needs before any pixel is decoded: size (width, height), the stored
    colour mode and format as PIL names them, and PIL's lazily opened image when PIL read it."""

    size: tuple[int, int]
    mode: str
    format: str | None
    image: Image.Image | None = None


_JPEG_MODES = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "L"}  # libjpeg-turbo's colourspace -> PIL's mode


def read_header(data: bytes) -> Header:
    """The header of a colour or greyscale JPEG from libjpeg-turbo (a C call, 20x cheaper
    than PIL's marker parsing in Python, which is several percent of a 224 px sample);
    anything else, and any JPEG it finds fault with or PIL would call a decompression bomb,
    from ``open_header``, so that exactly what PIL accepts is accepted."""
    if data[:2] == b"\xff\xd8":
        try:
            height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass
        else:
            limit = Image.MAX_IMAGE_PIXELS
            if colourspace in _JPEG_MODES and (limit is None or width * height <= limit):
                return Header((width, height), _JPEG_MODES[colourspace], "JPEG")
    img = open_header(data)
    return Header(img.size, img.mode, img.format, img)


def decode_with_mode(data: bytes, header: Image.Image | None = None,
                     at_least: tuple[int, int] | None = None) -> tuple[Image.Image, str]:  # fmt: skip
    """Like ``decode_rgb``, also returning the stored colour mode so readers can count conversions.

    ``at_least`` (width, height) lets a JPEG decode at a reduced DCT scale (PIL's ``draft``)
    as long as it stays at least that large. ``Image.open`` is lazy, so ``load()`` is
    forced here: a truncated JPEG must fail now, inside the skip-and-count handler, not
    later inside a transform.
    """
    img = open_header(data) if header is None else header
    try:
        if at_least is not None and img.format == "JPEG":
            img.draft(img.mode, at_least)
        img.load()
    except Exception as err:  # PIL raises many unrelated types for bad input
        raise _undecodable(err) from err
    mode = img.mode
    if mode == "RGB":
        return img, mode
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white rather than dropping alpha, which leaves arbitrary colours
        # wherever the picture was transparent.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), mode
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale: scale to 8 bits before conversion, else it saturates.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB"), mode


def decode_pixels(data: bytes, header: Header, at_least: tuple[int, int]) -> tuple[np.ndarray, str]:
    """RGB pixels [H, W, 3] uint8 at the smallest of the DCT scales 1, 1/2, 1/4, 1/8 whose
    width and height are at least ``at_least``, and the stored colour mode. ``header`` is
    ``read_header(data)``; images other than JPEGs decode at full size.

    Colour and greyscale JPEGs go through libjpeg-turbo (simplejpeg); everything else
    (other formats, CMYK, and JPEGs libjpeg-turbo finds fault with, so that exactly what
    PIL accepts is accepted) through PIL. libjpeg-turbo also scales by 7/8, 3/4, 5/8 and
    3/8, but those are not used: on 500 x 375 photos the first three decode more slowly
    than full size (no SIMD kernels) and differ most from a full-size decode resized
    (BENCHMARKS.md, "Decoding at the crop's scale").
    """
    width, height = header.size
    shrink = max(k for k in DCT_SHRINK if -(-width // k) >= at_least[0] and -(-height // k) >= at_least[1])
    at_least = (-(-width // shrink), -(-height // shrink))
    if header.format == "JPEG" and header.mode in ("RGB", "L"):
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=at_least[0], min_height=at_least[1])
            return pixels, header.mode
        except ValueError:
            pass  # PIL decides; it also names the fault
    img, mode = decode_with_mode(data, header.image if header.image is not None else open_header(data), at_least)
    return np.array(img), mode


def image_key(sample: dict) -> str | None:
    """The sample's image member name (``jpg``, ``png``...), or None when it has none."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    return None
