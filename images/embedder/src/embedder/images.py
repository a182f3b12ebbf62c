"""Decoding and preprocessing of images, shared by training, evaluation and serving."""

from __future__ import annotations

import io

from PIL import Image
from torchvision import transforms

# torchvision's ImageNet statistics: right for pretrained weights, harmless from scratch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "crop", "crop-flip")


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode image bytes into an RGB image (grayscale, palette, RGBA and CMYK are converted).

    Raises ``PIL.UnidentifiedImageError`` / ``OSError`` for data that is not a complete image.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
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
