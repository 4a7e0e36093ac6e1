"""Times one LoRA linear layer, y = x Wᵀ + s·x Aᵀ Bᵀ, against its baselines.

Modes: forward (with autograd recording, as in training), backward (grads of x, A
and B from a forward done once outside the timed region) and full (both). Providers:

  frozen_linear    a frozen nn.Linear with x requiring grad: the floor
  peft             PEFT's lora.Linear around that nn.Linear, fp32 adapters over a bf16 base
  eager_chain      the same forward as plain torch ops; stands in for peft when PEFT is absent
  torch_compile    torch.compile of lorafast.reference.lora_linear
  lorafast-hybrid  lorafast.lora_linear(..., backend="hybrid"): the default on a GPU without a
                   measured table; base GEMMs on cuBLAS, rank-r passes in the Triton kernels
  lorafast-triton  lorafast.lora_linear(..., backend="triton"): fully fused (Triton GEMMs)
  lorafast-cuda    lorafast.lora_linear(..., backend="cuda") (csrc/ kernels + cuBLAS GEMMs)
  lorafast-torch   lorafast.lora_linear(..., backend="torch") (the CPU smoke mode's default)

Each timed row has a twin with metric roofline_fraction: the least time the machine allows
(roofline_ms: bytes over the copy bandwidth or flops over the bf16 GEMM rate, both measured
in the same run) over the measured time.

On a GPU, each shape's forward+backward medians of the lorafast kernel backends timed
(hybrid, triton, cuda) are recorded in the backend table that automatic selection reads
(lorafast/_selection.py; the user's table, or --table PATH, e.g. lorafast/tuning/<gpu>.json
to ship it). --quick runs the headline shapes only: in=out=4096, r=16, N=2048 and 8192.

    python bench/bench_lora_linear.py [--quick] [--out PATH] [--providers ...] [--device cuda|cpu]

Without a GPU only `--device cpu` runs anything: one tiny shape timed with a wall
clock, so that the script itself can be tested.
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast import reference
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402

KERNEL = "lora_linear"
MODES = ("forward", "backward", "full")
ALL_PROVIDERS = ("frozen_linear", "peft", "eager_chain", "torch_compile", "lorafast-hybrid", "lorafast-triton",
                 "lorafast-cuda", "lorafast-torch")
GPU_PROVIDERS = ("frozen_linear", "peft", "torch_compile", "lorafast-hybrid", "lorafast-triton", "lorafast-cuda")
KERNEL_BACKENDS = ("hybrid", "triton", "cuda")   # the choices automatic selection weighs
CPU_PROVIDERS = ("frozen_linear", "peft", "lorafast-torch")
MAX_REL_ERR = 2e-2
ACT_DTYPE = torch.bfloat16
ADAPTER_DTYPE = torch.float32


@dataclass(frozen=True)
class Shape:
    in_f: int
    out_f: int
    r: int
    n: int

    @property
    def label(self) -> str:
        return f"in={self.in_f},out={self.out_f},r={self.r},N={self.n}"


FULL_SHAPES = [Shape(i, o, r, n) for i, o in ((4096, 4096), (4096, 14336)) for r in (16, 64)
               for n in (512, 2048, 8192)]
QUICK_SHAPES = [Shape(4096, 4096, 16, 2048), Shape(4096, 4096, 16, 8192)]
CPU_SHAPES = [Shape(64, 96, 4, 32)]


@dataclass
class Inputs:
    shape: Shape
    x: Tensor        # (N, in) bf16, requires grad
    weight: Tensor   # (out, in) bf16, frozen
    lora_A: Tensor   # (r, in) fp32, trainable
    lora_B: Tensor   # (out, r) fp32, trainable
    grad_y: Tensor   # (N, out) bf16
    base: nn.Linear  # frozen nn.Linear over ``weight``
    alpha: float
    scaling: float


@dataclass
class Case:
    """One provider on one shape."""
    provider: str
    fn: Callable[[], Tensor]  # one forward, recording autograd
    grads: list               # leaves that receive gradients; reset to None between timed runs
    lora: bool = True         # False: the output is x Wᵀ alone (frozen_linear)


# ------------------------------------------------------------------ inputs


def make_inputs(shape: Shape, device: torch.device) -> Inputs:
    """Random x, W, A and B scaled so that base and adapter terms are both O(1).

    B is random rather than PEFT's zero init: a zero B would make the adapter term
    vanish from the accuracy check and could let a kernel take shortcuts."""
    torch.manual_seed(0)
    n, i, o, r = shape.n, shape.in_f, shape.out_f, shape.r
    x = torch.randn(n, i, device=device, dtype=ACT_DTYPE).requires_grad_()
    weight = (torch.randn(o, i, device=device) / math.sqrt(i)).to(ACT_DTYPE)
    lora_A = (torch.randn(r, i, device=device, dtype=ADAPTER_DTYPE) / math.sqrt(i)).requires_grad_()
    lora_B = (torch.randn(o, r, device=device, dtype=ADAPTER_DTYPE) / math.sqrt(r)).requires_grad_()
    grad_y = torch.randn(n, o, device=device, dtype=ACT_DTYPE)
    base = nn.utils.skip_init(nn.Linear, i, o, bias=False, device=device, dtype=ACT_DTYPE)
    base.weight = nn.Parameter(weight, requires_grad=False)
    alpha = float(r)  # lora_alpha = r, so scaling = 1
    return Inputs(shape, x, weight, lora_A, lora_B, grad_y, base, alpha, alpha / r)


def references(inp: Inputs) -> dict[bool, Tensor]:
    """float64 ground truth: {True: the LoRA output, False: x Wᵀ alone}."""
    x, w = inp.x.detach().double(), inp.weight.double()
    a, b = inp.lora_A.detach().double(), inp.lora_B.detach().double()
    return {True: reference.lora_linear(x, w, a, b, scaling=inp.scaling), False: x @ w.T}


# ------------------------------------------------------------------ providers


def peft_status() -> tuple[bool, str]:
    """(usable, version or why not)."""
    try:
        import peft
        import peft.tuners.lora  # noqa: F401  (what peft_layer needs)
    except Exception as e:  # a broken install raises more than ImportError
        return False, f"{type(e).__name__}: {e}"
    return True, peft.__version__


def peft_layer(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    """PEFT's lora.Linear around ``base``, across PEFT versions' constructors."""
    from peft.tuners.lora import Linear, LoraConfig
    kwargs = {"r": r, "lora_alpha": alpha}
    if "config" in inspect.signature(Linear.__init__).parameters:  # recent PEFT reads options from a LoraConfig
        kwargs["config"] = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    else:
        kwargs["lora_dropout"] = 0.0
    return Linear(base, "default", **kwargs)


def build_peft(inp: Inputs) -> Case:
    layer = peft_layer(inp.base, inp.shape.r, inp.alpha)
    # The layer alone casts its adapters to the base's bf16; a PeftModel's default
    # autocast_adapter_dtype=True keeps them in fp32, which is what this loads.
    A = nn.Parameter(inp.lora_A.detach().clone())
    B = nn.Parameter(inp.lora_B.detach().clone())
    layer.lora_A["default"].weight = A
    layer.lora_B["default"].weight = B
    if layer.scaling["default"] != inp.scaling:
        raise RuntimeError(f"PEFT scaling {layer.scaling['default']} != {inp.scaling}")
    return Case("peft", lambda: layer(inp.x), [inp.x, A, B])


def eager_chain(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """PEFT's vanilla LoRA forward (no dropout) as plain torch ops: base in x's dtype,
    adapter on x cast to the adapters' dtype, sum cast back to x's dtype."""
    result = F.linear(x, weight)
    result = result + F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling
    return result.to(x.dtype)


def build_eager_chain(inp: Inputs) -> Case:
    return Case("eager_chain", lambda: eager_chain(inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling),
                [inp.x, inp.lora_A, inp.lora_B])


def build_frozen(inp: Inputs) -> Case:
    return Case("frozen_linear", lambda: inp.base(inp.x), [inp.x], lora=False)


def build_compile(inp: Inputs) -> Case:
    # A fresh, shape-specialised compile per shape: one cache across all shapes would
    # go dynamic after the second and hit the recompile limit after the eighth.
    torch._dynamo.reset()
    fn = torch.compile(reference.lora_linear, dynamic=False)
    return Case("torch_compile", lambda: fn(inp.x, inp.weight, inp.lora_A, inp.lora_B, scaling=inp.scaling),
                [inp.x, inp.lora_A, inp.lora_B])


def build_lorafast(backend: str) -> Callable[[Inputs], Case]:
    def build(inp: Inputs) -> Case:
        return Case(f"lorafast-{backend}",
                    lambda: lorafast.lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B,
                                                 scaling=inp.scaling, backend=backend),
                    [inp.x, inp.lora_A, inp.lora_B])
    return build


BUILDERS = {"frozen_linear": build_frozen, "peft": build_peft, "eager_chain": build_eager_chain,
            "torch_compile": build_compile, "lorafast-hybrid": build_lorafast("hybrid"),
            "lorafast-triton": build_lorafast("triton"),
            "lorafast-cuda": build_lorafast("cuda"), "lorafast-torch": build_lorafast("torch")}


def resolve_providers(requested: Optional[list[str]], cpu: bool) -> list[str]:
    """The providers to run, with `peft` replaced by `eager_chain` (loudly) when PEFT is absent."""
    wanted = list(requested or (CPU_PROVIDERS if cpu else GPU_PROVIDERS))
    if "peft" in wanted:
        ok, info = peft_status()
        if ok:
            common.banner(f"PEFT baseline: real PEFT {info} (peft.tuners.lora.Linear), provider `peft`")
        else:
            common.banner(f"PEFT IS NOT AVAILABLE ({info}).\nBaseline is `eager_chain`: plain torch ops "
                          "mirroring PEFT's LoRA forward. No row is labelled `peft`.")
            wanted = ["eager_chain" if p == "peft" else p for p in wanted]
    return list(dict.fromkeys(wanted))  # drop duplicates, keep order


# ------------------------------------------------------------------ one shape


def check(case: Case, refs: dict[bool, Tensor]) -> float:
    y = case.fn()  # with autograd on: the path that is timed (torch.compile traces it separately)
    return rel_err(y, refs[case.lora])


def mode_fn(case: Case, mode: str, grad_y: Tensor) -> Callable[[], object]:
    """What one timed run of ``mode`` does (the pytest-benchmark suites time the same callable)."""
    if mode == "forward":
        return case.fn
    if mode == "backward":
        y = case.fn()  # forward once, untimed; retain_graph keeps its graph for every run
        return lambda: y.backward(grad_y, retain_graph=True)
    return lambda: case.fn().backward(grad_y)


def time_mode(case: Case, mode: str, grad_y: Tensor, device: torch.device) -> list[float]:
    return common.bench(mode_fn(case, mode, grad_y), device, case.grads)


def ready_cases(inp: Inputs, providers: list[str]) -> list[Case]:
    """Build each provider and keep those whose output matches float64; skip the rest loudly."""
    refs = references(inp)
    cases = []
    for name in providers:
        try:
            case = BUILDERS[name](inp)
            err = check(case, refs)
        except Exception as e:
            common.banner(f"SKIP {name} on {inp.shape.label}: failed to run: {type(e).__name__}: {e}")
            continue
        if not err <= MAX_REL_ERR:  # also catches NaN
            common.banner(f"SKIP {name} on {inp.shape.label}: rel. error {err:.3g} > {MAX_REL_ERR}")
            continue
        cases.append(case)
    return cases


def roofline_ms(shape: Shape, mode: str, rl: dict) -> float:
    """The least time the machine allows, max(bytes / copy bandwidth, flops / bf16 GEMM rate), ms.
    With E = 2 bytes (bf16) and n tokens:
      forward   flops 2n·in·out + 2n·r(in+out)       bytes E(n·in + in·out + n·out)   (x, W, y)
      backward  flops 2n·in·out + 4n·r(in+out)       bytes E(n·out + in·out + 2n·in)  (dY, W, x, dx)
    (dx = dY W is the only large GEMM: W is frozen); full is their sum. The adapters (r·(in+out))
    are not counted."""
    n, i, o, r = shape.n, shape.in_f, shape.out_f, shape.r
    e = 2
    cost = {"forward": (2 * n * i * o + 2 * n * r * (i + o), e * (n * i + i * o + n * o)),
            "backward": (2 * n * i * o + 4 * n * r * (i + o), e * (n * o + i * o + 2 * n * i))}
    cost["full"] = tuple(a + b for a, b in zip(cost["forward"], cost["backward"]))
    flops, nbytes = cost[mode]
    return 1e3 * max(nbytes / (rl["bandwidth"]["q"][0] * 1e9), flops / (rl["tflops"]["q"][0] * 1e12))


def run_shape(shape: Shape, providers: list[str], device: torch.device, env: dict,
              p50s: dict, rl: dict) -> list[dict]:
    """Time every provider on ``shape``; returns CSV rows (time, and roofline_fraction = roofline
    time / measured time) and fills p50s[(label, mode)][provider]."""
    inp = make_inputs(shape, device)
    rows = []
    for case in ready_cases(inp, providers):
        done = []
        try:
            for mode in MODES:
                q = time_mode(case, mode, inp.grad_y, device)
                rows.append(common.row(KERNEL, case.provider, mode, "time", "ms", "shape", shape.label, q, env))
                roof = roofline_ms(shape, mode, rl)
                rows.append(common.row(KERNEL, case.provider, mode, "roofline_fraction", "fraction", "shape",
                                       shape.label, [roof / t for t in (q[0], q[2], q[1])], env))
                p50s.setdefault((shape.label, mode), {})[case.provider] = q[0]
                done.append(f"{mode} {q[0]:.4f}")
        except Exception as e:
            common.banner(f"SKIP {case.provider} on {shape.label}: timing failed: {type(e).__name__}: {e}")
        for t in case.grads:
            t.grad = None
        common.log(f"{shape.label:34s} {case.provider:16s} p50 ms: " + ", ".join(done))
    return rows


# ------------------------------------------------------------------ report


def print_table(p50s: dict, providers: list[str]) -> None:
    """p50 per provider with its ratio to frozen_linear, and lorafast's speed-up over the PEFT baseline."""
    baseline = next((p for p in ("peft", "eager_chain") if p in providers), None)
    ours = next((p for p in providers if p.startswith("lorafast-")), None)
    speedup = f"{ours} vs {baseline}" if baseline and ours else None
    head = ["shape", "mode"] + [f"{p} ms (x frozen)" for p in providers] + ([speedup] if speedup else [])
    lines = []
    for (label, mode), by in p50s.items():
        floor = by.get("frozen_linear")
        cells = [label, mode]
        for p in providers:
            t = by.get(p)
            cells.append("-" if t is None else f"{t:.4f} ({t / floor:.2f}x)" if floor else f"{t:.4f}")
        if speedup:
            b, o = by.get(baseline), by.get(ours)
            cells.append(f"{b / o:.2f}x" if b and o else "-")
        lines.append(cells)
    print("\n" + common.format_rows(head, lines))
    for (label, mode), by in p50s.items():
        if mode == "full":
            for line in targets(by):
                print(f"{label}: {line}")


# (provider, what it is compared with, the most it may take relative to that)
TARGETS = (("lorafast-hybrid", "frozen_linear", 1.10), ("lorafast-hybrid", "peft", 1.0),
           ("lorafast-triton", "frozen_linear", 1.05))


def targets(by: dict) -> list[str]:
    """The forward+backward targets this shape's medians meet or miss."""
    out = []
    for ours, base, most in TARGETS:
        if ours in by and base in by:
            ratio = by[ours] / by[base]
            out.append(f"{ours} / {base} = {ratio:.3f} (target <= {most:.2f}): {'met' if ratio <= most else 'MISSED'}")
    return out


def record_backends(p50s: dict, gpu: str, table: Optional[Path]) -> None:
    """Each shape's forward+backward medians of the kernel backends timed (at least two) into
    the automatic-selection table."""
    from lorafast import _selection
    path = None
    for (label, mode), by in p50s.items():
        ms = {b: by[f"lorafast-{b}"] for b in KERNEL_BACKENDS if f"lorafast-{b}" in by}
        if mode != "full" or len(ms) < 2:
            continue
        shape = next(s for s in FULL_SHAPES + QUICK_SHAPES if s.label == label)
        path = _selection.record(gpu, "lora_linear", str(ACT_DTYPE).removeprefix("torch."),
                                 (shape.n, shape.in_f, shape.out_f, shape.r), ms, table)
        times = ", ".join(f"{b} {t:.4f} ms" for b, t in ms.items())
        common.log(f"{label:34s} fastest backend: {min(ms, key=ms.get)} ({times})")
    if path is not None:
        print(f"recorded the backend choice per shape in {path}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return common.parse_cli(argv, __doc__, KERNEL, "only in=out=4096, r=16, N=2048 and 8192", ALL_PROVIDERS,
                            f"default {' '.join(GPU_PROVIDERS)} (on cpu: {' '.join(CPU_PROVIDERS)})", table=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cpu = args.device == "cpu"
    device = common.open_device(args.device, "tiny shape", "one tiny shape, wall-clock timing.", one_thread=False)
    if device is None:
        return 0
    shapes = CPU_SHAPES if cpu else QUICK_SHAPES if args.quick else FULL_SHAPES
    providers = resolve_providers(args.providers, cpu)
    env = common.env_info(device)
    common.log(f"device {env['gpu_name']} | torch {env['torch_version']} | triton {env['triton_version']} "
               f"| commit {env['commit']} | providers {' '.join(providers)}")

    rl = common.roofline(device)
    common.log(common.format_roofline(rl))
    rows = common.roofline_rows(KERNEL, rl, env)
    p50s: dict = {}
    for shape in common.progress(shapes, desc=KERNEL):
        rows += run_shape(shape, providers, device, env, p50s, rl)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    out = common.write_csv(args.out or common.default_out(KERNEL, device), rows)
    print_table(p50s, providers)
    if device.type == "cuda":
        record_backends(p50s, env["gpu_name"], args.table)
    print(common.format_roofline(rl))
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
