"""Times the Gaussian-noise kernel (lorafast.split.privatize: clip + Philox noise) against the
GPU's copy bandwidth, measured in the same run.

The kernel reads h once and writes y once, making its noise in registers, so it is
write-bound like a copy: its ceiling is the time of ``dst.copy_(src)`` on the same bytes.
Reported per provider and shape: time (ms), bandwidth (GB/s of bytes read + written) and
``pct_of_copy`` = copy time / provider time × 100 (the target is ≥ 80%).

Providers:
  copy             dst.copy_(h): the ceiling
  torch_randn      h.clamp(-C, C) + std · torch.randn_like(h): PyTorch's own fused Philox
                   normal, then the add (what one writes without lorafast)
  lorafast-triton  privatize(..., backend="triton")
  lorafast-cuda    privatize(..., backend="cuda")
  lorafast-torch   privatize(..., backend="torch") (the CPU smoke mode's)

Modes: "element" (clip each element) and "token" (clip each row's L2 norm; one pass
when a row fits one block). Each provider's output with zero noise is checked against the
float64 reference before timing. On a GPU, the faster of triton/cuda per shape is recorded
for automatic selection (lorafast/_selection.py; the user's table, or --table PATH).

    python bench/bench_noise.py [--quick] [--out PATH] [--providers ...] [--device cuda|cpu] [--table PATH]
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

import lorafast  # noqa: F401  (before triton: on a CPU-only machine it switches Triton to its interpreter)
from lorafast import reference
from lorafast.split import privatize

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402

KERNEL = "noise"
MODES = ("element", "token")
ALL_PROVIDERS = ("copy", "torch_randn", "lorafast-triton", "lorafast-cuda", "lorafast-torch")
GPU_PROVIDERS = ("copy", "torch_randn", "lorafast-triton", "lorafast-cuda")
CPU_PROVIDERS = ("copy", "torch_randn", "lorafast-torch")
FULL_SHAPES = [(rows, d, dt) for rows, d in ((16384, 4096), (4096, 16384), (65536, 1024))
               for dt in (torch.bfloat16, torch.float32)]
QUICK_SHAPES = [(16384, 4096, torch.bfloat16)]
CPU_SHAPES = [(64, 96, torch.float32)]
CLIP, STD = 1.0, 0.5
MAX_REL_ERR = 1e-2


def label(rows: int, d: int, dtype: torch.dtype) -> str:
    return f"rows={rows},d={d},dtype={str(dtype).removeprefix('torch.')}"


def provider_fn(name: str, h: torch.Tensor, mode: str) -> Callable[[float], torch.Tensor]:
    """fn(noise_std) → the provider's output on h."""
    if name == "copy":
        dst = torch.empty_like(h)
        return lambda std: dst.copy_(h)
    if name == "torch_randn":
        def fn(std):
            clipped = h.clamp(-CLIP, CLIP) if mode == "element" else \
                h * (CLIP / h.float().norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp_max(1.0).to(h.dtype)
            return clipped + std * torch.randn_like(h) if std else clipped
        return fn
    backend = name.removeprefix("lorafast-")
    return lambda std: privatize(h, CLIP, std / CLIP, mode=mode, seed=1234, backend=backend)


def make_input(rows: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The seeded activations h (rows, d) that every provider privatizes."""
    torch.manual_seed(0)
    return torch.randn(rows, d, device=device, dtype=dtype) * 0.1


def bytes_moved(h: torch.Tensor) -> int:
    """h read once and y written once: the bytes behind the bandwidth metric."""
    return 2 * h.numel() * h.element_size()


class NoiseSuite(common.Suite):
    KERNEL, MODES, PROVIDERS, GPU_PROVIDERS, CPU_PROVIDERS = KERNEL, MODES, ALL_PROVIDERS, GPU_PROVIDERS, CPU_PROVIDERS
    CUDA_PROVIDER = "lorafast-cuda"
    SIZES = {"cpu": CPU_SHAPES, "quick": QUICK_SHAPES, "full": FULL_SHAPES}
    QUICK_HELP = "only 16384x4096 bf16"
    SMOKE_WHAT, SMOKE = "tiny shape", "one tiny shape, wall-clock timing."
    ROOFLINE_GEMMS = ("bf16",)
    BASELINE, PERCENT = "copy", True
    RECORD_OP, RECORD_BACKENDS = "privatize", ("triton", "cuda")

    def label(self, shape):
        return label(*shape)

    def units(self, providers):
        return [(p, (mode,)) for mode in MODES for p in providers]  # provider_fn is per mode

    def inputs(self, shape):
        return make_input(*shape, self.device)

    def build(self, provider, shape, h, modes):
        fn = provider_fn(provider, h, modes[0])
        return common.Case(provider, lambda: fn(STD), state=(fn, modes[0]))

    def check(self, case, shape, h):
        """The noiseless output against float64 (copy is the ceiling, not checked)."""
        fn, mode = case.state
        if case.provider == "copy":
            return None
        want, _ = reference.privatize(h.double(), CLIP, 0.0, mode=mode, seed=0, offset=0)
        return common.check_close(fn(0.0), want, MAX_REL_ERR)

    def rates(self, shape, mode, h):
        return [("bandwidth", "GB/s", bytes_moved(h) / 1e9)]

    def derived_rows(self):
        """pct_of_copy: copy's p50 time over each provider's, in %."""
        rows = []
        for (lab, mode), by in self.p50.items():
            for p, m in by.items() if "copy" in by else ():
                pct = 100.0 * by["copy"]["time"] / m["time"]
                rows.append(common.row(KERNEL, p, mode, "pct_of_copy", "%", self.X_NAME, lab, [pct] * 3, self.env))
        return rows

    def record_key(self, shape, mode):
        rows, d, dtype = shape  # "token" mode, the common one
        return (str(dtype).removeprefix("torch."), (rows * d,)) if mode == "token" else None

    def info(self, shape, h):
        return {"bytes_moved": bytes_moved(h)}


SUITE = NoiseSuite
main = SUITE.main  # the entry point, main(argv=None) -> int, as lorafast/cli.py calls it


if __name__ == "__main__":
    sys.exit(main())
