"""The "torch" backend: lorafast.reference, the spec, in the plans' signatures. It computes
in fp32 (fp64 for fp64 inputs) on any device, and serves fp64 and CPU tensors."""
from __future__ import annotations

import torch

from lorafast import reference


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_clients(segments, M: int):
    """(each row's client in x's order, the clients' scales) of the plans' ``segments``."""
    rows, seg, scale = segments
    clients = torch.empty(M, dtype=torch.int64, device=rows.device)
    clients[rows] = seg.to(torch.int64)
    return clients, scale


def lora_linear_forward(x2, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p, seed, offset, segments=None):
    kw = dict(dropout_p=dropout_p, seed=seed, offset=offset)
    if segments is None:
        y, h = reference.lora_linear_forward(x2, weight, lora_A, lora_B, bias, lora_R, scaling=scaling, **kw)
        return y, h.to(torch.float32)
    clients, scale = _row_clients(segments, x2.shape[0])
    y, h = reference.lora_linear_multi_forward(x2, weight, lora_A, lora_B, bias, lora_R, row_clients=clients,
                                               scaling=scale * scaling, **kw)
    return y, h[segments[0]].to(torch.float32)     # h in client order, as the kernel plans keep it


def lora_linear_backward(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, needs,
                         segments=None):
    # dbias stays in the accumulation dtype: the op rounds it once, to the bias's dtype
    kw = dict(dropout_p=dropout_p, seed=seed, offset=offset, needs=needs, bias_dtype=_acc(x2))
    if segments is None:
        return reference.lora_linear_backward(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling=scaling, **kw)
    clients, scale = _row_clients(segments, x2.shape[0])
    h_rows = torch.empty_like(h)
    h_rows[segments[0]] = h
    return reference.lora_linear_multi_backward(gy2, x2, weight, lora_A, lora_B, lora_R, h_rows, row_clients=clients,
                                                scaling=scale * scaling, **kw)


def lora_linear_per_sample_backward(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, *,
                                    batch, need_x, ps_A, ps_B, ps_R, ps_scale, segments=None):
    kw = dict(dropout_p=dropout_p, seed=seed, offset=offset)
    dx = None
    if segments is not None:
        clients, scale = _row_clients(segments, x2.shape[0])
        h_rows = torch.empty_like(h)
        h_rows[segments[0]] = h
        h, kw = h_rows, dict(kw, row_clients=clients, scaling=scale * scaling)
        backward, per_sample = reference.lora_linear_multi_backward, reference.lora_linear_multi_per_sample_grads
    else:
        kw["scaling"] = scaling
        backward, per_sample = reference.lora_linear_backward, reference.lora_linear_per_sample_grads
    if need_x:
        dx = backward(gy2, x2, weight, lora_A, lora_B, lora_R, h, needs=(True, False, False, False, False), **kw)[0]
    trained = (ps_A is not None, ps_B is not None, ps_R is not None)
    if batch > 0 and any(trained):
        grads = per_sample(gy2, x2, lora_A, lora_B, lora_R, h, batch=batch, needs=trained, **kw)
        for buf, g in zip((ps_A, ps_B, ps_R), grads):
            if buf is not None:
                buf.add_(g.to(buf.dtype), alpha=ps_scale)
    return dx


def grad_sample_norms(grad_sample, segments):
    return reference.grad_sample_sq_norms(grad_sample, segments).to(torch.float32)


def clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std, seed, offset,
                      out_scale):
    return reference.clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, per_layer=per_layer, acc=acc,
                                       noise=noise, noise_std=noise_std, seed=seed, offset=offset,
                                       out_scale=out_scale).to(torch.float32)


def fedex_merge_(weight, U, V, compensation):
    reference.fedex_merge_(weight, U, V, compensation)


def privatize(h, clip_norm, noise_std, mode, seed, offset):
    y, sq = reference.privatize(h.detach(), clip_norm, noise_std, mode=mode, seed=seed, offset=offset)
    return y, sq.to(torch.float32)


def dequantize_(qw, out):
    out.copy_(reference.dequantize(qw, out.dtype))
