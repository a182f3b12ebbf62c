"""Decoding and preprocessing of images, shared by training, evaluation and serving."""

from __future__ import annotations

import io
import re

from PIL import Image, UnidentifiedImageError
from torchvision import transforms

# torchvision's ImageNet statistics: right for pretrained weights, harmless from scratch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "crop", "crop-flip")


DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000: far beyond any training image, far below a bomb
# Pillow names the stream it read in some messages ("cannot identify image file <_io.BytesIO object at
# 0x7f...>"): an address that says nothing about the file and differs on every run.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class ImageRejected(ValueError):
    """The data is not a usable image; the message says why (for the quarantine report)."""


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode image bytes into RGB; see :func:`decode`."""
    return decode(data, max_pixels)[0]


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """Fully decode image bytes into (the image in RGB, the file's own mode).

    Grayscale, palette, CMYK and 16-bit are converted, and transparency is composited onto white
    (not dropped to black).

    The pixel count is checked from the header before anything is decoded, so a decompression bomb
    costs nothing. Raises :class:`ImageRejected` with the reason for anything that is not a complete,
    decodable image of acceptable size.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(f"decompression bomb guard: {width}x{height} = {width * height} pixels, "
                                    f"over the limit of {max_pixels}")
            img.load()
            return to_rgb(img), img.mode
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb: {_describe(exc)}") from None
    except UnidentifiedImageError as exc:  # no format Pillow knows recognises the bytes
        raise ImageRejected(f"not a decodable image: not in an image format Pillow can read ({_describe(exc)})") from None
    except Exception as exc:  # PIL raises many types for undecodable or truncated data
        raise ImageRejected(f"not a decodable image: {type(exc).__name__}: {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    """The exception's message without object reprs (which carry a memory address, not a reason)."""
    return _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grayscale: scale to 8 bits, do not clip
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    if img.mode == "F":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


def eval_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(image_size: int, augment: str) -> transforms.Compose:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if augment == "none":
        return eval_transform(image_size)
    steps: list = [transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.9, 1.1))]
    if augment == "crop-flip":
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)
