"""The op catalogue: one torch.library custom op per operation.

Each op's body runs the backend named by its ``backend`` argument (resolved by
``lorafast._backend.select`` before the call): "torch" is the reference in
reference.py, "triton" the kernels in lorafast.kernels. Fake kernels make the
ops traceable by torch.compile; autograd is registered on the forward op and
calls the backward op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backend, reference


def _rows(x: Tensor) -> Tensor:
    """x (..., in) as a 2-D (M, in) view when its strides allow, else a copy in x's dtype."""
    return x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------------ lora_linear


@torch.library.custom_op("lorafast::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    bias: Optional[Tensor], lora_R: Optional[Tensor], scaling: float,
                    dropout_p: float, seed: int, offset: int, backend: str) -> tuple[Tensor, Tensor]:
    """(y, h): y = x Wᵀ + b + s·drop(x)Aᵀ(Rᵀ)Bᵀ in x's dtype; h = drop(x)Aᵀ (M, r) fp32 for backward."""
    if backend == "triton":
        kernels = _backend.triton_kernels(x.device)
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
    if backend == "triton":
        kernels = _backend.triton_kernels(x.device)
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
