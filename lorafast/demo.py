"""The main job: validate every kernel here, pick the backend, train a LoRALinear.

    python -m lorafast.demo
"""
from __future__ import annotations

import sys
import time

import torch

import lorafast
from lorafast import _backend, validate


def _progress(done: int, total: int, row) -> None:
    if not sys.stdout.isatty():
        return
    bar = "#" * (30 * done // total)
    verdict = "ok" if row.ok else "FAIL"
    print(f"\r  [{bar:<30}] {done}/{total} {row.backend}/{row.dtype:<8} {verdict}", end="", flush=True)


def _versions() -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return f"torch {torch.__version__}, triton {tv}, GPU: {gpu}"


def run() -> int:
    print(f"lorafast {lorafast.__version__}: {_versions()}")
    for name in ("triton", "cuda"):
        usable, why = getattr(_backend, f"{name}_status")()
        print(f"  backend {name:<6} {'available' if usable else 'unavailable'}: {why}")

    print("\n1. Validating every kernel against the float64 reference")
    t0 = time.perf_counter()
    rows = validate.run_checks(_progress)
    print(f"\n{validate.format_table(rows)}\n  ({time.perf_counter() - t0:.1f} s)")
    failed = [r for r in rows if not r.ok]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    chosen = _backend.select("lora_linear", torch.device(device), dtype)
    print(f"\n2. Best backend for {dtype} on {device}: {chosen}")

    print("\n3. Training a LoRALinear(64 -> 64, r=8) towards a low-rank target")
    torch.manual_seed(0)
    layer = lorafast.LoRALinear(64, 64, r=8, lora_alpha=16, device=device, dtype=dtype)
    teacher = torch.randn(64, 8, device=device) @ torch.randn(8, 64, device=device) * 0.05
    x = torch.randn(256, 64, device=device, dtype=dtype)
    target = (x.float() @ (layer.weight.float() + teacher).T + layer.bias.float()).to(dtype)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    steps = 40
    for step in range(1, steps + 1):
        loss = (layer(x).float() - target.float()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0:
            print(f"  step {step:>3}/{steps}  loss {loss.item():.5f}")
    if failed:
        print(f"\n{len(failed)} kernel check(s) FAILED", file=sys.stderr)
        return 1
    print(f"\nAll {len(rows)} kernel checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(run())
