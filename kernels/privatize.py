"""Split-learning kernel in Triton: clip the smashed activations and add Gaussian noise.

h is viewed as R rows of L contiguous elements (the caller's ``rows``): one row
per sample ("sample"), per vector along the last dim ("token"); "element" clips each
element and ignores rows.

``_row_sq_norm_kernel``   S[r] += ‖x[r, chunk]‖²                       (grid: rows × chunks)
``_privatize_kernel``     y = clip(x) + std·ξ,  ξ the Philox normals of the (R, L) rows
                          from (seed, offset), four per call  (grid: rows × chunks)

When a row fits in one block (token rows, small samples) the norm is taken inside
``_privatize_kernel`` and there is one launch; longer rows ("sample" mode) take a norm
launch first. Bytes: read h once (twice for long rows), write y once; the noise is
generated in registers, so the op is write-bound like a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreted
from .philox import normals

MODES = {"sample": 0, "token": 0, "element": 1}


@triton.jit
def _row_sq_norm_kernel(X, L, S, BL: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)     # rows on axis 0: B·T can pass 65535
    c = tl.program_id(1)
    cols = c * BL + tl.arange(0, BL)
    x = tl.load(X + r * L + cols, mask=cols < L, other=0.0).to(tl.float32)
    tl.atomic_add(S + r, tl.sum(x * x, axis=0))


@triton.jit
def _privatize_kernel(X, Y, S, L, clip, std, seed, offset,
                      BL: tl.constexpr, ELEMENT: tl.constexpr, ONE_PASS: tl.constexpr, NOISE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)     # rows on axis 0: B·T can pass 65535
    c = tl.program_id(1)
    cols = c * BL + tl.arange(0, BL)
    ok = cols < L
    idx = r * L + cols
    x = tl.load(X + idx, mask=ok, other=0.0).to(tl.float32)
    if ELEMENT:
        y = tl.minimum(tl.maximum(x, -clip), clip)
    else:
        if ONE_PASS:
            sq = tl.sum(x * x, axis=0)
            tl.store(S + r, sq)
        else:
            sq = tl.load(S + r)
        # min(1, C/‖x‖); the floor keeps a zero row finite (factor 1)
        y = x * tl.minimum(1.0, clip / tl.sqrt(tl.maximum(sq, 1e-30)))
    if NOISE:   # row r's Philox calls start at r·⌈L/4⌉; BL is a multiple of 4
        calls = offset + r * ((L + 3) // 4) + (c * (BL // 4) + tl.arange(0, BL // 4)).to(tl.int64)
        y += std * normals(seed, calls)
    tl.store(Y + idx, y.to(Y.dtype.element_ty), mask=ok)


def privatize(h: torch.Tensor, rows: tuple[int, int], clip_norm: float, noise_std: float, mode: str, seed: int,
              offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, sq) as ``reference.privatize`` for fp32/fp16/bf16 h viewed as ``rows`` = (R, L)."""
    x = h.contiguous()
    R, L = rows
    y = torch.empty_like(x)
    sq = torch.zeros(R, device=x.device, dtype=torch.float32)
    if R == 0 or L == 0:
        return y, sq
    max_block = 64 if interpreted() else 8192
    element = MODES[mode] == 1
    one_pass = not element and L <= max_block
    bl = max(4, triton.next_power_of_2(L)) if one_pass else (64 if interpreted() else 4096)
    grid = (R, triton.cdiv(L, bl))
    if not element and not one_pass:
        _row_sq_norm_kernel[grid](x, L, sq, BL=bl)
    warps = 1 if interpreted() else max(1, min(16, bl // 512))
    _privatize_kernel[grid](x, y, sq, L, float(clip_norm), float(noise_std), seed, offset,
                            BL=bl, ELEMENT=element, ONE_PASS=one_pass, NOISE=noise_std > 0, num_warps=warps)
    return y, sq
