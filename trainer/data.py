"""Training batches from the caches, in a seeded order whose position can be saved and resumed.

Epoch e's order depends only on (seed, e): each item is repeated num_repeats times, items of one
dataset and one bucket (size and frame count) are shuffled and cut into that dataset's batch_size,
and the batches are shuffled. With N processes, process r takes batches r, r + N, ... (the list is
padded by cycling so every process runs the same number). A run's position is (epoch, batch index),
so a resumed run reads exactly the batches the uninterrupted run would have read.
"""
from __future__ import annotations

import math
import random

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from k5core.cache import CachedItem, collate_cached, load_cached_item


def epoch_batches(items: list[CachedItem], seed: int, epoch: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """Item indices of every batch this process runs in `epoch` (1-based), in order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.dataset, item.bucket_key, item.batch_size), []).extend([i] * item.num_repeats)
    batches = []
    for (_, _, size), members in sorted(groups.items()):
        rng.shuffle(members)
        batches += [members[k:k + size] for k in range(0, len(members), size)]
    rng.shuffle(batches)
    per_rank = math.ceil(len(batches) / world)
    padded = [batches[k % len(batches)] for k in range(per_rank * world)]
    return padded[rank::world]


def batches_per_epoch(items: list[CachedItem], world: int = 1) -> int:
    """Batches one process runs per epoch (the same for every epoch and process)."""
    return len(epoch_batches(items, 0, 1, world, 0))


class _Batches(Dataset):
    """Dataset keyed by (epoch, k): the k-th batch of that epoch, loaded and collated (in a worker)."""

    def __init__(self, items: list[CachedItem], seed: int, world: int, rank: int):
        self.items, self.seed, self.world, self.rank = items, seed, world, rank
        self._plan: tuple[int, list] | None = None

    def batch(self, epoch: int, k: int) -> list[int]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_batches(self.items, self.seed, epoch, self.world, self.rank))
        return self._plan[1][k]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return collate_cached([load_cached_item(self.items[i]) for i in self.batch(*key)])


class _Positions(Sampler):
    """(epoch, k) from a start position to the end of epoch `last_epoch`, in order."""

    def __init__(self, per_epoch: int, start: tuple[int, int], last_epoch: int):
        self.per_epoch, self.start, self.last_epoch = per_epoch, start, last_epoch

    def __iter__(self):
        epoch, k = self.start
        while epoch <= self.last_epoch:
            yield epoch, k
            k += 1
            if k == self.per_epoch:
                epoch, k = epoch + 1, 0

    def __len__(self) -> int:
        epoch, k = self.start
        return max(0, (self.last_epoch - epoch + 1) * self.per_epoch - k)


def batch_stream(items: list[CachedItem], seed: int, start: tuple[int, int], last_epoch: int, world: int = 1,
                 rank: int = 0, workers: int = 0):
    """Yield ((epoch, k), batch) from position `start` = (epoch, k) to the end of `last_epoch`; one
    loader (and its workers) serves the whole run. A batch is what collate_cached gives: latent
    (B, 16, T, h, w), text_embed (B, L, D), text_mask (B, L), pooled (B, Dp), [image_latent]."""
    sampler = _Positions(batches_per_epoch(items, world), start, last_epoch)
    loader = DataLoader(_Batches(items, seed, world, rank), batch_size=None, sampler=sampler,
                        num_workers=workers, prefetch_factor=2 if workers else None,
                        generator=torch.Generator().manual_seed(seed))   # leaves the global RNG alone
    yield from zip(iter(sampler), loader)


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Move a batch: float tensors to `dtype`, masks stay bool."""
    return {k: v.to(device, dtype, non_blocking=True) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()}
