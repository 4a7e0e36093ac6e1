"""Many clients' adapters over one shared frozen base: ``MultiLoRALinear`` and ``clients``.

A federated simulation trains k clients' adapters on the same frozen base. Because the base
is shared, k clients' steps are one step: one base GEMM over every client's rows and each
client's rank-r work on its own rows (``lorafast.lora_linear_multi``). Each sample carries
the index of its client.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import _ops
from ._checks import check_client_ids, check_seed
from ._ops import lora_linear_multi
from .layers import (LoRALinear, _seed_from_torch, adapter_delta, base_parameters, check_layer_args, check_resample,
                     draw_adapters)


def _ranks(r, clients: int) -> list[int]:
    if isinstance(r, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be a positive integer, got {clients!r}")
    ranks = [r] * clients if isinstance(r, int) else list(r) if isinstance(r, Sequence) else None
    if ranks is None or len(ranks) != clients or any(isinstance(q, bool) or not isinstance(q, int) or q < 1
                                                     for q in ranks):
        raise ValueError(f"r must be a positive integer or a list of {clients} positive integers (one rank per "
                         f"client), got {r!r}")
    return ranks


class MultiLoRALinear(nn.Module):
    """A frozen linear layer shared by ``clients`` LoRA adapters, one per client:

        layer(x, client_ids)[i] = x[i] Wᵀ + b + s_c · drop(x[i]) A_cᵀ (R_cᵀ) B_cᵀ,  c = client_ids[i]

    that is, sample i gets exactly ``LoRALinear`` with client c's adapter, forward and backward.

    Parameters are stacked: ``lora_A`` (clients, r, in), ``lora_B`` (clients, out, r) and, for
    the "xs"/"sb" variants, ``lora_R`` (clients, r, r); the variants train what
    ``LoRALinear``'s do. ``r`` may be a list with one rank per client: the adapters are
    zero-padded to the largest (``self.r``; ``self.ranks`` holds each), the padding's
    gradients are zero and it never trains. ``scaling`` is ``lora_alpha / r`` (or / √r with
    rsLoRA): a float when every client has the same rank, else a (clients,) tensor buffer.

    Every client starts from the adapter ``LoRALinear(..., r=r_c, seed=self.seed)`` draws (a
    federated round starts from one global adapter); ``seed=None`` draws the seed from torch's
    global generator, so ``torch.manual_seed`` makes the init reproducible.

    ``client_ids`` is a (batch,) integer tensor; inside a model whose forward cannot take it,
    set it with ``with lorafast.clients(model, client_ids): model(**batch)``.
    """

    def __init__(self, in_features: int, out_features: int, clients: int, r: Union[int, Sequence[int]] = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, bias: bool = True, *, variant: str = "lora",
                 use_rslora: bool = False, device=None, dtype=None, seed: Optional[int] = None,
                 fan_in_fan_out: bool = False):
        super().__init__()
        self.ranks = _ranks(r, clients)
        check_layer_args(in_features, out_features, variant, lora_dropout)
        self.in_features, self.out_features, self.clients = in_features, out_features, clients
        self.r, self.lora_alpha, self.lora_dropout = max(self.ranks), lora_alpha, float(lora_dropout)
        self.variant, self.use_rslora, self.fan_in_fan_out = variant, use_rslora, bool(fan_in_fan_out)
        self.seed = check_seed("seed", seed)
        scales = self._scales = [lora_alpha / (math.sqrt(q) if use_rslora else q) for q in self.ranks]
        if len(set(scales)) == 1:
            self.scaling = scales[0]
        else:
            self.register_buffer("scaling", torch.tensor(scales, device=device), persistent=False)
        fkw = dict(device=device, dtype=dtype)
        shape = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **fkw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **fkw), requires_grad=False) if bias else None
        self._new_adapters(device)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapters()
        self._client_ids: Optional[torch.Tensor] = None

    def _new_adapters(self, device) -> None:
        k, r, akw = self.clients, self.r, dict(device=device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(k, r, self.in_features, **akw), requires_grad=self.variant == "lora")
        self.lora_B = nn.Parameter(torch.empty(k, self.out_features, r, **akw),
                                   requires_grad=self.variant in ("lora", "ffa"))
        self.lora_R = nn.Parameter(torch.empty(k, r, r, **akw)) if self.variant in ("xs", "sb") else None
        self._pad_hooks()

    def _pad_hooks(self) -> None:
        """Zero the padded ranks' gradients: padding stays zero whatever the optimizer."""
        if len(set(self.ranks)) == 1:
            return
        real = torch.arange(self.r)[None, :] < torch.tensor(self.ranks)[:, None]     # (clients, r)
        masks = {"lora_A": real[:, :, None], "lora_B": real[:, None, :], "lora_R": real[:, :, None] & real[:, None, :]}
        for name, mask in masks.items():
            p = getattr(self, name)
            if p is not None and p.requires_grad:
                m = mask.to(p.device)
                p.register_hook(lambda g, m=m: g * m.to(g.device))

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as (out, in), a view of ``weight`` whatever its layout."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def reset_adapters(self) -> None:
        """Every client's adapter as ``LoRALinear(r=r_c, seed=self.seed)`` draws it, zero-padded."""
        if self.seed is None:
            self.seed = _seed_from_torch()
        if self.lora_A.is_meta:
            return
        with torch.no_grad():
            for p in (self.lora_A, self.lora_B, self.lora_R):
                if p is not None:
                    p.zero_()
            for c, q in enumerate(self.ranks):
                A, B, R = draw_adapters(self.in_features, self.out_features, q, self.lora_R is not None, self.seed)
                self.lora_A[c, :q].copy_(A)
                self.lora_B[c, :, :q].copy_(B)
                if R is not None:
                    self.lora_R[c, :q, :q].copy_(R)

    @classmethod
    def from_linear(cls, linear: nn.Module, clients: int, *, r: Union[int, Sequence[int]] = 8,
                    lora_alpha: float = 8, lora_dropout: float = 0.0, variant: str = "lora",
                    use_rslora: bool = False, seed: Optional[int] = None) -> "MultiLoRALinear":
        """Wrap an ``nn.Linear`` or transformers ``Conv1D``: its weight and bias are shared (and
        frozen), not copied."""
        weight, bias, fan_in_fan_out = base_parameters(linear, "linear")
        out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        layer = cls(in_f, out_f, clients, r, lora_alpha, lora_dropout, bias=bias is not None, variant=variant,
                    use_rslora=use_rslora, device="meta", dtype=weight.dtype, seed=seed,
                    fan_in_fan_out=fan_in_fan_out)
        layer.weight = weight.requires_grad_(False)
        if bias is not None:
            layer.bias = bias.requires_grad_(False)
        if isinstance(layer.scaling, torch.Tensor):
            layer.scaling = torch.tensor(layer._scales, device=weight.device)
        layer._new_adapters(weight.device)
        layer.reset_adapters()
        return layer

    def client_scaling(self, i: int) -> float:
        return float(self._scales[i])

    def client_layer(self, i: int) -> LoRALinear:
        """Client ``i``'s adapter as a ``LoRALinear`` of its own rank, sharing this layer's frozen
        base weight and bias (the adapter is a detached copy)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.clients:
            raise ValueError(f"client must be an integer in [0, {self.clients}), got {i!r}")
        q = self.ranks[i]
        layer = LoRALinear(self.in_features, self.out_features, q, self.lora_alpha, self.lora_dropout,
                           bias=self.bias is not None, variant=self.variant, use_rslora=self.use_rslora,
                           device="meta", dtype=self.weight.dtype, seed=self.seed,
                           fan_in_fan_out=self.fan_in_fan_out)
        layer.weight, layer.bias = self.weight, self.bias
        copy = lambda t: nn.Parameter(t.detach().clone(), requires_grad=False)  # noqa: E731
        layer.lora_A, layer.lora_B = copy(self.lora_A[i, :q]), copy(self.lora_B[i, :, :q])
        if self.lora_R is not None:
            layer.lora_R = copy(self.lora_R[i, :q, :q])
        layer.scaling = self.client_scaling(i)
        return layer

    @torch.no_grad()
    def resample_(self, seed: Optional[int] = None, *, compensation: Optional[torch.Tensor] = None) -> None:
        """``LoRALinear.resample_`` for all k clients at once: W ← W + s·B A, every client's
        A ← draw(seed), B ← 0. The base is shared, so it can take one update: the clients'
        adapters must be identical, as ``federated.aggregate(layer)`` leaves them (resample
        between rounds, after aggregating); refused otherwise, before anything is written."""
        self._resample(self._check_resample(seed, compensation), compensation)

    def _check_resample(self, seed, compensation) -> int:
        if len(set(self.ranks)) > 1:
            raise ValueError(f"resample_ needs the clients' adapters identical, and these clients have different "
                             f"ranks {self.ranks}")
        seed = check_resample(self, seed, compensation)
        for name in ("lora_A", "lora_B"):
            stack = getattr(self, name)
            if not torch.equal(stack, stack[:1].expand_as(stack)):
                raise ValueError(f"resample_ needs the clients' adapters identical (the shared base takes one "
                                 f"update), but their {name} differ: aggregate the layer first")
        return seed

    def _resample(self, seed: int, compensation: Optional[torch.Tensor]) -> None:
        U, V = adapter_delta(self.lora_B[0], self.lora_A[0], None, self.scaling, self.weight.dtype)
        _ops.fedex_merge_(self.base_weight, U.contiguous(), V.contiguous(), compensation)
        self.seed = seed
        self.reset_adapters()

    def forward(self, x: torch.Tensor, client_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if client_ids is None:
            client_ids = self._client_ids
        if client_ids is None:
            raise ValueError("client_ids is required: pass layer(x, client_ids), or run the model inside "
                             "`with lorafast.clients(model, client_ids):`")
        return lora_linear_multi(x, self.base_weight, self.lora_A, self.lora_B, self.bias, client_ids=client_ids,
                                 scaling=self.scaling, lora_R=self.lora_R,
                                 dropout_p=self.lora_dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        ranks = self.r if len(set(self.ranks)) == 1 else self.ranks
        return (f"in_features={self.in_features}, out_features={self.out_features}, clients={self.clients}, "
                f"r={ranks}, lora_alpha={self.lora_alpha}, variant={self.variant!r}, "
                f"lora_dropout={self.lora_dropout}, bias={self.bias is not None}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))


def multi_layers(model: nn.Module) -> list[MultiLoRALinear]:
    """The model's MultiLoRALinear layers, all of one client count (a ValueError otherwise)."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    counts = sorted({m.clients for m in layers})
    if len(counts) > 1:
        raise ValueError(f"model: its MultiLoRALinear layers have different client counts {counts}; one model "
                         f"simulates one set of clients")
    return layers


@contextlib.contextmanager
def clients(model: nn.Module, client_ids: torch.Tensor) -> Iterator[None]:
    """Run ``model``'s MultiLoRALinear layers with these samples' clients:
    ``with lorafast.clients(model, client_ids): model(**batch)``, client_ids (batch,) int64."""
    layers = multi_layers(model)
    if not layers:
        raise ValueError("model has no MultiLoRALinear layers (convert it with inject_adapters(..., clients=k) "
                         "or from_peft(..., clients=k))")
    if not isinstance(client_ids, torch.Tensor) or client_ids.dim() != 1:
        raise ValueError("client_ids must be a (batch,) integer tensor, one client per sample")
    check_client_ids(client_ids, client_ids.shape[0], layers[0].clients, client_ids.device)
    previous = [m._client_ids for m in layers]
    for m in layers:
        m._client_ids = client_ids
    try:
        yield
    finally:
        for m, ids in zip(layers, previous):
            m._client_ids = ids
