"""Which clips each iteration trains on, and the DataLoader that delivers them.

The order is a pure function of (seed, global clip position) (``ClipOrder``), and each clip's augmentation is drawn
from (seed, epoch, index) by the dataset itself (``EpochIndexed`` tells it the epoch), so resuming at any iteration,
with any number of DataLoader workers or processes, gives the same clips with the same augmentation. The DataLoader
gets its own generator: it never draws from the global random streams (see ``rng``).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from av2ts_cli.data import collate_clips
from av2ts_cli.errors import UsageError


class ClipOrder:
    """The global stream of training clips: epoch e is a permutation of the clips drawn from (seed, e); the clip at
    global position p is ``permutation(p // n)[p % n]``. Iteration i uses positions [i * batch, (i + 1) * batch);
    rank r of w takes the r-th of w equal slices. So the order is a pure function of the position: resuming at any
    iteration, with any number of DataLoader workers, gives the same clips, and w processes together see exactly
    the clips of one process with the same global batch."""

    def __init__(self, num_clips: int, batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch % world_size:
            raise UsageError(f"--batch {batch} must be a multiple of the number of processes ({world_size})")
        self.num_clips, self.batch, self.seed = num_clips, batch, seed
        self.rank, self.world_size = rank, world_size
        self._permutation: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_clips))
        return self._permutation[1]

    def clips(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's (epoch, clip index) pairs of an iteration."""
        share = self.batch // self.world_size
        start = iteration * self.batch + self.rank * share
        return [(p // self.num_clips, int(self.permutation(p // self.num_clips)[p % self.num_clips]))
                for p in range(start, start + share)]

    def state(self, iteration: int) -> dict:
        return {"seed": self.seed, "batch": self.batch, "clips": self.num_clips, "position": iteration * self.batch}


class IterationBatches(Sampler):
    """Batch sampler over iterations [start, stop): each batch is ``ClipOrder.clips(iteration)``."""

    def __init__(self, order: ClipOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start, self.stop):
            yield self.order.clips(iteration)

    def __len__(self) -> int:
        return self.stop - self.start


class EpochIndexed(Dataset):
    """A training dataset indexed by (epoch, clip): the clip's augmentation is drawn from (seed, epoch, clip)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        self.dataset.set_epoch(epoch)  # each worker holds its own copy of the dataset
        return self.dataset[index]


def worker_init(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the workers leave it to the main process, which saves and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_loader(dataset, order: ClipOrder, start: int, stop: int, workers: int, seed: int,
                    pin_memory: bool = False) -> DataLoader:
    """This process's batches of iterations [start, stop) of ``order`` from the training ``dataset``, collated by
    ``data.collate_clips``."""
    return DataLoader(
        EpochIndexed(dataset), batch_sampler=IterationBatches(order, start, stop), num_workers=workers,
        collate_fn=collate_clips, pin_memory=pin_memory, worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
        prefetch_factor=2 if workers else None)
