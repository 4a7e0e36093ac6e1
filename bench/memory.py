"""Peak memory of one step, for the peak_memory rows (MB, 2**20 bytes).

On a GPU it is the CUDA allocator's max_memory_allocated over the step, after
reset_peak_memory_stats: every live tensor at the peak, not the allocator's cache. The CPU
has no such counter; ``LiveBytes`` stands in for it there.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common


def cuda_peak_mb(step: Callable[[], object], device: torch.device, steps: int = 3) -> list[float]:
    """(p50, p20, p80) of torch.cuda.max_memory_allocated over one step, in MB."""
    peaks = []
    for _ in range(steps):
        common.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        common.sync(device)
        peaks.append(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    return common._quantiles(peaks)


class LiveBytes(TorchDispatchMode):
    """The CPU stand-in for max_memory_allocated: the peak over a region of the bytes of
    live tensor storages, counting ``resident`` (model, optimizer state, batch) from the
    start and every storage an op returns from then on until it is freed. Views share
    their base's storage and count once. Temporaries inside one op (a fused op's
    workspace) are not seen, nor is the allocator's cache."""

    def __init__(self, resident: Iterable[torch.Tensor]):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        for t in resident:
            self._add(t)
        self.peak = sum(self.live.values())

    def _add(self, t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            try:
                st = t.untyped_storage()
            except (NotImplementedError, RuntimeError):  # sparse and other storage-less tensors
                return
            self.live.setdefault(StorageWeakRef(st), st.nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for k in [k for k in self.live if k.expired()]:
            del self.live[k]
        for t in tree_leaves(out):
            self._add(t)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def peak_memory_mb(step: Callable[[], object], device: torch.device,
                   resident: Optional[Callable[[], Iterable[torch.Tensor]]] = None, steps: int = 3) -> list[float]:
    """(p50, p20, p80) MB of the peak over one step: the CUDA allocator's max_memory_allocated,
    or on the CPU LiveBytes's peak, counting ``resident()`` (read before each step) from the start."""
    if device.type == "cuda":
        return cuda_peak_mb(step, device, steps)
    peaks = []
    for _ in range(steps):
        with LiveBytes(resident() if resident else ()) as mode:
            step()
        peaks.append(mode.peak / 2 ** 20)
    return common._quantiles(peaks)
