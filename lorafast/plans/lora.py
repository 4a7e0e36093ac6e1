"""The LoRA linear backward's gradient buffers, shared by the kernel plans (triton, hybrid,
cuda): each plan supplies only ``passes``, the kernels that fill the buffers.

``passes(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, *,
need_x, dA, dB, dR, db, grad_scale, rows_per_sample)`` accumulates whichever of dA (r, in),
dB (out, r), dR (r, r), db (out,) is given (dA, dB, dR may be per-sample (N, ·, ·) fp32 views
with ``rows_per_sample`` = T rows each), scaled by ``grad_scale``, and returns dx (M, in) in
x's dtype when ``need_x``. With ``segments`` (lora_linear_multi: rows, seg, scale; see
kernels/lora_linear.py) the adapters and dA, dB, dR are (clients, ·, ·) stacks, unless per
sample, and each row's scale is ``scaling`` times its client's.
"""
from __future__ import annotations

import torch


def backward(passes, gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, needs,
             segments=None):
    """Gradients (dx, dA, dB, dR, dbias), fp32 (dx in x's dtype); None where not needed."""
    need_x, need_A, need_B, need_R, need_bias = needs
    M, in_f = x2.shape
    dev, f32 = x2.device, torch.float32
    dA = torch.zeros(lora_A.shape, device=dev, dtype=f32) if need_A else None
    dB = torch.zeros(lora_B.shape, device=dev, dtype=f32) if need_B else None
    dR = torch.zeros(lora_R.shape, device=dev, dtype=f32) if need_R else None
    db = torch.zeros((weight.shape[0],), device=dev, dtype=f32) if need_bias else None
    if M == 0:
        return (x2.new_zeros((0, in_f)) if need_x else None), dA, dB, dR, db
    dx = passes(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset,
                need_x=need_x, dA=dA, dB=dB, dR=dR, db=db, grad_scale=1.0, rows_per_sample=0, segments=segments)
    return dx, dA, dB, dR, db


def per_sample_backward(passes, gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, *,
                        batch, need_x, ps_A, ps_B, ps_R, ps_scale, segments=None):
    """dx (None unless ``need_x``), and each sample's adapter gradients × ``ps_scale`` added into
    the fp32 views ps_A (N, r, in), ps_B (N, out, r), ps_R (N, r, r) (None where not trained):
    reductions over each sample's T = M / N rows inside the same passes. With ``segments``
    sample i's slot holds its gradient of its own client's adapter."""
    M, in_f = x2.shape
    if M == 0:
        return x2.new_zeros((0, in_f)) if need_x else None
    return passes(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset,
                  need_x=need_x, dA=ps_A, dB=ps_B, dR=ps_R, db=None, grad_scale=ps_scale, rows_per_sample=M // batch,
                  segments=segments)


def backward_functions(passes):
    """A plan's ``(lora_linear_backward, lora_linear_per_sample_backward)`` over its ``passes``."""
    def lora_linear_backward(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, needs,
                             segments=None):
        return backward(passes, gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, needs,
                        segments)

    def lora_linear_per_sample_backward(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed,
                                        offset, **per_sample):
        return per_sample_backward(passes, gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed,
                                   offset, **per_sample)
    return lora_linear_backward, lora_linear_per_sample_backward
