"""Argument validators shared by every public function.

Each takes the argument's name first and its value second, raises a ValueError that
names the argument and what was expected, and returns the value in its canonical type.
Nothing is modified by a check, so a refused call leaves every input as it was.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def real(name: str, value) -> float:
    """Any real number (numpy and torch scalars included), as a float; not a string or bool-like text."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def _finite_real(name: str, value, bound: str = "", ok=lambda x: True) -> float:
    """A finite real number (not a bool) for which ``ok`` holds; ``bound`` names the condition."""
    x = float("nan") if isinstance(value, bool) else real(name, value)
    if not (math.isfinite(x) and ok(x)):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return x


def check_finite(name: str, value) -> float:
    """A finite real number, not a bool."""
    return _finite_real(name, value)


def check_positive(name: str, value) -> float:
    """A finite number > 0."""
    return _finite_real(name, value, " > 0", lambda x: x > 0)


def check_nonnegative(name: str, value) -> float:
    """A finite number >= 0 (a noise multiplier, a noise std)."""
    return _finite_real(name, value, " >= 0", lambda x: x >= 0)


def check_count(name: str, value, minimum: int = 0) -> int:
    """An integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_sample_rate(name: str, value) -> float:
    """A Poisson sampling rate q in (0, 1]."""
    try:
        q = real(name, value)
    except ValueError:
        q = float("nan")
    if isinstance(value, bool) or not 0 < q <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return q


def check_fraction(name: str, value) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_delta(name: str, value) -> float:
    """A probability strictly inside (0, 1), such as DP's δ."""
    x = real(name, value)
    if not 0 < x < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return x


def check_choice(name: str, value, choices: Iterable):
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_seed(name: str, value) -> Optional[int]:
    """None (draw one from the OS later) or an int in [0, 2**63), a Philox key."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be None or an int in [0, 2**63), got {value!r}")
    return int(value)


def check_tensor(name: str, t, ndim: Optional[int] = None, dtypes=FLOATS) -> Tensor:
    """A tensor of ``ndim`` dimensions (any when None) and one of ``dtypes``."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be one of {names}, got {t.dtype}")
    return t


def check_merge_weight(name: str, weight, compensation, device=None) -> None:
    """An (out, in) weight that the FedEx merge (W += U V in place) can take: 2-D, floating,
    on ``device`` (the adapters' device, when given); ``compensation`` None or an fp32 tensor of
    its shape on its device, carrying what rounding a half-precision weight drops."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out, in) tensor")
    check_tensor(name, weight)
    if device is not None and weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but the client adapters are on {device}")
    if compensation is not None:
        if not isinstance(compensation, Tensor) or compensation.dtype != torch.float32 \
                or compensation.shape != weight.shape or compensation.device != weight.device:
            raise ValueError(f"compensation must be an fp32 tensor of {name}'s shape {tuple(weight.shape)} "
                             f"on {weight.device}")


def check_lora_linear(x, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p) -> None:
    """The arguments of ``lorafast.lora_linear``: shapes (..., in), (out, in), (r, in), (out, r),
    (out,), (r, r); one device; weight frozen and in x's dtype; adapters fp32 or x's dtype."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., in_features)")
    if x.dtype not in FLOATS:
        raise ValueError(f"x must be fp32, fp16, bf16 or fp64, got {x.dtype}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _floating_matrix(name, t)
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
        _floating_matrix("lora_R", lora_R)
        if tuple(lora_R.shape) != (r, r):
            raise ValueError(f"lora_R must be (r, r)=({r}, {r}), got {tuple(lora_R.shape)}")
    if bias is not None:
        _floating_matrix("bias", bias, ndim=1)
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


def check_client_ids(client_ids, batch: int, clients: int, device) -> Tensor:
    """(batch,) integer client ids in [0, clients), on ``device`` (checking the range syncs)."""
    if not isinstance(client_ids, Tensor):
        raise ValueError(f"client_ids must be a (batch,) integer tensor, got {type(client_ids).__name__}")
    if client_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"client_ids must be int64 (or int32), got {client_ids.dtype}")
    if tuple(client_ids.shape) != (batch,):
        raise ValueError(f"client_ids must be (batch,)=({batch},), one client per sample, got "
                         f"{tuple(client_ids.shape)}")
    if client_ids.device != device:
        raise ValueError(f"client_ids is on {client_ids.device} but x is on {device}")
    out = (client_ids < 0) | (client_ids >= clients)
    if torch.compiler.is_compiling():   # no host sync inside a graph: an assert on the device instead
        torch._assert_async(~out.any(), f"client_ids must be in [0, {clients})")
    elif batch and bool(out.any()):
        raise ValueError(f"client_ids must be in [0, {clients}) (the adapters' clients), "
                         f"got {client_ids[out][0].item()}")
    return client_ids


def check_lora_linear_multi(x, weight, lora_A, lora_B, bias, lora_R, client_ids, scaling, dropout_p) -> None:
    """The arguments of ``lorafast.lora_linear_multi``: x (batch, ..., in); lora_A (k, r, in),
    lora_B (k, out, r), lora_R (k, r, r) stacks of one client's ``lora_linear`` arguments each;
    client_ids (batch,) in [0, k); scaling a number or (k,)."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape (batch, ..., in_features)")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("lora_R", lora_R)):
        if t is not None:
            _floating_matrix(name, t, ndim=3)
    k = lora_A.shape[0]
    for name, t in (("lora_B", lora_B), ("lora_R", lora_R)):
        if t is not None and t.shape[0] != k:
            raise ValueError(f"{name} must stack the same {k} clients as lora_A, got shape {tuple(t.shape)}")
    if k < 1:
        raise ValueError(f"lora_A must stack at least one client, got shape {tuple(lora_A.shape)}")
    if isinstance(scaling, Tensor):
        if tuple(scaling.shape) != (k,) or not scaling.is_floating_point():
            raise ValueError(f"scaling must be a number or a ({k},) float tensor, one per client, got "
                             f"{scaling.dtype} {tuple(scaling.shape)}")
        if not bool(torch.isfinite(scaling).all()):
            raise ValueError("scaling must be finite")
        one = 1.0
    else:
        one = scaling
    check_lora_linear(x, weight, lora_A[0], lora_B[0], bias, lora_R[0] if lora_R is not None else None, one,
                      dropout_p)
    check_client_ids(client_ids, x.shape[0], k, x.device)


def _floating_matrix(name: str, t, ndim: int = 2) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATS:
        raise ValueError(f"{name} must be a floating-point tensor (fp32, fp16, bf16 or fp64), got {t.dtype}")
