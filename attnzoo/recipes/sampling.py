"""Samplers and a dataset wrapper that make every random draw of the data a function of (seed, epoch, index).

With them, a run gives the same batches and augmentations whatever the number of workers, whether
it was interrupted and resumed at an epoch boundary, and whether it runs in one process or in N:
the N processes of a DDP run see interleaved shards of the single process' order
(``indices[rank::N]``, torch's ``DistributedSampler``), so the union of their batch k is the
single process' batch k.
"""
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ['EvalSampler', 'SeededDataset', 'TrainSampler', 'derive_seed', 'seed_everything_for_batch']


def derive_seed(*keys: int) -> int:
    """A 32-bit seed derived from integer ``keys`` (a seed, an epoch, an index, a rank...)."""
    return int(np.random.SeedSequence([int(k) % 2 ** 63 for k in keys]).generate_state(1)[0])


class TrainSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (shuffled per (seed, epoch), sharded ``[rank::num_replicas]``,
    padded to equal shards) whose items are ``(index, epoch)``, for :class:`SeededDataset`.

    Being a ``DistributedSampler``, Lightning keeps it under DDP (instead of wrapping its own) and
    calls :meth:`set_epoch` before every epoch. ``current_epoch``, where given, is asked instead
    when an epoch's iteration starts (the trainer's own count): resuming a step-budgeted run
    (``max_steps``), Lightning sets the epoch one ahead of the one it trains, which would draw
    another epoch's order and augmentations.
    """

    def __init__(self, *args: Any, current_epoch: Optional[Callable[[], int]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current_epoch = current_epoch

    def __iter__(self) -> Iterator[Tuple[int, int]]:  # type: ignore[override]
        if self.current_epoch is not None:
            self.set_epoch(self.current_epoch())
        epoch = self.epoch
        return ((int(i), epoch) for i in super().__iter__())


class EvalSampler(DistributedSampler):
    """In order, sharded ``[rank::num_replicas]`` and not padded: each sample is scored exactly once,
    so metrics synced over processes equal the single-process ones (shards may differ by one)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Tuple[int, int]]:  # type: ignore[override]
        return ((i, 0) for i in range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class SeededDataset(Dataset):
    """Wraps a dataset whose ``transform`` is a :class:`~attnzoo.recipes.transforms.Preset` (or
    None): item ``(index, epoch)`` reseeds the preset from (seed, epoch, index) and returns
    ``dataset[index]``. Each worker holds its own copy, so reseeding never races."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Tuple[int, int]) -> Any:
        index, epoch = item
        transform: Optional[Any] = getattr(self.dataset, 'transform', None)
        if transform is not None and hasattr(transform, 'reseed'):
            transform.reseed(derive_seed(self.seed, epoch, index))
        return self.dataset[index]


def seed_everything_for_batch(seed: int, epoch: int, batch: int, rank: int) -> None:
    """Reseed Python's, numpy's and torch's global generators from (seed, epoch, batch, rank):
    what draws from them in a training step (dropout, drop path, mixup) is then the same in a
    resumed run."""
    import random
    s = derive_seed(seed, epoch, batch, rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
