"""Flora: LoRA as a gradient compressor, resampled (Hao, Cao & Mou, ICML 2024).

With A frozen at random, B's gradient is G Aᵀ: B accumulates a random projection of the
base weight's gradient G, and s·B A decompresses it, an update of rank ≤ r. Flora folds
s·B A into W every τ steps and restarts from a fresh random A with B = 0
(``LoRALinear.resample_``): the effective weight is unchanged, and the sum of the folded
updates Σₜ s·Bₜ Aₜ reaches rank r × (resamples), at LoRA's memory.

    handle = lorafast.resample_every(model, 100, optimizer=opt)   # after every 100th opt.step()

A QLoRALinear keeps the folded updates beside its quantised base, in its low-rank correction
(exact up to ``correction_rank``, its best approximation of that rank beyond).

Optimizer state: Adam's moments of B are per coordinate along the old A's rows, meaningless
for the new A, so ``reset_state`` clears them (and A's, for the "lora" variant).

DP: resampling is post-processing of the private adapter (the new A depends on a seed, not
on data), so ε is what the accountant counts for the noisy steps alone; the parameters are
written in place, so lorafast.dp's per-sample store keeps them.

Federated (FFA): aggregation is exact because the clients share A. Resample at a round's
end, after every party (server and clients) loaded the global B̄, so that W += s·B̄ A is
the same everywhere, with ``resample_adapters(model, seed, count=round)``: layer ``name``
draws A from ``resample_seed(seed, name, round)``, the same new A at every party without
sending it. (``federated.simulate(..., resample_rounds=)`` does this.)
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Optional

from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import check_count, check_seed
from .layers import LoRALinear
from .multi_lora import MultiLoRALinear

RESAMPLED_VARIANTS = ("lora", "ffa")


def resample_seed(seed: int, layer_name: str, count: int) -> int:
    """The seed of layer ``layer_name``'s ``count``-th resample under the base ``seed``: 63 bits
    of BLAKE2b(seed, name, count). Parties that share ``seed`` (and name their layers alike,
    as ``model.named_modules()`` does) draw the same new A without communicating it; layers
    and resamples get independent ones."""
    if seed is None:
        raise ValueError("seed must be an int in [0, 2**63), got None")
    seed = check_seed("seed", seed)
    if not isinstance(layer_name, str):
        raise ValueError(f"layer_name must be a str, got {type(layer_name).__name__}")
    count = check_count("count", count)
    digest = hashlib.blake2b(f"{seed}\0{layer_name}\0{count}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def resample_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} of ``model``'s adapters that Flora resamples: LoRALinear (QLoRALinear
    included) and MultiLoRALinear of the variants "lora" and "ffa"."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (LoRALinear, MultiLoRALinear)) and m.variant in RESAMPLED_VARIANTS}


def resample_adapters(model: nn.Module, seed: Optional[int] = None, *, count: int = 1,
                      compensation: Optional[Mapping[str, Tensor]] = None) -> dict[str, int]:
    """``resample_`` every layer of ``resample_layers(model)``: with ``seed``, layer ``name``
    draws A from ``resample_seed(seed, name, count)``; with None, each from the OS.
    ``compensation`` maps layer names to their fp32 compensation (half-precision bases).
    Every layer is checked before any is written. Returns {name: its new seed}."""
    layers = resample_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear or MultiLoRALinear of variant 'lora' or 'ffa' to resample")
    check_seed("seed", seed)
    count = check_count("count", count)
    compensation = _check_compensation(layers, compensation)
    seeds = {n: layer._check_resample(None if seed is None else resample_seed(seed, n, count), compensation.get(n))
             for n, layer in layers.items()}
    for n, layer in layers.items():
        layer._resample(seeds[n], compensation.get(n))
    return seeds


def _check_compensation(layers: Mapping[str, nn.Module], compensation) -> dict[str, Tensor]:
    """{layer name: tensor}, naming only resampled layers (each tensor is checked by its layer)."""
    if compensation is None:
        return {}
    if not isinstance(compensation, Mapping):
        raise ValueError(f"compensation must map layer names to fp32 tensors, got {type(compensation).__name__}")
    unknown = sorted(set(compensation) - set(layers), key=str)
    if unknown:
        raise ValueError(f"compensation names {unknown}, which are not resampled layers of model")
    return dict(compensation)


class Resampler:
    """What ``resample_every`` returns. ``count``: resamples so far; ``steps_seen``: optimizer
    steps counted; ``step()`` counts one (the optimizer's post-step hook calls it; without an
    optimizer call it after each step yourself) and resamples on every ``steps``-th;
    ``remove()`` stops it."""

    def __init__(self, model: nn.Module, steps: int, optimizer: Optional[Optimizer], seed: Optional[int],
                 reset_state: bool, compensation: Optional[Mapping[str, Tensor]]):
        self.model, self.steps, self.seed = model, steps, seed
        self.optimizer, self.reset_state, self.compensation = optimizer, reset_state, compensation
        self.count = self.steps_seen = 0
        self._hook = None if optimizer is None else optimizer.register_step_post_hook(lambda *_: self.step())

    def step(self) -> bool:
        """Count an optimizer step; resample if it is a ``steps``-th one. Returns whether it did."""
        self.steps_seen += 1
        if self.steps_seen % self.steps:
            return False
        resample_adapters(self.model, self.seed, count=self.count + 1, compensation=self.compensation)
        self.count += 1
        if self.reset_state and self.optimizer is not None:
            for layer in resample_layers(self.model).values():
                for p in (layer.lora_A, layer.lora_B):
                    self.optimizer.state.pop(p, None)   # torch optimizers re-initialise a missing state
        return True

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _torch_optimizer(optimizer) -> Optimizer:
    """The torch optimizer that steps: a DP optimizer's wrapped one (lorafast's and Opacus'
    DPOptimizer skip Optimizer.__init__, so hooks registered on them never run)."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    if not isinstance(inner, Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer (or a DPOptimizer wrapping one), got "
                         f"{type(optimizer).__name__}")
    return inner


def resample_every(model: nn.Module, steps: int, *, optimizer: Optional[Optimizer] = None,
                   seed: Optional[int] = None, reset_state: bool = True,
                   compensation: Optional[Mapping[str, Tensor]] = None) -> Resampler:
    """Flora: after every ``steps``-th optimizer step, ``resample_`` every LoRALinear of
    variant "lora" or "ffa" in ``model`` (see the module docstring).

    Args:
        steps: τ, optimizer steps between resamples.
        optimizer: the optimizer that trains ``model`` (a lorafast DPOptimizer too); the hook
            is its post-step hook. None: call ``handle.step()`` after each step.
        seed: the base of ``resample_seed`` (the c-th resample of layer ``name`` draws A from
            ``resample_seed(seed, name, c)``); None: fresh seeds from the OS.
        reset_state: clear the optimizer's state (Adam's moments) of the resampled A and B.
        compensation: {layer name: fp32 compensation} for half-precision bases.

    A model with MultiLoRALinear layers is refused: its k clients must agree before their
    shared base takes an update, so resample them between rounds (``resample_adapters``)."""
    check_count("steps", steps, minimum=1)
    check_seed("seed", seed)
    if not isinstance(reset_state, bool):
        raise ValueError(f"reset_state must be a bool, got {reset_state!r}")
    layers = resample_layers(model)
    if any(isinstance(m, MultiLoRALinear) for m in layers.values()):
        raise ValueError("model has MultiLoRALinear layers, whose k clients must agree before their shared base "
                         "takes an update: aggregate, then resample between rounds with resample_adapters")
    if not layers:
        raise ValueError("model has no LoRALinear of variant 'lora' or 'ffa' to resample")
    _check_compensation(layers, compensation)
    return Resampler(model, steps, None if optimizer is None else _torch_optimizer(optimizer), seed, reset_state,
                     compensation)
