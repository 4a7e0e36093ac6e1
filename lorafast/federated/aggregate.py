"""Server-side aggregation of clients' LoRA adapters.

Averaging A and B separately (FedIT) is inexact: mean(B)·mean(A) ≠ mean(B·A).
FedEx-LoRA keeps the average of the clients' effective weights exact by folding the
difference into the frozen weight:

    W ← W + s·(Σ pᵢBᵢAᵢ − B̄Ā) = W + s·Σ pᵢ(Bᵢ−B̄)(Aᵢ−Ā)

computed as one fused pass over W with the stacked, centred factors (K = k·r).

| method   | base weight                    | global adapter             | exact |
|----------|--------------------------------|----------------------------|-------|
| fedavg   | unchanged                      | (B̄, Ā)                     | no    |
| fedex    | W += s·(Σ pᵢBᵢAᵢ − B̄Ā)          | (B̄, Ā)                     | yes   |
| ffa      | unchanged (A shared, frozen)   | (B̄, A)                     | yes   |
| flora    | unchanged                      | ([B₁…B_k], [p₁A₁; …; p_kA_k]) | yes, rank Σrᵢ |

Fed-SB (LoRA-SB clients, B and A shared and frozen) averages only R: ``aggregate_r``
is exact because B·R·A is linear in R.

Precision of the base weight: the residual is typically 1e-3–1e-5 of W, which bf16
(8 bits of mantissa) mostly rounds away. Keep an fp32 master ``weight`` (4 bytes per
element) or pass a bf16/fp16 weight with an fp32 ``compensation`` of the same shape
(2 + 4 bytes per element, but the model itself stays in half precision): it carries
what rounding dropped, so ``weight.float() + compensation`` is the true weight.

Stacks: ``client_A`` (k, r, in) and ``client_B`` (k, out, r) may be stacked tensors, as a
``MultiLoRALinear`` holds them; ``aggregate(multi_layer)`` aggregates its k clients and
writes the global adapter back into all k slots in place (fedex also merges the residual
into the shared base, in one launch for all clients).

A quantised base (QLoRA: ``QLoRALinear`` over bitsandbytes' 4-bit or 8-bit W) cannot take
the residual exactly: rounding it into 4-bit codes would lose nearly all of it. The residual
is kept beside the base as a low-rank correction, W_eff = deq(W) + U V with U (out, q) and
V (q, in) in fp32: each round appends its stacked, centred factors (q grows by k·r) and, past
``layer.correction_rank`` (default 128), a truncated SVD keeps the best rank-q approximation
and reports the discarded energy. Memory: 4·(out + in)·q bytes (4 MiB at 4096×4096, q = 128),
against 2·out·in (32 MiB) for a bf16 dense delta, which is four times the NF4 base itself.
Exact (to fp32 rounding): the effective weight while the correction's rank stays within
``correction_rank``. Not exact: beyond it (the report says by how much), and the bf16
rounding of deq(W) + U V in the compute dtype, as any bf16 weight rounds.

Layout of the base weight: ``aggregate`` works on the (out, in) matrix that
``lora_B`` (out, r) · ``lora_A`` (r, in) updates. A GPT-2 ``Conv1D`` layer stores its
weight (in, out) (``LoRALinear(fan_in_fan_out=True)``); pass the layer itself, or
its ``base_weight`` (the (out, in) view of that storage), not ``layer.weight``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _ops, reference
from .._checks import check_choice, check_finite, check_merge_weight
from ..layers import LoRALinear
from ..multi_lora import MultiLoRALinear
from ..qlora import CorrectionReport, QLoRALinear

METHODS = ("fedavg", "fedex", "ffa", "flora")


@dataclass
class AggregateResult:
    """``weight`` is the tensor passed in, or the layer's ``base_weight`` when a layer was
    (updated in place by "fedex"); ``lora_A`` (r, in) and ``lora_B`` (out, r) are the global
    adapters; ``residual`` is (U, V) with the update W += U V that "fedex" applied (U
    includes the scaling), for clients to apply too.

    For "flora" the global adapter is the clients' adapters stacked, of rank Σrᵢ, and it
    keeps the clients' scaling s: the global model is ``W + s·lora_B @ lora_A``
    (= W + s·Σ pᵢBᵢAᵢ), not the ``lora_alpha / Σrᵢ`` a layer of rank Σrᵢ would compute
    from the clients' lora_alpha. Load it into a layer whose scaling is s (or fold s
    into lora_B).

    For a ``QLoRALinear`` (a quantised base) ``weight`` is None: "fedex" adds the residual to
    the layer's low-rank correction instead (``QLoRALinear.add_correction``; clients apply
    ``residual`` the same way), and ``correction`` reports its rank and what truncation to
    ``correction_rank`` discarded."""
    weight: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor
    residual: Optional[tuple[Tensor, Tensor]] = None
    correction: Optional[CorrectionReport] = None


def _normalise(client_weights, k: int, device) -> Tensor:
    """p (k,) float64 on device, Σ p = 1."""
    if client_weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)
    try:
        w = torch.as_tensor(client_weights, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"client_weights must be {k} numbers, got {client_weights!r}") from None
    if w.numel() != k:
        raise ValueError(f"client_weights must have one weight per client ({k}), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"client_weights must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError("client_weights must not all be zero")
    return (w / w.sum()).to(device)


def _is_matrix(t) -> bool:
    return isinstance(t, Tensor) and t.dim() == 2


def _target(weight, scaling) -> tuple[Tensor, str, float]:
    """(the (out, in) weight, its name for messages, the scaling) of aggregate's arguments:
    a LoRALinear gives its ``base_weight`` and, unless ``scaling`` is given, its scaling."""
    if not isinstance(weight, LoRALinear):
        return weight, "weight", 1.0 if scaling is None else check_finite("scaling", scaling)
    # a quantised base is not written: a stand-in of its (out, in) shape serves the checks
    base = weight.weight.new_zeros((), dtype=torch.float32).expand(weight.out_features, weight.in_features) \
        if isinstance(weight, QLoRALinear) else weight.base_weight
    if scaling is None:
        return base, "layer.base_weight", float(weight.scaling)
    s = check_finite("scaling", scaling)
    if not math.isclose(s, weight.scaling, rel_tol=1e-12, abs_tol=0.0):
        raise ValueError(f"scaling={scaling!r} is not the layer's scaling {weight.scaling!r}: leave scaling out "
                         "to use the layer's")
    return base, "layer.base_weight", s


def _check_layout(name: str, weight, client_A: Sequence[Tensor], client_B: Sequence[Tensor]) -> None:
    """Refuse a weight that is not the (out, in) matrix that every client's B (out, r) ·
    A (r, in) updates; where the clients disagree among themselves, the client check names
    the odd one instead."""
    if not _is_matrix(weight) or not all(_is_matrix(t) for t in (*client_A, *client_B)):
        return
    dims = {(b.shape[0], a.shape[1]) for a, b in zip(client_A, client_B)}
    if len(dims) != 1 or next(iter(dims)) == tuple(weight.shape):
        return
    out_f, in_f = next(iter(dims))
    if name != "weight":
        hint = "the clients' adapters do not belong to this layer"
    elif tuple(weight.shape) == (in_f, out_f):
        hint = ("it is laid out (in, out), as a GPT-2 Conv1D LoRALinear (fan_in_fan_out=True) stores its weight: "
                "pass the layer itself or layer.base_weight (its (out, in) view), not layer.weight")
    else:
        hint = "pass the adapted LoRALinear itself, or its base_weight (the (out, in) view)"
    raise ValueError(f"{name} has shape {tuple(weight.shape)} but the clients' lora_B ({out_f}, r) and lora_A "
                     f"(r, {in_f}) need an (out, in) = ({out_f}, {in_f}) base_weight; {hint}")


def _check_stacks(client_A: Tensor, client_B: Tensor, weight, name: str) -> None:
    """Stacked adapters (k, r, in) and (k, out, r) of one rank, on one device, finite."""
    for what, t in (("client_A", client_A), ("client_B", client_B)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"{what} must be a list of 2-D tensors or a 3-D floating-point stack, one slice "
                             "per client")
    k, r, _ = client_A.shape
    if client_B.shape[0] != k or client_B.shape[2] != r:
        raise ValueError(f"client_A {tuple(client_A.shape)} and client_B {tuple(client_B.shape)} must be (k, r, in) "
                         "and (k, out, r) stacks of the same k clients and rank r")
    if k == 0:
        raise ValueError("client_A is empty: aggregate needs at least one client")
    if client_B.device != client_A.device:
        raise ValueError(f"client_B is on {client_B.device} but client_A is on {client_A.device}")
    _check_layout(name, weight, [client_A[0]], [client_B[0]])
    finite = torch.isfinite(client_A).flatten(1).all(1) & torch.isfinite(client_B).flatten(1).all(1)
    if not bool(finite.all()):
        raise ValueError(f"client {int((~finite).nonzero()[0])} sent a non-finite adapter (inf or nan)")


def _check_clients(client_A: Sequence[Tensor], client_B: Sequence[Tensor], weight, name: str) -> None:
    if isinstance(client_A, Tensor) or isinstance(client_B, Tensor):
        return _check_stacks(client_A, client_B, weight, name)
    if not isinstance(client_A, (list, tuple)) or not isinstance(client_B, (list, tuple)):
        raise ValueError("client_A and client_B must be lists of tensors, one per client, or (k, r, in) and "
                         "(k, out, r) stacks")
    if len(client_A) == 0:
        raise ValueError("client_A is empty: aggregate needs at least one client")
    if len(client_A) != len(client_B):
        raise ValueError(f"client_A has {len(client_A)} clients but client_B has {len(client_B)}")
    _check_layout(name, weight, client_A, client_B)
    out_in = tuple(weight.shape) if _is_matrix(weight) else None
    for i, (a, b) in enumerate(zip(client_A, client_B)):
        for what, t in (("client_A", a), ("client_B", b)):
            if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise ValueError(f"{what}[{i}] must be a 2-D floating-point tensor")
        if out_in is None:            # no (out, in) weight to check against: client 0's sizes
            out_in = (b.shape[0], a.shape[1])
        out_f, in_f = out_in
        if a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != a.shape[0]:
            raise ValueError(f"client {i}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} must be "
                             f"(r, {in_f}) and ({out_f}, r) with the same r")
        if a.device != client_A[0].device or b.device != client_A[0].device:
            raise ValueError(f"client {i}'s adapters are not on {client_A[0].device} like client 0's")
    # one host sync for all clients' finiteness
    finite = torch.stack([torch.isfinite(a).all() & torch.isfinite(b).all()
                          for a, b in zip(client_A, client_B)]).tolist()
    if not all(finite):
        raise ValueError(f"client {finite.index(False)} sent a non-finite adapter (inf or nan)")


def _multi_target(layer: MultiLoRALinear, client_A, client_B, method: str, scaling):
    """(weight, A stack, B stack, scaling) of ``aggregate(multi_layer)``."""
    if client_A is not None or client_B is not None:
        raise ValueError("aggregate(multi_layer) takes the clients' adapters from the layer: leave client_A and "
                         "client_B out")
    if len(set(layer.ranks)) > 1:
        raise ValueError(f"layer's clients have different ranks {layer.ranks}: the global adapter has rank {layer.r} "
                         "and cannot be written back into the lower-rank slots; aggregate the stacks "
                         "(layer.lora_A, layer.lora_B) instead")
    if layer.lora_R is not None:
        raise ValueError(f"layer's variant {layer.variant!r} trains R: aggregate its stack with aggregate_r")
    s = float(layer.scaling) if scaling is None else check_finite("scaling", scaling)
    if not math.isclose(s, float(layer.scaling), rel_tol=1e-12, abs_tol=0.0):
        raise ValueError(f"scaling={scaling!r} is not the layer's scaling {layer.scaling!r}: leave scaling out")
    return layer.base_weight, layer.lora_A.detach(), layer.lora_B.detach(), s


def aggregate(weight: Union[Tensor, LoRALinear, MultiLoRALinear], client_A=None, client_B=None, *,
              method: str = "fedex", client_weights=None, scaling: Optional[float] = None,
              compensation: Optional[Tensor] = None, backend: Optional[str] = None) -> AggregateResult:
    """Aggregate k clients' adapters of one layer (see the module docstring for the methods).

    Args:
        weight: the layer's frozen base weight as an (out, in) tensor, fp32 (a master copy),
            fp64, or bf16/fp16; or the ``LoRALinear`` itself, whose ``base_weight`` (the
            (out, in) view, also of a GPT-2 Conv1D layer's (in, out) weight) is used.
            "fedex" updates it in place; the other methods leave it untouched. A weight
            whose shape is not the (out, in) of the clients' B·A is refused.
        client_A, client_B: lists of (rᵢ, in) and (out, rᵢ), or (k, r, in) and (k, out, r)
            stacks. "fedex" and "fedavg" accept different ranks (zero-padded to the largest,
            which keeps fedex exact).
        client_weights: k non-negative numbers (e.g. example counts), normalised to pᵢ;
            default equal.
        scaling: the adapters' s (lora_alpha / r). Default: the layer's ``scaling`` when
            ``weight`` is a LoRALinear (a different value is refused), else 1.
        compensation: fp32 tensor of weight's shape carrying what rounding a half-precision
            weight drops ("fedex"); updated in place.
        backend: "torch", "triton", "cuda" or None (automatic) for the merge.

    A ``MultiLoRALinear`` as ``weight`` aggregates its k clients (of equal ranks) and writes
    the global adapter into every client's slot, in place. "flora"'s rank-k·r global adapter
    does not fit the slots: as the Flower strategy does, it is merged into the base
    (W += s·[B₁…B_k][p₁A₁; …; p_kA_k]) and the clients restart from (Ā, 0).

    Everything is validated before anything is written: on a ValueError, weight and
    compensation are bit-identical to before.
    """
    check_choice("method", method, METHODS)
    layer = weight if isinstance(weight, MultiLoRALinear) else None
    qlayer = weight if isinstance(weight, QLoRALinear) else None
    if qlayer is not None and compensation is not None:
        raise ValueError("compensation does not apply to a QLoRALinear: its base stays quantised and the FedEx "
                         "residual is kept beside it as a low-rank correction")
    if layer is not None:
        weight, client_A, client_B, scaling = _multi_target(layer, client_A, client_B, method, scaling)
        name = "layer.base_weight"
    else:
        weight, name, scaling = _target(weight, scaling)
    _check_clients(client_A, client_B, weight, name)
    device = client_A[0].device
    check_merge_weight(name, weight, compensation, device)
    k = len(client_A)
    p = _normalise(client_weights, k, device)
    result = _aggregate(weight, client_A, client_B, method, p, scaling, compensation, backend,
                        merge=qlayer is None)
    if qlayer is not None:
        result.weight = None
        if result.residual is not None:
            result.correction = qlayer.add_correction(*result.residual)
    if layer is not None and method == "flora":
        U, V = (scaling * result.lora_B.to(torch.float32)).contiguous(), result.lora_A.to(torch.float32).contiguous()
        _ops.fedex_merge_(weight, U, V, compensation, backend)
        A_bar = torch.einsum("k,kri->ri", p, client_A.to(torch.float64)).to(client_A.dtype)
        result = AggregateResult(weight, A_bar, torch.zeros_like(client_B[0]), (U, V))
    if layer is not None:
        with torch.no_grad():
            layer.lora_A.copy_(result.lora_A.expand_as(layer.lora_A))
            layer.lora_B.copy_(result.lora_B.expand_as(layer.lora_B))
    return result


def _aggregate(weight, client_A, client_B, method, p, scaling, compensation, backend,
               merge: bool = True) -> AggregateResult:
    like, like_B = client_A[0], client_B[0]
    if method == "ffa":
        for i, a in enumerate(client_A[1:], 1):
            if a.shape != like.shape or not torch.equal(a, like):
                raise ValueError(f"method='ffa' needs every client to share A exactly; client {i}'s A differs "
                                 "from client 0's")
        B = client_B.to(torch.float64) if isinstance(client_B, Tensor) else \
            torch.stack([b.to(torch.float64) for b in client_B])
        return AggregateResult(weight, like.clone(), torch.einsum("k,kor->or", p, B).to(like_B.dtype))
    if method == "flora":
        A = torch.cat([(pi * a.to(torch.float64)).to(a.dtype) for pi, a in zip(p.tolist(), client_A)])
        B = torch.cat(list(client_B), dim=1)
        return AggregateResult(weight, A, B.clone())

    A_bar, B_bar, U, V = fedex_factors(client_A, client_B, p, scaling)
    result = AggregateResult(weight, A_bar.to(like.dtype), B_bar.to(like_B.dtype))
    if method == "fedex":
        f32 = torch.float64 if weight.dtype == torch.float64 else torch.float32
        U, V = U.to(f32).contiguous(), V.to(f32).contiguous()
        if merge:
            _ops.fedex_merge_(weight, U, V, compensation, backend)    # every client's residual in one launch
        result.residual = (U, V)
    return result


def fedex_factors(client_A, client_B, p: Tensor, scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Ā, B̄, U, V) with Ā = Σ pᵢAᵢ, B̄ = Σ pᵢBᵢ and the centred, stacked factors

        U = s·[p₁(B₁−B̄) … p_k(B_k−B̄)]  (out, K)      V = [A₁−Ā; …; A_k−Ā]  (K, in)

    so that U V = s·Σ pᵢ(Bᵢ−B̄)(Aᵢ−Ā) = s·(Σ pᵢBᵢAᵢ − B̄Ā) when Σ pᵢ = 1 (K = k·r, ranks
    zero-padded to the largest; the clients' adapters as lists, or as (k, r, in) and (k, out, r)
    stacks). The centred form has no cancellation when clients agree."""
    if isinstance(client_A, Tensor):
        acc = torch.float64 if client_A.dtype == torch.float64 or client_B.dtype == torch.float64 else torch.float32
        A, B = client_A.to(acc), client_B.to(acc)
    else:
        A, B = reference.stack_padded(list(client_A), list(client_B))
    p = p.to(A.dtype)
    A_bar = torch.einsum("k,kri->ri", p, A)
    B_bar = torch.einsum("k,kor->or", p, B)
    U = (scaling * p[:, None, None] * (B - B_bar)).permute(1, 0, 2).reshape(B.shape[1], -1)
    V = (A - A_bar).reshape(-1, A.shape[2])
    return A_bar, B_bar, U, V


def aggregate_r(client_R: Sequence[Tensor], client_weights=None) -> Tensor:
    """Fed-SB: the weighted mean Σ pᵢRᵢ of the clients' r×r matrices (exact: B·R·A is linear
    in R when B and A are shared), accumulated in float64 and returned in R's dtype."""
    if not isinstance(client_R, (list, tuple)) or len(client_R) == 0:
        raise ValueError("client_R must be a non-empty list of (r, r) tensors")
    first = client_R[0]
    for i, R in enumerate(client_R):
        if not isinstance(R, Tensor) or R.dim() != 2 or R.shape[0] != R.shape[1] or R.shape != first.shape:
            raise ValueError(f"client_R[{i}] must be an (r, r) tensor like client_R[0] {tuple(first.shape)}, got "
                             f"{tuple(R.shape) if isinstance(R, Tensor) else type(R).__name__}")
        if not torch.isfinite(R).all():
            raise ValueError(f"client {i} sent a non-finite R (inf or nan)")
    p = _normalise(client_weights, len(client_R), first.device)
    return torch.einsum("k,kab->ab", p, torch.stack([R.to(torch.float64) for R in client_R])).to(first.dtype)
