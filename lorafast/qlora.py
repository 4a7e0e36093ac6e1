"""QLoRA: a LoRA adapter over a bitsandbytes-quantised frozen base (``Linear4bit``, NF4 or FP4,
with or without double quantisation, or ``Linear8bitLt``).

``QLoRALinear`` is a ``LoRALinear`` whose base weight stays bitsandbytes' packed parameter
(shared with the layer it wraps, never copied). Its forward is ``lorafast.lora_linear_q``:

* by default (``fused=None``, with no measured table saying otherwise, and ``fused=False``):
  the weight is dequantised into a scratch buffer that every layer shares (lorafast.quant),
  and the ordinary LoRA linear runs on it with its default plan (base GEMMs on cuBLAS); the
  backward dequantises again for dx;
* ``fused=True``: lorafast's Triton GEMM decodes the weight tiles in its main loop, with no
  scratch. ``fused=None`` takes it only where a measured table for the GPU (bench/bench_qlora.py
  records one) says it is faster at the nearest shape.

x is cast to the layer's compute dtype (bitsandbytes' ``compute_dtype``; x's own when it
has none) and the output back to x's dtype, as bitsandbytes does. Under lorafast.dp the
per-sample backward takes the scratch path whatever ``fused`` says.

Federated rounds cannot add FedEx's residual exactly into a 4-bit W. The layer keeps it
beside the base as a low-rank correction W_eff = deq(W) + U V (fp32 factors), folded into
the scratch weight on every use: exact while its rank stays within ``correction_rank``,
truncated by SVD beyond that with the discarded energy reported (``add_correction``).
``merge()`` dequantises, merges and requantises, and reports the requantisation error.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backend, _ops, _selection, quant
from .layers import LoRALinear

DEFAULT_CORRECTION_RANK = 128


@dataclasses.dataclass
class CorrectionReport:
    """What ``add_correction`` kept: the correction's rank after this round, the squared
    Frobenius norm of what truncation discarded, and that as a fraction of the accumulated
    correction's (0.0: exact)."""
    rank: int
    discarded: float
    relative: float


@dataclasses.dataclass
class MergeError:
    """The requantisation error of ``merge()``: max |Ŵ − W*| and ‖Ŵ − W*‖_F relative to ‖W*‖_F
    and to the update ‖W* − W‖_F, where W* = deq(W) + U V + s·B(R)A is the exact merged
    weight and Ŵ its requantised decoding."""
    max_abs: float
    relative_to_weight: float
    relative_to_update: float


class QLoRALinear(LoRALinear):
    """A LoRALinear over a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base; build it with
    ``QLoRALinear.from_linear`` (or ``LoRALinear.from_linear``, ``inject_adapters``,
    ``from_peft``, which pick it for a quantised base). See the module docstring."""

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    variant: str = "lora", use_rslora: bool = False, seed: Optional[int] = None,
                    fused: Optional[bool] = None, correction_rank: int = DEFAULT_CORRECTION_RANK) -> "QLoRALinear":
        """Wrap a bitsandbytes layer: its packed weight (with its quant state) and its bias are
        shared, not copied. Unsupported layers raise ValueError naming the reason."""
        if not quant.is_quantised(linear):
            raise ValueError(f"linear must be a bitsandbytes Linear4bit or Linear8bitLt, got {type(linear).__name__}")
        quant.check_quantised(linear, "linear")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be True, False or None (from a measured table), got {fused!r}")
        if isinstance(correction_rank, bool) or not isinstance(correction_rank, int) or correction_rank < 1:
            raise ValueError(f"correction_rank must be a positive integer, got {correction_rank!r}")
        weight, bias = linear.weight, linear.bias
        cdt = getattr(linear, "compute_dtype", None)
        layer = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, bias=bias is not None,
                    variant=variant, use_rslora=use_rslora, device="meta", dtype=torch.float32, seed=seed)
        layer.kind = 8 if type(linear).__name__ == "Linear8bitLt" else 4
        layer.compute_dtype = cdt
        layer.quantisation = quant.describe(linear)
        layer.fused, layer.correction_rank = fused, correction_rank
        layer.weight = weight.requires_grad_(False)
        if layer.kind == 8:   # bitsandbytes moves SCB from the weight to this state on its first forward
            layer.int8_state, layer.threshold = linear.state, float(linear.state.threshold)
        if bias is not None:
            layer.bias = bias.requires_grad_(False)
        layer.register_buffer("correction_U", None)
        layer.register_buffer("correction_V", None)
        layer._merged_from = None
        device = bias.device if bias is not None else weight.device
        for name in ("lora_A", "lora_B", "lora_R"):
            p = getattr(layer, name)
            if p is not None:
                setattr(layer, name, nn.Parameter(torch.empty(p.shape, device=device, dtype=torch.float32),
                                                  requires_grad=p.requires_grad))
        layer.reset_adapters()
        return layer

    def reset_parameters(self) -> None:   # the base is bitsandbytes': only the adapters are (re)drawn
        self.reset_adapters()

    # ------------------------------------------------------------- the base weight

    def quant_weight(self):
        """The base's reference.QuantWeight, read from the current tensors."""
        return quant.quant_weight(self)

    def correction(self) -> Optional[tuple[Tensor, Tensor]]:
        return None if self.correction_U is None else (self.correction_U, self.correction_V)

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        return self.compute_dtype if self.compute_dtype is not None else x.dtype

    def compute_input(self, x: Tensor) -> Tensor:
        return x.to(self._compute_dtype(x))

    def compute_weight(self, dtype: torch.dtype) -> Tensor:
        """The effective base weight deq(W) (+ U V) in ``dtype``, in the shared scratch buffer:
        valid until the next layer's use of it."""
        return _ops._dense(self.quant_weight(), dtype, self.weight.device, self.correction() or (None, None),
                           _backend.select("dequantize_", self.weight.device, dtype))

    def compute_bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        b = self.bias
        return b if b is None or b.dtype in (dtype, torch.float32) else b.to(dtype)

    @property
    def base_weight(self) -> Tensor:
        """A dequantised fp32 copy of the effective base weight deq(W) + U V, (out, in):
        for reading; writing to it changes nothing (``add_correction`` and ``merge`` do)."""
        w = _ops.dequantize_(self.quant_weight(), torch.empty(self.out_features, self.in_features,
                                                              device=self.weight.device))
        if self.correction_U is not None:
            w.addmm_(self.correction_U, self.correction_V)
        return w

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by the quantised base (with its state), the correction and the adapters."""
        adapters = sum(p.numel() * p.element_size() for p in (self.lora_A, self.lora_B, self.lora_R) if p is not None)
        corr = sum(t.numel() * t.element_size() for t in (self.correction_U, self.correction_V) if t is not None)
        return {"base": quant.quantised_bytes(self), "correction": corr, "adapters": adapters}

    # ------------------------------------------------------------- forward

    def _use_fused(self, x: Tensor) -> bool:
        if self.correction_U is not None:
            if self.fused:
                warnings.warn(f"{self._name()}: fused=True cannot apply the FedEx correction inside the GEMM; "
                              "this layer runs the scratch path while it has one", RuntimeWarning, stacklevel=3)
            return False
        if self.fused is None:
            return x.is_cuda and _measured_fused(x, self)
        return bool(self.fused)

    def forward(self, x: Tensor) -> Tensor:
        xc = self.compute_input(x)
        bias = self.compute_bias(xc.dtype)
        if self.merged:
            w = _ops.dequantize_(self.quant_weight(), torch.empty(self.out_features, self.in_features,
                                                                  device=xc.device, dtype=xc.dtype))
            return F.linear(xc, w, bias.to(xc.dtype) if bias is not None else None).to(x.dtype)
        y = _ops.lora_linear_q(xc, self.quant_weight(), self.lora_A, self.lora_B, bias, scaling=self.scaling,
                               lora_R=self.lora_R, dropout_p=self.lora_dropout if self.training else 0.0,
                               correction=self.correction(), fused=self._use_fused(xc))
        return y.to(x.dtype)

    # ------------------------------------------------------------- federated correction

    @torch.no_grad()
    def add_correction(self, U: Tensor, V: Tensor) -> CorrectionReport:
        """W_eff += U V (U (out, q), V (q, in)): FedEx's residual, kept beside the quantised
        base as stacked low-rank factors. Beyond ``correction_rank`` the stack is compressed to
        that rank by a truncated SVD (QR of both factors, SVD of the small core), which keeps
        the best rank-``correction_rank`` approximation; what it discards is reported."""
        if not isinstance(U, Tensor) or not isinstance(V, Tensor) or U.dim() != 2 or V.dim() != 2 \
                or U.shape[0] != self.out_features or V.shape[1] != self.in_features or U.shape[1] != V.shape[0]:
            raise ValueError(f"U and V must be ({self.out_features}, q) and (q, {self.in_features}) matrices, got "
                             f"{tuple(getattr(U, 'shape', ()))} and {tuple(getattr(V, 'shape', ()))}")
        if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
            raise ValueError("U and V must be finite")
        dev = self.weight.device
        U, V = U.to(dev, torch.float32), V.to(dev, torch.float32)
        if self.correction_U is not None:
            U, V = torch.cat([self.correction_U, U], 1), torch.cat([self.correction_V, V], 0)
        discarded, total = 0.0, 0.0
        cap = min(self.correction_rank, self.out_features, self.in_features)
        if U.shape[1] > cap:
            U, V, discarded, total = _truncate(U, V, cap)
        self.correction_U, self.correction_V = U.contiguous(), V.contiguous()
        return CorrectionReport(U.shape[1], discarded, discarded / total if total > 0 else 0.0)

    # ------------------------------------------------------------- Flora resampling

    def _check_resample(self, seed, compensation) -> int:
        if compensation is not None:
            raise ValueError("compensation does not apply to a QLoRALinear: its base stays quantised and "
                             "resample_ keeps s·B A beside it, in the low-rank correction")
        return super()._check_resample(seed, None)

    def _absorb(self, compensation: None) -> CorrectionReport:
        """``resample_`` over the quantised base: s·B(R)A cannot be rounded into the 4/8-bit
        codes, so it joins the low-rank correction (``add_correction``), whose rank grows by r
        per resample: exact up to ``correction_rank``, then its best approximation of that rank
        (SVD), and the report that ``resample_`` returns says what truncation discarded. While
        the layer has a correction its forward takes the scratch path."""
        U, V = self.delta_factors()
        return self.add_correction(U, V.clone())    # V is lora_A's storage, which the restart overwrites

    # ------------------------------------------------------------- merge

    @torch.no_grad()
    def merge(self) -> MergeError:
        """W ← requantise(deq(W) + U V + s·B(R)A), with the layer's quant type, block size and
        double quantisation; the correction is folded in. Returns (and keeps as
        ``merge_error``) the requantisation error. The quantised weight before the merge is
        kept, so ``unmerge()`` restores it bit for bit."""
        if self.merged:
            raise ValueError("this QLoRALinear is already merged")
        base = self.base_weight.to(torch.float64)
        U, V = self.delta_factors()
        target = base + U.to(torch.float64) @ V.to(torch.float64)
        previous = self._requantise(target.to(torch.float32))
        decoded = self.base_weight.to(torch.float64)
        diff = torch.linalg.matrix_norm(decoded - target)
        update = torch.linalg.matrix_norm(target - base)
        self.merge_error = MergeError(float((decoded - target).abs().max()),
                                      float(diff / torch.linalg.matrix_norm(target).clamp_min(1e-300)),
                                      float(diff / update) if update > 0 else float("inf") if diff > 0 else 0.0)
        self._merged_from = previous
        self.merged = True
        return self.merge_error

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the quantised weight and the correction from before ``merge()``, exactly."""
        if not self.merged:
            raise ValueError("this QLoRALinear is not merged")
        data, state, U, V = self._merged_from
        self._set_quantised(data, state)
        self.correction_U, self.correction_V = U, V
        self._merged_from = None
        self.merged = False

    def _requantise(self, w: Tensor):
        """Quantise w (fp32, (out, in)) in place of the current weight; returns what it replaced."""
        import bitsandbytes.functional as bF
        previous = (self.weight.data, self._state(), self.correction_U, self.correction_V)
        if self.kind == 8:
            CB, SCB, _ = bF.int8_vectorwise_quant(w.to(torch.float16))
            self._set_quantised(CB, SCB)
        else:
            s = self.weight.quant_state
            packed, state = bF.quantize_4bit(w.to(s.dtype), blocksize=s.blocksize, compress_statistics=s.nested,
                                             quant_type=s.quant_type, quant_storage=self.weight.data.dtype)
            self._set_quantised(packed, state)
        self.correction_U = self.correction_V = None
        return previous

    def _state(self):
        return quant.quant_weight(self).absmax if self.kind == 8 else self.weight.quant_state

    def _set_quantised(self, data: Tensor, state) -> None:
        self.weight.data = data
        if self.kind == 8:
            self.weight.CB, self.weight.SCB = data, state
            self.int8_state.SCB = state
        else:
            self.weight.quant_state = state

    def _name(self) -> str:
        return f"QLoRALinear({self.in_features}, {self.out_features})"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", base={self.quantisation!r}" + \
            (f", fused={self.fused}" if self.fused is not None else "") + \
            (f", correction_rank={self.correction_U.shape[1]}" if self.correction_U is not None else "")


def _truncate(U: Tensor, V: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """The best rank-``rank`` factors of U V (Eckart–Young), from QR of U and Vᵀ and the SVD of
    the small core R_U R_Vᵀ, in float64; and (discarded, total) squared Frobenius norms."""
    Qu, Ru = torch.linalg.qr(U.to(torch.float64))
    Qv, Rv = torch.linalg.qr(V.T.to(torch.float64))
    P, S, Qh = torch.linalg.svd(Ru @ Rv.T)
    energy = S.square()
    keep_U = (Qu @ P[:, :rank]) * S[:rank]
    keep_V = Qh[:rank] @ Qv.T
    return keep_U.to(torch.float32), keep_V.to(torch.float32), float(energy[rank:].sum()), float(energy.sum())


def _measured_fused(x: Tensor, layer: QLoRALinear) -> bool:
    """Whether the recorded timings for this GPU put the fused GEMM ahead of the scratch path
    at the nearest shape (bench/bench_qlora.py records them)."""
    shape = (x.numel() // max(x.shape[-1], 1), layer.in_features, layer.out_features, layer.r)
    found = _selection.nearest(torch.cuda.get_device_name(x.device), "lora_linear_q_fwd",
                               str(x.dtype).removeprefix("torch."), shape, ["fused", "scratch"], ["scratch"])
    return found is not None and found[1].get("fused", math.inf) < found[1]["scratch"]


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """{name: QLoRALinear} of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
