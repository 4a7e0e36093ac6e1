"""Times the FedEx-LoRA server merge, W += s·(Σ pᵢ BᵢAᵢ − B̄Ā), against its baselines.

The merge folds what averaging the clients' factors loses into the frozen weight W, in place.
Configs: k = 4, 16, 64 clients, r = 16 and 64, W 4096×4096 and 4096×14336, an fp32 master
weight or a bf16 one plus an fp32 Kahan compensation. Providers:

  naive            k dense products BᵢAᵢ into an fp32 temporary, minus B̄Ā, added into W
                   (lorafast.reference.fedex_residual; Kahan-compensated in torch ops)
  torch_stacked    lorafast.federated.aggregate(..., backend="torch"): one GEMM over the
                   centred factors stacked to K = k·r
  lorafast-triton  backend="triton": the fused kernel reads and writes W (and the
                   compensation) once, looping over the K stacked factors per tile
  lorafast-cuda    backend="cuda": the fused merge in CUDA C++ (csrc/); GPU only

Rows: time and roofline_fraction (roofline time = max(bytes moved / copy bandwidth, 2·out·in·K
/ bf16 GEMM rate); the fp32 GEMM rate is a roofline row too). Each timed call starts from the
weight the previous one left. First, on a fresh copy, W_new + s·B̄Ā == Σ pᵢ (W_old + s·BᵢAᵢ) must
hold to 1e-5 in float64 or the run exits 1, as when torch_stacked or lorafast raises. --quick:
k=16, r=16, 4096×4096; `--device cpu`: k=3, r=4, W 48×40.

    python bench/bench_federated.py [--quick] [--out PATH] [--device cuda|cpu] [--providers ...]
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast import reference

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402
from common import Ratio  # noqa: E402

MODE, OURS = "merge", "lorafast-triton"
MAX_REL_ERR, SCALING = 1e-5, 2.0  # SCALING: lora_alpha = 2r
DELTA = 0.05     # ‖s·BᵢAᵢ‖ ≈ DELTA·‖W‖: a client's adapter is a few percent of the weight
DRIFT = 0.3      # each client's factors = shared global factors + DRIFT × an independent draw
# Targets at TARGET_CONFIG: lorafast-triton's roofline fraction (within 1.5× of the roofline), its speed-up over naive.
TARGET_CONFIG, TARGET_ROOFLINE_FRACTION, TARGET_NAIVE_SPEEDUP = "k=16,r=16,shape=4096x4096,master=fp32", 0.67, 10.0


@dataclass(frozen=True)
class Config:
    k: int
    r: int
    out_f: int
    in_f: int
    master: str  # "fp32" or "bf16+comp"

    @property
    def label(self) -> str:
        return f"k={self.k},r={self.r},shape={self.out_f}x{self.in_f},master={self.master}"

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.float32 if self.master == "fp32" else torch.bfloat16

    @property
    def compensated(self) -> bool:
        return self.master != "fp32"

    def bytes_moved(self) -> int:
        """W read + written (+ the fp32 compensation read + written) + the fp32 factors read once."""
        n = self.out_f * self.in_f
        es = torch.finfo(self.weight_dtype).bits // 8
        return 2 * n * es + (2 * n * 4 if self.compensated else 0) + self.k * self.r * (self.out_f + self.in_f) * 4

    def flops(self) -> int:
        return 2 * self.out_f * self.in_f * self.k * self.r


MASTERS = ("fp32", "bf16+comp")
GPU_CONFIGS = [Config(k, r, o, i, m) for (o, i) in ((4096, 4096), (4096, 14336)) for r in (16, 64)
               for k in (4, 16, 64) for m in MASTERS]
QUICK_CONFIGS = [Config(16, 16, 4096, 4096, m) for m in MASTERS]
CPU_CONFIGS = [Config(3, 4, 48, 40, m) for m in MASTERS]


def naive_merge(weight: Tensor, client_A: list[Tensor], client_B: list[Tensor], p: list[float],
                scaling: float, compensation: Optional[Tensor]) -> None:
    """The residual as plain dense math, then added into W (Kahan-compensated with a carry)."""
    residual = reference.fedex_residual(client_A, client_B, client_weights=p, scaling=scaling)
    if compensation is None:
        weight.add_(residual.to(weight.dtype))
        return
    # as reference.fedex_merge_: t = C + R, W' = round(W + t), C' = (W − W') + t
    w = weight.float()
    t = residual.add_(compensation)
    weight.copy_(w + t)
    compensation.copy_(w.sub_(weight.float()).add_(t))


def merge_fn(provider: str) -> Callable[..., None]:
    """merge(weight, client_A, client_B, p, scaling, compensation), in place."""
    if provider == "naive":
        return naive_merge
    from lorafast.federated import aggregate
    backend = {"torch_stacked": "torch", OURS: "triton", "lorafast-cuda": "cuda"}[provider]

    def merge(weight, client_A, client_B, p, scaling, compensation):
        aggregate(weight, client_A, client_B, method="fedex", client_weights=p, scaling=scaling,
                  compensation=compensation, backend=backend)
    return merge


@dataclass
class Inputs:
    cfg: Config
    weight: Tensor                  # (out, in) in the master's dtype: the state every provider starts from
    compensation: Optional[Tensor]  # (out, in) fp32 carry for a bf16 weight
    client_A: list[Tensor]          # k × (r, in) fp32
    client_B: list[Tensor]          # k × (out, r) fp32
    p: list[float]                  # client weights, Σ = 1

    def fresh_state(self) -> tuple[Tensor, Optional[Tensor]]:
        return self.weight.clone(), None if self.compensation is None else self.compensation.clone()


def make_inputs(cfg: Config, device: torch.device) -> Inputs:
    """Clients that start from shared global factors and drift apart, with unequal weights. A bf16
    master is the rounding of an fp32 weight, its compensation what the rounding lost (non-zero)."""
    torch.manual_seed(0)
    k, r, o, i = cfg.k, cfg.r, cfg.out_f, cfg.in_f
    w32 = torch.randn(o, i, device=device) / math.sqrt(i)  # rows of norm ≈ 1
    b_std = DELTA / (SCALING * math.sqrt(r))  # ‖s·BA‖_F ≈ s·√r·b_std·‖W‖_F
    a0 = torch.randn(r, i, device=device) / math.sqrt(i)
    b0 = torch.randn(o, r, device=device) * b_std
    client_A = [a0 + DRIFT * torch.randn(r, i, device=device) / math.sqrt(i) for _ in range(k)]
    client_B = [b0 + DRIFT * torch.randn(o, r, device=device) * b_std for _ in range(k)]
    sizes = torch.randint(1, 100, (k,), generator=torch.Generator().manual_seed(1)).double()
    weight = w32.to(cfg.weight_dtype) if cfg.compensated else w32
    compensation = w32 - weight.float() if cfg.compensated else None
    return Inputs(cfg, weight, compensation, client_A, client_B, (sizes / sizes.sum()).tolist())


def effective_weight(weight: Tensor, compensation: Optional[Tensor]) -> Tensor:
    """The value the state stands for, in float64."""
    w = weight.double()
    return w if compensation is None else w + compensation.double()


def invariant_sides(inp: Inputs) -> tuple[Tensor, Tensor]:
    """float64 (Σ pᵢ(W_old + s·BᵢAᵢ), s·B̄Ā). Σ pᵢ BᵢAᵢ is one GEMM over [p₁B₁ … p_kB_k] and
    [A₁; …; A_k], independent of the centred form the providers use."""
    p = torch.tensor(inp.p, dtype=torch.float64, device=inp.weight.device)
    a = torch.stack(inp.client_A).double()  # (k, r, in)
    b = torch.stack(inp.client_B).double()  # (k, out, r)
    b_cat = (b * p[:, None, None]).permute(1, 0, 2).reshape(inp.cfg.out_f, -1)  # (out, k·r)
    want = effective_weight(inp.weight, inp.compensation).add_(b_cat @ a.reshape(-1, inp.cfg.in_f), alpha=SCALING)
    return want, (torch.einsum("k,kor->or", p, b) @ torch.einsum("k,kri->ri", p, a)).mul_(SCALING)


def roofline_ms(cfg: Config, rl: dict) -> tuple[float, str]:
    """(max(bytes / copy bandwidth, flops / bf16 GEMM rate) in ms from the p50 rates, the bound that decides)."""
    mem, flop = cfg.bytes_moved() / (rl["bandwidth"]["q"][0] * 1e9), cfg.flops() / (rl["tflops"]["q"][0] * 1e12)
    return max(mem, flop) * 1e3, "memory" if mem >= flop else "compute"


class FedexMergeSuite(common.Suite):
    KERNEL, X_NAME, MODES = "fedex_merge", "config", (MODE,)
    PROVIDERS = ("naive", "torch_stacked", OURS, "lorafast-cuda")
    CUDA_PROVIDER = "lorafast-cuda"
    SIZES = {"cpu": CPU_CONFIGS, "quick": QUICK_CONFIGS, "full": GPU_CONFIGS}
    QUICK_HELP = "only k=16, r=16, 4096x4096 (both masters)"
    SMOKE_WHAT = "k=3, r=4, 48x40"
    SMOKE = "k=3, r=4, W 48x40, wall-clock timing, lorafast-triton under the Triton interpreter."
    ROOFLINE_GEMMS = ("bf16", "fp32")
    CELLS = ("time", "roofline_fraction")

    def needs(self):
        def triton():
            return ("triton" in lorafast.available_backends(), "lorafast.available_backends() has no 'triton'")
        return [common.Needs("THE TRITON BACKEND", (OURS,), triton, "no Triton rows, no ratios against it, no targets")]

    def ratios(self):
        return [Ratio("naive", OURS, target=TARGET_NAIVE_SPEEDUP, at_most=False, at=TARGET_CONFIG),
                Ratio("torch_stacked", OURS),
                Ratio(OURS, None, "roofline_fraction", TARGET_ROOFLINE_FRACTION, at_most=False, at=TARGET_CONFIG)]

    def fails_run(self, provider, check):
        return check or provider != "naive"  # naive is not lorafast's code

    def inputs(self, cfg):
        inp = make_inputs(cfg, self.device)
        return (inp, *invariant_sides(inp))

    def build(self, provider, cfg, inputs, modes):
        return common.Case(provider, merge_fn(provider))  # fn: merge(weight, client_A, client_B, p, scaling, comp)

    def check(self, case, cfg, inputs):
        """W_new + s·B̄Ā against Σ pᵢ(W_old + s·BᵢAᵢ), on a fresh copy of the state."""
        inp, want, mean_term = inputs
        weight, comp = inp.fresh_state()
        case.fn(weight, inp.client_A, inp.client_B, inp.p, SCALING, comp)
        return common.check_close(effective_weight(weight, comp).add_(mean_term), want, MAX_REL_ERR)

    def timed(self, case, mode, inputs):
        inp = inputs[0]
        weight, comp = inp.fresh_state()  # each timed merge starts from what the previous one left
        return lambda: case.fn(weight, inp.client_A, inp.client_B, inp.p, SCALING, comp)

    def roofline_ms(self, cfg, mode):
        return roofline_ms(cfg, self.rl)[0]

    def x_columns(self, cfg):
        return {"roofline ms": "{:.4f} ({})".format(*roofline_ms(cfg, self.rl))}

    def info(self, cfg, inputs):
        return {"bytes_moved": cfg.bytes_moved(), "flops": cfg.flops()}


SUITE = FedexMergeSuite
main = SUITE.main  # the entry point, main(argv=None) -> int, as lorafast/cli.py calls it


if __name__ == "__main__":
    sys.exit(main())
