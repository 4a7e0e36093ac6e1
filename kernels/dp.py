"""DP-SGD kernels in Triton: per-sample squared norms, and the fused clip-reduce-noise step.

All trainable parameters' per-sample gradients live side by side in one fp32 buffer
G (N, D): parameter p owns columns [segments[p], segments[p+1]). Both kernels walk a
table of column chunks, each at most BD wide and inside one parameter, so that one
launch covers every parameter:

``_sq_norm_kernel``       S[i, p] = ‖G[i, seg p]‖²           (grid: chunks × samples)
``_clip_reduce_kernel``   out[j] = (acc[j] + Σᵢ cᵢ G[i, j] + std · ξ_j) · scale
                          cᵢ = min(1, C/‖gᵢ‖), or min(1, C_p/‖gᵢ,p‖) per parameter, and 0
                          for a sample whose total squared norm is inf or nan (its gradient
                          is not finite); ξ is the Philox normals of the (1, D) vector from
                          (seed, offset), four per call, or a given fp32 tensor.
                          (grid: chunks; a loop over samples)

Bytes: the norm pass reads G once (4·N·D), the step reads it once more and writes D
floats. For adapters, D = r·(in + out) per layer, T/r times smaller than the
activations the backward reads, so both passes are a few percent of a training step.
The step's sum over samples is a fixed-order loop: the result is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import interpreted
from .philox import normals


@triton.jit
def _sq_norm_kernel(G, stride_gn, CHUNKS, S, stride_sn, BD: tl.constexpr):
    c = tl.program_id(0)
    i = tl.program_id(1)
    start = tl.load(CHUNKS + 3 * c)
    stop = tl.load(CHUNKS + 3 * c + 1)
    seg = tl.load(CHUNKS + 3 * c + 2)
    cols = (start - start % 4) + tl.arange(0, BD)
    g = tl.load(G + i.to(tl.int64) * stride_gn + cols, mask=(cols >= start) & (cols < stop), other=0.0)
    tl.atomic_add(S + i.to(tl.int64) * stride_sn + seg, tl.sum(g * g, axis=0))


@triton.jit
def _clip_reduce_kernel(G, stride_gn, TOTAL, S, stride_sn, CHUNKS, BOUNDS, ACC, NOISE, OUT,
                        n_samples, noise_std, out_scale, seed, offset,
                        BN: tl.constexpr, BD: tl.constexpr,
                        PER_LAYER: tl.constexpr, HAS_ACC: tl.constexpr, NOISE_MODE: tl.constexpr):
    c = tl.program_id(0)
    start = tl.load(CHUNKS + 3 * c)
    stop = tl.load(CHUNKS + 3 * c + 1)
    seg = tl.load(CHUNKS + 3 * c + 2)
    base = start - start % 4       # the tile starts on a Philox call: four noise values each
    cols = base + tl.arange(0, BD)
    c_ok = (cols >= start) & (cols < stop)
    bound = tl.load(BOUNDS + seg)
    acc = tl.zeros((BD,), dtype=tl.float32)
    for n0 in range(0, n_samples, BN):
        rn = n0 + tl.arange(0, BN)
        n_ok = rn < n_samples
        total = tl.load(TOTAL + rn, mask=n_ok, other=0.0)
        finite = total < float("inf")          # false for inf and nan
        if PER_LAYER:
            own = tl.load(S + rn.to(tl.int64) * stride_sn + seg, mask=n_ok, other=0.0)
        else:
            own = total
        # min(1, C/‖g‖); the floor keeps ‖g‖ = 0 finite (factor 1) without a 0-division
        coef = tl.minimum(1.0, bound / tl.sqrt(tl.maximum(own, 1e-30)))
        coef = tl.where(finite & n_ok, coef, 0.0)
        g = tl.load(G + rn[:, None].to(tl.int64) * stride_gn + cols[None, :],
                    mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        # select before scaling: a factor-0 sample may hold inf or nan
        acc += tl.sum(tl.where(coef[:, None] > 0.0, g, 0.0) * coef[:, None], axis=0)
    if HAS_ACC:
        acc += tl.load(ACC + cols, mask=c_ok, other=0.0)
    if NOISE_MODE == 1:
        acc += noise_std * normals(seed, offset + base // 4 + tl.arange(0, BD // 4).to(tl.int64))
    if NOISE_MODE == 2:
        acc += noise_std * tl.load(NOISE + cols, mask=c_ok, other=0.0)
    tl.store(OUT + cols, acc * out_scale, mask=c_ok)


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------

_DEVICE_TABLES: dict = {}


def _cached(key, make):
    """A small device tensor built once per key: a step then makes no host→device copy."""
    table = _DEVICE_TABLES.get(key)
    if table is None:
        if len(_DEVICE_TABLES) > 64:
            _DEVICE_TABLES.clear()
        table = _DEVICE_TABLES[key] = make()
    return table


def chunk_rows(segments: tuple[int, ...], bd: int) -> list[tuple[int, int, int]]:
    """(start, stop, segment) column chunks, each inside one segment and within the bd-wide
    tile that starts at start rounded down to a multiple of 4 (a Philox call's first column)."""
    rows = []
    for p, (start, stop) in enumerate(zip(segments[:-1], segments[1:])):
        a = start
        while a < stop:
            b = min(a - a % 4 + bd, stop)
            rows.append((a, b, p))
            a = b
    return rows


def _chunks(segments: tuple[int, ...], bd: int, device) -> torch.Tensor:
    """The chunk table as int64 (start, stop, segment) rows on ``device``."""
    return _cached(("chunks", segments, bd, str(device)), lambda: torch.tensor(
        chunk_rows(segments, bd), dtype=torch.int64, device=device).flatten())


def _block_d(interp: bool) -> int:
    return 64 if interp else 256


def grad_sample_sq_norms(grad_sample: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """(N, P) fp32 squared norms per sample and parameter of grad_sample (N, D) fp32."""
    n = grad_sample.shape[0]
    p = len(segments) - 1
    out = torch.zeros((n, p), device=grad_sample.device, dtype=torch.float32)
    if n == 0 or p == 0 or segments[-1] == 0:
        return out
    bd = _block_d(interpreted())
    table = _chunks(tuple(segments), bd, grad_sample.device)
    n_chunks = table.numel() // 3
    _sq_norm_kernel[(n_chunks, n)](grad_sample, grad_sample.stride(0), table, out, out.stride(0), BD=bd)
    return out


def clip_reduce_noise(grad_sample: torch.Tensor, sq_norms: torch.Tensor, segments: list[int],
                      max_norms: list[float], *, per_layer: bool, acc: Optional[torch.Tensor],
                      noise: Optional[torch.Tensor], noise_std: float, seed: int, offset: int,
                      out_scale: float) -> torch.Tensor:
    """The fused step; see the module docstring and ``lorafast.reference.clip_reduce_noise``."""
    interp = interpreted()
    n, d = grad_sample.shape
    p = len(segments) - 1
    out = torch.empty((d,), device=grad_sample.device, dtype=torch.float32)
    if d == 0:
        return out
    bd = _block_d(interp)
    table = _chunks(tuple(segments), bd, grad_sample.device)
    n_chunks = table.numel() // 3
    per_segment = tuple(float(v) for v in (max_norms if per_layer else max_norms[:1] * p))
    bounds = _cached(("bounds", per_segment, str(grad_sample.device)), lambda: torch.tensor(
        per_segment, dtype=torch.float32, device=grad_sample.device))
    noise_mode = 0 if noise_std == 0.0 else (2 if noise is not None else 1)
    total = sq_norms.sum(1)
    _clip_reduce_kernel[(n_chunks,)](
        grad_sample, grad_sample.stride(0), total, sq_norms, sq_norms.stride(0), table, bounds,
        acc if acc is not None else out, noise if noise is not None else out, out,
        n, float(noise_std), float(out_scale), int(seed), int(offset),
        BN=16 if interp else 32, BD=bd,
        PER_LAYER=per_layer, HAS_ACC=acc is not None, NOISE_MODE=noise_mode,
        num_warps=1 if interp else 4)
    return out
