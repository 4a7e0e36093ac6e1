"""Poisson sampling of batches, the sampling that DP-SGD accounting assumes.

Every record joins each batch independently with probability q, so batch
sizes are Binomial(N, q): they vary from step to step and may be 0. The
accountant's guarantee (:mod:`lorafast.dp.accountant`) holds only for batches
drawn this way, which is why :class:`DPDataLoader` replaces a loader's sampler
instead of reusing it.

In distributed training each rank samples its own shard ``rank::world_size``
at the same rate q. The union over ranks is then a Poisson sample of the whole
dataset at rate q, the same mechanism as on one process.
"""
from __future__ import annotations

import collections.abc
import warnings

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler)
from torch.utils.data.distributed import DistributedSampler

from .._checks import check_count, check_sample_rate
from .._random import os_seed
from .noise import secure_uniform

__all__ = ["DPDataLoader", "PoissonBatchSampler"]


class PoissonBatchSampler(Sampler):
    """Yields ``steps`` batches of indices; each index joins each batch independently with probability ``sample_rate``.

    Args:
        num_samples: size N of the (map-style) dataset.
        sample_rate: inclusion probability q in (0, 1].
        steps: batches per epoch; by default ``round(1/q)``, one pass over the data in expectation.
        generator: torch.Generator for the Bernoulli draws. By default a fresh one seeded from
            the OS; pass a seeded one to replay a run.
        secure_mode: draw from the OS's cryptographically secure generator instead (os.urandom).
            Slower, several times so for large N, but not predictable from observed batches,
            which a seeded PRNG is. ``generator`` must then be None.
        rank, world_size: with ``world_size > 1`` only indices ``range(rank, N, world_size)`` are
            sampled (at rate q). Give each rank its own generator seed: shared seeds correlate
            inclusions across ranks, which the accounting does not allow.
        micro_batches: yield each Poisson batch as this many consecutive chunks of near-equal
            size (gradient accumulation: the chunks of one logical batch share one noise draw,
            so the step is still one Poisson-subsampled Gaussian step). ``len`` counts chunks.

    Batches vary in size and may be empty (an empty list).
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None, *,
                 generator: torch.Generator | None = None, secure_mode: bool = False,
                 rank: int = 0, world_size: int = 1, micro_batches: int = 1):
        self.micro_batches = check_count("micro_batches", micro_batches, 1)
        self.num_samples = check_count("num_samples", num_samples, 1)
        self.sample_rate = check_sample_rate("sample_rate", sample_rate)
        self.world_size = check_count("world_size", world_size, 1)
        self.rank = check_count("rank", rank)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank!r}")
        if self.num_samples < self.world_size:
            raise ValueError(f"num_samples must be at least world_size={self.world_size}, got {num_samples!r}")
        self.steps = max(1, round(1 / self.sample_rate)) if steps is None else check_count("steps", steps, 1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.secure_mode = bool(secure_mode)
        if self.secure_mode and generator is not None:
            raise ValueError("generator must be None with secure_mode=True (draws come from os.urandom)")
        self.generator = None if self.secure_mode else (generator or torch.Generator().manual_seed(os_seed()))
        self._shard = torch.arange(self.rank, self.num_samples, self.world_size)

    @property
    def shard_size(self) -> int:
        """How many indices this rank samples from."""
        return len(self._shard)

    def __len__(self) -> int:
        return self.steps * self.micro_batches

    def __iter__(self):
        n = len(self._shard)
        for _ in range(self.steps):
            if self.secure_mode:
                u = torch.from_numpy(secure_uniform(n))  # P(u < q) = ⌈q·2⁵³⌉·2⁻⁵³
            else:
                u = torch.rand(n, generator=self.generator, dtype=torch.float64)
            batch = self._shard[u < self.sample_rate]
            if self.micro_batches == 1:
                yield batch.tolist()
            else:
                yield from (chunk.tolist() for chunk in torch.tensor_split(batch, self.micro_batches))


def _empty_like(batch):
    """The zero-length version of a collated batch: tensors sliced [:0], containers rebuilt."""
    if isinstance(batch, torch.Tensor):
        return batch[:0] if batch.dim() > 0 else batch
    if isinstance(batch, np.ndarray):
        return batch[:0] if batch.ndim > 0 else batch
    if isinstance(batch, (str, bytes)):
        return batch
    if isinstance(batch, collections.abc.Mapping):
        items = {k: _empty_like(v) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        # a collated list of non-tensors (strings, ids) has one entry per sample
        if batch and not any(isinstance(v, (torch.Tensor, np.ndarray, collections.abc.Mapping, list, tuple))
                             for v in batch):
            return type(batch)()
        return type(batch)(_empty_like(v) for v in batch)
    return batch


class _EmptyBatchCollate:
    """collate_fn that maps an empty batch to zero-length tensors of the right shape and dtype.

    The shapes come from collating one probe sample, done once on the first empty batch
    (once per worker process) and kept as an empty template.
    """

    def __init__(self, dataset, collate_fn, probe_index: int):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.probe_index = probe_index
        self._template = None

    def __call__(self, batch):
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self._template is None:
            self._template = _empty_like(self.collate_fn([self.dataset[self.probe_index]]))
        # rebuilt on every call so that a caller mutating the batch (e.g. popping keys) can't change the template
        return _empty_like(self._template)


def _distributed_rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs torch.distributed to be initialized (init_process_group)")
    return dist.get_rank(), dist.get_world_size()


# DataLoader arguments that choose batches; Poisson sampling replaces them.
_SAMPLING_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


class DPDataLoader(DataLoader):
    """DataLoader whose batches are Poisson samples of ``dataset`` at rate ``sample_rate``.

    One epoch is ``round(1/sample_rate)`` batches (each split into ``micro_batches`` chunks,
    see PoissonBatchSampler). Empty batches are collated to zero-length
    tensors with the usual trailing shapes and dtypes. ``distributed=True`` shards the indices
    by torch.distributed rank. ``loader_kwargs`` go to DataLoader (num_workers, pin_memory, ...).

    Attributes:
        sample_rate: q.
        expected_batch_size: q times the number of samples this rank draws from.
    """

    def __init__(self, dataset: Dataset, sample_rate: float, *, collate_fn=None,
                 generator: torch.Generator | None = None, secure_mode: bool = False,
                 distributed: bool = False, micro_batches: int = 1, **loader_kwargs):
        if isinstance(dataset, IterableDataset):
            raise ValueError("dataset must be a map-style dataset with __len__, not an IterableDataset: "
                             "Poisson sampling draws each index independently")
        try:
            num_samples = len(dataset)
        except TypeError:
            raise ValueError("dataset must be a map-style dataset with __len__") from None
        sample_rate = check_sample_rate("sample_rate", sample_rate)
        for key in _SAMPLING_KWARGS:
            if key in loader_kwargs:
                raise ValueError(f"{key} can't be given to DPDataLoader: batches are Poisson sampled "
                                 f"at sample_rate (expected batch size = sample_rate × len(dataset))")
        rank, world_size = _distributed_rank_world(distributed)
        batch_sampler = PoissonBatchSampler(num_samples, sample_rate, generator=generator,
                                            secure_mode=secure_mode, rank=rank, world_size=world_size,
                                            micro_batches=micro_batches)
        if collate_fn is None:
            collate_fn = torch.utils.data.default_collate
        super().__init__(dataset, batch_sampler=batch_sampler,
                         collate_fn=_EmptyBatchCollate(dataset, collate_fn, probe_index=rank),
                         generator=generator, **loader_kwargs)
        self.sample_rate = sample_rate
        self.expected_batch_size = sample_rate * batch_sampler.shard_size
        self.distributed = bool(distributed)

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator: torch.Generator | None = None,
                         secure_mode: bool = False, distributed: bool = False) -> "DPDataLoader":
        """The Poisson-sampled twin of ``data_loader``: same dataset, collate_fn and worker settings,
        ``sample_rate = 1/len(data_loader)``, so the expected batch size is about its batch size."""
        if not isinstance(data_loader, DataLoader):
            raise ValueError(f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
        if isinstance(data_loader.dataset, IterableDataset):
            raise ValueError("data_loader must wrap a map-style dataset with __len__, not an IterableDataset")
        if data_loader.batch_sampler is None:
            raise ValueError("data_loader must batch its samples (batch_size=None is not supported)")
        if len(data_loader) == 0:
            raise ValueError("data_loader must have at least one batch")
        custom_sampler = not (
            type(data_loader.batch_sampler) is BatchSampler
            and (type(data_loader.sampler) in (SequentialSampler, RandomSampler)
                 or (distributed and type(data_loader.sampler) is DistributedSampler))
        )
        if custom_sampler:
            warnings.warn(
                f"data_loader's sampler ({type(data_loader.sampler).__name__}) and batch sampler "
                f"({type(data_loader.batch_sampler).__name__}) are REPLACED by Poisson sampling at rate "
                f"1/len(data_loader); their ordering, weighting or grouping is lost. DP accounting "
                f"is only valid for Poisson-sampled batches.",
                UserWarning, stacklevel=2)
        kwargs = dict(
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            multiprocessing_context=data_loader.multiprocessing_context,
            persistent_workers=data_loader.persistent_workers,
        )
        if data_loader.num_workers > 0:
            kwargs["prefetch_factor"] = data_loader.prefetch_factor
        for optional in ("pin_memory_device", "in_order"):  # not in every torch version
            if hasattr(data_loader, optional):
                kwargs[optional] = getattr(data_loader, optional)
        return cls(data_loader.dataset, 1.0 / len(data_loader), collate_fn=data_loader.collate_fn,
                   generator=generator, secure_mode=secure_mode, distributed=distributed, **kwargs)
