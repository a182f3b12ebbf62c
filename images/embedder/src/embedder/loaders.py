"""The training data in an order and with augmentations that do not depend on history.

Epoch ``e``'s order comes from a generator seeded by ``(seed, e)``; each image's augmentation is
seeded by ``(seed, e, index)``. Neither depends on what ran before, so a resumed run sees exactly
what an uninterrupted one would (the checkpoint tests compare weights bit for bit).
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from embedder import data, images, model


def _mix(*values: int) -> int:
    h = 0
    for v in values:
        h = (h * 1_000_003 + v) % (2**63 - 1)
    return h


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys: epoch ``e``'s order comes from a generator seeded by
    ``(seed, e)``, so it is the same whether or not training was interrupted before it, and
    ``set_epoch(e, start_batch)`` resumes in the middle of it."""

    def __init__(self, size: int, batch_size: int, seed: int, drop_last: bool):
        self.size, self.batch_size, self.seed, self.drop_last = size, batch_size, seed, drop_last
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch))).tolist()
        for b in range(self.start_batch, self.batches_per_epoch):
            yield [(self.epoch, i) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)


class SeededDataset(Dataset):
    """Looks up ``(epoch, index)`` keys; each sample's random augmentation is seeded by ``(seed, epoch, index)``."""

    def __init__(self, base: data.ManifestDataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        # Torchvision's random transforms draw from the default CPU generator: seed it for this
        # sample and put its state back after (cheaper than torch.random.fork_rng by ~50x).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(_mix(self.seed, epoch, index))
        try:
            return self.base[index]
        finally:
            generator.set_state(saved)


def _worker_init(_worker_id: int) -> None:
    # SIGTERM goes to the trainer, which stops the workers itself after saving a checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    budget = model.cpu_budget()
    return 0 if budget <= 2 else min(8, budget - 1)


def make_loaders(manifest: data.Manifest, class_to_idx: dict[str, int], args: argparse.Namespace,
                 pin_memory: bool = False):
    workers = loader_workers(args.num_workers)
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": pin_memory,
              "worker_init_fn": _worker_init if workers else None}
    train_set = data.ManifestDataset(manifest, "train", class_to_idx, images.train_transform(args.image_size, args.augment))
    sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, drop_last=len(train_set) > args.batch_size)
    train_loader = DataLoader(SeededDataset(train_set, args.seed), batch_sampler=sampler, **common)
    val_set = data.ManifestDataset(manifest, "val", class_to_idx, images.eval_transform(args.image_size))
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, **common) if len(val_set) else None
    return train_loader, val_loader
