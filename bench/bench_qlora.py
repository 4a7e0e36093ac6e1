"""Times one QLoRA linear layer's forward+backward: PEFT over bitsandbytes against lorafast.QLoRALinear.

The base: bitsandbytes.nn.Linear4bit, NF4 with double quantisation (blocks of 64), bf16 compute,
quantised from a random dense weight (N(0, 1/in)); Llama's layer shapes (in, out) = (4096, 4096),
(4096, 14336), (14336, 4096) at N = 2048 and 8192 tokens; LoRA r=16, alpha 16 (scaling 1), fp32
adapters. One timed run: the forward of x (N, in) bf16 requiring grad, then the backward of a fixed
grad_out (dx, dA, dB). Providers, all on the same Linear4bit:

  peft              PEFT's bitsandbytes LoRA layer (peft.tuners.lora.bnb.Linear4bit, checked): from
                    get_peft_model on a module holding the Linear4bit, with is_loaded_in_4bit set
  lorafast-scratch  QLoRALinear.from_linear(q, fused=False), the default path: the weight dequantised into
                    the scratch buffer every layer shares (lorafast.quant), base GEMMs on cuBLAS
  lorafast-fused    fused=True: lorafast's Triton GEMM decodes the NF4 tiles in its main loop

PEFT's layer is the reference. Its lora_B is drawn nonzero (N(0, 1/r); lora_A N(0, 1/in)) and both
are copied into each lorafast layer, whose output and dx, dA, dB must match PEFT's within a relative
error of 2e-2 per tensor in bf16 (1e-4 in fp32), else the provider is not timed and the run exits 1,
as when a lorafast provider raises. Rows: time; peak_memory, each provider alone (peak reset with its
gradients and the scratch buffer released, so the scratch's allocation is inside the measurement);
speedup_vs_peft (peft's p50 time over the provider's, same run); max_abs_err_{y,dx,dA,dB} of the
check. The CSV's speedups are drawn beside it (lorafast.plot, <kernel>_speedup.png) where matplotlib
is installed. On a GPU each shape's fused and scratch medians go into the backend table that
QLoRALinear(fused=None) reads (lorafast/_selection.py, op lora_linear_q_fwd; the user's, or --table
PATH). --quick: in=out=4096, N=2048 and 8192; `--device cpu`: in/out 64/96 and 128/64, N=16, r=4,
fp32 compute, the fused GEMM under the Triton interpreter.

    python bench/bench_qlora.py [--quick] [--out PATH] [--providers ...] [--device cuda|cpu] [--table PATH]
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

import lorafast  # noqa: F401  (before bitsandbytes and triton: on a CPU-only machine it sets up the interpreter)
from lorafast import _backend, quant
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402
import memory  # noqa: E402
from common import Case, Ratio  # noqa: E402

KERNEL, MODE = "qlora_linear", "full"
PEFT, SCRATCH, FUSED = "peft", "lorafast-scratch", "lorafast-fused"
PEFT_CLASS = "peft.tuners.lora.bnb.Linear4bit"   # what PEFT must wrap a Linear4bit in
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # relative error of each of y, dx, dA, dB against PEFT's
CHECKED = ("y", "dx", "dA", "dB")
QUANT = {"quant_type": "nf4", "compress_statistics": True}   # NF4, double quantisation


@dataclass(frozen=True)
class Shape(common.LayerShape):
    dtype: torch.dtype = torch.bfloat16   # bitsandbytes' compute dtype, and x's


LLAMA_LAYERS = ((4096, 4096), (4096, 14336), (14336, 4096))
FULL_SHAPES = [Shape(i, o, 16, n) for i, o in LLAMA_LAYERS for n in (2048, 8192)]
QUICK_SHAPES = [Shape(4096, 4096, 16, 2048), Shape(4096, 4096, 16, 8192)]
# in a multiple of the 64-element block: bitsandbytes' own CPU dequantisation (PEFT's path there) decodes
# a weight whose blocks straddle rows wrongly (0.50.2), and the check would fail against it
CPU_SHAPES = [Shape(64, 96, 4, 16, torch.float32), Shape(128, 64, 4, 16, torch.float32)]


@dataclass
class Inputs:
    shape: Shape
    q: nn.Module        # the bitsandbytes Linear4bit every provider computes on
    peft: nn.Module     # PEFT's LoRA layer around it: the reference, and provider `peft`
    x: Tensor           # (N, in), requires grad
    grad_y: Tensor      # (N, out)
    refs: dict          # PEFT's y, dx, dA, dB, on the CPU (not in the GPU's peak memory)

    @property
    def adapters(self) -> tuple[Tensor, Tensor]:
        return self.peft.lora_A["default"].weight, self.peft.lora_B["default"].weight

    def resident(self) -> list[Tensor]:
        """What stays allocated across a step: the counted start of the CPU's peak memory."""
        qw = quant.quant_weight(self.q)
        return [self.x, self.grad_y, *self.adapters,
                *(t for t in (qw.data, qw.absmax, qw.code, qw.absmax2, qw.code2, qw.offset) if t is not None)]


def quantised(weight: Tensor, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear4bit (NF4, double quantisation, ``dtype`` compute) of the dense (out, in)
    ``weight``, quantised as bitsandbytes does when the layer moves to ``device``."""
    import bitsandbytes as bnb
    out_f, in_f = weight.shape
    q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, **QUANT)
    q.load_state_dict({"weight": weight})
    return q.to(device)


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def peft_layer(q: nn.Module, r: int, alpha: float) -> nn.Module:
    """PEFT's LoRA layer around ``q``, as get_peft_model builds it for a model loaded in 4 bits;
    RuntimeError unless it is PEFT's bitsandbytes layer with scaling alpha / r."""
    from peft import LoraConfig, get_peft_model
    holder = _Holder(q)
    holder.is_loaded_in_4bit = True   # as transformers marks a 4-bit model: PEFT dispatches on it
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    if qualname(layer) != PEFT_CLASS:
        raise RuntimeError(f"PEFT wrapped the Linear4bit in {qualname(layer)}, not {PEFT_CLASS}")
    if layer.scaling["default"] != alpha / r:
        raise RuntimeError(f"PEFT scaling {layer.scaling['default']} != {alpha / r}")
    return layer


def make_inputs(shape: Shape, device: torch.device) -> Inputs:
    """The seeded Linear4bit, PEFT's layer on it with random (nonzero) adapters, x, grad_out, and
    PEFT's output and gradients. Base and adapter terms are both O(1)."""
    g = torch.Generator().manual_seed(0)
    n, i, o, r = shape.n, shape.in_f, shape.out_f, shape.r
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = quantised(rnd(o, i) / math.sqrt(i), shape.dtype, device)
    layer = peft_layer(q, r, float(r))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():   # PEFT's zero lora_B would take the adapter out of the check
        A.copy_(rnd(r, i) / math.sqrt(i))
        B.copy_(rnd(o, r) / math.sqrt(r))
    x = rnd(n, i).to(device, shape.dtype).requires_grad_()
    grad_y = rnd(n, o).to(device, shape.dtype)
    y = layer(x)
    y.backward(grad_y)
    refs = {k: t.detach().cpu() for k, t in zip(CHECKED, (y, x.grad, A.grad, B.grad))}
    x.grad = A.grad = B.grad = None
    return Inputs(shape, q, layer, x, grad_y, refs)


def describe_peft(device: torch.device, dtype: torch.dtype) -> str:
    """PEFT's layer and bitsandbytes' quantisation as this run builds them (on a tiny layer);
    RuntimeError where PEFT does not give its bitsandbytes layer."""
    q = quantised(torch.randn(64, 64) / 8, dtype, device)
    layer = peft_layer(q, 4, 4.0)
    return (f"PEFT layer {qualname(layer)} (adapters {str(layer.lora_A['default'].weight.dtype)[6:]}) over "
            f"{qualname(q)}: {quant.describe(q)}")


class QLoRASuite(common.Suite):
    KERNEL, MODES = KERNEL, (MODE,)
    PROVIDERS, BASELINE = (PEFT, SCRATCH, FUSED), PEFT
    SIZES = {"cpu": CPU_SHAPES, "quick": QUICK_SHAPES, "full": FULL_SHAPES}
    QUICK_HELP = "only in=out=4096, N=2048 and 8192"
    SMOKE_WHAT = "tiny shapes"
    SMOKE = ("tiny shapes, fp32 compute, wall-clock timing, the fused GEMM under the Triton interpreter, "
             "peak memory counted from live tensors.")
    TIMING = {"cpu_warmup": 1, "cpu_reps": 5}
    CELLS = ("time", "peak_memory")
    RECORD_OP, RECORD_BACKENDS = "lora_linear_q_fwd", ("fused", "scratch")   # what QLoRALinear(fused=None) weighs
    OOM_HINT = " (try --quick)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors: dict = {}   # (label, provider) -> {tensor: max abs error against PEFT's}

    def requires(self):
        ok, versions = common.import_status("bitsandbytes", "peft")
        return ok, f"bitsandbytes AND peft ARE NEEDED ({versions}): pip install bitsandbytes 'lorafast[hf]'"

    def needs(self):
        return [common.Needs("THE TRITON BACKEND", (FUSED,), _backend.triton_status,
                             "no fused rows, and no fused-vs-scratch entry in the backend table")]

    def header_extra(self):
        return [common.import_status("bitsandbytes", "peft")[1], f"compute {str(self.sizes[0].dtype)[6:]}"]

    def prepare(self):
        """PEFT must wrap a Linear4bit in its bitsandbytes layer (else the baseline is not QLoRA): 1 if not."""
        try:
            common.log(describe_peft(self.device, self.sizes[0].dtype))
        except Exception as e:
            common.banner(f"CHECK FAILED: {PEFT}: {type(e).__name__}: {e}\nNothing is timed.")
            return 1
        common.free(self.device)

    def inputs(self, shape):
        quant.release_scratch()
        return make_inputs(shape, self.device)

    def build(self, provider, shape, inp, modes):
        """Case.state: (the layer, the inputs). lorafast's layers get PEFT's adapters."""
        if provider == PEFT:
            layer, params = inp.peft, list(inp.adapters)
        else:
            from lorafast.qlora import QLoRALinear
            layer = QLoRALinear.from_linear(inp.q, r=shape.r, lora_alpha=float(shape.r), fused=provider == FUSED)
            with torch.no_grad():
                for mine, theirs in zip((layer.lora_A, layer.lora_B), inp.adapters):
                    mine.copy_(theirs)
            params = [layer.lora_A, layer.lora_B]
        return Case(provider, lambda: layer(inp.x).backward(inp.grad_y), [inp.x, *params], state=(layer, inp))

    def check(self, case, shape, inp):
        """lorafast's y, dx, dA, dB against PEFT's: the worst relative error, or CheckFailed; the max
        abs errors are logged and kept for the CSV. PEFT's own first call is its warm-up."""
        if case.provider == PEFT:
            case.fn()
            return None
        layer, _ = case.state
        self.release(case)
        y = layer(inp.x)
        y.backward(inp.grad_y)
        got = dict(zip(CHECKED, (y, inp.x.grad, layer.lora_A.grad, layer.lora_B.grad)))
        rel, worst = {}, {}
        for k in CHECKED:
            want = inp.refs[k].to(self.device)
            rel[k] = rel_err(got[k], want)
            worst[k] = (got[k].detach().float() - want.float()).abs().max().item()
        del got, y
        self.release(case)
        tol = TOL[shape.dtype]
        ok = all(e <= tol for e in rel.values())   # also catches NaN
        self.errors[(shape.label, case.provider)] = worst
        common.log(f"check {case.provider} vs {PEFT} on {shape.label}: "
                   + ", ".join(f"{k} max abs err {worst[k]:.3g} (rel. {rel[k]:.3g})" for k in CHECKED)
                   + f"; tolerance rel. {tol:g}: {'ok' if ok else 'FAILED'}")
        if not ok:
            bad = max(rel, key=rel.get)
            raise common.CheckFailed(f"{bad} rel. error {rel[bad]:.3g} > {tol:g}")
        return max(rel.values())

    def memory(self, case, mode):
        """One step alone: it starts from the resident tensors only (gradients and the scratch buffer
        released), so the scratch's allocation is inside the measured peak."""
        layer, inp = case.state

        def step():
            case.fn()
            self.release(case)

        self.release(case)
        return memory.peak_memory_mb(step, self.device, inp.resident)

    def release(self, case):
        for t in case.grads:
            t.grad = None
        quant.release_scratch()

    def fails_run(self, provider, check):
        return provider != PEFT

    def derived_rows(self):
        """speedup_vs_peft (peft's p50 time over each lorafast provider's) and the check's max errors."""
        rows = []
        for (label, mode), by in self.p50.items():
            base = by.get(PEFT, {}).get("time")
            for p, m in by.items():
                if p != PEFT and base and m.get("time"):
                    rows.append(common.row(KERNEL, p, mode, "speedup_vs_peft", "x", self.X_NAME, label,
                                           [base / m["time"]] * 3, self.env))
        for (label, p), worst in self.errors.items():
            rows += [common.row(KERNEL, p, MODE, f"max_abs_err_{k}", "abs", self.X_NAME, label, [v] * 3, self.env)
                     for k, v in worst.items()]
        return rows

    def ratios(self):
        return [Ratio(PEFT, SCRATCH), Ratio(PEFT, FUSED), Ratio(SCRATCH, FUSED),
                Ratio(SCRATCH, PEFT, "peak_memory"), Ratio(FUSED, PEFT, "peak_memory")]

    def record_key(self, shape, mode):
        # the shape features QLoRALinear(fused=None) looks up: (N, in, out, r), in the compute dtype
        return (str(shape.dtype).removeprefix("torch."), (shape.n, shape.in_f, shape.out_f, shape.r)) \
            if mode == MODE else None

    def info(self, shape, inp):
        return {"tokens": shape.n, "compute_dtype": str(shape.dtype).removeprefix("torch."),
                "quantisation": quant.describe(inp.q)}

    def run(self) -> int:
        code = super().run()
        if self.rows:
            self.chart(self.args.out or common.default_out(self.KERNEL, self.device))
        return code

    def chart(self, csv_path: Path) -> Optional[Path]:
        """The CSV's speedups against PEFT per shape, beside it (lorafast.plot); None where matplotlib
        is missing or nothing was timed against PEFT."""
        from lorafast.plot import plot_results
        try:
            path, = plot_results([csv_path])
        except (ImportError, ValueError) as e:
            common.log(f"no chart: {common.first_line(e)}")
            return None
        print(f"wrote the speedup chart {path}")
        return path


SUITE = QLoRASuite
main = SUITE.main  # the entry point, main(argv=None) -> int, as lorafast/cli.py calls it


if __name__ == "__main__":
    sys.exit(main())
