"""Client side: load what the server sent into the model, keeping the base in sync."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor, nn

from ... import _ops
from ...layers import LoRALinear
from ...multi_lora import MultiLoRALinear
from ...qlora import QLoRALinear
from .records import (BASE_VERSION_KEY, LAYER_SUFFIXES, RESIDUAL_SUFFIXES, ArraysLike, lora_layers, split_key,
                      to_tensor)

__all__ = ["apply_global_adapters"]

_U, _V = RESIDUAL_SUFFIXES


@torch.no_grad()
def apply_global_adapters(model: nn.Module, arrays: ArraysLike, *, base_version: Optional[int] = None,
                          compensation: Optional[Mapping[str, Tensor]] = None) -> Optional[int]:
    """Load what the server sent into ``model`` and return the base version it now holds.

    For each LoRALinear layer ``P`` of ``model``: ``P.lora_A``/``P.lora_B`` (and
    ``P.lora_R``) are copied into its adapters (into every client's slot of a
    MultiLoRALinear: a node of virtual clients), ``P.weight`` into its base weight, and
    ``P.residual_U``/``P.residual_V`` are added to the base, ``W ← W + U V`` with the
    product and the sum in fp32 and the result cast to W's dtype (the server's own
    merge, ``lorafast``'s automatic backend for it, so an fp32 base stays bit-equal to
    the master copy of a ``FedExLoRA`` on its default backend). ``compensation``
    ({P: fp32 tensor of W's shape}) carries what a half-precision W rounds away,
    as ``lorafast.federated.aggregate`` does. Any other key must name a parameter or
    buffer of ``model`` and is copied there (e.g. an averaged head).

    ``base_version`` is the version this model's base holds (None: apply without
    checking). Residuals it already has are skipped; residuals that start from another
    version raise ValueError. Everything is checked before anything is written.
    """
    layers = lora_layers(model)
    if not isinstance(arrays, Mapping):
        raise ValueError(f"arrays must be an ArrayRecord or a mapping of arrays, got {type(arrays).__name__}")
    tensors = {k: to_tensor(v) for k, v in arrays.items()}
    meta = tensors.pop(BASE_VERSION_KEY, None)
    copies, found = _plan(model, layers, tensors)
    residuals = {prefix: _checked_residual(prefix, layers[prefix], pair, f"{prefix}.weight" in tensors, compensation)
                 for prefix, pair in found.items()}
    version_from, version_to = _versions(meta)
    apply_residuals = bool(residuals) and _residuals_due(base_version, version_from, version_to)

    # everything is checked: from here on the model changes
    for target, value in copies:
        target.copy_(value.to(device=target.device, dtype=target.dtype))
    if apply_residuals:
        for prefix, (U, V) in residuals.items():
            if isinstance(layers[prefix], QLoRALinear):   # a quantised base keeps it as its low-rank correction
                layers[prefix].add_correction(U, V)
                continue
            w = layers[prefix].base_weight
            comp = None if compensation is None else compensation.get(prefix)
            _ops.fedex_merge_(w.data, U.to(device=w.device, dtype=torch.float32),
                              V.to(device=w.device, dtype=torch.float32), comp)
    return base_version if version_to is None else version_to


def _plan(model: nn.Module, layers: dict[str, LoRALinear], tensors: dict[str, Tensor]):
    """([(target, value)] to copy, checked against the targets' shapes; {P: {suffix: tensor}}
    of the residual entries)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    copies: list[tuple[Tensor, Tensor]] = []
    residuals: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        prefix, suffix = split_key(key, LAYER_SUFFIXES) or (None, None)
        layer = layers.get(prefix)
        if layer is None:
            target = named.get(key)
        elif suffix in RESIDUAL_SUFFIXES:
            residuals.setdefault(prefix, {})[suffix] = value
            continue
        elif suffix == ".weight" and isinstance(layer, QLoRALinear):
            raise ValueError(f"arrays[{key!r}] is a dense base weight, but {prefix}'s base is quantised "
                             "(QLoRALinear): send its FedEx residuals, which it keeps as a low-rank correction")
        else:
            target = layer.base_weight if suffix == ".weight" else getattr(layer, suffix[1:])
        if target is None:
            raise ValueError(f"arrays[{key!r}] matches no LoRALinear adapter, base weight or parameter of model")
        stacked = isinstance(layer, MultiLoRALinear) and suffix != ".weight"   # the global adapter, in every slot
        want = tuple(target.shape[1:]) if stacked else tuple(target.shape)
        if tuple(value.shape) != want:
            raise ValueError(f"arrays[{key!r}] has shape {tuple(value.shape)}, model expects {want}")
        copies.append((target, value.expand(target.shape) if stacked else value))
    return copies, residuals


def _checked_residual(prefix: str, layer: LoRALinear, pair: dict[str, Tensor], whole: bool,
                      compensation) -> tuple[Tensor, Tensor]:
    """(U, V) of layer ``prefix``, checked against the layer (and its compensation)."""
    if len(pair) != 2:
        raise ValueError(f"arrays has only one of {prefix}.residual_U and {prefix}.residual_V")
    if whole:
        raise ValueError(f"arrays has both {prefix}.weight and a residual for it")
    U, V = pair[_U], pair[_V]
    out_f, in_f = layer.out_features, layer.in_features
    if U.dim() != 2 or V.dim() != 2 or U.shape[0] != out_f or V.shape[1] != in_f or U.shape[1] != V.shape[0]:
        raise ValueError(f"arrays[{prefix}.residual_U/V] have shapes {tuple(U.shape)}, {tuple(V.shape)}; expected "
                         f"({out_f}, K) and (K, {in_f})")
    if compensation is not None and prefix in compensation:
        if isinstance(layer, QLoRALinear):
            raise ValueError(f"compensation[{prefix!r}]: {prefix}'s base is quantised and takes no compensation")
        c, shape = compensation[prefix], layer.base_weight.shape
        if not isinstance(c, Tensor) or c.dtype != torch.float32 or c.shape != shape:
            raise ValueError(f"compensation[{prefix!r}] must be an fp32 tensor of shape {tuple(shape)}")
    return U, V


def _versions(meta: Optional[Tensor]) -> tuple[Optional[int], Optional[int]]:
    """(from, to) of the payload's ``BASE_VERSION_KEY`` entry; (None, None) without one."""
    if meta is None:
        return None, None
    if meta.numel() != 2:
        raise ValueError(f"arrays[{BASE_VERSION_KEY!r}] must hold [from, to], got {meta.tolist()}")
    version_from, version_to = (int(v) for v in meta.tolist())
    return version_from, version_to


def _residuals_due(base_version: Optional[int], version_from: Optional[int], version_to: Optional[int]) -> bool:
    """Whether a base at ``base_version`` still needs the residuals from ``version_from`` to
    ``version_to``; raises when they update another version."""
    if base_version is None or version_to is None:
        return True
    if base_version == version_to:
        return False              # already applied: the payload was delivered twice
    if base_version == version_from:
        return True
    raise ValueError(f"base_version is {base_version} but the residuals in arrays update version "
                     f"{version_from} to {version_to}; the server must resend the base weights")
