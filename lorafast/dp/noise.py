"""Sources of DP noise.

Default: Philox Gaussian noise drawn inside the fused step kernel from (seed, offset),
with the seed from the operating system (``os.urandom``), never from a constant or from
``lorafast.manual_seed``. Philox is fast and replayable from its seed, but it is not a
cryptographic generator: whoever learns the seed can subtract the noise.

``secure_mode=True``: the noise comes from the OS's cryptographically secure generator
instead. Each element takes 16 bytes of ``os.urandom`` (two 53-bit uniforms) and a
float64 Box–Muller transform on the CPU, then a copy to the device. That costs roughly
20–40 ns per element on one CPU core (for a 2.4M-parameter adapter set, tens of
milliseconds per step) against well under a millisecond on the GPU; it is meant for the
final, released training run. The Poisson sampler draws its batches from the same
source in secure mode.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .._random import os_seed  # noqa: F401  (the default noise's seed, above; one definition in _random)


def secure_uniform(n: int) -> np.ndarray:
    """n float64 uniforms k·2⁻⁵³ in [0, 1), 53 bits each from the OS's CSPRNG."""
    return (np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def secure_standard_normal(n: int, device) -> torch.Tensor:
    """n independent N(0, 1) draws (fp32) from the OS's CSPRNG, Box–Muller in float64:
    u1 ∈ (0, 1] and u2 ∈ [0, 1) have 53 random bits each."""
    u1 = 1.0 - secure_uniform(n)
    u2 = secure_uniform(n)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z.astype(np.float32)).to(device)
