"""The op catalogue: one torch.library custom op per operation.

Each op's body runs the backend named by its ``backend`` argument (resolved by
``lorafast._backend.select`` before the call): "torch" is the reference in
reference.py, "triton" the kernels in lorafast.kernels, "hybrid" the same with the LoRA
linear's base GEMMs on cuBLAS, "cuda" the lorafast_cuda ops of csrc/ (composed with cuBLAS
GEMMs in _cuda_lora.py for the LoRA linear). Fake kernels make the
ops traceable by torch.compile; autograd is registered on the forward op and
calls the backward op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backend, reference

KERNEL_BACKENDS = ("triton", "hybrid", "cuda")
TRITON_BACKENDS = ("triton", "hybrid")     # "hybrid" differs from "triton" only in the LoRA linear's base GEMMs


def _rows(x: Tensor) -> Tensor:
    """x (..., in) as a 2-D (M, in) view when its strides allow, else a copy in x's dtype."""
    return x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------------ lora_linear


@torch.library.custom_op("lorafast::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    bias: Optional[Tensor], lora_R: Optional[Tensor], scaling: float,
                    dropout_p: float, seed: int, offset: int, backend: str) -> tuple[Tensor, Tensor]:
    """(y, h): y = x Wᵀ + b + s·drop(x)Aᵀ(Rᵀ)Bᵀ in x's dtype; h = drop(x)Aᵀ (M, r) fp32 for backward."""
    if backend in KERNEL_BACKENDS:
        kernels = _backend.lora_linear_kernels(backend, x.device)
        y, h = kernels.lora_linear_forward(_rows(x), weight, lora_A, lora_B, bias, lora_R,
                                           scaling, dropout_p, seed, offset)
        return y.reshape(*x.shape[:-1], weight.shape[0]), h
    y, h = reference.lora_linear_forward(x, weight, lora_A, lora_B, bias, lora_R, scaling=scaling,
                                         dropout_p=dropout_p, seed=seed, offset=offset)
    return y, h.to(torch.float32)


@lora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p, seed, offset, backend):
    rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    h = x.new_empty((rows, lora_A.shape[0]), dtype=torch.float32)
    return y, h


@torch.library.custom_op("lorafast::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    lora_R: Optional[Tensor], bias: Optional[Tensor], h: Tensor, scaling: float,
                    dropout_p: float, seed: int, offset: int, needs: list[bool],
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dR, dbias); an entry whose ``needs`` flag is False is an empty tensor."""
    needs_t = tuple(bool(n) for n in needs)
    if backend in KERNEL_BACKENDS:
        kernels = _backend.lora_linear_kernels(backend, x.device)
        grads = kernels.lora_linear_backward(_rows(grad_y), _rows(x), weight, lora_A, lora_B, lora_R, h,
                                             scaling, dropout_p, seed, offset, needs_t)
        dx, dA, dB, dR, db = grads
        if dx is not None:
            dx = dx.reshape(x.shape)
    else:
        dx, dA, dB, dR, db = reference.lora_linear_backward(
            grad_y, x, weight, lora_A, lora_B, lora_R, h, scaling=scaling, dropout_p=dropout_p,
            seed=seed, offset=offset, needs=needs_t,
            bias_dtype=bias.dtype if bias is not None else None)
    like = (x, lora_A, lora_B, lora_R, bias)
    out = []
    for g, ref in zip((dx, dA, dB, dR, db), like):
        out.append(g.to(ref.dtype).contiguous() if g is not None else x.new_empty((0,)))
    return tuple(out)


@lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, lora_R, bias, h, scaling, dropout_p, seed, offset, needs, backend):
    like = (x, lora_A, lora_B, lora_R, bias)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if n else x.new_empty((0,))
                 for n, t in zip(needs, like))


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p, seed, offset, backend = inputs
    _, h = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, lora_R, bias, h)
    ctx.args = (scaling, dropout_p, seed, offset, backend)


def _backward(ctx, grad_y, _grad_h):
    x, weight, lora_A, lora_B, lora_R, bias, h = ctx.saved_tensors
    scaling, dropout_p, seed, offset, backend = ctx.args
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3], lora_R is not None and n[5], bias is not None and n[4]]
    if not any(needs):
        return (None,) * 11
    dx, dA, dB, dR, db = lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, lora_R, bias, h, scaling,
                                         dropout_p, seed, offset, needs, backend)
    pick = [g if k else None for g, k in zip((dx, dA, dB, dR, db), needs)]
    return pick[0], None, pick[1], pick[2], pick[4], pick[3], None, None, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ DP-SGD


@torch.library.custom_op("lorafast::lora_linear_bwd_ps", mutates_args=("ps_A", "ps_B", "ps_R"))
def lora_linear_bwd_ps(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                       lora_R: Optional[Tensor], h: Tensor, scaling: float, dropout_p: float, seed: int,
                       offset: int, batch: int, need_x: bool, ps_A: Optional[Tensor], ps_B: Optional[Tensor],
                       ps_R: Optional[Tensor], ps_scale: float, backend: str) -> Tensor:
    """The backward of ``lora_linear_fwd`` with per-sample adapter gradients: returns dx (empty
    unless ``need_x``) and adds ps_scale × each sample's gradient into the fp32 buffers
    ps_A (N, r, in), ps_B (N, out, r), ps_R (N, r, r) (None where not trained)."""
    if backend in KERNEL_BACKENDS:
        kernels = _backend.lora_linear_kernels(backend, x.device)
        dx = kernels.lora_linear_per_sample_backward(
            _rows(grad_y), _rows(x), weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset,
            batch=batch, need_x=need_x, ps_A=ps_A, ps_B=ps_B, ps_R=ps_R, ps_scale=ps_scale)
        dx = dx.reshape(x.shape) if dx is not None else None
    else:
        kw = dict(scaling=scaling, dropout_p=dropout_p, seed=seed, offset=offset)
        dx = None
        if need_x:
            dx = reference.lora_linear_backward(grad_y, x, weight, lora_A, lora_B, lora_R, h,
                                                needs=(True, False, False, False, False), **kw)[0]
        needs = (ps_A is not None, ps_B is not None, ps_R is not None)
        if batch > 0 and any(needs):
            grads = reference.lora_linear_per_sample_grads(grad_y, x, lora_A, lora_B, lora_R, h, batch=batch,
                                                           needs=needs, **kw)
            for buf, g in zip((ps_A, ps_B, ps_R), grads):
                if buf is not None:
                    buf.add_(g.to(buf.dtype), alpha=ps_scale)
    return dx.contiguous() if dx is not None else x.new_empty((0,))


@lora_linear_bwd_ps.register_fake
def _(grad_y, x, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, batch, need_x,
      ps_A, ps_B, ps_R, ps_scale, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,))


@torch.library.custom_op("lorafast::grad_sample_norms", mutates_args=())
def grad_sample_norms(grad_sample: Tensor, segments: list[int], backend: str) -> Tensor:
    """(N, P) fp32 squared norms of each sample's gradient of each parameter; grad_sample (N, D)
    holds parameter p in columns [segments[p], segments[p+1])."""
    if backend in TRITON_BACKENDS:
        return _backend.triton_kernels(grad_sample.device, "dp").grad_sample_sq_norms(grad_sample, segments)
    if backend == "cuda":
        return _backend.cuda_ops().grad_sample_norms(grad_sample, segments)
    return reference.grad_sample_sq_norms(grad_sample, segments).to(torch.float32)


@grad_sample_norms.register_fake
def _(grad_sample, segments, backend):
    return grad_sample.new_empty((grad_sample.shape[0], len(segments) - 1), dtype=torch.float32)


@torch.library.custom_op("lorafast::clip_reduce_noise", mutates_args=())
def clip_reduce_noise(grad_sample: Tensor, sq_norms: Tensor, segments: list[int], max_norms: list[float],
                      per_layer: bool, acc: Optional[Tensor], noise: Optional[Tensor], noise_std: float,
                      seed: int, offset: int, out_scale: float, backend: str) -> Tensor:
    """(D,) fp32 ``(acc + Σᵢ cᵢ gᵢ + std·ξ) · out_scale``; see ``reference.clip_reduce_noise``."""
    kw = dict(per_layer=per_layer, acc=acc, noise=noise, noise_std=noise_std, seed=seed, offset=offset,
              out_scale=out_scale)
    if backend in TRITON_BACKENDS:
        kernels = _backend.triton_kernels(grad_sample.device, "dp")
        return kernels.clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, **kw)
    if backend == "cuda":
        return _backend.cuda_ops().clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise,
                                                     noise_std, seed, offset, out_scale)
    return reference.clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, **kw).to(torch.float32)


@clip_reduce_noise.register_fake
def _(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std, seed, offset, out_scale,
      backend):
    return grad_sample.new_empty((grad_sample.shape[1],), dtype=torch.float32)


# ------------------------------------------------------------------ federated aggregation


@torch.library.custom_op("lorafast::fedex_merge_", mutates_args=("weight", "compensation"))
def fedex_merge_(weight: Tensor, U: Tensor, V: Tensor, compensation: Optional[Tensor], backend: str) -> None:
    """W += U V in place (fp32 accumulation), carrying rounding in ``compensation`` when given."""
    if backend in TRITON_BACKENDS:
        _backend.triton_kernels(weight.device, "fedex").fedex_merge_(weight, U, V, compensation)
    elif backend == "cuda":
        _backend.cuda_ops().fedex_merge_(weight, U, V, compensation)
    else:
        reference.fedex_merge_(weight, U, V, compensation)


@fedex_merge_.register_fake
def _(weight, U, V, compensation, backend):
    return None


# ------------------------------------------------------------------ split learning


@torch.library.custom_op("lorafast::privatize", mutates_args=())
def privatize(h: Tensor, clip_norm: float, noise_std: float, mode: str, seed: int, offset: int,
              backend: str) -> tuple[Tensor, Tensor]:
    """(y, sq): y = clip(h) + noise_std·ξ in h's dtype, sq the clipped rows' squared norms."""
    if backend in TRITON_BACKENDS:
        return _backend.triton_kernels(h.device, "split").privatize(h, clip_norm, noise_std, mode, seed, offset)
    if backend == "cuda":
        return _backend.cuda_ops().privatize(h, clip_norm, noise_std, mode, seed, offset)
    y, sq = reference.privatize(h.detach(), clip_norm, noise_std, mode=mode, seed=seed, offset=offset)
    return y, sq.to(torch.float32)


@privatize.register_fake
def _(h, clip_norm, noise_std, mode, seed, offset, backend):
    rows, _ = reference.privatize_rows(h, mode)
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty((rows,), dtype=torch.float32)


def _privatize_setup(ctx, inputs, output):
    h, clip_norm, _, mode, *_ = inputs
    ctx.save_for_backward(h, output[1])
    ctx.clip_norm, ctx.mode = clip_norm, mode


def _privatize_backward(ctx, grad_y, _grad_sq):
    h, sq = ctx.saved_tensors
    return reference.privatize_backward(grad_y, h, sq, ctx.clip_norm, mode=ctx.mode), None, None, None, None, None, None


privatize.register_autograd(_privatize_backward, setup_context=_privatize_setup)
