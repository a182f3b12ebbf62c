"""JPEG decoding on the training device (``--decode-on device``), for when the CPUs cannot decode as fast as the GPU trains.

The DataLoader workers only read each file and draw its random crop and flip; the device decodes the
batch (``torchvision.io.decode_jpeg``: nvJPEG on a GPU), crops, resizes, flips and normalises it. The
random choices are those of the CPU path (:func:`embedder.images.train_transform`), drawn in the same
order from the same per-image seed, so an image gets the same crop box either way; the pixels differ
by the resize's rounding. Files that are not JPEG in RGB or grayscale (PNG, CMYK JPEG, ...) are
decoded, cropped and resized by the workers as on the CPU path, and join the batch as pixels.

The GPU benchmark (:mod:`embedder.bench_gpu`, ``--decode-on device``) measures whether it pays: its
input-pipeline side says whether the workers are the bound.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

from embedder import data, images

DECODE_ON = ("cpu", "device")


@dataclass
class Crop:
    """Where one image's crop lies in it and whether it is flipped: the CPU transform's random choices."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def random_choices(transform: transforms.Compose, height: int, width: int) -> Crop:
    """``transform``'s random crop and flip for an image of ``height`` x ``width``, drawn as the transform
    itself draws them (from the default generator, in its order), without touching a pixel."""
    crop, flip = Crop(0, 0, height, width, False), False
    for step in transform.transforms:
        if isinstance(step, transforms.RandomResizedCrop):
            dims = torch.empty(1, 1, 1).expand(3, height, width)  # get_params only reads the shape
            crop = Crop(*step.get_params(dims, step.scale, step.ratio), False)
        elif isinstance(step, transforms.RandomHorizontalFlip):
            flip = bool(torch.rand(1) < step.p)
    crop.flip = flip
    return crop


class EncodedImages(Dataset):
    """A split's images as ``(file bytes or pixels, crop, target)``, for :class:`embedder.loaders.SeededDataset`
    (which seeds the random choices per image, as for the CPU path).

    A JPEG in RGB or grayscale comes as its bytes (uint8, 1-d) with its crop, for the device to
    decode; any other file as its cropped, resized, flipped pixels (uint8, 3 x size x size).
    """

    def __init__(self, base: data.ManifestDataset, image_size: int):
        self.base, self.image_size = base, image_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Crop, int]:
        raw = self.base.read(index)
        target = self.base.target(index)
        with Image.open(io.BytesIO(raw)) as header:  # the header only: nothing is decoded
            width, height = header.size
            on_device = header.format == "JPEG" and header.mode in ("RGB", "L")
        crop = random_choices(self.base.transform, height, width)
        if on_device:
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8), crop, target
        size = [self.image_size, self.image_size]
        pixels = TF.resized_crop(images.decode_rgb(raw), crop.top, crop.left, crop.height, crop.width, size)
        if crop.flip:
            pixels = TF.hflip(pixels)
        return TF.pil_to_tensor(pixels), Crop(0, 0, self.image_size, self.image_size, False), target


@dataclass
class EncodedBatch:
    """A batch as the workers leave it for the device: per image, JPEG bytes or final pixels, and its crop."""

    payloads: list[torch.Tensor]
    crops: list[Crop]
    image_size: int

    def pin_memory(self) -> EncodedBatch:
        return EncodedBatch([p.pin_memory() for p in self.payloads], self.crops, self.image_size)

    def __len__(self) -> int:
        return len(self.payloads)

    def decode(self, device: torch.device) -> torch.Tensor:
        """The batch as the CPU path's tensors: (N, 3, size, size), float, normalised, on ``device``."""
        size = self.image_size
        jpegs = [p for p in self.payloads if p.dim() == 1]
        decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
        out = torch.empty(len(self), 3, size, size, device=device)
        for k, (payload, crop) in enumerate(zip(self.payloads, self.crops, strict=True)):
            if payload.dim() == 1:
                pixels = next(decoded)[:, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
                pixels = F.interpolate(pixels[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                       align_corners=False)[0]
                out[k] = pixels.flip(-1) if crop.flip else pixels
            else:
                out[k] = payload.to(device, non_blocking=True)
        mean, std = _normalisation(device)
        return out.sub_(mean).div_(std)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std on ``device``, scaled to 0-255 pixels: made once per device, not every step."""
    return (torch.tensor(images.IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(images.IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)


def collate(batch: list[tuple[torch.Tensor, Crop, int, int]], image_size: int
            ) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
    """The DataLoader's ``collate_fn`` over :class:`EncodedImages` in a SeededDataset: (EncodedBatch, targets, indices)."""
    payloads, crops, targets, indices = zip(*batch, strict=True)
    return EncodedBatch(list(payloads), list(crops), image_size), torch.tensor(targets), torch.tensor(indices)
