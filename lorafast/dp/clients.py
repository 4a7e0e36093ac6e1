"""Per-client DP-SGD for k clients simulated in one model (MultiLoRALinear layers).

Each client is its own DP-SGD run over its own data: its samples are Poisson sampled at its
own rate q_c = E_c / n_c, each sample is clipped within its own client (its gradient lives
in its client's slice of the stacked adapters only), and every step draws one Gaussian noise
vector per client, with that client's Philox key, even for a client without samples in the
batch. Each client has its own accountant, so ε is reported per client. With the same
seeds, a client's private gradient is the one ``PrivacyEngine.make_private`` computes for
that client alone.
"""
from __future__ import annotations

import bisect
import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset

from .. import _ops, reference
from .._checks import check_count, check_nonnegative, check_seed
from .._random import os_seed
from .data_loader import PoissonBatchSampler, _EmptyBatchCollate
from .noise import secure_standard_normal
from .optimizer import DPOptimizer


def per_client(name: str, value, k: int, check) -> list:
    """A value per client from one value or a list of k."""
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{name} must be one value or a list of {k} (one per client), got {len(value)}")
        return [check(f"{name}[{c}]", v) for c, v in enumerate(value)]
    return [check(name, value)] * k


class _Tagged(Dataset):
    """The clients' datasets end to end; item j is (sample, its client)."""

    def __init__(self, datasets: Sequence[Dataset]):
        self.concat = ConcatDataset(datasets)
        self.starts = [0, *self.concat.cumulative_sizes]

    def __len__(self) -> int:
        return len(self.concat)

    def __getitem__(self, j):
        return self.concat[j], bisect.bisect_right(self.starts, j) - 1


class _ClientPoissonBatches:
    """Each step, every client's indices drawn by its own Poisson sampler (global indices)."""

    def __init__(self, samplers: list[PoissonBatchSampler], starts: list[int], steps: int):
        self.samplers, self.starts, self.steps = samplers, starts, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        streams = [iter(s) for s in self.samplers]
        for _ in range(self.steps):
            yield [start + i for s, start in zip(streams, self.starts) for i in next(s)]


class _TaggedCollate:
    def __init__(self, inner: _EmptyBatchCollate):
        self.inner = inner

    def __call__(self, items):
        return self.inner([s for s, _ in items]), torch.tensor([c for _, c in items], dtype=torch.int64)


class ClientDPDataLoader(DataLoader):
    """Yields ``(batch, client_ids)``: each client's samples Poisson sampled at its own rate
    q_c = expected_batch_size_c / len(dataset_c), all clients in one batch, in client order.
    Batches vary in size, and a client may have no samples (the batch may be empty)."""

    def __init__(self, client_datasets: Sequence[Dataset], expected_batch_size, *, steps: Optional[int] = None,
                 collate_fn=None, seed: Optional[int] = None, secure_mode: bool = False, **loader_kwargs):
        if not isinstance(client_datasets, (list, tuple)) or not client_datasets:
            raise ValueError("client_datasets must be a non-empty list of map-style datasets, one per client")
        sizes = []
        for c, ds in enumerate(client_datasets):
            if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
                raise ValueError(f"client_datasets[{c}] must be a map-style dataset with __len__ (Poisson sampling "
                                 "draws each index independently)")
            sizes.append(len(ds))
            if sizes[-1] == 0:
                raise ValueError(f"client_datasets[{c}] is empty")
        k = len(sizes)
        expected = per_client("expected_batch_size", expected_batch_size, k,
                              lambda n, v: float(check_count(n, v, 1)))
        rates = [e / n for e, n in zip(expected, sizes)]
        for c, q in enumerate(rates):
            if q > 1:
                raise ValueError(f"expected_batch_size[{c}] = {expected[c]:g} exceeds client {c}'s "
                                 f"{sizes[c]} samples")
        steps = max(1, round(1 / min(rates))) if steps is None else check_count("steps", steps, 1)
        seed = os_seed() if seed is None else check_seed("seed", seed)
        samplers = [PoissonBatchSampler(n, q, steps, secure_mode=secure_mode,
                                        generator=None if secure_mode else torch.Generator().manual_seed(seed + c))
                    for c, (n, q) in enumerate(zip(sizes, rates))]
        tagged = _Tagged(client_datasets)
        inner = _EmptyBatchCollate(client_datasets[0], collate_fn or torch.utils.data.default_collate, 0)
        super().__init__(tagged, batch_sampler=_ClientPoissonBatches(samplers, tagged.starts[:-1], steps),
                         collate_fn=_TaggedCollate(inner), **loader_kwargs)
        self.clients, self.sample_rates, self.expected_batch_sizes = k, rates, expected


class ClientDPOptimizer(DPOptimizer):
    """A DPOptimizer whose step is k clients' private steps: client c's slice of every stacked
    adapter gets (Σ_{i∈c} clip(gᵢ) + N(0, σ_c² C² I)) / E_c, one fused clip-reduce-noise launch
    per client with its own Philox key and stream. ``noise_seeds`` and ``expected_batch_sizes``
    are per client; ``noise_multipliers`` too (``noise_multiplier`` is their largest)."""

    def __init__(self, optimizer, *, store, noise_multipliers: list[float], max_grad_norm, per_layer: bool,
                 expected_batch_sizes: list[float], noise_seeds: list[int], secure_mode: bool = False):
        super().__init__(optimizer, store=store, noise_multiplier=max(noise_multipliers), max_grad_norm=max_grad_norm,
                         per_layer=per_layer, expected_batch_size=min(expected_batch_sizes),
                         noise_seed=noise_seeds[0], secure_mode=secure_mode)
        self.clients = len(noise_seeds)
        self.noise_multipliers = list(noise_multipliers)
        self.expected_batch_sizes = list(expected_batch_sizes)
        self.noise_seeds = list(noise_seeds)
        self._offsets = [0] * self.clients
        self._summed_clients: Optional[list[Optional[Tensor]]] = None

    def _client_rows(self, store) -> list[Tensor]:
        ids = store.client_ids
        return [(ids == c).nonzero().flatten() for c in range(self.clients)]

    def _fold(self, store) -> None:
        self._count_nonfinite(store.sq)
        summed = self._summed_clients or [None] * self.clients
        for c, rows in enumerate(self._client_rows(store)):
            summed[c] = _ops.clip_reduce_noise(store.buf[rows], store.sq[rows], store.segments, self._bounds,
                                               self.per_layer, summed[c], None, 0.0, 0, 0, 1.0, store.backend)
        self._summed_clients = summed

    def pre_step(self) -> None:
        store = self.store
        self._check_ready(self._summed_clients is not None)
        if store.state == "sealed":
            self._count_nonfinite(store.sq)
            rows = self._client_rows(store) if store.batch else [None] * self.clients
        else:
            rows = [None] * self.clients
        summed = self._summed_clients or [None] * self.clients
        empty_buf = torch.zeros((0, store.width), device=store.device)
        empty_sq = torch.zeros((0, len(store.params)), device=store.device)
        grads = [torch.empty(p.shape, device=p.device, dtype=torch.float32) for p in store.params]
        root = math.sqrt(sum(b * b for b in self._bounds))
        for c in range(self.clients):
            buf = store.buf[rows[c]] if rows[c] is not None else empty_buf
            sq = store.sq[rows[c]] if rows[c] is not None else empty_sq
            std = self.noise_multipliers[c] * root
            noise = secure_standard_normal(store.width, store.device) if (self.secure_mode and std > 0) else None
            flat = _ops.clip_reduce_noise(buf, sq, store.segments, self._bounds, self.per_layer, summed[c], noise, std,
                                          self.noise_seeds[c], self._offsets[c], 1.0 / self.expected_batch_sizes[c],
                                          store.backend)
            self._offsets[c] += reference.philox_calls(1, store.width)
            for g, a, b in zip(grads, store.segments[:-1], store.segments[1:]):
                g[c] = flat[a:b].view(g.shape[1:])
        for p, g in zip(store.params, grads):
            p.grad = g if p.dtype == torch.float32 else g.to(p.dtype)
        store.reset()
        self._summed_clients = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._summed_clients = None
        super().zero_grad(set_to_none)


def client_noise_seeds(noise_seed, k: int) -> list[int]:
    """k Philox keys: from the OS (None), k consecutive keys from one, or the k given."""
    if isinstance(noise_seed, (list, tuple)):
        return per_client("noise_seed", noise_seed, k, check_seed)
    seed = check_seed("noise_seed", noise_seed)
    if seed is None:
        return [os_seed() for _ in range(k)]
    return [(seed + c) % 2**63 for c in range(k)]


def client_noise_multipliers(noise_multiplier, k: int) -> list[float]:
    return per_client("noise_multiplier", noise_multiplier, k, check_nonnegative)
