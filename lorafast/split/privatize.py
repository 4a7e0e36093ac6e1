"""Privatized smashed data: clip the activations a split-learning client sends, add Gaussian noise."""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .. import _ops
from .._layout import PRIVATIZE_MODES
from .._random import os_seed


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def privatize(h: Tensor, clip_norm: float, noise_multiplier: float, *, mode: str = "sample",
              seed: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """Clip h and add N(0, (noise_multiplier·clip_norm)²) to every element, in one fused kernel.

    h has shape (B, ..., d). Clipping, with C = clip_norm:
      * ``"sample"``: each sample's whole activation h[b] to L2 norm ≤ C;
      * ``"token"``:  each vector along the last dim to L2 norm ≤ C;
      * ``"element"``: each element to [−C, C] (DP-CutMixSL's elementwise clipping).
    A vector is scaled by min(1, C/‖x‖). The noise is Philox normal from (seed, flat
    element index), generated and added in fp32; ``seed=None`` takes one from the OS
    (never from ``lorafast.manual_seed``: it protects data); a given seed replays the call.

    Gradients pass straight through the noise and through the clipping's Jacobian:
    1[|x| ≤ C] per element, or (C/‖x‖)(I − x̂x̂ᵀ) for a clipped vector and I otherwise.
    Returns a tensor like h (contiguous) in h's dtype.
    """
    if not isinstance(h, Tensor) or not h.is_floating_point():
        got = h.dtype if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"h must be a floating-point tensor, got {got}")
    if h.dim() < 2:
        raise ValueError(f"h must have shape (B, ..., d) with at least 2 dims, got {tuple(h.shape)}")
    clip_norm = _number(clip_norm, "clip_norm")
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    noise_multiplier = _number(noise_multiplier, "noise_multiplier")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if mode not in PRIVATIZE_MODES:
        raise ValueError(f"mode must be one of {PRIVATIZE_MODES}, got {mode!r}")
    if seed is None:
        seed = os_seed()
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    y, _ = _ops.privatize(h, clip_norm, noise_multiplier * clip_norm, mode, seed, 0, backend)
    return y
