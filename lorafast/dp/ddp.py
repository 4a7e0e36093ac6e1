"""DPDDP: data parallelism for private training.

PyTorch's DistributedDataParallel all-reduces raw gradients during backward, before any
clipping, which breaks DP-SGD. DPDDP only makes the replicas start equal (it broadcasts
rank 0's parameters and buffers); the DPOptimizer all-reduces the clipped per-sample sums
at ``step()`` and rank 0 alone adds the noise.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class DPDDP(nn.Module):
    """Wraps ``module`` for multi-process private training (``torch.distributed`` initialised)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("DPDDP needs torch.distributed to be initialised (dist.init_process_group)")
        self.module = module
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
