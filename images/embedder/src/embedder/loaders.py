"""The training data in an order and with augmentations that do not depend on history.

Epoch ``e``'s order comes from a generator seeded by ``(seed, e)``; each image's augmentation is
seeded by ``(seed, e, index)``. Neither depends on what ran before, so a resumed run sees exactly
what an uninterrupted one would (the checkpoint tests compare weights bit for bit). Neither depends
on the number of training processes either: the ranks of a data-parallel run share each step's
global batch (see :class:`EpochBatchSampler`).
"""

from __future__ import annotations

import argparse
import functools
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from embedder import data, device_decode, images, model
from embedder.distributed import SINGLE, World
from embedder.stage import StageInputError


def _mix(*values: int) -> int:
    h = 0
    for v in values:
        h = (h * 1_000_003 + v) % (2**63 - 1)
    return h


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for rank ``rank`` of ``world`` data-parallel processes.

    Epoch ``e``'s order is a permutation of the ``size`` images drawn from a generator seeded by
    ``(seed, e)``: the same on every rank, whether or not training was interrupted before it. Step
    ``s`` of the epoch trains on the global batch ``order[s*G:(s+1)*G]``, ``G = batch_size * world``,
    and rank ``r`` takes every ``world``-th key of it from the ``r``-th (``global_batch[r::world]``,
    which is also ``order[r::world]`` cut into batches): the ranks' batches of a step are disjoint
    and together are the global batch. So W processes with batch size B train, step by step, on
    exactly the images of one process with batch size W x B, with the same augmentations (those
    are seeded per image, see :class:`SeededDataset`).

    The remainder: with more images than one global batch, the last ``size % G`` of each epoch's
    order are left out of that epoch (as ``DataLoader``'s ``drop_last``; a different few each epoch);
    with at most one global batch, the epoch is one step on every image, split among the ranks as
    above (their batches then differ in size by at most one image).

    ``set_epoch(e, start)`` resumes epoch ``e`` at position ``start`` of its order, counted in images
    of all ranks. With the world size of the run that saved ``start``, the remaining steps are
    exactly its remaining steps. With another world size the rest of the epoch is cut into the new
    global batches from ``start`` on, so no image of the epoch is seen twice or skipped, except that
    the dropped remainder of that one epoch is the new ``(size - start) % G``.
    """

    def __init__(self, size: int, batch_size: int, seed: int, drop_last: bool, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} ranks")
        self.size, self.batch_size, self.seed, self.drop_last = size, batch_size, seed, drop_last
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, all ranks together."""
        return self.batch_size * self.world

    def steps_from(self, start: int) -> int:
        """Steps from position ``start`` of an epoch's order to its end."""
        rest = max(0, self.size - start)
        return rest // self.global_batch if self.drop_last else -(-rest // self.global_batch)

    @property
    def batches_per_epoch(self) -> int:
        """Steps in a whole epoch."""
        return self.steps_from(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order of the image indices (the same on every rank)."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, epoch))).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        for step in range(len(self)):
            first = self.start + step * self.global_batch
            yield [(self.epoch, i) for i in order[first : first + self.global_batch][self.rank :: self.world]]

    def __len__(self) -> int:
        return self.steps_from(self.start)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``size``: each rank scores its share of a split, each image once."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededDataset(Dataset):
    """Looks up ``(epoch, index)`` keys as ``(image, target, index)``; each sample's random augmentation is
    seeded by ``(seed, epoch, index)``. The index lets the loop say which images it trained on."""

    def __init__(self, base: data.ManifestDataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, index = key
        # Torchvision's random transforms draw from the default CPU generator: seed it for this
        # sample and put its state back after (cheaper than torch.random.fork_rng by ~50x).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(_mix(self.seed, epoch, index))
        try:
            return (*self.base[index], index)
        finally:
            generator.set_state(saved)


def _worker_init(_worker_id: int) -> None:
    # SIGTERM goes to the trainer, which stops the workers itself after saving a checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_workers(requested: int, local_processes: int = 1, cuda: bool = False) -> int:
    """DataLoader workers per training process: ``requested``, or (-1) from this process's share of the
    CPU budget (the affinity mask and cgroup quota, divided among the node's training processes).

    On a GPU every CPU but the one that drives the GPU decodes and augments; on the CPU the training
    threads need the cores, so small machines load in the training process itself.
    """
    if requested >= 0:
        return requested
    share = model.cpu_share(local_processes)
    if cuda:
        return max(1, share - 1)
    return 0 if share <= 2 else min(8, share - 1)


def make_loaders(manifest: data.Manifest, class_to_idx: dict[str, int], args: argparse.Namespace,
                 cuda: bool = False, world: World = SINGLE):
    """This rank's training loader (:class:`EpochBatchSampler`) and its share of the validation split.

    ``cuda``: pinned memory and a deeper prefetch, so copies to the GPU overlap its work. With
    ``--decode-on device`` the training batches are :class:`embedder.device_decode.EncodedBatch`.
    """
    workers = loader_workers(args.num_workers, world.local_size, cuda)
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": cuda,
              "worker_init_fn": _worker_init if workers else None}
    if workers:
        common["prefetch_factor"] = 4 if cuda else 2
    train_set = data.ManifestDataset(manifest, "train", class_to_idx, images.train_transform(args.image_size, args.augment))
    items: Dataset = train_set
    if args.decode_on == "device":  # the workers read files and draw crops; the training device decodes
        items = device_decode.EncodedImages(train_set, args.image_size)
        common_train = {"collate_fn": functools.partial(device_decode.collate, image_size=args.image_size)}
    else:
        common_train = {}
    if len(train_set) < world.size:
        raise StageInputError(f"{len(train_set)} training images cannot be shared among {world.size} training "
                              "processes; run fewer processes or add images")
    global_batch = args.batch_size * world.size
    sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, drop_last=len(train_set) > global_batch,
                                rank=world.rank, world=world.size)
    train_loader = DataLoader(SeededDataset(items, args.seed), batch_sampler=sampler, **common, **common_train)
    val_set = data.ManifestDataset(manifest, "val", class_to_idx, images.eval_transform(args.image_size))
    val_loader = None
    if len(val_set):
        val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=ShardSampler(len(val_set), world.rank, world.size),
                                **common)
    return train_loader, val_loader
