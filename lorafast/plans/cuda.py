"""The "cuda" backend: the ``lorafast_cuda`` ops of csrc/ (bound in csrc/bindings.cpp). For
the LoRA linear, the two large GEMMs run on cuBLAS (torch.mm) and every rank-r pass in the
kernels of csrc/lora_linear.cu, in the same shape as plans/triton.py:

    forward   h = drop(x) Aᵀ                            rank_reduce over x (OUT)
              y = [x Wᵀ] + s (h Rᵀ) Bᵀ + b              cuBLAS, then rank_update_ in place
    backward  g = G B,  dB += s Gᵀ (h Rᵀ),  db = Σ G    one rank_reduce pass over G
              dR = s gᵀ h,  Lg = s g R                  (M, r) × (r, r) products in fp32
              dA += Lgᵀ drop(x)                         rank_reduce over x (DW)
              dx = [G W] + (Lg A) ⊙ m/(1-p)             cuBLAS, then rank_update_
With per-sample buffers (DP-SGD) the reductions over rows flush at each sample's boundary.
The dropout mask takes word col mod 4 of Philox call offset + row·⌈in/4⌉ + ⌊col/4⌋ under
seed (four mask elements per call), bit-identical to the Triton kernels'. fp32 GEMMs follow
torch's TF32 switch, as the Triton backend does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lorafast import _backend

from . import lora

MAX_RANK = 128   # kMaxReduceRank in csrc/launchers.h: larger ranks go through in slices


def ops():
    """The lorafast_cuda op namespace (loaded on first use; see ``_backend.cuda_ops``)."""
    return _backend.cuda_ops()


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.to(torch.float32) if t is not None else None


def _reduce(X: Tensor, *, P: Optional[Tensor] = None, out: Optional[Tensor] = None, out_scale: float = 1.0,
            L: Optional[Tensor] = None, dW: Optional[Tensor] = None, l_scale: float = 1.0,
            dbias: Optional[Tensor] = None, r: int, dropout_p: float = 0.0, seed: int = 0, offset: int = 0,
            rows_per_sample: int = 0) -> None:
    """One rank_reduce pass (P (K, r) with out (M, r); L (M, r) with dW (K, r) or (N, K, r)),
    in rank slices of at most MAX_RANK."""
    for c0 in range(0, r, MAX_RANK):
        c1 = min(r, c0 + MAX_RANK)
        whole = c0 == 0 and c1 == r
        out_c = out if whole or out is None else torch.zeros((X.shape[0], c1 - c0), device=X.device,
                                                             dtype=torch.float32)
        ops().rank_reduce(X, P[:, c0:c1] if P is not None else None, out_c, float(out_scale),
                          L[:, c0:c1].contiguous() if L is not None else None,
                          dW[..., c0:c1] if dW is not None else None, float(l_scale), int(rows_per_sample),
                          dbias if c0 == 0 else None, float(dropout_p), int(seed), int(offset))
        if out_c is not out:
            out[:, c0:c1] = out_c


def _no_segments(segments) -> None:
    if segments is not None:   # _backend.select never sends lora_linear_multi here
        raise ValueError("the CUDA backend has no kernels for many clients' adapters (lora_linear_multi); "
                         "use backend='triton', 'hybrid' or 'torch'")


def lora_linear_forward(x2, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p, seed, offset, segments=None):
    """x2 (M, in) → (y (M, out) in x's dtype, h = drop(x) Aᵀ (M, r) fp32)."""
    _no_segments(segments)
    M = x2.shape[0]
    out_f, r = weight.shape[0], lora_A.shape[0]
    h = torch.zeros((M, r), device=x2.device, dtype=torch.float32)
    if M == 0:
        return x2.new_empty((0, out_f)), h
    # the kernels read P (K, r) and U (r, N) row by row: small contiguous copies keep those reads coalesced
    _reduce(x2, P=_f32(lora_A).T.contiguous(), out=h, r=r, dropout_p=dropout_p, seed=seed, offset=offset)
    v = h @ _f32(lora_R).T if lora_R is not None else h
    y = torch.mm(x2, weight.T)
    b = _f32(bias).contiguous() if bias is not None else None
    ops().rank_update_(y, v.contiguous(), _f32(lora_B).T.contiguous(), b, float(scaling), 0.0, 0, 0)
    return y, h


def passes(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, *,
           need_x, dA, dB, dR, db, grad_scale, rows_per_sample, segments=None) -> Optional[Tensor]:
    """The backward's kernels (see plans/lora.py for the contract)."""
    _no_segments(segments)
    M = x2.shape[0]
    r = lora_A.shape[0]
    R = _f32(lora_R)
    need_low = need_x or dA is not None          # Lg = s g R feeds both dA and dx
    g = torch.zeros((M, r), device=x2.device, dtype=torch.float32) if need_low or dR is not None else None
    if g is not None or dB is not None or db is not None:
        v = (h @ R.T if R is not None else h) if dB is not None else None
        _reduce(gy2, P=_f32(lora_B).contiguous() if g is not None else None, out=g, L=v, dW=dB,
                l_scale=scaling * grad_scale, dbias=db, r=r, rows_per_sample=rows_per_sample)
    if dR is not None:
        if rows_per_sample:
            n = M // rows_per_sample
            dR.add_(torch.bmm(g.view(n, rows_per_sample, r).transpose(1, 2), h.view(n, rows_per_sample, r)),
                    alpha=scaling * grad_scale)
        else:
            dR.add_(g.T @ h, alpha=scaling * grad_scale)
    if not need_low:
        return None
    Lg = (g @ R).mul_(scaling) if R is not None else g * scaling
    if dA is not None:
        _reduce(x2, L=Lg, dW=dA.transpose(-1, -2), l_scale=grad_scale, r=r, dropout_p=dropout_p, seed=seed,
                offset=offset, rows_per_sample=rows_per_sample)
    if not need_x:
        return None
    dx = torch.mm(gy2, weight)
    ops().rank_update_(dx, Lg, _f32(lora_A).contiguous(), None, 1.0, float(dropout_p), int(seed), int(offset))
    return dx


lora_linear_backward, lora_linear_per_sample_backward = lora.backward_functions(passes)


def grad_sample_norms(grad_sample, segments):
    return ops().grad_sample_norms(grad_sample, segments)


def clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std, seed, offset,
                      out_scale):
    return ops().clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std,
                                   seed, offset, out_scale)


def fedex_merge_(weight, U, V, compensation):
    ops().fedex_merge_(weight, U, V, compensation)


def privatize(h, clip_norm, noise_std, mode, seed, offset):
    return ops().privatize(h, clip_norm, noise_std, mode, seed, offset)


def dequantize_(qw, out):
    """No CUDA C++ kernel decodes bitsandbytes weights: the reference's, on the GPU."""
    from lorafast import reference
    out.copy_(reference.dequantize(qw, out.dtype))
