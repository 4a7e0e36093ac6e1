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

    python bench/bench_noise.py [--quick] [--out PATH] [--providers ...] [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast import reference
from lorafast.split import privatize
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def checked(name: str, h: torch.Tensor, mode: str) -> Optional[Callable[[float], torch.Tensor]]:
    """The provider's function if its noiseless output matches float64, else None (loudly)."""
    try:
        fn = provider_fn(name, h, mode)
        if name == "copy":
            return fn
        want, _ = reference.privatize(h.double(), CLIP, 0.0, mode=mode, seed=0, offset=0)
        err = rel_err(fn(0.0), want)
    except Exception as e:
        common.banner(f"SKIP {name} ({mode}, {label(*h.shape, h.dtype)}): failed to run: {type(e).__name__}: {e}")
        return None
    if not err <= MAX_REL_ERR:
        common.banner(f"SKIP {name} ({mode}): rel. error {err:.3g} > {MAX_REL_ERR}")
        return None
    return fn


def make_input(rows: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The seeded activations h (rows, d) that every provider privatizes."""
    torch.manual_seed(0)
    return torch.randn(rows, d, device=device, dtype=dtype) * 0.1


def bytes_moved(h: torch.Tensor) -> int:
    """h read once and y written once: the bytes behind the bandwidth metric."""
    return 2 * h.numel() * h.element_size()


def run_shape(rows: int, d: int, dtype: torch.dtype, providers: list[str], device: torch.device, env: dict,
              p50s: dict) -> list[dict]:
    h = make_input(rows, d, dtype, device)
    nbytes = bytes_moved(h)
    lab = label(rows, d, dtype)
    out = []
    for mode in MODES:
        times = {}
        for name in providers:
            fn = checked(name, h, mode)
            if fn is None:
                continue
            q = common.bench(lambda: fn(STD), device)
            times[name] = q[0]
            out.append(common.row(KERNEL, name, mode, "time", "ms", "shape", lab, q, env))
            out.append(common.row(KERNEL, name, mode, "bandwidth", "GB/s", "shape", lab,
                                  [nbytes / (t * 1e-3) / 1e9 for t in (q[0], q[2], q[1])], env))
        if "copy" in times:
            for name, t in times.items():
                pct = 100.0 * times["copy"] / t
                out.append(common.row(KERNEL, name, mode, "pct_of_copy", "%", "shape", lab, [pct, pct, pct], env))
        p50s[(lab, mode)] = times
        common.log(f"{lab:36s} {mode:8s} " + ", ".join(f"{n} {t:.4f} ms" for n, t in times.items()))
    return out


def print_table(p50s: dict, providers: list[str]) -> None:
    head = ["shape", "mode"] + [f"{p} ms (% of copy)" for p in providers]
    lines = []
    for (lab, mode), by in p50s.items():
        copy = by.get("copy")
        lines.append([lab, mode] + ["-" if p not in by else f"{by[p]:.4f} ({100 * copy / by[p]:.0f}%)" if copy
                                    else f"{by[p]:.4f}" for p in providers])
    print("\n" + common.format_rows(head, lines))


def record_backends(p50s: dict, gpu: str, table: Optional[Path]) -> None:
    """The faster of triton/cuda per shape ("token" mode, the common one) for automatic selection."""
    from lorafast import _selection
    for (lab, mode), by in p50s.items():
        if mode == "token" and "lorafast-triton" in by and "lorafast-cuda" in by:
            rows, d, dtype = (v.split("=")[1] for v in lab.split(","))
            path = _selection.record(gpu, "privatize", dtype, (int(rows) * int(d),),
                                     {"triton": by["lorafast-triton"], "cuda": by["lorafast-cuda"]}, table)
            print(f"recorded the privatize backend for {lab} in {path}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return common.parse_cli(argv, __doc__, KERNEL, "only 16384x4096 bf16", ALL_PROVIDERS,
                            f"default {' '.join(GPU_PROVIDERS)} (on cpu: {' '.join(CPU_PROVIDERS)})", table=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cpu = args.device == "cpu"
    device = common.open_device(args.device, "tiny shape", "one tiny shape, wall-clock timing.")
    if device is None:
        return 0
    shapes = CPU_SHAPES if cpu else QUICK_SHAPES if args.quick else FULL_SHAPES
    providers = list(dict.fromkeys(args.providers or (CPU_PROVIDERS if cpu else GPU_PROVIDERS)))
    env = common.env_info(device)
    common.log(f"device {env['gpu_name']} | torch {env['torch_version']} | lorafast {lorafast.__version__} "
               f"| providers {' '.join(providers)}")
    rl = common.roofline(device)
    common.log(common.format_roofline(rl))
    rows = common.roofline_rows(KERNEL, rl, env)
    p50s: dict = {}
    for shape in common.progress(shapes, desc=KERNEL):
        rows += run_shape(*shape, providers, device, env, p50s)
        common.free(device)
    out = common.write_csv(args.out or common.default_out(KERNEL, device), rows)
    print_table(p50s, providers)
    print(common.format_roofline(rl))
    if device.type == "cuda":
        record_backends(p50s, env["gpu_name"], args.table)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
