"""The "triton" backend: lorafast.kernels, with the LoRA linear fully fused (its base GEMMs
in the Triton GEMM, whose epilogue adds the rank-r term). ``blas=True`` is the "hybrid"
plan (plans/hybrid.py): torch.mm forms x·Wᵀ and dY·W, and one pass adds the rest.

    forward   h = drop(x) Aᵀ                            project over x (out)
              y = x Wᵀ + s (h Rᵀ) Bᵀ + b                v = h Rᵀ (tiny), then gemm
    backward  g = G B;  Lg = s g R;  dB = s Gᵀ(h Rᵀ);   one project pass over G
              dR = s gᵀ h;  db = Σ G
              dA = Lgᵀ drop(x)                          project over x (dW only)
              dx = G W + (Lg A) ⊙ m/(1-p)               gemm

With ``segments`` (rows, seg, scale) (lora_linear_multi) the adapters are (clients, ·, ·)
stacks and the same kernels run in client order (kernels/lora_linear.py, SEGMENTED): h and
Lg are then in that order, and R is folded into each client's B for the forward's epilogue.
"""
from __future__ import annotations

import torch

from lorafast import _layout
from lorafast.kernels import dp, fedex
from lorafast.kernels import lora_linear as K
from lorafast.kernels import privatize as _privatize
from lorafast.kernels import quant as _quant

from . import lora


def lora_linear_forward(x2, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p, seed, offset, *, blas=False,
                        segments=None):
    """x2 (M, in) → (y (M, out) in x's dtype, h = drop(x) Aᵀ (M, r) fp32)."""
    M = x2.shape[0]
    out_f, r = weight.shape[0], lora_A.shape[-2]
    h = torch.empty((M, r), device=x2.device, dtype=torch.float32)
    y = torch.empty((M, out_f), device=x2.device, dtype=x2.dtype)
    if M == 0:
        return y, h
    K.project(x2, P=lora_A.transpose(-1, -2), out=h, r=r, dropout_p=dropout_p, seed=seed, offset=offset,
              segments=_unscaled(segments))
    v, U = h, lora_B.transpose(-1, -2)
    if lora_R is not None and segments is not None:
        U = (lora_B.float() @ lora_R.float()).transpose(-1, -2)   # (k, out, r) B_c R_c: tiny, once per call
    elif lora_R is not None:
        v = h @ lora_R.T.to(torch.float32)     # (M, r): a tiny product, done once
    K.gemm(x2, weight.T, H=v, U=U, Y=y, r=r, scale=scaling, bias=bias.contiguous() if bias is not None else None,
           blas=blas, segments=segments)
    return y, h


def passes(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, *,
           need_x, dA, dB, dR, db, grad_scale, rows_per_sample, segments=None, blas=False):
    """The backward's kernels (see plans/lora.py for the contract)."""
    M = x2.shape[0]
    r = lora_A.shape[-2]
    need_low = need_x or dA is not None   # Lg = s g R feeds both dA and dx
    Lg = torch.empty((M, r), device=x2.device, dtype=torch.float32) if need_low else None
    if need_low or dB is not None or dR is not None or db is not None:
        K.project(gy2, P=lora_B if (need_low or dR is not None) else None, out=Lg, out_scale=scaling,
                  Q=lora_R if need_low else None, H=h, QH=lora_R.transpose(-1, -2) if lora_R is not None else None,
                  l_scale=scaling * grad_scale, dW=dB, dR=dR, dr_scale=scaling * grad_scale, dbias=db, r=r,
                  rows_per_sample=rows_per_sample, segments=segments)
    if dA is not None:   # Lg carries the client scales already
        K.project(x2, H=Lg, dW=dA.transpose(-1, -2), l_scale=grad_scale, r=r, dropout_p=dropout_p, seed=seed,
                  offset=offset, rows_per_sample=rows_per_sample, segments=_unscaled(segments))
    if not need_x:
        return None
    dx = torch.empty((M, x2.shape[1]), device=x2.device, dtype=x2.dtype)
    K.gemm(gy2, weight, H=Lg, U=lora_A, Y=dx, r=r, dropout_p=dropout_p, seed=seed, offset=offset, blas=blas,
           segments=_unscaled(segments))
    return dx


def _unscaled(segments):
    """``segments`` for a pass whose H (Lg) already carries each client's scale."""
    return None if segments is None else (segments[0], segments[1], None)


lora_linear_backward, lora_linear_per_sample_backward = lora.backward_functions(passes)


def grad_sample_norms(grad_sample, segments):
    return dp.grad_sample_sq_norms(grad_sample, segments)


def clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std, seed, offset,
                      out_scale):
    return dp.clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, per_layer=per_layer, acc=acc,
                                noise=noise, noise_std=noise_std, seed=seed, offset=offset, out_scale=out_scale)


def fedex_merge_(weight, U, V, compensation):
    fedex.fedex_merge_(weight, U, V, compensation)


def privatize(h, clip_norm, noise_std, mode, seed, offset):
    return _privatize.privatize(h, _layout.privatize_rows(h.shape, mode), clip_norm, noise_std, mode, seed, offset)


def dequantize_(qw, out):
    _quant.dequantize(qw, out)
