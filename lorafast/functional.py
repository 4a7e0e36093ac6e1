"""User-facing functions. Each validates its input, resolves a backend and calls its op."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _ops, _random  # noqa: F401  (_ops registers the lorafast:: ops)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating-point tensor (fp32, fp16, bf16 or fp64), got {t.dtype}")


def _validate(x, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., in_features)")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be fp32, fp16, bf16 or fp64, got {x.dtype}")
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    if weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): lora_linear trains only the adapters")
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight is (out={out_f}, in={in_f})")
    if r < 1:
        raise ValueError(f"lora_A must have rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must be (r, in)=({r}, {in_f}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B must be (out, r)=({out_f}, {r}), got {tuple(lora_B.shape)}")
    if lora_R is not None:
        _check_tensor("lora_R", lora_R, 2)
        if tuple(lora_R.shape) != (r, r):
            raise ValueError(f"lora_R must be (r, r)=({r}, {r}), got {tuple(lora_R.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must be (out,)=({out_f},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("lora_R", lora_R), ("bias", bias)):
        if t is not None and t.dtype not in (x.dtype, torch.float32, torch.float64):
            raise ValueError(f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


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
    _validate(x, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p)
    if dropout_p > 0.0:
        seed = _random.next_seed() if seed is None else int(seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    else:
        seed = 0
    name = _backend.select("lora_linear", x.device, x.dtype, backend, shape=lora_shape(x, weight, lora_A))
    y, _ = torch.ops.lorafast.lora_linear_fwd(x, weight, lora_A, lora_B, bias, lora_R, float(scaling),
                                              float(dropout_p), seed, 0, name)
    return y
