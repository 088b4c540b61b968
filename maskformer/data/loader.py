"""Data loaders for iteration-based training (infinite, seeded, resumable) and for evaluation.

Reproducibility and resume
--------------------------
The training stream is defined independently of processes and workers. Global position ``g = 0, 1, 2,
...`` holds index ``perm_e[g % N]`` with ``e = g // N`` (one fresh permutation per pass, drawn from
``(seed, e)``), and the sample there is augmented with a generator seeded from ``(seed, g)``. Rank
``r`` of ``W`` takes positions ``g = j*W + r``, ``j = 0, 1, ...`` (disjoint shards), so per-rank batch
``k`` holds local items ``k*b .. k*b+b-1`` with ``b = ims_per_batch // W``.

Because the augmentation depends only on ``(seed, g)`` -- not on a worker's RNG state -- a run gives the
same batches with 0 or many workers, and ``build_train_loader(cfg, start_iter=k)`` starts the stream at
local item ``k*b`` and yields exactly the batches an uninterrupted loader yields from iteration ``k``
on (bit-exact resume). ``worker_init_fn`` still seeds ``random``/``numpy``/``torch`` per (seed, rank,
worker) for any third-party code that uses global RNGs.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from maskformer.data.collate import SegmentationCollator
from maskformer.data.dataset import SegmentationDataset, build_dataset

__all__ = ["TrainingSampler", "InferenceSampler", "build_train_loader", "build_test_loader", "build_collator", "seed_worker"]


class TrainingSampler(Sampler):
    """Infinite stream of ``(index, seed_words)`` keys for one rank (see the module docstring).

    Args:
        size: dataset length N.
        seed: the run's seed.
        rank, world_size: this process's shard.
        start: first *local* item to yield (``start_iter * per_rank_batch`` to resume).
        shuffle: False streams 0..N-1 in order on every pass.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.size, self.seed, self.rank, self.world_size, self.start, self.shuffle = size, seed, rank, world_size, start, shuffle

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, 0, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int, int]]]:
        local = self.start
        epoch, perm = -1, None
        while True:
            g = local * self.world_size + self.rank
            if g // self.size != epoch:
                epoch = g // self.size
                perm = self._permutation(epoch)
            yield int(perm[g % self.size]), (self.seed, 1, g)
            local += 1


class InferenceSampler(Sampler):
    """Contiguous, disjoint shard of ``range(size)`` for one rank; no padding, no duplicates."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(size * rank // world_size, size * (rank + 1) // world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int, *, seed: int, rank: int) -> None:
    s = int(np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def build_collator(cfg, ignore_label: int) -> SegmentationCollator:
    m = cfg.model
    return SegmentationCollator(m.pixel_mean, m.pixel_std, m.size_divisibility, ignore_label)


def build_train_loader(
    cfg, rank: int = 0, world_size: int = 1, *, start_iter: int = 0, dataset: SegmentationDataset | None = None
) -> DataLoader:
    """Infinite training loader of per-rank batches (``cfg.solver.ims_per_batch // world_size`` each).

    ``start_iter=k`` resumes the stream at iteration ``k`` exactly. ``dataset`` skips rebuilding it.
    """
    total = cfg.solver.ims_per_batch
    if total % world_size != 0:
        raise ValueError(f"solver.ims_per_batch ({total}) must be divisible by the number of processes ({world_size})")
    per_rank = total // world_size
    if dataset is None:
        dataset = build_dataset(cfg, "train")
    seed = cfg.train.seed
    sampler = TrainingSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start=start_iter * per_rank)
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=workers,
        collate_fn=build_collator(cfg, dataset.metadata.ignore_label),
        worker_init_fn=partial(seed_worker, seed=seed, rank=rank),
        generator=torch.Generator().manual_seed(seed + rank),
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
    )


def build_test_loader(cfg, rank: int = 0, world_size: int = 1, *, dataset: SegmentationDataset | None = None) -> DataLoader:
    """Sequential loader over this rank's contiguous shard of the test set (``cfg.test.ims_per_batch`` per batch).

    ``cfg.test.max_images > 0`` keeps only the first that many images (before sharding).
    """
    if dataset is None:
        dataset = build_dataset(cfg, "test")
    size = len(dataset)
    if cfg.test.max_images > 0:
        size = min(size, cfg.test.max_images)
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.test.ims_per_batch,
        sampler=InferenceSampler(size, rank, world_size),
        num_workers=workers,
        collate_fn=build_collator(cfg, dataset.metadata.ignore_label),
        worker_init_fn=partial(seed_worker, seed=cfg.train.seed, rank=rank),
        pin_memory=torch.cuda.is_available(),
    )
