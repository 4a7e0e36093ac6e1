"""Times one LoRA linear layer, y = x Wᵀ + s·x Aᵀ Bᵀ, against its baselines.

Modes: forward (autograd recording, as in training), backward (grads of x, A and B from a
forward done once, untimed) and full (both). Providers:

  frozen_linear    a frozen nn.Linear with x requiring grad: the floor
  peft             PEFT's lora.Linear around that nn.Linear, fp32 adapters over a bf16 base
  eager_chain      the same forward as plain torch ops; stands in for peft when PEFT is absent
  torch_compile    torch.compile of lorafast.reference.lora_linear
  lorafast-hybrid  lorafast.lora_linear(..., backend="hybrid"): base GEMMs on cuBLAS, rank-r
                   passes in Triton (the GPU default without a measured table)
  lorafast-triton  backend="triton": fully fused (Triton GEMMs)
  lorafast-cuda    backend="cuda" (csrc/ kernels + cuBLAS GEMMs)
  lorafast-torch   backend="torch" (the CPU smoke mode's default)

Outputs are checked against float64 first; each time row has a roofline_fraction twin. On a
GPU each shape's forward+backward medians of the kernel backends go into the backend table of
automatic selection (lorafast/_selection.py; the user's, or --table PATH). --quick: in=out=4096,
r=16, N=2048 and 8192; `--device cpu`: one tiny shape, wall-clock timing.

    python bench/bench_lora_linear.py [--quick] [--out PATH] [--providers ...] [--device cuda|cpu] [--table PATH]
"""
from __future__ import annotations

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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402
from common import Case, Ratio  # noqa: E402

MAX_REL_ERR, ACT_DTYPE, ADAPTER_DTYPE = 2e-2, torch.bfloat16, torch.float32
# forward+backward targets: (provider, what it is compared with, the most it may take relative to that)
TARGETS = (("lorafast-hybrid", "frozen_linear", 1.10), ("lorafast-hybrid", "peft", 1.0),
           ("lorafast-triton", "frozen_linear", 1.05))


Shape = common.LayerShape


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
    refs: Optional[dict] = None  # float64 ground truth: {True: the LoRA output, False: x Wᵀ alone}


def make_inputs(shape: Shape, device: torch.device) -> Inputs:
    """Random x, W, A and B scaled so that base and adapter terms are both O(1), and their float64
    outputs. B is random rather than PEFT's zero init: a zero B would make the adapter term
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
    inp = Inputs(shape, x, weight, lora_A, lora_B, grad_y, base, alpha, alpha / r)
    x64, w64, a64, b64 = (t.detach().double() for t in (x, weight, lora_A, lora_B))
    inp.refs = {True: reference.lora_linear(x64, w64, a64, b64, scaling=inp.scaling), False: x64 @ w64.T}
    return inp


# ------------------------------------------------------------------ providers: Case.state is True for a LoRA output


def build_peft(inp: Inputs) -> Case:
    """PEFT's lora.Linear around the frozen nn.Linear, across PEFT versions' constructors."""
    from peft.tuners.lora import Linear, LoraConfig
    r, alpha = inp.shape.r, inp.alpha
    kwargs = {"r": r, "lora_alpha": alpha}
    if "config" in inspect.signature(Linear.__init__).parameters:  # recent PEFT reads options from a LoraConfig
        kwargs["config"] = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    else:
        kwargs["lora_dropout"] = 0.0
    layer = Linear(inp.base, "default", **kwargs)
    # The layer alone casts its adapters to the base's bf16; a PeftModel's default
    # autocast_adapter_dtype=True keeps them in fp32, which is what this loads.
    A, B = nn.Parameter(inp.lora_A.detach().clone()), nn.Parameter(inp.lora_B.detach().clone())
    layer.lora_A["default"].weight, layer.lora_B["default"].weight = A, B
    if layer.scaling["default"] != inp.scaling:
        raise RuntimeError(f"PEFT scaling {layer.scaling['default']} != {inp.scaling}")
    return Case("peft", lambda: layer(inp.x), [inp.x, A, B], True)


def eager_chain(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """PEFT's vanilla LoRA forward (no dropout) as plain torch ops: base in x's dtype,
    adapter on x cast to the adapters' dtype, sum cast back to x's dtype."""
    result = F.linear(x, weight)
    result = result + F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling
    return result.to(x.dtype)


def build_compile(inp: Inputs) -> Case:
    # A fresh, shape-specialised compile per shape: one cache across all shapes would
    # go dynamic after the second and hit the recompile limit after the eighth.
    torch._dynamo.reset()
    fn = torch.compile(reference.lora_linear, dynamic=False)
    return Case("torch_compile", lambda: fn(inp.x, inp.weight, inp.lora_A, inp.lora_B, scaling=inp.scaling),
                [inp.x, inp.lora_A, inp.lora_B], True)


def build_lorafast(backend: str) -> Callable[[Inputs], Case]:
    return lambda inp: Case(f"lorafast-{backend}", lambda: lorafast.lora_linear(
        inp.x, inp.weight, inp.lora_A, inp.lora_B, scaling=inp.scaling, backend=backend),
        [inp.x, inp.lora_A, inp.lora_B], True)


BUILDERS = {"frozen_linear": lambda inp: Case("frozen_linear", lambda: inp.base(inp.x), [inp.x], False),
            "peft": build_peft,
            "eager_chain": lambda inp: Case("eager_chain", lambda: eager_chain(
                inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling), [inp.x, inp.lora_A, inp.lora_B], True),
            "torch_compile": build_compile,
            **{f"lorafast-{b}": build_lorafast(b) for b in ("hybrid", "triton", "cuda", "torch")}}


class LoraLinearSuite(common.Suite):
    KERNEL, MODES = "lora_linear", ("forward", "backward", "full")
    PROVIDERS = ("frozen_linear", "peft", "eager_chain", "torch_compile", "lorafast-hybrid", "lorafast-triton",
                 "lorafast-cuda", "lorafast-torch")
    GPU_PROVIDERS = ("frozen_linear", "peft", "torch_compile", "lorafast-hybrid", "lorafast-triton", "lorafast-cuda")
    CPU_PROVIDERS = ("frozen_linear", "peft", "lorafast-torch")
    CUDA_PROVIDER = "lorafast-cuda"
    SIZES = {"cpu": CPU_SHAPES, "quick": QUICK_SHAPES, "full": FULL_SHAPES}
    QUICK_HELP = "only in=out=4096, r=16, N=2048 and 8192"
    SMOKE_WHAT, SMOKE, ONE_THREAD = "tiny shape", "one tiny shape, wall-clock timing.", False
    ROOFLINE_GEMMS, BASELINE = ("bf16",), "frozen_linear"
    RECORD_OP, RECORD_BACKENDS = "lora_linear_fwd", ("hybrid", "triton", "cuda")  # the choices selection weighs

    def needs(self):
        return [common.Needs("PEFT", ("peft",), lambda: common.import_status("peft", "peft.tuners.lora"),
                             "plain torch ops mirroring PEFT's LoRA forward; no row is labelled `peft`",
                             "PEFT baseline: real {info} (peft.tuners.lora.Linear), provider `peft`", "eager_chain")]

    def ratios(self):
        base = next((p for p in ("peft", "eager_chain") if p in self.providers), None)
        ours = next((p for p in self.providers if p.startswith("lorafast-")), None)
        speedup = [Ratio(base, ours)] if base and ours else []
        return speedup + [Ratio(o, b, target=t, mode="full") for o, b, t in TARGETS]

    def inputs(self, shape):
        return make_inputs(shape, self.device)

    def build(self, provider, shape, inp, modes):
        return BUILDERS[provider](inp)

    def check(self, case, shape, inp):
        # with autograd on: the path that is timed (torch.compile traces it separately)
        return common.check_close(case.fn(), inp.refs[case.state], MAX_REL_ERR)

    def timed(self, case, mode, inp):
        if mode == "forward":
            return case.fn
        if mode == "backward":
            y = case.fn()  # forward once, untimed; retain_graph keeps its graph for every run
            return lambda: y.backward(inp.grad_y, retain_graph=True)
        return lambda: case.fn().backward(inp.grad_y)

    def roofline_ms(self, shape, mode):
        """max(bytes / copy bandwidth, flops / bf16 GEMM rate) in ms. With E = 2 bytes (bf16), n tokens:
        forward flops 2n·in·out + 2n·r(in+out), bytes E(n·in + in·out + n·out) (x, W, y); backward flops
        2n·in·out + 4n·r(in+out), bytes E(n·out + in·out + 2n·in) (dY, W, x, dx: dx = dY W is the only
        large GEMM, W is frozen); full is their sum. The adapters (r·(in+out)) are not counted."""
        n, i, o, r = shape.n, shape.in_f, shape.out_f, shape.r
        cost = {"forward": (2 * n * i * o + 2 * n * r * (i + o), 2 * (n * i + i * o + n * o)),
                "backward": (2 * n * i * o + 4 * n * r * (i + o), 2 * (n * o + i * o + 2 * n * i))}
        flops, nbytes = cost[mode] if mode in cost else [a + b for a, b in zip(*cost.values())]
        return 1e3 * max(nbytes / (self.rl["bandwidth"]["q"][0] * 1e9), flops / (self.rl["tflops"]["q"][0] * 1e12))

    def record_key(self, shape, mode):
        return (str(ACT_DTYPE).removeprefix("torch."), (shape.n, shape.in_f, shape.out_f, shape.r)) \
            if mode == "full" else None


SUITE = LoraLinearSuite
main = SUITE.main  # the entry point, main(argv=None) -> int, as lorafast/cli.py calls it


if __name__ == "__main__":
    sys.exit(main())
