"""Drop-in adapter layers."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops
from ._checks import check_merge_weight, check_seed
from ._ops import lora_linear
from ._random import os_seed

VARIANTS = ("lora", "ffa", "xs", "sb")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank adapter, computed by one fused op.

        y = x Wᵀ + b + s · drop(x) Aᵀ (Rᵀ) Bᵀ,   s = lora_alpha / r  (or / √r with rsLoRA)

    Variants (which parameters train):
      * ``"lora"``: A and B; A Kaiming-uniform, B zeros (PEFT's default init).
      * ``"ffa"``:  B only (FFA-LoRA); A is frozen at a random init drawn from ``seed``,
        so clients that share the seed (``layer.seed``) share A.
      * ``"xs"`` / ``"sb"``: R (r×r) only; A and B are frozen. The init here is a
        placeholder: A and B random from ``seed`` (A Kaiming-uniform, B with orthogonal
        columns) and R zeros, so the layer starts at the base output. The SVD-based
        LoRA-XS and gradient-based LoRA-SB initialisations replace it.

    The base weight and bias are frozen; adapters are fp32 whatever the base dtype.

    The adapters are drawn from a CPU generator seeded with ``seed``. ``seed=None`` draws
    that seed from torch's global generator (after the base weight, which is drawn as
    nn.Linear draws it), so ``torch.manual_seed`` makes a model's init reproducible, as with
    nn.Linear and PEFT. Either way ``layer.seed`` holds it: ``reset_adapters()`` redraws the
    same adapters, and FFA clients share A by sharing it. Dropout masks do not use it.

    ``fan_in_fan_out=True`` stores ``weight`` as (in, out), the layout of GPT-2's
    ``Conv1D`` (y = x W + b), so that the layer can share a Conv1D's parameter and
    keep its checkpoint layout; ``base_weight`` is always the (out, in) view and
    everything that reads or writes the base goes through it.

    ``merge()`` folds s·B(R)A into the base weight for inference, after which the
    forward is the plain linear map; ``unmerge()`` takes it out again. ``resample_()`` folds
    it in for training to go on from a fresh random A (Flora; lorafast.resample).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, *, variant: str = "lora",
                 use_rslora: bool = False, device=None, dtype=None, seed: Optional[int] = None,
                 fan_in_fan_out: bool = False):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        check_layer_args(in_features, out_features, variant, lora_dropout)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.variant, self.use_rslora = variant, use_rslora
        self.fan_in_fan_out, self.merged = bool(fan_in_fan_out), False
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.seed = check_seed("seed", seed)   # None: drawn from torch's generator by reset_adapters
        fkw = dict(device=device, dtype=dtype)
        akw = dict(device=device, dtype=torch.float32)
        shape = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **fkw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **fkw), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **akw), requires_grad=variant in ("lora",))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **akw), requires_grad=variant in ("lora", "ffa"))
        self.lora_R = (nn.Parameter(torch.empty(r, r, **akw)) if variant in ("xs", "sb") else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Base weight as nn.Linear; adapters as the variant's docstring says."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
            self.reset_adapters()

    def reset_adapters(self) -> None:
        """The adapters' init from ``self.seed`` (drawn from torch's global generator if None)."""
        if self.seed is None:
            self.seed = _seed_from_torch()
        if self.lora_A.is_meta:
            return  # from_linear builds on the meta device, then calls this again on the real one
        A, B, R = draw_adapters(self.in_features, self.out_features, self.r, self.lora_R is not None, self.seed)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            if self.lora_R is not None:
                self.lora_R.copy_(R)

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as (out, in), a view of ``weight`` whatever its layout."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    variant: str = "lora", use_rslora: bool = False, seed: Optional[int] = None) -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` or transformers ``Conv1D`` (GPT-2's transposed linear):
        its weight and bias are shared (and frozen), not copied. A bitsandbytes ``Linear4bit``
        or ``Linear8bitLt`` gives a ``QLoRALinear`` (lorafast.qlora) over its quantised weight."""
        from .quant import is_quantised
        if is_quantised(linear):
            from .qlora import QLoRALinear
            return QLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                           variant=variant, use_rslora=use_rslora, seed=seed)
        weight, bias, fan_in_fan_out = base_parameters(linear, "linear")
        out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        layer = cls(in_f, out_f, r, lora_alpha, lora_dropout, bias=bias is not None, variant=variant,
                    use_rslora=use_rslora, device="meta", dtype=weight.dtype, seed=seed,
                    fan_in_fan_out=fan_in_fan_out)
        layer.weight = weight.requires_grad_(False)
        if bias is not None:
            layer.bias = bias.requires_grad_(False)
        for name in ("lora_A", "lora_B", "lora_R"):
            p = getattr(layer, name)
            if p is not None:
                setattr(layer, name, nn.Parameter(torch.empty(p.shape, device=weight.device, dtype=torch.float32),
                                                  requires_grad=p.requires_grad))
        layer.reset_adapters()
        return layer

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with U V = s·B(R)A, the adapter's update of the (out, in) base weight, in fp32
        (fp64 for an fp64 base)."""
        return adapter_delta(self.lora_B, self.lora_A, self.lora_R, self.scaling, self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W += s·B(R)A in W's dtype (fp32 accumulation); the forward then skips the adapter."""
        if self.merged:
            raise ValueError("this LoRALinear is already merged")
        self._fold(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W −= s·B(R)A: undoes ``merge`` up to one rounding of W's dtype per element each way."""
        if not self.merged:
            raise ValueError("this LoRALinear is not merged")
        self._fold(-1.0)
        self.merged = False

    def _fold(self, sign: float, compensation: Optional[torch.Tensor] = None) -> None:
        U, V = self.delta_factors()
        _ops.fedex_merge_(self.base_weight, (U * sign).contiguous(), V.contiguous(), compensation)

    @torch.no_grad()
    def resample_(self, seed: Optional[int] = None, *, compensation: Optional[torch.Tensor] = None):
        """Flora's resampling (Hao, Cao & Mou, 2024; lorafast.resample): fold the adapter into
        the base and restart it from a new random projection,

            W ← W + s·B A,    A ← draw(seed),    B ← 0,

        which leaves the effective weight W + s·B A unchanged, while the training that follows
        moves in a fresh rank-r subspace, so the update summed over resamples exceeds rank r.

        A is drawn as ``reset_adapters`` draws it, from ``seed``, which becomes ``self.seed``.
        ``seed=None`` takes a fresh one from the OS, which no torch or lorafast ``manual_seed``
        replays: pass seeds (``lorafast.resample.resample_seed``) where runs must replay or
        FFA clients must agree on A. ``lora_A`` and ``lora_B`` are written in place, so
        optimizers and lorafast.dp keep their references (an optimizer's state for them
        describes the old projection: ``lorafast.resample_every`` clears it).

        The merge is the FedEx merge op, accumulated in fp32 (fp64 for an fp64 base): exact for
        an fp32/fp64 base; a bf16/fp16 base keeps what its dtype can hold (as ``merge()``)
        unless ``compensation``, an fp32 tensor of ``base_weight``'s (out, in) shape updated in
        place, carries the rounding (``weight.float() + compensation`` is then the true weight).

        Refused with a ValueError, before anything is written: a merged layer, the "xs"/"sb"
        variants, a bad seed or compensation, a non-finite adapter. Returns None (a
        QLoRALinear returns its correction's report)."""
        return self._resample(self._check_resample(seed, compensation), compensation)

    def _check_resample(self, seed, compensation) -> int:
        """The seed ``resample_(seed, compensation=...)`` will use, or the ValueError that refuses it."""
        if self.merged:
            raise ValueError("resample_ needs an unmerged layer: this LoRALinear is merged, so its base already "
                             "holds s·B(R)A and would take it twice; unmerge() first")
        return check_resample(self, seed, compensation)

    def _resample(self, seed: int, compensation: Optional[torch.Tensor]):
        absorbed = self._absorb(compensation)
        self.seed = seed
        self.reset_adapters()
        return absorbed

    def _absorb(self, compensation: Optional[torch.Tensor]) -> None:
        """W += s·B(R)A, before the adapter restarts (a QLoRALinear keeps it in its correction)."""
        self._fold(1.0, compensation)

    # what the op computes on: the input, the (out, in) weight and the bias in the compute
    # dtype (a QLoRALinear casts to its compute dtype and dequantises its weight)
    def compute_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.base_weight

    def compute_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.base_weight, self.bias)
        return lora_linear(x, self.base_weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                           lora_R=self.lora_R, dropout_p=self.lora_dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, variant={self.variant!r}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, bias={self.bias is not None}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "") + (", merged=True" if self.merged else ""))


def check_layer_args(in_features: int, out_features: int, variant: str, lora_dropout: float) -> None:
    """The arguments an adapter layer (LoRALinear, MultiLoRALinear) shares, each refused by name."""
    if in_features < 1 or out_features < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


def adapter_delta(B: torch.Tensor, A: torch.Tensor, R: Optional[torch.Tensor], scaling: float,
                  weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) = (s·B(R), A), detached, in fp32 (fp64 for an fp64 base): U V is the adapter's
    update of the (out, in) base weight, in the form the FedEx merge op takes."""
    acc = torch.float64 if weight_dtype == torch.float64 else torch.float32
    B = B.detach().to(acc)
    if R is not None:
        B = B @ R.detach().to(acc)
    return B * scaling, A.detach().to(acc)


def check_resample(layer: nn.Module, seed, compensation) -> int:
    """What ``resample_`` needs of a LoRALinear or MultiLoRALinear, refused by name; returns
    the new seed (``seed``, or a fresh one from the OS for None). Writes nothing."""
    if layer.lora_R is not None:
        raise ValueError(f"resample_ does not apply to variant {layer.variant!r}: it trains only R inside a frozen "
                         "(A, B) basis (LoRA-XS's SVD, LoRA-SB's gradient init), which a random redraw would "
                         "throw away; Flora resamples A under a trained B (variants 'lora' and 'ffa')")
    seed = check_seed("seed", seed)
    if compensation is not None:
        check_merge_weight("layer.base_weight", layer.base_weight, compensation)
    if not bool(torch.isfinite(layer.lora_A).all() & torch.isfinite(layer.lora_B).all()):
        raise ValueError("resample_ refuses a non-finite adapter (inf or nan): merging it would corrupt the base")
    return os_seed() if seed is None else seed


def draw_adapters(in_features: int, out_features: int, r: int, with_R: bool, seed: int):
    """(A (r, in), B (out, r), R (r, r) or None), fp32 on the CPU, from a generator seeded with
    ``seed``: A Kaiming-uniform (a=√5, fan_in = in); B zeros, or with R (LoRA-XS/SB) B with
    orthonormal columns and R zeros. A's first r' rows are the A of rank r' < r."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1 / math.sqrt(in_features)
    A = torch.empty(r, in_features).uniform_(-bound, bound, generator=gen)
    B = torch.zeros(out_features, r)
    if not with_R:
        return A, B, None
    q, _ = torch.linalg.qr(torch.randn(out_features, r, generator=gen))
    B[:, : q.shape[1]] = q        # r > out: only out orthonormal columns exist
    return A, B, torch.zeros(r, r)


def _seed_from_torch() -> int:
    """A seed in [0, 2**63) from torch's global CPU generator, which torch.manual_seed sets."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): a linear layer whose weight is (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def base_parameters(module: nn.Module, what: str) -> tuple[nn.Parameter, Optional[nn.Parameter], bool]:
    """(weight, bias, fan_in_fan_out) of an ``nn.Linear`` or a transformers ``Conv1D``."""
    from .quant import is_quantised
    if is_quantised(module):
        raise ValueError(f"{what} is a bitsandbytes {type(module).__name__}: its weight is quantised, and only "
                         "LoRALinear.from_linear (a QLoRALinear) adapts it; MultiLoRALinear needs a dense base")
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, False
    if is_conv1d(module):
        return module.weight, module.bias, True
    raise ValueError(f"{what} must be an nn.Linear or a transformers Conv1D, got {type(module).__name__}")
