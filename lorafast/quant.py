"""bitsandbytes-quantised base weights (QLoRA): what lorafast reads of a ``Linear4bit`` or
``Linear8bitLt``, and the scratch buffer that the default path dequantises into.

bitsandbytes stays the owner of the weight: its packed tensor and ``QuantState`` are read
where they are, never copied, so moving or saving the model works as bitsandbytes does.

The default path dequantises a layer's weight into one scratch buffer per (device, dtype),
reused by every layer (as Unsloth does), then runs the ordinary LoRA linear on it: only one
layer's half-precision weight exists at a time, and the base GEMMs stay on cuBLAS. The
backward dequantises again for dx. The fused path (``fused=True``) decodes the weight tiles
inside lorafast's Triton GEMM instead and needs no scratch at all.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .reference import QuantWeight

MIN_BITSANDBYTES = (0, 45)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Unsupported(ValueError):
    """A bitsandbytes layer lorafast cannot compute on; the message names the reason."""


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def is_quantised(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (told apart without importing it)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in ("Linear4bit",
                                                                                            "Linear8bitLt")


def _version(text: str) -> tuple[int, int]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_quantised(module: nn.Module, where: str = "layer") -> None:
    """Raise ``Unsupported`` (a ValueError) naming why ``module`` cannot be computed on."""
    bnb = _bnb()
    if bnb is None:
        raise Unsupported(f"{where} is a bitsandbytes layer but bitsandbytes cannot be imported")
    if _version(bnb.__version__) < MIN_BITSANDBYTES:
        raise Unsupported(f"{where}: bitsandbytes {bnb.__version__} is too old; lorafast reads the quant state of "
                          f"bitsandbytes >= {'.'.join(map(str, MIN_BITSANDBYTES))}")
    w = module.weight
    if type(module).__name__ == "Linear4bit":
        state = getattr(w, "quant_state", None)
        if state is None:
            raise Unsupported(f"{where}: its Linear4bit weight is not quantised yet (bitsandbytes quantises it when "
                              "the layer is moved to its device: call .to(device) first)")
        if state.quant_type not in QUANT_TYPES:
            raise Unsupported(f"{where}: quant_type {state.quant_type!r} is not one of {QUANT_TYPES}")
        if state.nested and (state.state2 is None or state.offset is None):
            raise Unsupported(f"{where}: double quantisation without its second-level state")
        if tuple(state.shape) != (module.out_features, module.in_features):
            raise Unsupported(f"{where}: quant state shape {tuple(state.shape)} is not (out, in) = "
                              f"({module.out_features}, {module.in_features})")
        cdt = getattr(module, "compute_dtype", None)
        if cdt is not None and cdt not in COMPUTE_DTYPES:
            raise Unsupported(f"{where}: compute_dtype {cdt} is not one of float32, float16, bfloat16")
        return
    if getattr(module.state, "has_fp16_weights", False) or w.dtype != torch.int8:
        raise Unsupported(f"{where}: Linear8bitLt with has_fp16_weights=True keeps a half-precision weight that "
                          "it re-quantises every step; build it with has_fp16_weights=False")
    if _row_scales(module) is None:
        raise Unsupported(f"{where}: its Linear8bitLt weight is not quantised yet (call .to(device) first)")


def unsupported_reason(module: nn.Module, where: str, clients: Optional[int] = None) -> Optional[str]:
    """Why lorafast cannot adapt the bitsandbytes layer ``module`` (``check_quantised``'s reason,
    or ``clients=`` over it), or None; None too for a layer that is not quantised."""
    if not is_quantised(module):
        return None
    try:
        check_quantised(module, where)
    except Unsupported as e:
        return str(e)
    if clients is not None:
        return f"clients= over a quantised base ({type(module).__name__}): MultiLoRALinear needs a dense base"
    return None


def _row_scales(module: nn.Module) -> Optional[Tensor]:
    """An int8 weight's row scales SCB: on the weight until bitsandbytes' first forward moves
    them to the layer's MatmulLtState (``state``; a QLoRALinear keeps it as ``int8_state``)."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        state = getattr(module, "int8_state", None) or getattr(module, "state", None)
        scb = getattr(state, "SCB", None)
    return scb


def quant_weight(module: nn.Module) -> QuantWeight:
    """The QuantWeight of a bitsandbytes layer (or of a QLoRALinear, which holds its weight),
    read from its current tensors, so a model that was moved since is read where it is now."""
    w = module.weight
    shape = (module.out_features, module.in_features)
    s = getattr(w, "quant_state", None)
    if getattr(s, "packing_format_for_cpu", False):
        s = _unpack_for_cpu(w)
    if s is None:   # Int8Params: CB (the data) and its row scales SCB
        return QuantWeight(w.data, _row_scales(module), None, None, None, None, 8, module.in_features, 1, shape)
    if s.nested:
        return QuantWeight(w.data, s.absmax, s.code, s.state2.absmax, s.state2.code, s.offset.reshape(1), 4,
                           s.blocksize, s.state2.blocksize, shape)
    return QuantWeight(w.data, s.absmax, s.code, None, None, None, 4, s.blocksize, 1, shape)


def _unpack_for_cpu(w):
    """Undo, in place, the layout that bitsandbytes' CPU inference kernel rewrites a Linear4bit's
    weight into (an eval-mode forward on an AVX512-BF16 CPU does it), with bitsandbytes' own
    inverse, as it does itself before moving or saving the weight. The scales come back
    re-quantised from the bf16 copy that layout keeps, so they are the ones bitsandbytes then
    computes with, not bit for bit the original ones."""
    import bitsandbytes.functional as bF
    w.data, state = bF._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    if state.absmax.dim() == 2:   # without double quantisation the inverse leaves the scales (in/block, out), bf16
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32)
    w.quant_state = state
    return state


def describe(module: nn.Module) -> str:
    """``nf4, double quantisation, blocks of 64, compute bfloat16`` and the like."""
    if type(module).__name__ == "Linear8bitLt":
        return f"int8 row-wise (LLM.int8, threshold {module.state.threshold:g})"
    s = module.weight.quant_state
    cdt = getattr(module, "compute_dtype", None)
    return (f"{s.quant_type}{', double quantisation' if s.nested else ''}, blocks of {s.blocksize}, compute "
            f"{str(cdt).removeprefix('torch.') if cdt is not None else 'the input dtype'}")


def quantised_bytes(module: nn.Module) -> int:
    """Bytes the quantised weight and its state occupy."""
    qw = quant_weight(module)
    return sum(t.numel() * t.element_size() for t in (qw.data, qw.absmax, qw.code, qw.absmax2, qw.code2, qw.offset)
               if t is not None)


# ------------------------------------------------------------------ the shared scratch buffer

_scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def scratch(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """An (out, in) view of the scratch buffer for (device, dtype), grown to the largest layer
    seen. Its contents last until the next call for the same device and dtype: dequantise,
    use, and let the next layer overwrite it."""
    n = shape[0] * shape[1]
    key = (torch.device(device), dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        _scratch.pop(key, None)
        buf = _scratch[key] = torch.empty(n, device=device, dtype=dtype)
    return buf[:n].view(shape)


def scratch_bytes(device: Optional[torch.device] = None) -> int:
    """Bytes the scratch buffers hold (on ``device``, or everywhere)."""
    return sum(b.numel() * b.element_size() for (d, _), b in _scratch.items()
               if device is None or d == torch.device(device))


def release_scratch() -> None:
    """Free the scratch buffers (the next QLoRA forward allocates again)."""
    _scratch.clear()
