"""A sharded, deterministically seeded batch loader (the original's ``load_data`` with resume).

:func:`make_loader` wraps a dataset in ``torch.utils.data.DataLoader`` batches sharded by rank
with a ``DistributedSampler`` (shuffled with ``seed + epoch``); every rank holds a disjoint part
of each epoch.  ``infinite=True`` cycles epochs forever like the original's generator.  The
position in the stream (epoch, batches taken) is in :meth:`BatchLoader.state_dict` so training
can resume exactly where it stopped.  No global RNG is used (the DataLoader gets its own
``torch.Generator``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from iddpm.config import ConfigError

__all__ = ["BatchLoader", "make_loader"]


class _EpochIndexSampler(Sampler):
    """Yields this rank's indices of one epoch: ``(index, epoch)`` pairs when ``tag`` (datasets with
    ``accepts_epoch_index``, whose random flip depends on the epoch), else plain indices."""

    def __init__(self, indices: list[int], epoch: int, tag: bool):
        self.indices = indices
        self.epoch = epoch
        self.tag = tag

    def __iter__(self):
        return ((i, self.epoch) for i in self.indices) if self.tag else iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BatchLoader:
    """Iterable of ``(x float32 [N, C, H, W], cond {"y": int64 [N]} or {})`` batches for one rank.

    Any map-style dataset works; an :class:`~iddpm.data.dataset.ImageDataset` additionally receives
    ``(index, epoch)`` so that its random flip changes with the epoch.  Iterating a finite loader
    runs one epoch (the next one each time); an infinite loader never stops.
    ``state_dict()`` -> ``{"epoch", "batch"}``: the epoch in progress and the number of batches of
    it already yielded; ``load_state_dict`` continues from there.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool = True,
        infinite: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"--batch_size {batch_size}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.infinite = bool(infinite)
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=self.seed, drop_last=False
        )
        if self.drop_last and len(self.sampler) < self.batch_size:
            raise ConfigError(
                f"--batch_size {batch_size}: larger than this rank's share of the data ({len(self.sampler)} of "
                f"{len(dataset)} images); lower the batch size or add images"
            )
        self.epoch = 0
        self.batch = 0

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices of ``epoch``, in order."""
        self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def _epoch_loader(self) -> DataLoader:
        indices = self.epoch_indices(self.epoch)[self.batch * self.batch_size :]
        tag = bool(getattr(self.dataset, "accepts_epoch_index", False))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # worker base seeds only
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=_EpochIndexSampler(indices, self.epoch, tag),
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            generator=generator,
            pin_memory=False,
        )

    def __iter__(self) -> Iterator:
        while True:
            try:
                for x, cond in self._epoch_loader():
                    self.batch += 1
                    yield x, cond
            except ConfigError as exc:  # from a worker process it carries the worker's traceback: keep the message
                raise ConfigError(_worker_message(exc)) from None
            self.epoch += 1
            self.batch = 0
            if not self.infinite:
                return


def _worker_message(exc: ConfigError) -> str:
    """The one-line message of a ConfigError, also when a DataLoader worker re-raised it with its traceback."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last.split("ConfigError: ", 1)[-1]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = True,
    infinite: bool = False,
) -> BatchLoader:
    """Batches of ``dataset`` for ``rank`` of ``world_size`` (``batch_size`` is per rank).

    Sharding: ``DistributedSampler(num_replicas=world_size, rank=rank, seed=seed)``, ``set_epoch``
    per epoch; with ``drop_last=False`` the sampler pads the last shard by repeating indices (as
    DistributedSampler does) and the last batch may be short.
    """
    return BatchLoader(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        drop_last=drop_last,
        infinite=infinite,
    )
