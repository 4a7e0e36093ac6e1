"""Times the FedEx-LoRA server merge, W += s·(Σ pᵢ BᵢAᵢ − B̄Ā), against its baselines.

The merge folds the part of the clients' average that averaging the factors loses into
the frozen weight W (out, in), in place. Configs: k = 4, 16, 64 clients, r = 16 and 64,
W of 4096×4096 and 4096×14336 (out×in), with (a) an fp32 master weight and (b) a bf16
weight plus an fp32 Kahan compensation (carry), both updated in place. Client factors
are fp32: Aᵢ (r, in), Bᵢ (out, r), with unequal weights pᵢ (Σ pᵢ = 1). Providers:

  naive            k dense products BᵢAᵢ accumulated into an fp32 (out, in) temporary,
                   minus B̄Ā, then added into W (lorafast.reference.fedex_residual, then an
                   add; with a compensation the add is Kahan-compensated in torch ops)
  torch_stacked    lorafast.federated.aggregate(..., backend="torch"): one GEMM over the
                   centred factors stacked to K = k·r, added into W
  lorafast-triton  aggregate(..., backend="triton"): the fused merge kernel, which reads W
                   (and the compensation) once, loops over the K stacked factors per tile
                   and writes W once
  lorafast-cuda    aggregate(..., backend="cuda"): the fused merge as a CUDA C++ kernel
                   (csrc/); GPU only, not in the CPU smoke mode's default

Metrics per (provider, config), x_name `config`, e.g. `k=16,r=16,shape=4096x4096,master=fp32`
(`master=bf16+comp` for (b)):

  time               ms per merge: CUDA events through triton.testing.do_bench (p50/p20/p80)
  roofline_fraction  roofline time / measured time (1 = at this machine's ceiling), where
                     roofline time = max(bytes / copy bandwidth, flops / GEMM rate),
                       bytes = W read + written (+ compensation read + written, fp32)
                               + the factors, k·r·(out+in)·4 (fp32, read once)
                       flops = 2·out·in·K, K = k·r (the stacked GEMM; forming B̄, Ā and the
                               centring are O(K·(out+in)) and not counted)
                     with common.roofline's copy bandwidth and bf16 GEMM rate, measured in
                     the same run: the machine's ceilings, so the fraction is a lower bound.
                     The merge keeps fp32 accuracy (the Triton kernel runs 3xTF32 on the
                     fp32 factors unless torch allows TF32), which cannot run at the bf16
                     rate: where flops decide (large K) the fraction reads low. The fp32 torch.mm rate is measured too and written as a
                     roofline row (dtype=fp32) for reading those configs.

Every timed call starts from the weight the previous call left: the merge is in place,
and re-copying W inside the timed function would add a copy as large as the merge itself.
W drifts by one residual per call, which changes no cost (no data-dependent work). The
correctness check runs first, on a fresh copy per provider: the float64 invariant

    W_new + s·B̄Ā == Σ pᵢ (W_old + s·BᵢAᵢ)   (relative error ≤ 1e-5)

with W = weight.float() + compensation for the bf16 master. A provider that fails it is
not timed on that config and the run exits 1.

    python bench/bench_federated.py [--quick] [--out PATH] [--device cuda|cpu] [--providers ...]

--quick runs k=16, r=16, 4096×4096 only (both masters). Without a GPU only `--device cpu`
runs anything: k=3, r=4, W 48×40, both masters, timed with a wall clock, lorafast-triton
under the Triton interpreter, so that the script itself can be tested.

Exit status: 0 when every requested provider ran or was skipped (Triton backend missing,
CUDA backend unusable here (lorafast._backend.cuda_status(), or --device cpu), out of
memory, naive raising); 1 when a check fails or torch_stacked or a lorafast provider
raises.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast import reference
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402

KERNEL = "fedex_merge"
MODE = "merge"
X_NAME = "config"
ALL_PROVIDERS = ("naive", "torch_stacked", "lorafast-triton", "lorafast-cuda")
OURS = "lorafast-triton"
CUDA_PROVIDER = "lorafast-cuda"  # backend="cuda": GPU only
MAX_REL_ERR = 1e-5
SCALING = 2.0    # lora_alpha = 2r
DELTA = 0.05     # ‖s·BᵢAᵢ‖ ≈ DELTA·‖W‖: a client's adapter is a few percent of the weight
DRIFT = 0.3      # each client's factors = shared global factors + DRIFT × an independent draw

# Targets at TARGET_CONFIG: lorafast-triton's roofline fraction, and its speed-up over naive.
TARGET_CONFIG = "k=16,r=16,shape=4096x4096,master=fp32"
TARGET_ROOFLINE_FRACTION = 0.67  # within 1.5× of the roofline
TARGET_NAIVE_SPEEDUP = 10.0


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


class CheckFailed(RuntimeError):
    """A provider's merge broke the FedEx invariant."""


# ------------------------------------------------------------------ providers


def triton_status() -> tuple[bool, str]:
    """(usable, why not) for the Triton merge."""
    if "triton" not in lorafast.available_backends():
        return False, "lorafast.available_backends() has no 'triton'"
    return True, "ok"


def resolve_providers(requested: Optional[list[str]], device: torch.device) -> list[str]:
    """The requested providers that can run here, the others dropped loudly; the CPU default
    leaves out the CUDA provider."""
    wanted = list(dict.fromkeys(requested or common.default_providers(ALL_PROVIDERS, CUDA_PROVIDER, device)))
    if OURS in wanted:
        ok, why = triton_status()
        if not ok:
            common.banner(f"THE TRITON BACKEND IS NOT AVAILABLE ({why}).\nProvider `{OURS}` is skipped: "
                          "no Triton rows, no ratios against it, no targets.")
            wanted.remove(OURS)
    wanted = common.drop_unusable_cuda(wanted, CUDA_PROVIDER, device, "no CUDA rows")
    return wanted


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
    if provider == "naive":
        return naive_merge
    from lorafast.federated import aggregate
    backend = {"torch_stacked": "torch", OURS: "triton", CUDA_PROVIDER: "cuda"}[provider]

    def merge(weight, client_A, client_B, p, scaling, compensation):
        aggregate(weight, client_A, client_B, method="fedex", client_weights=p, scaling=scaling,
                  compensation=compensation, backend=backend)
    return merge


# ------------------------------------------------------------------ inputs and check


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
    """Clients that start from shared global factors and drift apart, with unequal weights.

    A bf16 master starts as the rounding of an fp32 weight, its compensation holding
    what the rounding lost, so that the carry is non-zero and must be read."""
    torch.manual_seed(0)
    k, r, o, i = cfg.k, cfg.r, cfg.out_f, cfg.in_f
    w32 = torch.randn(o, i, device=device) / math.sqrt(i)  # rows of norm ≈ 1
    b_std = DELTA / (SCALING * math.sqrt(r))  # ‖s·BA‖_F ≈ s·√r·b_std·‖W‖_F
    a0 = torch.randn(r, i, device=device) / math.sqrt(i)
    b0 = torch.randn(o, r, device=device) * b_std
    client_A = [a0 + DRIFT * torch.randn(r, i, device=device) / math.sqrt(i) for _ in range(k)]
    client_B = [b0 + DRIFT * torch.randn(o, r, device=device) * b_std for _ in range(k)]
    sizes = torch.randint(1, 100, (k,), generator=torch.Generator().manual_seed(1)).double()
    p = (sizes / sizes.sum()).tolist()
    if cfg.compensated:
        weight = w32.to(cfg.weight_dtype)
        compensation = w32 - weight.float()
    else:
        weight, compensation = w32, None
    return Inputs(cfg, weight, compensation, client_A, client_B, p)


def effective_weight(weight: Tensor, compensation: Optional[Tensor]) -> Tensor:
    """The value the state stands for, in float64."""
    w = weight.double()
    return w if compensation is None else w + compensation.double()


def invariant_sides(inp: Inputs) -> tuple[Tensor, Tensor]:
    """float64 (Σ pᵢ(W_old + s·BᵢAᵢ), s·B̄Ā). Σ pᵢ BᵢAᵢ is one GEMM over [p₁B₁ … p_kB_k] and
    [A₁; …; A_k], independent of the centred form the providers use."""
    s = SCALING
    p = torch.tensor(inp.p, dtype=torch.float64, device=inp.weight.device)
    a = torch.stack(inp.client_A).double()  # (k, r, in)
    b = torch.stack(inp.client_B).double()  # (k, out, r)
    b_cat = (b * p[:, None, None]).permute(1, 0, 2).reshape(inp.cfg.out_f, -1)  # (out, k·r)
    a_cat = a.reshape(-1, inp.cfg.in_f)                                            # (k·r, in)
    want = effective_weight(inp.weight, inp.compensation).add_(b_cat @ a_cat, alpha=s)
    a_bar = torch.einsum("k,kri->ri", p, a)
    b_bar = torch.einsum("k,kor->or", p, b)
    return want, (b_bar @ a_bar).mul_(s)


def check(provider: str, merge: Callable[..., None], inp: Inputs, want: Tensor, mean_term: Tensor) -> float:
    """Relative error of W_new + s·B̄Ā against Σ pᵢ(W_old + s·BᵢAᵢ); raises CheckFailed above MAX_REL_ERR."""
    weight, comp = inp.fresh_state()
    merge(weight, inp.client_A, inp.client_B, inp.p, SCALING, comp)
    got = effective_weight(weight, comp).add_(mean_term)
    err = rel_err(got, want)
    if not err <= MAX_REL_ERR:  # also catches NaN
        raise CheckFailed(f"rel. error {err:.3g} > {MAX_REL_ERR:g}")
    return err


# ------------------------------------------------------------------ measuring


def fp32_gemm_rate(device: torch.device) -> dict:
    """TFLOP/s of an fp32 torch.mm under torch's TF32 switch, as common.roofline reports bf16
    (context for the compute-bound configs; not used in roofline_fraction)."""
    n = 8192 if device.type == "cuda" else 128
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    q = common.bench(lambda: torch.mm(a, b), device)
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return {"unit": "TFLOP/s", "x_value": f"M={n},N={n},K={n},dtype=fp32" + (",tf32=on" if tf32 else ""),
            "q": [2.0 * n ** 3 / (t * 1e-3) / 1e12 for t in (q[0], q[2], q[1])]}


def roofline_ms(cfg: Config, rl: dict) -> float:
    """max(bytes / copy bandwidth, flops / bf16 GEMM rate), in ms, from the p50 rates."""
    bw = rl["bandwidth"]["q"][0] * 1e9
    rate = rl["tflops"]["q"][0] * 1e12
    return max(cfg.bytes_moved() / bw, cfg.flops() / rate) * 1e3


def bound(cfg: Config, rl: dict) -> str:
    """Which ceiling decides the roofline time: "memory" or "compute"."""
    bw, rate = rl["bandwidth"]["q"][0] * 1e9, rl["tflops"]["q"][0] * 1e12
    return "memory" if cfg.bytes_moved() / bw >= cfg.flops() / rate else "compute"


def run_config(cfg: Config, providers: list[str], device: torch.device, env: dict, rl: dict,
               p50s: dict) -> tuple[list[dict], list[str]]:
    """Check, then time, every provider on ``cfg``; returns CSV rows and what failed."""
    rows, failed = [], []
    try:
        inp = make_inputs(cfg, device)
        want, mean_term = invariant_sides(inp)
    except torch.cuda.OutOfMemoryError as e:
        common.banner(f"OUT OF MEMORY building {cfg.label}: no rows.\n{str(e).splitlines()[0]}")
        common.free(device)
        return [], []
    roof = roofline_ms(cfg, rl)
    entry = {"roofline_ms": roof, "bound": bound(cfg, rl), "by": {}}
    for provider in providers:
        weight = comp = None
        try:
            merge = merge_fn(provider)
            err = check(provider, merge, inp, want, mean_term)
            weight, comp = inp.fresh_state()
            q = common.bench(lambda: merge(weight, inp.client_A, inp.client_B, inp.p, SCALING, comp), device)
        except torch.cuda.OutOfMemoryError as e:
            common.banner(f"OUT OF MEMORY: {provider} on {cfg.label}: no row written.\n{str(e).splitlines()[0]}")
            continue
        except CheckFailed as e:
            common.banner(f"CHECK FAILED: {provider} on {cfg.label}: {e}\nNot timed; the run exits 1.")
            failed.append(f"check of {provider} on {cfg.label}")
            continue
        except Exception as e:
            common.banner(f"SKIP {provider} on {cfg.label}: failed to run: {type(e).__name__}: {e}")
            if provider != "naive":  # lorafast's own code
                failed.append(f"{provider} on {cfg.label}")
            continue
        finally:
            weight = comp = None  # the timed copy, before the next provider's
            common.free(device)
        frac = [roof / t for t in (q[0], q[2], q[1])]  # a slow run is a low fraction
        rows.append(common.row(KERNEL, provider, MODE, "time", "ms", X_NAME, cfg.label, q, env))
        rows.append(common.row(KERNEL, provider, MODE, "roofline_fraction", "fraction", X_NAME, cfg.label,
                               frac, env))
        entry["by"][provider] = (q[0], frac[0])
        p50s[cfg.label] = entry
        common.log(f"{cfg.label:44s} {provider:16s} p50 {q[0]:.4f} ms, roofline {roof:.4f} ms "
                   f"({frac[0]:.2f} of it), check rel. err {err:.2e}")
    inp = want = mean_term = None
    common.free(device)
    return rows, failed


# ------------------------------------------------------------------ report


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _verdict(value: Optional[float], target: float, unit: str = "x") -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}{unit} ({'met' if value >= target else 'MISSED'}: >= {target}{unit})"


def print_table(p50s: dict, providers: list[str], cpu: bool) -> None:
    """p50 per provider, lorafast-triton's speed-up over each baseline, roofline fractions; then the targets."""
    head = (["config", "roofline ms"] + [f"{p} ms" for p in providers]
            + [f"naive/{OURS}", f"torch_stacked/{OURS}"] + [f"{p} roofline" for p in providers])
    lines = []
    for label, entry in p50s.items():
        by = entry["by"]
        t = {p: by[p][0] for p in by}
        ours = t.get(OURS)
        lines.append([label, f"{entry['roofline_ms']:.4f} ({entry['bound']})"]
                     + [f"{t[p]:.4f}" if p in t else "-" for p in providers]
                     + [f"{r:.3g}x" if r else "-" for r in (_ratio(t.get("naive"), ours),
                                                             _ratio(t.get("torch_stacked"), ours))]
                     + [f"{by[p][1]:.2f}" if p in by else "-" for p in providers])
    print("\n" + common.format_rows(head, lines))

    by = p50s.get(TARGET_CONFIG, {}).get("by", {})
    ours = by.get(OURS)
    print(f"\ntargets at {TARGET_CONFIG}:")
    print(f"  {OURS} roofline fraction: "
          + _verdict(ours[1] if ours else None, TARGET_ROOFLINE_FRACTION, "")
          + " (within 1.5x of the roofline)")
    print(f"  naive / {OURS}: "
          + _verdict(_ratio(by.get("naive", (None,))[0], ours[0] if ours else None), TARGET_NAIVE_SPEEDUP))
    if cpu:
        print("(CPU smoke mode: these numbers say nothing about GPU performance; the target config is not run)")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return common.parse_cli(argv, __doc__, KERNEL, "only k=16, r=16, 4096x4096 (both masters)", ALL_PROVIDERS,
                            f"default: all of {' '.join(ALL_PROVIDERS)} (with --device cpu, all but {CUDA_PROVIDER})")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cpu = args.device == "cpu"
    device = common.open_device(args.device, "k=3, r=4, 48x40", "k=3, r=4, W 48x40, wall-clock timing, "
                                "lorafast-triton under the Triton interpreter.")
    if device is None:
        return 0
    configs = CPU_CONFIGS if cpu else QUICK_CONFIGS if args.quick else GPU_CONFIGS
    providers = resolve_providers(args.providers, device)
    env = common.env_info(device)
    common.log(f"device {env['gpu_name']} | torch {env['torch_version']} | triton {env['triton_version']} "
               f"| commit {env['commit']} | providers {' '.join(providers)}")

    rl = common.roofline(device)
    rl["tflops_fp32"] = fp32_gemm_rate(device)
    common.log(common.format_roofline(rl) + f", fp32 GEMM {rl['tflops_fp32']['q'][0]:,.4g} TFLOP/s (p50)")
    rows = common.roofline_rows(KERNEL, {k: rl[k] for k in ("bandwidth", "tflops")}, env)
    rows.append(common.row(KERNEL, "roofline", "-", "tflops", "TFLOP/s", "shape", rl["tflops_fp32"]["x_value"],
                           rl["tflops_fp32"]["q"], env))
    p50s: dict = {}
    failed: list[str] = []
    for cfg in common.progress(configs, desc=KERNEL):
        new, bad = run_config(cfg, providers, device, env, rl, p50s)
        rows += new
        failed += bad

    out = common.write_csv(args.out or common.default_out(KERNEL, device), rows)
    print_table(p50s, providers, cpu)
    print(common.format_roofline(rl) + f", fp32 GEMM {rl['tflops_fp32']['q'][0]:,.4g} TFLOP/s (p50)")
    print(f"wrote {len(rows)} rows to {out}")
    if failed:
        common.banner("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
