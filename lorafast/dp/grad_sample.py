"""Per-sample gradients: where each layer's backward writes them, and which layers may train.

Every trainable parameter owns columns [segments[p], segments[p+1]) of one fp32 buffer
(N, D) per backward pass. A lorafast layer in per-sample mode writes its adapters'
per-sample gradients there from inside its fused backward (``lorafast::lora_linear_bwd_ps``:
reductions over each sample's rows, no activation copies, no T×T Gram matrices); a plain
``nn.Linear`` (a classification head, say) writes Gᵢᵀ Xᵢ and Σₜ Gᵢ. Parameters' ``.grad``
stay untouched: the optimizer forms them from this buffer at ``step()``.

A backward pass opens the buffer at its first per-sample layer and seals it when autograd
finishes (a queued engine callback), computing every squared norm in one launch. A second
backward before ``step()`` (gradient accumulation) first folds the sealed pass into the
optimizer's clipped running sum, so each pass is clipped with its own norms.
"""
from __future__ import annotations

import math
import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend, _checks, _ops, _random
from ..layers import LoRALinear
from ..multi_lora import MultiLoRALinear

ADAPTER_NAMES = ("lora_A", "lora_B", "lora_R")
_STORE_ATTR = "_lorafast_grad_sample_store"
LOSS_REDUCTIONS = ("mean", "sum")


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter in ``module.parameters()`` order.

    Raises ValueError naming any trainable parameter that per-sample mode cannot handle:
    only lorafast adapters (lora_A, lora_B, lora_R of a LoRALinear) and the weight and bias
    of a plain nn.Linear may train.
    """
    owner: dict[int, tuple[str, nn.Module, str]] = {}
    for mod_name, mod in module.named_modules():
        for leaf, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mod_name, mod, leaf))
    out = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        _, mod, leaf = owner[id(p)]
        ok = (isinstance(mod, (LoRALinear, MultiLoRALinear)) and leaf in ADAPTER_NAMES) or \
             (isinstance(mod, nn.Linear) and leaf in ("weight", "bias"))
        if not ok:
            raise ValueError(
                f"module: trainable parameter {name!r} ({type(mod).__name__}.{leaf}) has no per-sample "
                "gradient in lorafast.dp; only LoRALinear adapters (lora_A, lora_B, lora_R) and plain "
                "nn.Linear weights and biases may train. Freeze it with requires_grad_(False).")
        out.append((name, p))
    return out


class GradSampleStore:
    """The per-sample gradient buffer of one private model, and its pass bookkeeping."""

    def __init__(self, params: list[nn.Parameter], *, loss_reduction: str,
                 backend: Optional[str] = None, clients: int = 0):
        self.params = params
        # with ``clients`` (per-client DP) every parameter is a (clients, ...) stack of which each
        # sample's gradient fills only its own client's slice: its row holds that slice alone
        self.clients = clients
        self.sample_shapes = [tuple(p.shape[1:]) if clients else tuple(p.shape) for p in params]
        self.segments = [0]
        for shape in self.sample_shapes:
            self.segments.append(self.segments[-1] + math.prod(shape))
        self._col = {id(p): (a, b) for p, a, b in zip(params, self.segments[:-1], self.segments[1:])}
        self.loss_reduction = loss_reduction
        # set by the DPOptimizer that owns this store: clips a sealed pass into its running sum
        self.fold: Optional[Callable[["GradSampleStore"], None]] = None
        self.backend = backend
        self.device = params[0].device
        self.reset()

    @property
    def width(self) -> int:
        return self.segments[-1]

    def reset(self) -> None:
        self.client_ids: Optional[Tensor] = None   # (N,) each sample's client, per-client DP
        self.buf: Optional[Tensor] = None     # (N, D) fp32 per-sample gradients
        self.sq: Optional[Tensor] = None      # (N, P) fp32 squared norms, once sealed
        self.batch: Optional[int] = None
        self.state = "idle"                   # "open" during a backward pass, then "sealed"

    def grad_scale(self, batch: int) -> float:
        """Undo a mean over the batch: the loss of sample i is ℓᵢ, not ℓᵢ/N (per client, ``_seal``
        undoes each client's mean instead)."""
        return float(batch) if self.loss_reduction == "mean" and not self.clients else 1.0

    def views(self, batch: int, params: list[Optional[Tensor]], where: str,
              client_ids: Optional[Tensor] = None) -> list[Optional[Tensor]]:
        """(N, *p.shape) views of the buffer for the given parameters (None stays None); per
        client, (N, *p.shape[1:]) views and the batch's ``client_ids``."""
        self._open(batch, where)
        if self.clients:
            if self.client_ids is None:
                self.client_ids = client_ids
            elif client_ids is not self.client_ids and not torch.equal(client_ids, self.client_ids):
                raise RuntimeError(f"{where}: its samples' clients differ from an earlier layer's in this backward "
                                   "pass; every layer must see the same client_ids")
        out = []
        for p in params:
            if p is None or id(p) not in self._col:
                out.append(None)
                continue
            a, b = self._col[id(p)]
            out.append(self.buf[:, a:b].view(batch, *(p.shape[1:] if self.clients else p.shape)))
        return out

    def _open(self, batch: int, where: str) -> None:
        if self.state == "open":
            if batch != self.batch:
                raise RuntimeError(
                    f"{where}: its input has batch size {batch} but an earlier layer in this backward pass "
                    f"had {self.batch}; per-sample gradients need the batch as the first dimension of "
                    "every layer's input")
            return
        if self.state == "sealed":
            self.fold(self)      # gradient accumulation: clip the previous pass with its own norms
        self.client_ids = None
        self.buf = torch.zeros((batch, self.width), device=self.device, dtype=torch.float32)
        self.batch = batch
        self.state = "open"
        torch.autograd.Variable._execution_engine.queue_callback(self._seal)

    def _seal(self) -> None:
        if _inside_another_backward():
            self.reset()
            raise RuntimeError(
                "per-sample gradients: this backward pass runs nested inside another one (reentrant activation "
                "checkpointing, use_reentrant=True), so each checkpointed segment would be clipped on its own; "
                "checkpoint with use_reentrant=False (transformers: gradient_checkpointing_kwargs="
                "{'use_reentrant': False})")
        if self.clients and self.loss_reduction == "mean" and self.batch:
            # the loss is Σ_c mean over client c's samples: undo each client's mean, ∇ℓᵢ = n_c(i) · ∇(ℓᵢ / n_c(i))
            counts = torch.bincount(self.client_ids, minlength=self.clients).to(self.buf.dtype)
            self.buf.mul_(counts[self.client_ids][:, None])
        self.sq = _ops.grad_sample_norms(self.buf, self.segments, self.backend)
        self.state = "sealed"


def _inside_another_backward() -> bool:
    """True in a backward pass that an autograd node of an outer one started (reentrant
    checkpointing re-runs its segment's backward from inside its own node's backward)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


def _batch_of(x: Tensor, where: str) -> int:
    if x.dim() < 2:
        raise ValueError(f"{where}: per-sample gradients need a batch dimension first, got input of shape "
                         f"{tuple(x.shape)}")
    return x.shape[0]


def _trained(ctx, first: int, params) -> list[Optional[Tensor]]:
    """The parameters, passed to a per-sample Function from input ``first`` on, that autograd
    wants gradients of (None for the others). The store knows parameters by identity, so they
    come from the layer, not from ``ctx.saved_tensors``: under activation checkpointing the
    saved tensors are recomputed copies."""
    return [p if p is not None and ctx.needs_input_grad[first + i] else None for i, p in enumerate(params)]


class _LoRAPerSample(torch.autograd.Function):
    """LoRALinear's forward; its backward writes per-sample adapter gradients to the store."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, lora_R, layer, store, seed, backend, dropout_p, weight, bias):
        # weight: the layer's compute weight, not saved (a QLoRALinear's lives in a shared
        # scratch buffer): the backward asks the layer for it again
        y, h = _ops.lora_linear_fwd(x, weight, lora_A, lora_B, bias, lora_R,
                                    float(layer.scaling), dropout_p, seed, 0, backend)
        ctx.save_for_backward(x, lora_A, lora_B, lora_R, h)
        ctx.layer, ctx.store, ctx.seed, ctx.backend, ctx.dropout_p = layer, store, seed, backend, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, R, h = ctx.saved_tensors
        layer, store = ctx.layer, ctx.store
        batch = x.shape[0]
        ps_A, ps_B, ps_R = store.views(batch, _trained(ctx, 1, (layer.lora_A, layer.lora_B, layer.lora_R)),
                                       f"LoRALinear({layer.in_features}, {layer.out_features})")
        need_x = ctx.needs_input_grad[0]
        weight = layer.compute_weight(x.dtype) if need_x else \
            x.new_empty(()).expand(layer.out_features, layer.in_features)   # only dx reads W
        dx = _ops.lora_linear_bwd_ps(
            grad_y.contiguous(), x, weight, A, B, R, h, float(layer.scaling), ctx.dropout_p, ctx.seed, 0,
            batch, need_x, ps_A, ps_B, ps_R, store.grad_scale(batch), ctx.backend)
        return (dx,) + (None,) * 10


class _LinearPerSample(torch.autograd.Function):
    """nn.Linear's forward; its backward writes per-sample Gᵢᵀ Xᵢ and Σₜ Gᵢ to the store."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight, bias)
        ctx.store, ctx.params = store, (weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        store = ctx.store
        batch = x.shape[0]
        ps_W, ps_b = store.views(batch, _trained(ctx, 1, ctx.params),
                                 f"nn.Linear({weight.shape[1]}, {weight.shape[0]})")
        scale = store.grad_scale(batch)
        if batch > 0:
            G = grad_y.reshape(batch, -1, weight.shape[0]).to(torch.float32)
            if ps_W is not None:
                X = x.reshape(batch, -1, weight.shape[1]).to(torch.float32)
                ps_W.baddbmm_(G.transpose(1, 2), X, alpha=scale)
            if ps_b is not None:
                ps_b.add_(G.sum(1), alpha=scale)
        dx = grad_y @ weight if ctx.needs_input_grad[0] else None
        return dx, None, None, None


class _MultiPerSample(torch.autograd.Function):
    """MultiLoRALinear's forward; its backward writes each sample's gradient of its own
    client's adapter to the store."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, lora_R, layer, store, client_ids, rows, seg, scale, seed, backend,
                dropout_p):
        y, h = _ops.lora_linear_multi_fwd(x, layer.base_weight, lora_A, lora_B, layer.bias, lora_R, rows, seg,
                                          scale, dropout_p, seed, 0, backend)
        ctx.save_for_backward(x, lora_A, lora_B, lora_R, h, rows, seg, scale)
        ctx.layer, ctx.store, ctx.client_ids, ctx.seed = layer, store, client_ids, seed
        ctx.backend, ctx.dropout_p = backend, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, R, h, rows, seg, scale = ctx.saved_tensors
        layer, store = ctx.layer, ctx.store
        batch = x.shape[0]
        ps_A, ps_B, ps_R = store.views(batch, _trained(ctx, 1, (layer.lora_A, layer.lora_B, layer.lora_R)),
                                       f"MultiLoRALinear({layer.in_features}, {layer.out_features})", ctx.client_ids)
        need_x = ctx.needs_input_grad[0]
        dx = _ops.lora_linear_multi_bwd_ps(grad_y.contiguous(), x, layer.base_weight, A, B, R, h, rows, seg, scale,
                                           ctx.dropout_p, ctx.seed, 0, need_x, ps_A, ps_B, ps_R,
                                           store.grad_scale(batch), ctx.backend)
        return (dx,) + (None,) * 12


def _multi_forward(layer: MultiLoRALinear, x: Tensor, client_ids: Optional[Tensor] = None) -> Tensor:
    store = getattr(layer, _STORE_ATTR)
    where = f"MultiLoRALinear({layer.in_features}, {layer.out_features})"
    _batch_of(x, where)
    ids = client_ids if client_ids is not None else layer._client_ids
    if ids is None:
        raise ValueError(f"{where}: client_ids is required: pass layer(x, client_ids), or run the model inside "
                         "`with lorafast.clients(model, client_ids):`")
    p = layer.lora_dropout if layer.training else 0.0
    _checks.check_lora_linear_multi(x, layer.base_weight, layer.lora_A, layer.lora_B, layer.bias, layer.lora_R, ids,
                                    layer.scaling, p)
    seed = _random.next_seed() if p > 0.0 else 0
    backend = _backend.select("lora_linear_multi_fwd", x.device, x.dtype, store.backend,
                              shape=_ops.lora_shape(x, layer.base_weight, layer.lora_A[0]))
    rows, seg = _ops.client_segments(ids, x.numel() // max(x.shape[0] * x.shape[-1], 1))
    scale = _ops.client_scaling(layer.scaling, layer.clients, x.device)
    return _MultiPerSample.apply(x, layer.lora_A, layer.lora_B, layer.lora_R, layer, store, ids, rows, seg, scale,
                                 seed, backend, p)


def _lora_forward(layer: LoRALinear, x: Tensor) -> Tensor:
    store = getattr(layer, _STORE_ATTR)
    where = f"LoRALinear({layer.in_features}, {layer.out_features})"
    _batch_of(x, where)
    if layer.merged:
        raise RuntimeError(f"{where} is merged (its adapter is folded into the base weight); "
                           "call lorafast.unmerge_adapters(model) before private training")
    p = layer.lora_dropout if layer.training else 0.0
    xc = layer.compute_input(x)
    weight, bias = layer.compute_weight(xc.dtype), layer.compute_bias(xc.dtype)
    _checks.check_lora_linear(xc, weight, layer.lora_A, layer.lora_B, bias, layer.lora_R, layer.scaling, p)
    seed = _random.next_seed() if p > 0.0 else 0
    # resolved once here, so that the per-sample backward runs on the forward's backend
    backend = _backend.select("lora_linear_fwd", x.device, xc.dtype, store.backend,
                              shape=_ops.lora_shape(xc, weight, layer.lora_A))
    y = _LoRAPerSample.apply(xc, layer.lora_A, layer.lora_B, layer.lora_R, layer, store, seed, backend, p, weight,
                             bias)
    return y.to(x.dtype)


def _linear_forward(layer: nn.Linear, x: Tensor) -> Tensor:
    store = getattr(layer, _STORE_ATTR)
    _batch_of(x, f"nn.Linear({layer.in_features}, {layer.out_features})")
    return _LinearPerSample.apply(x, layer.weight, layer.bias, store)


def attach(module: nn.Module, store: GradSampleStore) -> None:
    """Route every LoRALinear and every nn.Linear with trainable parameters through per-sample mode."""
    trainable = {id(p) for p in store.params}
    for mod in module.modules():
        if isinstance(mod, LoRALinear):
            fwd = _lora_forward
        elif isinstance(mod, MultiLoRALinear):
            fwd = _multi_forward
        elif isinstance(mod, nn.Linear) and any(id(p) in trainable for p in mod.parameters(recurse=False)):
            fwd = _linear_forward
        else:
            continue
        setattr(mod, _STORE_ATTR, store)
        mod.forward = types.MethodType(fwd, mod)   # a bound method: deepcopy rebinds it to the copy


def is_attached(module: nn.Module) -> bool:
    return any(hasattr(m, _STORE_ATTR) for m in module.modules())


def detach(module: nn.Module) -> None:
    """Undo ``attach``: layers compute as before and per-sample gradients stop."""
    for mod in module.modules():
        if hasattr(mod, _STORE_ATTR):
            del mod.forward
            delattr(mod, _STORE_ATTR)
