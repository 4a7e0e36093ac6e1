"""The op catalogue: every lorafast op, registered with torch.library, and its entry point.

Each op has two faces here:
  * the registered op ``lorafast::<name>`` (in ``REGISTERED``), whose body runs the plan of
    the backend named by its last argument: ``_backend.plan(backend, device).<name>``, one
    module per backend with the same functions (lorafast/plans/). Fake kernels make the ops
    traceable by torch.compile; autograd is registered on the forward ops;
  * the entry point ``<name>(...)``, with the op's arguments in the same order and the
    backend last and optional: it resolves the backend (``_backend.select``, by the
    registered name) and calls the op. Everything outside this module calls these.

    op                    entry point                      plan function
    lora_linear_fwd       lora_linear (public), lora_linear_fwd    lora_linear_forward
    lora_linear_bwd       lora_linear_bwd (autograd)       lora_linear_backward
    lora_linear_bwd_ps    lora_linear_bwd_ps (DP-SGD)      lora_linear_per_sample_backward
    lora_linear_multi_fwd lora_linear_multi (public), lora_linear_multi_fwd   lora_linear_forward(segments=)
    lora_linear_multi_bwd lora_linear_multi_bwd (autograd) lora_linear_backward(segments=)
    lora_linear_multi_bwd_ps lora_linear_multi_bwd_ps (per-client DP) lora_linear_per_sample_backward(segments=)
    grad_sample_norms     grad_sample_norms                grad_sample_norms
    clip_reduce_noise     clip_reduce_noise                clip_reduce_noise
    fedex_merge_          fedex_merge_                     fedex_merge_
    privatize             privatize                        privatize
    dequantize_           dequantize_ (QLoRA)              dequantize_
    lora_linear_q_fwd     lora_linear_q (QLoRA), lora_linear_q_fwd   dequantize_ + lora_linear_forward
    lora_linear_q_bwd     (autograd)                       dequantize_ + lora_linear_backward
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _checks, _layout, _random, reference


def _rows(x: Tensor) -> Tensor:
    """x (..., in) as a 2-D (M, in) view when its strides allow, else a copy in x's dtype."""
    return x.reshape(-1, x.shape[-1])


def _dropout_seed(seed: Optional[int], dropout_p: float) -> int:
    """The dropout mask's Philox key: the one given, else the next of ``lorafast.manual_seed``'s
    stream; 0 without dropout."""
    if dropout_p <= 0.0:
        return 0
    seed = _checks.check_seed("seed", seed)
    return _random.next_seed() if seed is None else seed


def _noise_seed(seed: Optional[int]) -> int:
    """A Philox key for noise: the one given, else one from the OS (noise protects data, so
    ``lorafast.manual_seed`` does not replay it)."""
    return _random.os_seed() if seed is None else int(seed)


# ------------------------------------------------------------------ the LoRA linear


@torch.library.custom_op("lorafast::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                     bias: Optional[Tensor], lora_R: Optional[Tensor], scaling: float,
                     dropout_p: float, seed: int, offset: int, backend: str) -> tuple[Tensor, Tensor]:
    y, h = _backend.plan(backend, x.device).lora_linear_forward(_rows(x), weight, lora_A, lora_B, bias, lora_R,
                                                                 scaling, dropout_p, seed, offset)
    return y.reshape(*x.shape[:-1], weight.shape[0]), h


@_lora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p, seed, offset, backend):
    rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    h = x.new_empty((rows, lora_A.shape[0]), dtype=torch.float32)
    return y, h


@torch.library.custom_op("lorafast::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                     lora_R: Optional[Tensor], bias: Optional[Tensor], h: Tensor, scaling: float,
                     dropout_p: float, seed: int, offset: int, needs: list[bool],
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backend.plan(backend, x.device).lora_linear_backward(
        _rows(grad_y), _rows(x), weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset,
        tuple(bool(n) for n in needs))
    return _lora_grads(grads, x, lora_A, lora_B, lora_R, bias)


def _lora_grads(grads, x, lora_A, lora_B, lora_R, bias) -> tuple[Tensor, ...]:
    """(dx, dA, dB, dR, dbias) each in its input's shape and dtype; an empty tensor where not needed."""
    return tuple(x.new_empty((0,)) if g is None else g.reshape(ref.shape).to(ref.dtype).contiguous()
                 for g, ref in zip(grads, (x, lora_A, lora_B, lora_R, bias)))


def _lora_grads_fake(needs, x, lora_A, lora_B, lora_R, bias) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if n else x.new_empty((0,))
                 for n, t in zip(needs, (x, lora_A, lora_B, lora_R, bias)))


@_lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, lora_R, bias, h, scaling, dropout_p, seed, offset, needs, backend):
    return _lora_grads_fake(needs, x, lora_A, lora_B, lora_R, bias)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p, seed, offset, backend = inputs
    _, h = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, lora_R, bias, h)
    ctx.args = (scaling, dropout_p, seed, offset, backend)


def _grad_needs(ctx, lora_R, bias) -> list[bool]:
    """Which of (dx, dA, dB, dR, dbias) autograd wants, for ops whose inputs start
    (x, weight, lora_A, lora_B, bias, lora_R, ...)."""
    n = ctx.needs_input_grad
    return [n[0], n[2], n[3], lora_R is not None and n[5], bias is not None and n[4]]


def _input_grads(grads, needs, n_inputs: int) -> tuple:
    """(dx, dA, dB, dR, dbias) in the inputs' order (x, weight, lora_A, lora_B, bias, lora_R, ...)."""
    dx, dA, dB, dR, db = (g if k else None for g, k in zip(grads, needs))
    return (dx, None, dA, dB, db, dR) + (None,) * (n_inputs - 6)


def _backward(ctx, grad_y, _grad_h):
    x, weight, lora_A, lora_B, lora_R, bias, h = ctx.saved_tensors
    scaling, dropout_p, seed, offset, backend = ctx.args
    needs = _grad_needs(ctx, lora_R, bias)
    if not any(needs):
        return (None,) * 11
    grads = _lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, lora_R, bias, h, scaling, dropout_p, seed, offset,
                             needs, backend)
    return _input_grads(grads, needs, 11)


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lorafast::lora_linear_bwd_ps", mutates_args=("ps_A", "ps_B", "ps_R"))
def _lora_linear_bwd_ps(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                        lora_R: Optional[Tensor], h: Tensor, scaling: float, dropout_p: float, seed: int,
                        offset: int, batch: int, need_x: bool, ps_A: Optional[Tensor], ps_B: Optional[Tensor],
                        ps_R: Optional[Tensor], ps_scale: float, backend: str) -> Tensor:
    dx = _backend.plan(backend, x.device).lora_linear_per_sample_backward(
        _rows(grad_y), _rows(x), weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset,
        batch=batch, need_x=need_x, ps_A=ps_A, ps_B=ps_B, ps_R=ps_R, ps_scale=ps_scale)
    return dx.reshape(x.shape).contiguous() if dx is not None else x.new_empty((0,))


@_lora_linear_bwd_ps.register_fake
def _(grad_y, x, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, batch, need_x,
      ps_A, ps_B, ps_R, ps_scale, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,))


def lora_shape(x: Tensor, weight: Tensor, lora_A: Tensor) -> tuple[int, int, int, int]:
    """(M, in, out, r): the size features by which backends are chosen for the LoRA linear."""
    return x.numel() // max(x.shape[-1], 1), weight.shape[1], weight.shape[0], lora_A.shape[0]


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                bias: Optional[Tensor] = None, *, scaling: float = 1.0,
                lora_R: Optional[Tensor] = None, dropout_p: float = 0.0,
                backend: Optional[str] = None, seed: Optional[int] = None) -> Tensor:
    """Fused LoRA linear layer.

        y = x Wᵀ + b + s · drop(x) Aᵀ (Rᵀ) Bᵀ

    Args:
        x: (..., in) activations, fp32, fp16 or bf16 (fp64 runs on the torch backend).
        weight: (out, in) frozen base weight, x's dtype. Must not require grad.
        lora_A: (r, in) down projection; fp32 or x's dtype.
        lora_B: (out, r) up projection; fp32 or x's dtype.
        bias: optional (out,) bias.
        scaling: s, usually ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        lora_R: optional (r, r) matrix between A and B (LoRA-XS / LoRA-SB).
        dropout_p: inverted dropout on the adapter's input only, with a Philox mask from
            ``seed`` that the backward regenerates instead of storing.
        backend: "torch", "triton" (fully fused), "hybrid" (cuBLAS base GEMMs, Triton rank-r
            passes: the GPU default without a measured table), "cuda" or None (automatic; see
            ``lorafast.set_backend``).
        seed: the dropout mask's Philox key; None draws a fresh one (see ``lorafast.manual_seed``).

    Returns:
        (..., out) in x's dtype, accumulated in fp32. Gradients flow to whichever of
        x, lora_A, lora_B, lora_R and bias require grad; the others cost nothing.
    """
    _checks.check_lora_linear(x, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p)
    seed = _dropout_seed(seed, dropout_p)
    y, _ = lora_linear_fwd(x, weight, lora_A, lora_B, bias, lora_R, float(scaling), float(dropout_p), seed, 0,
                           backend)
    return y


def lora_linear_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor] = None,
                    lora_R: Optional[Tensor] = None, scaling: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
                    offset: int = 0, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(y, h) of the LoRA linear, differentiable: y = x Wᵀ + b + s·drop(x)Aᵀ(Rᵀ)Bᵀ in x's
    dtype, and h = drop(x)Aᵀ (M, r) fp32, which the per-sample backward takes. The dropout
    mask is Philox (seed, offset + row·⌈in/4⌉ + ⌊col/4⌋), word col mod 4 (reference.dropout_keep).
    Arguments are not validated here: ``lora_linear`` is the checked public form."""
    name = _backend.select("lora_linear_fwd", x.device, x.dtype, backend, shape=lora_shape(x, weight, lora_A))
    return _lora_linear_fwd(x, weight, lora_A, lora_B, bias, lora_R, float(scaling), float(dropout_p), int(seed),
                            int(offset), name)


def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    lora_R: Optional[Tensor], bias: Optional[Tensor], h: Tensor, scaling: float, dropout_p: float,
                    seed: int, offset: int, needs: list[bool], backend: Optional[str] = None):
    """(dx, dA, dB, dR, dbias) of ``lora_linear_fwd``, each in its input's dtype; an entry whose
    ``needs`` flag (in that order) is False is an empty tensor. Autograd calls this op itself."""
    name = _backend.select("lora_linear_bwd", x.device, x.dtype, backend, shape=lora_shape(x, weight, lora_A))
    return _lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, lora_R, bias, h, float(scaling), float(dropout_p),
                            int(seed), int(offset), [bool(n) for n in needs], name)


def lora_linear_bwd_ps(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                       lora_R: Optional[Tensor], h: Tensor, scaling: float, dropout_p: float, seed: int,
                       offset: int, batch: int, need_x: bool, ps_A: Optional[Tensor] = None,
                       ps_B: Optional[Tensor] = None, ps_R: Optional[Tensor] = None, ps_scale: float = 1.0,
                       backend: Optional[str] = None) -> Optional[Tensor]:
    """The backward of ``lora_linear_fwd`` with per-sample adapter gradients (DP-SGD): x holds
    ``batch`` samples of M/batch rows each; adds ps_scale × each sample's gradient into the
    fp32 buffers ps_A (N, r, in), ps_B (N, out, r), ps_R (N, r, r) (None where not trained)
    and returns dx (None unless ``need_x``). Pass the forward's backend."""
    name = _backend.select("lora_linear_bwd_ps", x.device, x.dtype, backend, shape=lora_shape(x, weight, lora_A))
    dx = _lora_linear_bwd_ps(grad_y, x, weight, lora_A, lora_B, lora_R, h, float(scaling), float(dropout_p),
                             int(seed), int(offset), int(batch), bool(need_x), ps_A, ps_B, ps_R, float(ps_scale),
                             name)
    return dx if need_x else None


# ------------------------------------------------------------------ many clients over one base


@torch.library.custom_op("lorafast::lora_linear_multi_fwd", mutates_args=())
def _lora_linear_multi_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                           lora_R: Optional[Tensor], rows: Tensor, seg: Tensor, scaling: Tensor, dropout_p: float,
                           seed: int, offset: int, backend: str) -> tuple[Tensor, Tensor]:
    y, h = _backend.plan(backend, x.device).lora_linear_forward(
        _rows(x), weight, lora_A, lora_B, bias, lora_R, 1.0, dropout_p, seed, offset, segments=(rows, seg, scaling))
    return y.reshape(*x.shape[:-1], weight.shape[0]), h


@_lora_linear_multi_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, lora_R, rows, seg, scaling, dropout_p, seed, offset, backend):
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[1]), dtype=torch.float32))


@torch.library.custom_op("lorafast::lora_linear_multi_bwd", mutates_args=())
def _lora_linear_multi_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                           lora_R: Optional[Tensor], bias: Optional[Tensor], h: Tensor, rows: Tensor, seg: Tensor,
                           scaling: Tensor, dropout_p: float, seed: int, offset: int, needs: list[bool],
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backend.plan(backend, x.device).lora_linear_backward(
        _rows(grad_y), _rows(x), weight, lora_A, lora_B, lora_R, h, 1.0, dropout_p, seed, offset,
        tuple(bool(n) for n in needs), segments=(rows, seg, scaling))
    return _lora_grads(grads, x, lora_A, lora_B, lora_R, bias)


@_lora_linear_multi_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, lora_R, bias, h, rows, seg, scaling, dropout_p, seed, offset, needs,
      backend):
    return _lora_grads_fake(needs, x, lora_A, lora_B, lora_R, bias)


@torch.library.custom_op("lorafast::lora_linear_multi_bwd_ps", mutates_args=("ps_A", "ps_B", "ps_R"))
def _lora_linear_multi_bwd_ps(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                              lora_R: Optional[Tensor], h: Tensor, rows: Tensor, seg: Tensor, scaling: Tensor,
                              dropout_p: float, seed: int, offset: int, need_x: bool, ps_A: Optional[Tensor],
                              ps_B: Optional[Tensor], ps_R: Optional[Tensor], ps_scale: float,
                              backend: str) -> Tensor:
    dx = _backend.plan(backend, x.device).lora_linear_per_sample_backward(
        _rows(grad_y), _rows(x), weight, lora_A, lora_B, lora_R, h, 1.0, dropout_p, seed, offset,
        batch=x.shape[0], need_x=need_x, ps_A=ps_A, ps_B=ps_B, ps_R=ps_R, ps_scale=ps_scale,
        segments=(rows, seg, scaling))
    return dx.reshape(x.shape).contiguous() if dx is not None else x.new_empty((0,))


@_lora_linear_multi_bwd_ps.register_fake
def _(grad_y, x, weight, lora_A, lora_B, lora_R, h, rows, seg, scaling, dropout_p, seed, offset, need_x,
      ps_A, ps_B, ps_R, ps_scale, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,))


def _multi_setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, lora_R, rows, seg, scaling, dropout_p, seed, offset, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, lora_R, bias, output[1], rows, seg, scaling)
    ctx.args = (dropout_p, seed, offset, backend)


def _multi_backward(ctx, grad_y, _grad_h):
    x, weight, lora_A, lora_B, lora_R, bias, h, rows, seg, scaling = ctx.saved_tensors
    needs = _grad_needs(ctx, lora_R, bias)
    if not any(needs):
        return (None,) * 13
    grads = _lora_linear_multi_bwd(grad_y, x, weight, lora_A, lora_B, lora_R, bias, h, rows, seg, scaling,
                                   *ctx.args[:3], needs, ctx.args[3])
    return _input_grads(grads, needs, 13)


_lora_linear_multi_fwd.register_autograd(_multi_backward, setup_context=_multi_setup_context)


def client_segments(client_ids: Tensor, rows_per_sample: int) -> tuple[Tensor, Tensor]:
    """(rows, seg): the batch's rows in client order, rows (M,) int64 the row of x at each
    position and seg (M,) int32 its client, sorted. Samples keep their T = rows_per_sample
    rows together and their order within a client (a stable sort of the ids, on the device:
    no copy of x and no host sync)."""
    order = torch.argsort(client_ids, stable=True)
    T = int(rows_per_sample)
    rows = (order[:, None] * T + torch.arange(T, device=order.device)).reshape(-1)
    seg = client_ids[order].to(torch.int32).repeat_interleave(T)
    return rows, seg


def client_scaling(scaling, clients: int, device) -> Tensor:
    """(clients,) fp32 scales from a number or a (clients,) tensor."""
    if isinstance(scaling, Tensor):
        return scaling.detach().to(device=device, dtype=torch.float32).contiguous()
    return torch.full((clients,), float(scaling), device=device, dtype=torch.float32)


def lora_linear_multi(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor] = None, *,
                      client_ids: Tensor, scaling=1.0, lora_R: Optional[Tensor] = None, dropout_p: float = 0.0,
                      backend: Optional[str] = None, seed: Optional[int] = None) -> Tensor:
    """k clients' LoRA adapters over one frozen base, in one fused op: sample i of x (its
    rows x[i, ...]) gets ``lora_linear`` with client ``client_ids[i]``'s adapter,

        y[i] = x[i] Wᵀ + b + s_c · drop(x[i]) A_cᵀ (R_cᵀ) B_cᵀ,   c = client_ids[i].

    The base GEMM runs once over every row; each client's rank-r work runs on its own rows,
    which the op visits in client order through an index (samples may come in any order;
    nothing is copied). The backward gives each client's dA, dB, dR from its rows alone,
    and dx and dbias of the whole batch; a client without rows gets zero gradients.

    Args:
        x: (batch, ..., in) activations, fp32, fp16 or bf16 (fp64 on the torch backend).
        weight: (out, in) frozen base weight, x's dtype.
        lora_A: (k, r, in), lora_B: (k, out, r), lora_R: optional (k, r, r): the k clients'
            adapters stacked, fp32 or x's dtype (clients of lower rank zero-padded).
        bias: optional (out,) bias.
        client_ids: (batch,) integer client of each sample, in [0, k).
        scaling: a number, or a (k,) tensor of per-client scales.
        dropout_p, seed, backend: as ``lora_linear`` (the mask is the whole batch's); "cuda"
            has no such kernels.

    Returns:
        (batch, ..., out) in x's dtype.
    """
    _checks.check_lora_linear_multi(x, weight, lora_A, lora_B, bias, lora_R, client_ids, scaling, dropout_p)
    seed = _dropout_seed(seed, dropout_p)
    rows, seg = client_segments(client_ids, x.numel() // max(x.shape[0] * x.shape[-1], 1))
    y, _ = lora_linear_multi_fwd(x, weight, lora_A, lora_B, bias, lora_R, rows, seg,
                                 client_scaling(scaling, lora_A.shape[0], x.device), dropout_p, seed, 0, backend)
    return y


def lora_linear_multi_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                          lora_R: Optional[Tensor], rows: Tensor, seg: Tensor, scaling: Tensor, dropout_p: float = 0.0,
                          seed: int = 0, offset: int = 0, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(y, h) of ``lora_linear_multi``, differentiable, over the client order (rows, seg) of
    ``client_segments`` and (k,) fp32 ``scaling``; h (M, r) fp32 is in client order.
    Arguments are not validated here."""
    name = _backend.select("lora_linear_multi_fwd", x.device, x.dtype, backend,
                           shape=lora_shape(x, weight, lora_A[0]))
    return _lora_linear_multi_fwd(x, weight, lora_A, lora_B, bias, lora_R, rows, seg, scaling, float(dropout_p),
                                  int(seed), int(offset), name)


def lora_linear_multi_bwd_ps(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                             lora_R: Optional[Tensor], h: Tensor, rows: Tensor, seg: Tensor, scaling: Tensor,
                             dropout_p: float, seed: int, offset: int, need_x: bool, ps_A: Optional[Tensor] = None,
                             ps_B: Optional[Tensor] = None, ps_R: Optional[Tensor] = None, ps_scale: float = 1.0,
                             backend: Optional[str] = None) -> Optional[Tensor]:
    """The backward of ``lora_linear_multi_fwd`` with per-sample gradients (per-client DP): adds
    ps_scale × sample i's gradient of its own client's adapter into the fp32 buffers ps_A
    (N, r, in), ps_B (N, out, r), ps_R (N, r, r) (None where not trained; N = x.shape[0]) and
    returns dx (None unless ``need_x``). Pass the forward's backend."""
    name = _backend.select("lora_linear_multi_bwd_ps", x.device, x.dtype, backend,
                           shape=lora_shape(x, weight, lora_A[0]))
    dx = _lora_linear_multi_bwd_ps(grad_y, x, weight, lora_A, lora_B, lora_R, h, rows, seg, scaling,
                                   float(dropout_p), int(seed), int(offset), bool(need_x), ps_A, ps_B, ps_R,
                                   float(ps_scale), name)
    return dx if need_x else None


def lora_linear_multi_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                          lora_R: Optional[Tensor], bias: Optional[Tensor], h: Tensor, rows: Tensor, seg: Tensor,
                          scaling: Tensor, dropout_p: float, seed: int, offset: int, needs: list[bool],
                          backend: Optional[str] = None):
    """(dx, dA, dB, dR, dbias) of ``lora_linear_multi_fwd`` (empty where ``needs`` says no);
    dA, dB, dR are (k, ·, ·). Autograd calls this op itself."""
    name = _backend.select("lora_linear_multi_bwd", x.device, x.dtype, backend,
                           shape=lora_shape(x, weight, lora_A[0]))
    return _lora_linear_multi_bwd(grad_y, x, weight, lora_A, lora_B, lora_R, bias, h, rows, seg, scaling,
                                  float(dropout_p), int(seed), int(offset), [bool(n) for n in needs], name)


# ------------------------------------------------------------------ quantised base weights (QLoRA)


def _qw(qdata, absmax, code, absmax2, code2, qoffset, qmeta) -> reference.QuantWeight:
    """The QuantWeight that the ops' flat arguments spell: qmeta = [kind, blocksize, blocksize2, out, in]."""
    kind, block, block2, out_f, in_f = (int(v) for v in qmeta)
    return reference.QuantWeight(qdata, absmax, code, absmax2, code2, qoffset, kind, block, block2, (out_f, in_f))


def quant_args(qw: reference.QuantWeight) -> tuple:
    """The ops' flat arguments (qdata, absmax, code, absmax2, code2, qoffset, qmeta) of ``qw``."""
    return (qw.data, qw.absmax, qw.code, qw.absmax2, qw.code2, qw.offset,
            [qw.kind, qw.blocksize, qw.blocksize2, *qw.shape])


@torch.library.custom_op("lorafast::dequantize_", mutates_args=("out",))
def _dequantize_(qdata: Tensor, absmax: Tensor, code: Optional[Tensor], absmax2: Optional[Tensor],
                 code2: Optional[Tensor], qoffset: Optional[Tensor], qmeta: list[int], out: Tensor,
                 backend: str) -> None:
    _backend.plan(backend, out.device).dequantize_(_qw(qdata, absmax, code, absmax2, code2, qoffset, qmeta), out)


@_dequantize_.register_fake
def _(qdata, absmax, code, absmax2, code2, qoffset, qmeta, out, backend):
    return None


def dequantize_(qw: reference.QuantWeight, out: Tensor, backend: Optional[str] = None) -> Tensor:
    """Write the (out, in) weight that ``qw`` encodes into the contiguous ``out`` (fp32, fp16 or
    bf16), decoded in fp32 and rounded once (``reference.dequantize``). Returns ``out``."""
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(qw.shape) or not out.is_contiguous() \
            or out.dtype not in _backend.KERNEL_DTYPES or out.device != qw.data.device:
        raise ValueError(f"out must be a contiguous fp32, fp16 or bf16 tensor of the weight's shape {tuple(qw.shape)} "
                         f"on {qw.data.device}, got "
                         + (f"{tuple(out.shape)} {out.dtype} on {out.device}"
                            + ("" if out.is_contiguous() else ", not contiguous") if isinstance(out, Tensor)
                            else type(out).__name__))
    name = _backend.select("dequantize_", out.device, out.dtype, backend)
    _dequantize_(*quant_args(qw), out, name)
    return out


def _dense(qw, dtype, device, correction, backend: str) -> Tensor:
    """qw dequantised into the shared scratch buffer, plus the FedEx correction U V if any."""
    from . import quant
    w = quant.scratch(qw.shape, device, dtype)
    plan = _backend.plan(backend, device)
    plan.dequantize_(qw, w)
    if correction[0] is not None:
        plan.fedex_merge_(w, correction[0], correction[1], None)
    return w


def _q_weight(qw, x, correction, fused: bool, backend: str, need: bool = True):
    """What the LoRA plans take as the weight: the fused GEMM's QuantOperand, the scratch
    buffer, or (``need`` False: the backward without dx reads only its shape) a stand-in."""
    if not need:
        return x.new_empty(()).expand(qw.shape)
    if fused:
        from .kernels.lora_linear import QuantOperand
        return QuantOperand(qw, False)
    return _dense(qw, x.dtype, x.device, correction, backend)


@torch.library.custom_op("lorafast::lora_linear_q_fwd", mutates_args=())
def _lora_linear_q_fwd(x: Tensor, qdata: Tensor, absmax: Tensor, code: Optional[Tensor], absmax2: Optional[Tensor],
                       code2: Optional[Tensor], qoffset: Optional[Tensor], qmeta: list[int], lora_A: Tensor,
                       lora_B: Tensor, bias: Optional[Tensor], lora_R: Optional[Tensor], corr_U: Optional[Tensor],
                       corr_V: Optional[Tensor], scaling: float, dropout_p: float, seed: int, offset: int,
                       fused: bool, backend: str) -> tuple[Tensor, Tensor]:
    qw = _qw(qdata, absmax, code, absmax2, code2, qoffset, qmeta)
    w = _q_weight(qw, x, (corr_U, corr_V), fused, backend)
    y, h = _backend.plan(backend, x.device).lora_linear_forward(_rows(x), w, lora_A, lora_B, bias, lora_R, scaling,
                                                                 dropout_p, seed, offset)
    return y.reshape(*x.shape[:-1], qw.shape[0]), h


@_lora_linear_q_fwd.register_fake
def _(x, qdata, absmax, code, absmax2, code2, qoffset, qmeta, lora_A, lora_B, bias, lora_R, corr_U, corr_V,
      scaling, dropout_p, seed, offset, fused, backend):
    return (x.new_empty((*x.shape[:-1], qmeta[3])),
            x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("lorafast::lora_linear_q_bwd", mutates_args=())
def _lora_linear_q_bwd(grad_y: Tensor, x: Tensor, qdata: Tensor, absmax: Tensor, code: Optional[Tensor],
                       absmax2: Optional[Tensor], code2: Optional[Tensor], qoffset: Optional[Tensor],
                       qmeta: list[int], lora_A: Tensor, lora_B: Tensor, lora_R: Optional[Tensor],
                       bias: Optional[Tensor], h: Tensor, corr_U: Optional[Tensor], corr_V: Optional[Tensor],
                       scaling: float, dropout_p: float, seed: int, offset: int, needs: list[bool], fused: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    qw = _qw(qdata, absmax, code, absmax2, code2, qoffset, qmeta)
    w = _q_weight(qw, x, (corr_U, corr_V), fused, backend, need=bool(needs[0]))   # dx alone reads W
    grads = _backend.plan(backend, x.device).lora_linear_backward(
        _rows(grad_y), _rows(x), w, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset,
        tuple(bool(n) for n in needs))
    return _lora_grads(grads, x, lora_A, lora_B, lora_R, bias)


@_lora_linear_q_bwd.register_fake
def _(grad_y, x, qdata, absmax, code, absmax2, code2, qoffset, qmeta, lora_A, lora_B, lora_R, bias, h, corr_U,
      corr_V, scaling, dropout_p, seed, offset, needs, fused, backend):
    return _lora_grads_fake(needs, x, lora_A, lora_B, lora_R, bias)


_Q_INPUTS = 20   # x, the quantised weight (7), lora_A, lora_B, bias, lora_R, corr_U, corr_V, then the scalars


def _q_setup_context(ctx, inputs, output):
    x, *q, lora_A, lora_B, bias, lora_R, corr_U, corr_V = inputs[:14]
    ctx.save_for_backward(x, *q[:6], lora_A, lora_B, lora_R, bias, output[1], corr_U, corr_V)
    ctx.qmeta = q[6]
    ctx.args = inputs[14:]


def _q_backward(ctx, grad_y, _grad_h):
    x, *q, lora_A, lora_B, lora_R, bias, h, corr_U, corr_V = ctx.saved_tensors
    scaling, dropout_p, seed, offset, fused, backend = ctx.args
    n = ctx.needs_input_grad
    needs = [n[0], n[8], n[9], lora_R is not None and n[11], bias is not None and n[10]]
    if not any(needs):
        return (None,) * _Q_INPUTS
    dx, dA, dB, dR, db = (g if k else None for g, k in zip(
        _lora_linear_q_bwd(grad_y, x, *q, ctx.qmeta, lora_A, lora_B, lora_R, bias, h, corr_U, corr_V, scaling,
                           dropout_p, seed, offset, needs, fused, backend), needs))
    return (dx,) + (None,) * 7 + (dA, dB, db, dR) + (None,) * (_Q_INPUTS - 12)


_lora_linear_q_fwd.register_autograd(_q_backward, setup_context=_q_setup_context)


def lora_linear_q(x: Tensor, qweight: reference.QuantWeight, lora_A: Tensor, lora_B: Tensor,
                  bias: Optional[Tensor] = None, *, scaling: float = 1.0, lora_R: Optional[Tensor] = None,
                  dropout_p: float = 0.0, correction: Optional[tuple[Tensor, Tensor]] = None, fused: bool = False,
                  backend: Optional[str] = None, seed: Optional[int] = None) -> Tensor:
    """The LoRA linear over a quantised frozen base (QLoRA):

        y = x Ŵᵀ + b + s · drop(x) Aᵀ (Rᵀ) Bᵀ,   Ŵ = dequantize(qweight) (+ U V)

    with Ŵ decoded in fp32 and rounded to x's dtype (the compute dtype), as
    ``lora_linear(x, reference.dequantize(qweight, x.dtype) + U V, ...)`` computes it.

    The default dequantises Ŵ into a scratch buffer that every layer shares
    (lorafast.quant.scratch) and runs ``lora_linear``'s default plan on it; the backward
    dequantises again for dx. ``fused=True`` decodes Ŵ's tiles inside lorafast's Triton GEMM
    instead (no scratch; the "triton" backend only, and no ``correction``). ``correction`` is
    the FedEx low-rank correction (U (out, q), V (q, in), fp32) that federated rounds on a
    quantised base accumulate (lorafast.federated). W never receives a gradient.
    """
    if not isinstance(qweight, reference.QuantWeight) or qweight.kind not in (4, 8):
        raise ValueError("qweight must be a lorafast.reference.QuantWeight of kind 4 or 8 (lorafast.quant."
                         f"quant_weight builds one from a bitsandbytes layer), got {type(qweight).__name__}")
    out_f, in_f = qweight.shape
    if isinstance(x, Tensor) and qweight.data.device != x.device:
        raise ValueError(f"qweight is on {qweight.data.device} but x is on {x.device}")
    stand_in = x.new_empty(()).expand(out_f, in_f) if isinstance(x, Tensor) else None
    _checks.check_lora_linear(x, stand_in, lora_A, lora_B, bias, lora_R, scaling, dropout_p)
    U, V = correction if correction is not None else (None, None)
    if U is not None:
        for what, t, shape in (("correction U", U, (out_f, None)), ("correction V", V, (None, in_f))):
            if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype != torch.float32 or t.device != x.device \
                    or any(want is not None and got != want for got, want in zip(t.shape, shape)):
                raise ValueError(f"{what} must be an fp32 matrix of shape {shape} on {x.device} (None: any size)")
        if U.shape[1] != V.shape[0]:
            raise ValueError(f"correction U {tuple(U.shape)} and V {tuple(V.shape)} must share their rank")
        U, V = U.contiguous(), V.contiguous()
    if not isinstance(fused, bool):
        raise ValueError(f"fused must be a bool, got {fused!r}")
    if fused and U is not None:
        raise ValueError("fused=True decodes the weight inside the GEMM and cannot add a FedEx correction: "
                         "leave fused off for a layer with one")
    seed = _dropout_seed(seed, dropout_p)
    y, _ = lora_linear_q_fwd(x, qweight, lora_A, lora_B, bias, lora_R, (U, V), float(scaling), float(dropout_p),
                             seed, 0, fused, backend)
    return y


def lora_linear_q_fwd(x: Tensor, qweight: reference.QuantWeight, lora_A: Tensor, lora_B: Tensor,
                      bias: Optional[Tensor], lora_R: Optional[Tensor], correction, scaling: float, dropout_p: float,
                      seed: int, offset: int, fused: bool, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(y, h) of ``lora_linear_q``, differentiable, unchecked. ``fused`` needs "triton", asked for or
    chosen: it is never picked automatically over the scratch path."""
    shape = (x.numel() // max(x.shape[-1], 1), qweight.shape[1], qweight.shape[0], lora_A.shape[0])
    asked = _backend.requested(backend)
    if fused and asked not in (None, "triton"):
        raise ValueError(f"fused=True runs in lorafast's Triton GEMM, not on backend {asked!r}")
    name = _backend.select("lora_linear_q_fwd", x.device, x.dtype, "triton" if fused else backend, shape=shape)
    U, V = correction
    return _lora_linear_q_fwd(x, *quant_args(qweight), lora_A, lora_B, bias, lora_R, U, V, float(scaling),
                              float(dropout_p), int(seed), int(offset), bool(fused), name)


# ------------------------------------------------------------------ DP-SGD


@torch.library.custom_op("lorafast::grad_sample_norms", mutates_args=())
def _grad_sample_norms(grad_sample: Tensor, segments: list[int], backend: str) -> Tensor:
    return _backend.plan(backend, grad_sample.device).grad_sample_norms(grad_sample, segments)


@_grad_sample_norms.register_fake
def _(grad_sample, segments, backend):
    return grad_sample.new_empty((grad_sample.shape[0], len(segments) - 1), dtype=torch.float32)


def grad_sample_norms(grad_sample: Tensor, segments: list[int], backend: Optional[str] = None) -> Tensor:
    """(N, P) fp32 squared norms of each sample's gradient of each parameter: grad_sample (N, D)
    holds parameter p in columns [segments[p], segments[p+1])."""
    name = _backend.select("grad_sample_norms", grad_sample.device, torch.float32, backend)
    return _grad_sample_norms(grad_sample, [int(s) for s in segments], name)


@torch.library.custom_op("lorafast::clip_reduce_noise", mutates_args=())
def _clip_reduce_noise(grad_sample: Tensor, sq_norms: Tensor, segments: list[int], max_norms: list[float],
                       per_layer: bool, acc: Optional[Tensor], noise: Optional[Tensor], noise_std: float,
                       seed: int, offset: int, out_scale: float, backend: str) -> Tensor:
    return _backend.plan(backend, grad_sample.device).clip_reduce_noise(
        grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std, seed, offset, out_scale)


@_clip_reduce_noise.register_fake
def _(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std, seed, offset, out_scale,
      backend):
    return grad_sample.new_empty((grad_sample.shape[1],), dtype=torch.float32)


def clip_reduce_noise(grad_sample: Tensor, sq_norms: Tensor, segments: list[int], max_norms: list[float],
                      per_layer: bool = False, acc: Optional[Tensor] = None, noise: Optional[Tensor] = None,
                      noise_std: float = 0.0, seed: Optional[int] = None, offset: int = 0, out_scale: float = 1.0,
                      backend: Optional[str] = None) -> Tensor:
    """(D,) fp32 ``(acc + Σᵢ cᵢ gᵢ + std·ξ) · out_scale``: each sample's gradient gᵢ clipped
    by cᵢ = min(1, C/‖gᵢ‖) (flat, ``max_norms[0]``) or per parameter (``per_layer``), summed,
    plus N(0, noise_std²) noise (the given ``noise`` (D,), else Philox (seed, offset)); see
    ``reference.clip_reduce_noise``. ``seed`` None draws a fresh key from the OS."""
    name = _backend.select("clip_reduce_noise", grad_sample.device, torch.float32, backend)
    return _clip_reduce_noise(grad_sample, sq_norms, [int(s) for s in segments], [float(c) for c in max_norms],
                              bool(per_layer), acc, noise, float(noise_std), _noise_seed(seed), int(offset),
                              float(out_scale), name)


# ------------------------------------------------------------------ federated aggregation


@torch.library.custom_op("lorafast::fedex_merge_", mutates_args=("weight", "compensation"))
def _fedex_merge_(weight: Tensor, U: Tensor, V: Tensor, compensation: Optional[Tensor], backend: str) -> None:
    _backend.plan(backend, weight.device).fedex_merge_(weight, U, V, compensation)


@_fedex_merge_.register_fake
def _(weight, U, V, compensation, backend):
    return None


def fedex_merge_(weight: Tensor, U: Tensor, V: Tensor, compensation: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> None:
    """W (out, in) += U (out, K) · V (K, in) in place, accumulated in fp32 (fp64 for an fp64 W);
    with ``compensation`` C (fp32, W's shape) the rounding W's dtype drops is carried in C
    (reference.fedex_merge_). W may be a strided view (a Conv1D weight's transpose)."""
    name = _backend.select("fedex_merge_", weight.device, weight.dtype, backend)
    _fedex_merge_(weight, U, V, compensation, name)


# ------------------------------------------------------------------ split learning


@torch.library.custom_op("lorafast::privatize", mutates_args=())
def _privatize(h: Tensor, clip_norm: float, noise_std: float, mode: str, seed: int, offset: int,
               backend: str) -> tuple[Tensor, Tensor]:
    return _backend.plan(backend, h.device).privatize(h, clip_norm, noise_std, mode, seed, offset)


@_privatize.register_fake
def _(h, clip_norm, noise_std, mode, seed, offset, backend):
    rows, _ = _layout.privatize_rows(h.shape, mode)
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty((rows,), dtype=torch.float32)


def _privatize_setup(ctx, inputs, output):
    h, clip_norm, _, mode, *_ = inputs
    ctx.save_for_backward(h, output[1])
    ctx.clip_norm, ctx.mode = clip_norm, mode


def _privatize_backward(ctx, grad_y, _grad_sq):
    h, sq = ctx.saved_tensors
    return reference.privatize_backward(grad_y, h, sq, ctx.clip_norm, mode=ctx.mode), None, None, None, None, None, None


_privatize.register_autograd(_privatize_backward, setup_context=_privatize_setup)


def privatize(h: Tensor, clip_norm: float, noise_std: float, mode: str = "sample", seed: Optional[int] = None,
              offset: int = 0, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(y, sq): y = clip(h) + noise_std·ξ in h's dtype, differentiable in h, and sq the clipped
    rows' squared norms (fp32). ``mode`` "sample" clips each sample's whole activation, "token"
    each vector along the last dim, "element" each element to [−C, C]; ξ are the Philox normals
    of (seed, offset) over those rows (``seed`` None draws a fresh key from the OS)."""
    name = _backend.select("privatize", h.device, h.dtype, backend, shape=(h.numel(),))
    return _privatize(h, float(clip_norm), float(noise_std), mode, _noise_seed(seed), int(offset), name)


# the registered ops by name (their OpOverloads), for torch.library.opcheck and the table above
REGISTERED = {name: getattr(torch.ops.lorafast, name).default for name in _backend.OPS}
