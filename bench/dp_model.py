"""A small pre-LN transformer encoder for classification, with LoRA on every projection.

Used by the DP benchmark (bench/bench_dp.py) and by tests. Two builds compute the
same function and differ only in how each projection is written:

  layer="lorafast"  every projection is a ``lorafast.LoRALinear`` (one fused op)
  layer="plain"     every projection is ``PlainLoRALinear``: PEFT's LoRA made of plain
                    nn.Linear layers only, which is what Opacus can compute
                    per-sample gradients for

The input is a float tensor (B, T, hidden) in the model's dtype: there is no
embedding table, so every trainable parameter is an adapter (A, B) or the head.
Base weights, biases and LayerNorms are frozen. ``copy_weights`` makes one build
compute exactly what the other computes.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter

LAYERS = ("lorafast", "plain")
PROJECTIONS = ("q", "k", "v", "o", "fc1", "fc2")


class PlainLoRALinear(nn.Module):
    """PEFT's LoRA linear layer from nn.Linear modules only.

        y = base(x) + (lora_B(lora_A(x.float())) · s).to(x.dtype),   s = lora_alpha / r

    ``base`` is frozen in the model's dtype; ``lora_A`` (r×in) and ``lora_B`` (out×r)
    are fp32 nn.Linear layers without bias, as PEFT keeps them under autocast_adapter_dtype.
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, bias: bool = True,
                 *, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.r, self.lora_alpha = in_features, out_features, r, lora_alpha
        self.scaling = lora_alpha / r
        self.base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=torch.float32, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=torch.float32, device=device)
        nn.init.zeros_(self.lora_B.weight)  # PEFT's default: the adapter starts at zero

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.lora_B(self.lora_A(x.to(torch.float32))) * self.scaling).to(x.dtype)


Projection = Union[lorafast.LoRALinear, PlainLoRALinear]


def _projection(layer: str, in_f: int, out_f: int, r: int, lora_alpha: float, dtype, device) -> Projection:
    if layer == "lorafast":
        return lorafast.LoRALinear(in_f, out_f, r=r, lora_alpha=lora_alpha, bias=True, dtype=dtype, device=device)
    return PlainLoRALinear(in_f, out_f, r, lora_alpha, bias=True, dtype=dtype, device=device)


class Block(nn.Module):
    """Pre-LN encoder block: x + attn(LN(x)), then x + MLP(LN(x)) with a 4× GELU MLP."""

    def __init__(self, hidden: int, n_heads: int, r: int, lora_alpha: float, layer: str, dtype, device):
        super().__init__()
        self.n_heads = n_heads
        proj = lambda i, o: _projection(layer, i, o, r, lora_alpha, dtype, device)  # noqa: E731
        self.ln1 = nn.LayerNorm(hidden, dtype=dtype, device=device)
        self.q, self.k, self.v, self.o = (proj(hidden, hidden) for _ in range(4))
        self.ln2 = nn.LayerNorm(hidden, dtype=dtype, device=device)
        self.fc1, self.fc2 = proj(hidden, 4 * hidden), proj(4 * hidden, hidden)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, h = t.shape
        return t.view(b, n, self.n_heads, h // self.n_heads).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        attn = F.scaled_dot_product_attention(self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h)))
        x = x + self.o(attn.transpose(1, 2).reshape(x.shape))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Pre-LN transformer encoder over float inputs (B, T, hidden), mean-pooled into an fp32 head.

    Args:
        hidden, n_layers, n_heads: width, depth and heads (hidden % n_heads == 0).
        r: LoRA rank of every projection (q, k, v, o, fc1, fc2).
        n_classes: outputs of the head.
        lora_alpha: default 2·r, so the scaling s = alpha / r is 2 (PEFT's common recipe);
            a scaling other than 1 lets a check catch a forgotten factor of s.
        layer: "lorafast" (lorafast.LoRALinear) or "plain" (PlainLoRALinear, Opacus-compatible).
        dtype: dtype of the inputs, the frozen base weights and the LayerNorms. Adapters
            and the head are fp32; the pooled features are cast to fp32 before the head.

    Trainable: every lora_A and lora_B, and head.weight / head.bias. Nothing else.
    """

    def __init__(self, hidden: int, n_layers: int, n_heads: int, r: int, n_classes: int = 2, *,
                 lora_alpha: Optional[float] = None, layer: str = "lorafast", dtype=torch.bfloat16,
                 device=None):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of n_heads ({n_heads})")
        self.hidden, self.n_layers, self.n_heads, self.r, self.layer = hidden, n_layers, n_heads, r, layer
        self.lora_alpha = float(2 * r if lora_alpha is None else lora_alpha)
        self.dtype = dtype
        self.blocks = nn.ModuleList(Block(hidden, n_heads, r, self.lora_alpha, layer, dtype, device)
                                    for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(hidden, dtype=dtype, device=device)
        self.head = nn.Linear(hidden, n_classes, dtype=torch.float32, device=device)
        for name, p in self.named_parameters():
            trainable = name.startswith("head.") or name.endswith(("lora_A", "lora_B", "lora_A.weight",
                                                                  "lora_B.weight"))
            p.requires_grad_(trainable)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(dim=1).to(torch.float32))


# ------------------------------------------------------------------ weights across the two builds


def _lora_tensors(m: Projection) -> dict:
    """The tensors of one projection under PEFT-style names, whichever build it is."""
    if isinstance(m, PlainLoRALinear):
        return {"weight": m.base.weight, "bias": m.base.bias, "lora_A": m.lora_A.weight, "lora_B": m.lora_B.weight}
    return {"weight": m.weight, "bias": m.bias, "lora_A": m.lora_A, "lora_B": m.lora_B}


def _projections(model: TinyTransformer):
    """(canonical name, projection) for every projection, e.g. ("blocks.0.q", module)."""
    for i, block in enumerate(model.blocks):
        for p in PROJECTIONS:
            yield f"blocks.{i}.{p}", getattr(block, p)


def _check_same_shape(src: TinyTransformer, dst: TinyTransformer) -> None:
    for attr in ("hidden", "n_layers", "n_heads", "r"):
        if getattr(src, attr) != getattr(dst, attr):
            raise ValueError(f"src and dst differ in {attr}: {getattr(src, attr)} vs {getattr(dst, attr)}")
    if src.head.out_features != dst.head.out_features:
        raise ValueError(f"src and dst differ in n_classes: {src.head.out_features} vs {dst.head.out_features}")


@torch.no_grad()
def copy_weights(src: TinyTransformer, dst: TinyTransformer) -> TinyTransformer:
    """Copy every weight of ``src`` into ``dst`` (either build into either), so that both
    compute the same function: base weights and biases, A, B, LayerNorms and the head.

    Values are converted to ``dst``'s dtypes; the LoRA scalings must already agree.
    Returns ``dst``."""
    _check_same_shape(src, dst)
    for (name, s), (_, d) in zip(_projections(src), _projections(dst)):
        if not math.isclose(s.scaling, d.scaling):
            raise ValueError(f"{name}: LoRA scaling differs ({s.scaling} vs {d.scaling}); build both with "
                             "the same lora_alpha")
        ts, td = _lora_tensors(s), _lora_tensors(d)
        for key in ts:
            if (ts[key] is None) != (td[key] is None):
                raise ValueError(f"{name}.{key} exists in only one of src and dst")
            if ts[key] is not None:
                td[key].copy_(ts[key])
    pairs = [(f"blocks.{i}.{ln}", getattr(bs, ln), getattr(bd, ln))
             for i, (bs, bd) in enumerate(zip(src.blocks, dst.blocks)) for ln in ("ln1", "ln2")]
    pairs += [("ln_f", src.ln_f, dst.ln_f), ("head", src.head, dst.head)]
    for _, ms, md in pairs:
        for key, t in ms.state_dict().items():
            md.state_dict()[key].copy_(t)
    return dst


def trainable_parameters(model: TinyTransformer) -> dict[str, nn.Parameter]:
    """Every trainable parameter under a name shared by both builds:
    ``blocks.{i}.{q,k,v,o,fc1,fc2}.lora_{A,B}`` (shapes (r, in) and (out, r)), ``head.weight``, ``head.bias``."""
    out = {}
    for name, m in _projections(model):
        t = _lora_tensors(m)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = t["lora_A"], t["lora_B"]
    out["head.weight"], out["head.bias"] = model.head.weight, model.head.bias
    return out


@torch.no_grad()
def randomize_lora_B_(model: TinyTransformer, std: float = 1e-2, generator: Optional[torch.Generator] = None
                      ) -> TinyTransformer:
    """Give every lora_B small N(0, std²) values in place of PEFT's zeros.

    With B = 0 the gradient of A, s·(G B)ᵀ X, is exactly zero, so a gradient check
    or a benchmark would see only half the adapter work. Returns ``model``."""
    for name, p in trainable_parameters(model).items():
        if name.endswith("lora_B"):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)
    return model
