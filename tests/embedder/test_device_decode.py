"""JPEG decoding on the training device (``--decode-on device``), checked on the CPU (the same code with
``device="cpu"``; no GPU here): the same crops as the CPU path, close pixels, and a real training epoch."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from embedder import data, device_decode, images, loaders, loop, model

SIZE = 32


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> data.Manifest:
    """Photo-like JPEGs (RGB and grayscale, odd sizes), a PNG and a CMYK JPEG, in two classes."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(6):
            folder = root / split / f"c{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            smooth = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).resize((90 + k, 61 + 2 * k),
                                                                                           Image.Resampling.BICUBIC)
            if k == 4:
                smooth.convert("L").save(folder / f"{k}.jpg", quality=90)
            elif k == 5:
                smooth.save(folder / f"{k}.png")
            elif k == 3:
                smooth.convert("CMYK").save(folder / f"{k}.jpg", quality=90)
            else:
                smooth.save(folder / f"{k}.jpg", quality=90)
    return data.scan(str(root))


def datasets(manifest: data.Manifest, augment: str) -> tuple[loaders.SeededDataset, loaders.SeededDataset]:
    """The CPU path and the device path over the same training split."""
    split = data.ManifestDataset(manifest, "train", {"c0": 0, "c1": 1}, images.train_transform(SIZE, augment))
    return loaders.SeededDataset(split, seed=3), loaders.SeededDataset(device_decode.EncodedImages(split, SIZE), seed=3)


@pytest.mark.parametrize("augment", ["crop-flip", "crop", "none"])
def test_the_device_path_crops_as_the_cpu_path_and_its_pixels_are_close(manifest, augment):
    cpu, device = datasets(manifest, augment)
    kinds = []
    for epoch in range(3):
        for index in range(len(cpu)):
            expected, target, _ = cpu[(epoch, index)]
            payload, crop, device_target, device_index = device[(epoch, index)]
            batch = device_decode.collate([(payload, crop, device_target, device_index)], image_size=SIZE)
            got = batch[0].decode(torch.device("cpu"))[0]
            assert got.shape == expected.shape == (3, SIZE, SIZE) and device_target == target and device_index == index
            kinds.append(payload.dim())
            if payload.dim() == 3:  # decoded by the workers: the CPU path's pixels
                assert torch.allclose(got, expected, atol=1e-4)
            else:  # the same crop, resized by torch instead of Pillow: within a grey level on average (a crop
                # flipped the other way is tens of levels off)
                assert (got - expected).abs().mean() * 0.226 * 255 < 1, (epoch, index)
    assert kinds.count(1) == 3 * 4 and kinds.count(3) == 3 * 2  # RGB and grey JPEGs on the device; PNG, CMYK not


def test_an_epoch_trains_from_batches_the_device_decodes(manifest):
    args = argparse.Namespace(image_size=SIZE, augment="crop-flip", batch_size=3, seed=0, num_workers=0,
                              decode_on="device", epochs=1, learning_rate=0.01, weight_decay=0.0, amp="off",
                              channels_last="off", compile="off", log_every_steps=1000, checkpoint_every_steps=0,
                              progress_every_steps=1000, progress_every_s=1000.0)
    train_loader, _ = loaders.make_loaders(manifest, {"c0": 0, "c1": 1}, args)
    assert isinstance(next(iter(train_loader))[0], device_decode.EncodedBatch)
    torch.manual_seed(0)
    trainer = loop.Trainer(model.build("resnet18", 2), args, torch.device("cpu"))
    before = trainer.net.head.weight.detach().clone()
    with loop.StopSignal() as stop:
        metrics = loop.fit(trainer, loop.Progress(), args, train_loader, None, None, None, stop, {})
    assert metrics["train_loss"] > 0 and metrics["epoch_seconds"] > 0
    assert metrics["images_per_sec"] == pytest.approx(6 / metrics["epoch_seconds"])  # both steps, all six images
    assert not torch.equal(before, trainer.net.head.weight)
