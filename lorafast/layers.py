"""Drop-in adapter layers."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import _random
from .functional import lora_linear

VARIANTS = ("lora", "ffa", "xs", "sb")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank adapter, computed by one fused op.

        y = x Wᵀ + b + s · drop(x) Aᵀ (Rᵀ) Bᵀ,   s = lora_alpha / r  (or / √r with rsLoRA)

    Variants (which parameters train):
      * ``"lora"``: A and B; A Kaiming-uniform, B zeros (PEFT's default init).
      * ``"ffa"``:  B only (FFA-LoRA); A is frozen at a random init drawn from ``seed``,
        so clients that share the seed share A.
      * ``"xs"`` / ``"sb"``: R (r×r) only; A and B are frozen. The init here is a
        placeholder: A and B random from ``seed`` (A Kaiming-uniform, B with orthogonal
        columns) and R zeros, so the layer starts at the base output. The SVD-based
        LoRA-XS and gradient-based LoRA-SB initialisations replace it.

    The base weight and bias are frozen; adapters are fp32 whatever the base dtype.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, *, variant: str = "lora",
                 use_rslora: bool = False, device=None, dtype=None, seed: Optional[int] = None):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.variant, self.use_rslora = variant, use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.seed = _random.next_seed() if seed is None else int(seed)
        fkw = dict(device=device, dtype=dtype)
        akw = dict(device=device, dtype=torch.float32)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fkw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **fkw), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **akw), requires_grad=variant in ("lora",))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **akw), requires_grad=variant in ("lora", "ffa"))
        self.lora_R = (nn.Parameter(torch.empty(r, r, **akw)) if variant in ("xs", "sb") else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Base weight as nn.Linear; adapters as the variant's docstring says."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
            self.reset_adapters()

    def reset_adapters(self) -> None:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape)
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on fan_in = in
            a.uniform_(-bound, bound, generator=gen)
            self.lora_A.copy_(a)
            if self.lora_R is None:
                self.lora_B.zero_()
            else:
                q, _ = torch.linalg.qr(torch.randn(self.out_features, self.r, generator=gen))
                self.lora_B.copy_(q[:, : self.r])
                self.lora_R.zero_()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    variant: str = "lora", use_rslora: bool = False, seed: Optional[int] = None) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are shared (and frozen), not copied."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout,
                    bias=linear.bias is not None, variant=variant, use_rslora=use_rslora,
                    device="meta", dtype=w.dtype, seed=seed)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        for name in ("lora_A", "lora_B", "lora_R"):
            p = getattr(layer, name)
            if p is not None:
                setattr(layer, name, nn.Parameter(torch.empty(p.shape, device=w.device, dtype=torch.float32),
                                                  requires_grad=p.requires_grad))
        layer.reset_adapters()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                           lora_R=self.lora_R, dropout_p=self.lora_dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, variant={self.variant!r}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, bias={self.bias is not None}")
