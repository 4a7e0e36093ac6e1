"""The FedEx-LoRA merge in Triton: W += U V in place, U (out, K), V (K, in) the clients'
stacked, centred factors (spec: lorafast/reference.py ``fedex_merge_``).

Each program owns one (BM, BN) tile of W: it loops over K accumulating U·V in fp32,
then reads the tile of W (and of the fp32 compensation C) once and writes it once:

    t = C + UV,   W' = round(W + t),   C' = (W − W') + t        (with compensation)
    W' = round(W + UV)                                          (without)

No (out, in) temporary exists. Bytes: W read and written (plus C), and the factors,
K·(out + in)·4, re-read from L2 by the tiles of one row or column. FLOPs: 2·out·in·K;
for K = k·r ≤ a few hundred the merge is bound by W's bytes.
fp32 factors use 3xTF32 on the tensor cores (about fp32 accuracy at a third of TF32's
rate) unless torch allows TF32; the residual must not lose digits that the exactness
invariant keeps.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import grouped_tile, interpreted, rtne_bf16_bits


@triton.jit
def _fedex_merge_kernel(W, stride_wm, stride_wn, C, stride_cm, stride_cn,
                        U, stride_um, stride_uk, V, stride_vk, stride_vn, M, N, K,
                        HAS_COMP: tl.constexpr, ROUND_BF16: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        u = tl.load(U + rm[:, None] * stride_um + (k0 + rk)[None, :] * stride_uk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + (k0 + rk)[:, None] * stride_vk + rn[None, :] * stride_vn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(u, v, acc, input_precision=PREC)

    ok = m_ok[:, None] & n_ok[None, :]
    # int64 both ways: W may be the transposed view of a (in, out) weight (GPT-2's Conv1D)
    w_ptrs = W + rm[:, None].to(tl.int64) * stride_wm + rn[None, :].to(tl.int64) * stride_wn
    w = tl.load(w_ptrs, mask=ok, other=0.0).to(tl.float32)
    if HAS_COMP:
        c_ptrs = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
        t = tl.load(c_ptrs, mask=ok, other=0.0) + acc
        new = w + t
    else:
        new = w + acc
    if ROUND_BF16:   # the interpreter's bf16 cast truncates; round to nearest-even first
        new = rtne_bf16_bits(new)
    new = new.to(W.dtype.element_ty)
    tl.store(w_ptrs, new, mask=ok)
    if HAS_COMP:
        tl.store(c_ptrs, (w - new.to(tl.float32)) + t, mask=ok)


def _precision(dtype: torch.dtype) -> str:
    if interpreted():
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def fedex_merge_(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                 compensation: Optional[torch.Tensor] = None) -> None:
    """W (out, in) += U (out, K) · V (K, in) in place, with optional fp32 compensation."""
    M, N = weight.shape
    K = U.shape[1]
    if M == 0 or N == 0:
        return
    interp = interpreted()
    if interp:
        bm, bn, bk, warps, stages = 16, 32, 16, 1, 1
    else:
        bm, bn, bk, warps, stages = 128, 128, 32, 8, 3
    comp = compensation if compensation is not None else weight
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fedex_merge_kernel[grid](
        weight, weight.stride(0), weight.stride(1), comp, comp.stride(0), comp.stride(1),
        U, U.stride(0), U.stride(1), V, V.stride(0), V.stride(1), M, N, K,
        HAS_COMP=compensation is not None, ROUND_BF16=interp and weight.dtype == torch.bfloat16,
        PREC=_precision(U.dtype), BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
