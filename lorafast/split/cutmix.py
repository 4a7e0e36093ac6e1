r"""CutMix of smashed data across clients (DP-CutMixSL, arXiv 2210.15986, 2408.01040).

k clients each hold a smashed tensor hᵢ of the same shape, P patches (tokens)
along ``patch_dim``. One call draws mixing ratios λ ~ Dirichlet(1, …, 1), gives
client i exactly nᵢ ≈ λᵢ·P patches of every sample at random positions, and
releases

    mixed = Σᵢ maskᵢ ⊙ hᵢ,     the maskᵢ disjoint and covering all P patches,

so that each client contributes only the fraction nᵢ/P of every sample.
:func:`mix_labels` mixes the clients' labels by the same fractions.

The counts use largest-remainder (Hamilton) rounding: nᵢ = ⌊λᵢP⌋, then the
P − Σ⌊λᵢP⌋ leftover patches go one each to the largest fractional parts
λᵢP − ⌊λᵢP⌋, equal parts to the lower client index. Hence Σ nᵢ = P and
|nᵢ − λᵢP| < 1. Positions are a fresh uniform permutation per sample.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
import torch

from .._checks import check_count, check_seed
from .._random import os_seed

__all__ = ["cutmix", "mix_labels"]

# How far the given ratios may sum from 1 (they are renormalised afterwards).
_RATIO_SUM_TOL = 1e-6


def check_ratios(name: str, ratios, k: int | None = None) -> np.ndarray:
    """Non-negative finite ratios summing to 1 (within 1e-6), renormalised, as float64; ``k``: how many.

    Shared with :mod:`lorafast.split.accounting`, which checks ``mixing_ratios`` the same way."""
    if isinstance(ratios, torch.Tensor):
        if ratios.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got a tensor of shape {tuple(ratios.shape)}")
        arr = ratios.detach().to("cpu", torch.float64).numpy()
    elif isinstance(ratios, np.ndarray):
        if ratios.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got an array of shape {ratios.shape}")
        try:
            arr = ratios.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must contain only real numbers, got {ratios!r}") from None
    elif isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers or a 1-D tensor, got {ratios!r}")
    else:
        try:
            arr = np.asarray([float(r) for r in ratios], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must contain only real numbers, got {ratios!r}") from None
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if k is not None and arr.size != k:
        raise ValueError(f"{name} must have one entry per client ({k}), got {arr.size}")
    if not (np.isfinite(arr).all() and (arr >= 0).all()):
        raise ValueError(f"{name} must be finite and non-negative, got {arr.tolist()}")
    total = float(arr.sum())
    if abs(total - 1.0) > _RATIO_SUM_TOL:
        raise ValueError(f"{name} must sum to 1 (within {_RATIO_SUM_TOL}), got sum {total!r}")
    return arr / total


def _largest_remainder(ratios: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` with |nᵢ − λᵢ·total| < 1 (Hamilton's method)."""
    quotas = ratios * total
    counts = np.floor(quotas).astype(np.int64)
    leftover = total - int(counts.sum())
    # a stable sort on −fraction: equal fractions favour the lower index
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts


def _check_smashed(smashed_list) -> list[torch.Tensor]:
    if isinstance(smashed_list, torch.Tensor) or not isinstance(smashed_list, Sequence):
        raise ValueError(f"smashed_list must be a list of tensors, one per client, got {type(smashed_list).__name__}")
    hs = list(smashed_list)
    if not hs:
        raise ValueError("smashed_list must hold at least one client's tensor, got an empty list")
    for i, h in enumerate(hs):
        if not isinstance(h, torch.Tensor):
            raise ValueError(f"smashed_list[{i}] must be a tensor, got {type(h).__name__}")
    first = hs[0]
    if first.ndim < 2:
        raise ValueError(f"smashed_list tensors need a batch dim and a patch dim, got shape {tuple(first.shape)}")
    for i, h in enumerate(hs[1:], start=1):
        for what, a, b in (("shape", tuple(h.shape), tuple(first.shape)),
                           ("dtype", h.dtype, first.dtype), ("device", h.device, first.device)):
            if a != b:
                raise ValueError(f"smashed_list[{i}] has {what} {a}, but client 0 has {b}; all clients must agree")
    return hs


def _check_patch_dim(patch_dim, ndim: int) -> int:
    if isinstance(patch_dim, bool) or not isinstance(patch_dim, numbers.Integral):
        raise ValueError(f"patch_dim must be an int, got {patch_dim!r}")
    dim = int(patch_dim) + ndim if patch_dim < 0 else int(patch_dim)
    if not 1 <= dim < ndim:
        raise ValueError(f"patch_dim must name a dim in 1..{ndim - 1} (or -{ndim - 1}..-1) of the {ndim}-D "
                         f"smashed tensors; dim 0 is the batch; got {patch_dim!r}")
    return dim


def cutmix(smashed_list, ratios=None, *, patch_dim: int = 1, seed: int | None = None):
    """Mix k clients' smashed tensors patch-wise; returns ``(mixed, masks)``.

    Args:
        smashed_list: k tensors of one shape, dtype and device, e.g. (B, P, d).
        ratios: k non-negative numbers summing to 1 (a sequence or 1-D tensor),
            the fraction of patches each client contributes. Default: drawn
            once per call from Dirichlet(1, …, 1).
        patch_dim: the dim holding the P patches (not 0, the batch; negative
            counts from the end).
        seed: an int replays the call exactly (λ and positions, drawn on the
            CPU, so on any device); ``None`` draws a seed from the OS.

    Returns:
        ``mixed``, the tensor Σᵢ maskᵢ ⊙ hᵢ of the inputs' shape, dtype and
        device (the gradient reaches hᵢ on its own patches only), and
        ``masks``, k bool tensors of shape (B, P): maskᵢ[b, p] says that patch
        p of sample b comes from client i. Every sample gives client i the same
        count nᵢ (see the module docstring), so nᵢ/P = ``masks[i][0].float().mean()``.
    """
    hs = _check_smashed(smashed_list)
    k, shape = len(hs), hs[0].shape
    dim = _check_patch_dim(patch_dim, len(shape))
    if shape[dim] == 0:
        raise ValueError(f"smashed_list tensors have no patches along patch_dim={patch_dim} (shape {tuple(shape)})")
    lam = None if ratios is None else check_ratios("ratios", ratios, k)
    seed = check_seed("seed", seed)
    rng = np.random.default_rng(os_seed() if seed is None else seed)

    B, P = shape[0], shape[dim]
    if lam is None:
        lam = rng.dirichlet(np.ones(k))
    counts = _largest_remainder(lam, P)
    # Shuffling the slot owners [0]*n₀ + [1]*n₁ + … in each row is the same as giving
    # the first n₀ positions of a random permutation to client 0, the next n₁ to client 1, …
    slots = np.repeat(np.arange(k, dtype=np.int64), counts)
    owner = torch.from_numpy(rng.permuted(np.tile(slots, (B, 1)), axis=1)).to(hs[0].device)
    masks = [owner == i for i in range(k)]

    if k == 1:
        return hs[0].clone(), masks
    view = [1] * len(shape)
    view[0], view[dim] = B, P
    # where, not a product with 0/1 masks: a non-finite value on another client's
    # patch must not leak into the output as NaN, and the result is exact.
    mixed = hs[-1]
    for h, m in zip(hs[-2::-1], masks[-2::-1]):
        mixed = torch.where(m.view(view), h, mixed)
    return mixed, masks


def mix_labels(labels_list, masks, *, num_classes: int | None = None) -> torch.Tensor:
    """Soft labels of the mixed samples: Σᵢ (nᵢ[b]/P) · yᵢ[b] per sample b.

    ``nᵢ[b]`` is the number of patches of sample b that ``masks`` (from
    :func:`cutmix`) give client i, so each client's label weighs as much as
    its share of the patches (CutMix's label mixing).

    Args:
        labels_list: k tensors, one per client, all of one dtype: soft labels
            (B, C) of a floating dtype, or integer class ids (B,) with ``num_classes``.
        masks: the k bool (B, P) masks returned by :func:`cutmix`.
        num_classes: C, required for class ids (optional for soft labels, checked).

    Returns:
        A (B, C) tensor of the soft labels' dtype (float32 for class ids), on
        the labels' device.
    """
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence) or not masks:
        raise ValueError("masks must be the non-empty list of bool masks returned by cutmix")
    for i, m in enumerate(masks):
        if not (isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.ndim == 2 and m.shape[1] > 0):
            raise ValueError(f"masks[{i}] must be a bool (B, P) tensor with P > 0, got {m!r}")
        if (m.shape, m.device) != (masks[0].shape, masks[0].device):
            raise ValueError(f"masks[{i}] has shape {tuple(m.shape)} on {m.device}, but masks[0] has "
                             f"{tuple(masks[0].shape)} on {masks[0].device}")
    B, P = masks[0].shape
    owners = torch.stack([m.to(torch.int64) for m in masks]).sum(0)
    if not bool((owners == 1).all()):
        raise ValueError("masks must give every patch exactly one client (disjoint and covering)")

    if isinstance(labels_list, torch.Tensor) or not isinstance(labels_list, Sequence):
        raise ValueError(f"labels_list must be a list of tensors, one per client, got {type(labels_list).__name__}")
    if len(labels_list) != len(masks):
        raise ValueError(f"labels_list must have one entry per client ({len(masks)} masks), got {len(labels_list)}")
    ys = list(labels_list)
    for i, y in enumerate(ys):
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"labels_list[{i}] must be a tensor, got {type(y).__name__}")
        if (y.shape, y.dtype, y.device) != (ys[0].shape, ys[0].dtype, ys[0].device):
            raise ValueError(f"labels_list[{i}] has shape/dtype/device {tuple(y.shape)}/{y.dtype}/{y.device}, but "
                             f"client 0 has {tuple(ys[0].shape)}/{ys[0].dtype}/{ys[0].device}; all must agree")
    y0 = ys[0]
    if num_classes is not None:
        num_classes = check_count("num_classes", num_classes, 1)
    if y0.is_floating_point():
        if y0.ndim != 2 or y0.shape[0] != B:
            raise ValueError(f"labels_list soft labels must have shape (B={B}, C), got {tuple(y0.shape)}")
        if num_classes is not None and y0.shape[1] != num_classes:
            raise ValueError(f"num_classes is {num_classes}, but the soft labels have {y0.shape[1]} columns")
        soft = ys
    elif y0.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if y0.ndim != 1 or y0.shape[0] != B:
            raise ValueError(f"labels_list class ids must have shape (B={B},), got {tuple(y0.shape)}")
        if num_classes is None:
            raise ValueError("num_classes is required when labels_list holds integer class ids")
        for i, y in enumerate(ys):
            if y.numel() and not bool(((y >= 0) & (y < num_classes)).all()):
                raise ValueError(f"labels_list[{i}] has class ids outside [0, {num_classes})")
        soft = [torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float32) for y in ys]
    else:
        raise ValueError(f"labels_list must hold floating soft labels or integer class ids, got dtype {y0.dtype}")

    out = torch.zeros_like(soft[0])
    for y, m in zip(soft, masks):
        weight = m.to(device=y.device, dtype=torch.float64).sum(1) / P  # nᵢ[b]/P, exact in float64
        out = out + weight.to(y.dtype).unsqueeze(1) * y
    return out
