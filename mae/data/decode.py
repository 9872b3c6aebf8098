"""Turning stored image bytes into RGB pictures, with every way that can fail named.

Shared by the training reader and ``shards build/verify`` so that what the build
accepts is exactly what training can read.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")


class UndecodableImage(ValueError):
    """Raised for bytes that are not an image PIL can fully decode."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully and convert any colour mode (L, CMYK, RGBA, P, I;16...) to RGB."""
    return decode_with_mode(data)[0]


def decode_with_mode(data: bytes) -> tuple[Image.Image, str]:
    """Like ``decode_rgb``, also returning the stored colour mode so readers can count conversions.

    ``Image.open`` is lazy, so ``load()`` is forced here: a truncated JPEG must fail
    now, inside the skip-and-count handler, not later inside a transform.
    """
    if not data:
        raise UndecodableImage("zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as err:  # PIL raises many unrelated types for bad input
        # PIL's messages name the BytesIO object by address; keep reasons reproducible
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
        raise UndecodableImage(f"{type(err).__name__}: {reason}") from err
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


def image_key(sample: dict) -> str | None:
    """The sample's image member name (``jpg``, ``png``...), or None when it has none."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    return None
