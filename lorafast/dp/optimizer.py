"""DPOptimizer: wraps any torch optimizer and makes its step differentially private.

At ``step()`` each trainable parameter's ``.grad`` becomes

    (Σᵢ clip(gᵢ) + N(0, σ² C² I)) / E,      clip(g) = g · min(1, C/‖g‖)

from the per-sample gradients of the backward passes since the last step, with one fused
kernel launch over all parameters (``lorafast::clip_reduce_noise``); then the wrapped
optimizer updates. With "per_layer" clipping each parameter l has its own bound C_l and
the noise std is σ·√(Σ C_l²). Under torch.distributed the clipped sums are all-reduced
and only rank 0 adds noise, so the noise enters once.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .. import _ops, reference
from .._random import os_seed
from .grad_sample import GradSampleStore
from .noise import secure_standard_normal


def distributed_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shared(name: str) -> property:
    """An attribute that lives on the wrapped optimizer."""
    return property(lambda self: getattr(self.original_optimizer, name),
                    lambda self, value: setattr(self.original_optimizer, name, value))


class DPOptimizer(Optimizer):
    """A private view of ``optimizer``: the same param_groups and state, a private ``step``.

    Attributes: ``noise_multiplier``, ``max_grad_norm`` (a float, or a list per parameter),
    ``expected_batch_size`` (E), ``noise_seed``, ``nonfinite_samples`` (samples whose
    gradient was not finite and which therefore contributed zero).
    """

    def __init__(self, optimizer: Optimizer, *, store: GradSampleStore, noise_multiplier: float,
                 max_grad_norm, per_layer: bool, expected_batch_size: float,
                 noise_seed: Optional[int] = None, secure_mode: bool = False):
        # deliberately no Optimizer.__init__: param_groups and state stay the wrapped optimizer's
        self.original_optimizer = optimizer
        self.store = store
        store.fold = self._fold
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = max_grad_norm
        self.per_layer = per_layer
        self._bounds = [float(c) for c in max_grad_norm] if per_layer else [float(max_grad_norm)]
        self.expected_batch_size = float(expected_batch_size)
        self.secure_mode = secure_mode
        self.noise_seed = os_seed() if noise_seed is None else int(noise_seed)
        self._noise_offset = 0              # Philox calls used so far; never reused
        self._summed: Optional[Tensor] = None
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=store.device)
        self._step_hooks: list[Callable[["DPOptimizer"], None]] = []
        self.steps = 0

    # ---- the wrapped optimizer's state, shared rather than copied
    param_groups = _shared("param_groups")
    state = _shared("state")
    defaults = _shared("defaults")

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
                f"clipping={'per_layer' if self.per_layer else 'flat'}, "
                f"expected_batch_size={self.expected_batch_size:g}, wraps {self.original_optimizer!r})")

    # ---- privacy
    @property
    def noise_std(self) -> float:
        """σ·C (flat) or σ·√(Σ C_l²) (per layer): the std of the noise added to the clipped sum."""
        return self.noise_multiplier * math.sqrt(sum(c * c for c in self._bounds))

    @property
    def nonfinite_samples(self) -> int:
        return int(self._nonfinite.item())

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        """Call ``fn(self)`` after every private step (the engine's accountant uses this)."""
        self._step_hooks.append(fn)

    def _count_nonfinite(self, sq: Tensor) -> None:
        self._nonfinite += (~torch.isfinite(sq.sum(1))).sum()

    def _fold(self, store: GradSampleStore) -> None:
        """Clip a finished backward pass into the running sum (gradient accumulation), no noise."""
        self._count_nonfinite(store.sq)
        self.fold_samples(store.buf, store.sq)

    def fold_samples(self, grad_sample: Tensor, sq_norms: Tensor) -> None:
        """Clip extra per-sample gradients (N, D), with their squared norms (N, P), into this
        step's sum, exactly as the samples of a backward pass are (a privacy audit's canaries)."""
        self._summed = _ops.clip_reduce_noise(
            grad_sample, sq_norms, self.store.segments, self._bounds, self.per_layer, self._summed, None,
            0.0, 0, 0, 1.0, self.store.backend)

    @property
    def pending(self) -> bool:
        """Whether ``step()`` now has samples to take: a finished backward pass, or folded ones."""
        return self.store.state == "sealed" or self._summed is not None

    def _check_ready(self, accumulated: bool) -> None:
        """A step needs a finished backward pass since the last one (or an accumulated one)."""
        store = self.store
        if store.state == "open":
            raise RuntimeError("optimizer.step() was called while a backward pass was still running")
        if store.state == "idle" and not accumulated:
            raise RuntimeError("optimizer.step() was called with no backward pass since the last step: "
                               "call loss.backward() first (an empty Poisson batch still needs one)")

    def _private_grad(self) -> Tensor:
        store = self.store
        self._check_ready(self._summed is not None)
        if store.state == "sealed":
            buf, sq = store.buf, store.sq
            self._count_nonfinite(sq)
        else:
            buf = torch.zeros((0, store.width), device=store.device)
            sq = torch.zeros((0, len(store.params)), device=store.device)
        rank, world = distributed_world()
        std = self.noise_std if rank == 0 else 0.0
        noise = secure_standard_normal(store.width, store.device) if (self.secure_mode and std > 0) else None
        flat = _ops.clip_reduce_noise(
            buf, sq, store.segments, self._bounds, self.per_layer, self._summed, noise, std,
            self.noise_seed, self._noise_offset, 1.0 / (self.expected_batch_size * world), self.store.backend)
        self._noise_offset += reference.philox_calls(1, store.width)
        if world > 1:
            dist.all_reduce(flat)
        return flat

    def pre_step(self) -> None:
        """Write every trainable parameter's private ``.grad`` and clear the per-sample state."""
        flat = self._private_grad()
        store = self.store
        for p, a, b in zip(store.params, store.segments[:-1], store.segments[1:]):
            g = flat[a:b].view(p.shape)
            p.grad = g if p.dtype == torch.float32 else g.to(p.dtype)
        store.reset()
        self._summed = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.pre_step()
        out = self.original_optimizer.step()
        self.steps += 1
        for fn in self._step_hooks:
            fn(self)
        return loss if closure is not None else out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` and every per-sample gradient not yet stepped."""
        self.store.reset()
        self._summed = None
        self.original_optimizer.zero_grad(set_to_none)
