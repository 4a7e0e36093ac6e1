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
    chosen = _backend.select("lora_linear_fwd", torch.device(device), dtype)
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
    _private_training(device, dtype)
    _federated_merge(device)
    if failed:
        print(f"\n{len(failed)} kernel check(s) FAILED", file=sys.stderr)
        return 1
    print(f"\nAll {len(rows)} kernel checks passed.")
    return 0


def _private_training(device: str, dtype: torch.dtype) -> None:
    """DP-SGD on the same kind of layer: per-sample clipping, noise, and the ε it costs."""
    from torch.utils.data import DataLoader, TensorDataset
    from lorafast.dp import PrivacyEngine

    print("\n4. Private training (DP-SGD, σ=1, C=1, Poisson sampling) of a LoRALinear and a head")
    torch.manual_seed(0)
    model = torch.nn.Sequential(lorafast.LoRALinear(32, 32, r=4, lora_alpha=8, device=device, dtype=dtype),
                                torch.nn.GELU(), torch.nn.Linear(32, 2, device=device, dtype=dtype))
    x = torch.randn(1000, 32)
    y = (x[:, :16].sum(1) > x[:, 16:].sum(1)).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine = PrivacyEngine(accountant="pld")
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    for epoch in range(1, 4):
        correct = seen = 0
        for xb, yb in loader:
            xb, yb = xb.to(device, dtype), yb.to(device)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits.float(), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
        print(f"  epoch {epoch}  train accuracy {correct / max(seen, 1):.2f}  "
              f"ε = {engine.get_epsilon(1e-5):.2f} at δ = 1e-5")


def _federated_merge(device: str) -> None:
    """How far each aggregation method's global model is from the clients' average."""
    from lorafast.federated import aggregate

    print("\n5. Aggregating 8 clients' LoRA adapters (r=8, 256x256 layer, weighted by example counts)")
    torch.manual_seed(0)
    W = torch.randn(256, 256, device=device)
    A = [torch.randn(8, 256, device=device) * 0.1 for _ in range(8)]
    B = [torch.randn(256, 8, device=device) * 0.1 for _ in range(8)]
    counts = [float(n) for n in range(10, 90, 10)]
    p = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    target = sum(pi * (W.double() + 2.0 * b.double() @ a.double()) for pi, a, b in zip(p.tolist(), A, B))
    for method in ("fedavg", "fedex", "flora"):
        w = W.clone()
        res = aggregate(w, A, B, method=method, client_weights=counts, scaling=2.0)
        err = (w.double() + 2.0 * res.lora_B.double() @ res.lora_A.double() - target).norm() / target.norm()
        print(f"  {method:<7} rank {res.lora_A.shape[0]:>3}  error vs the clients' average {err.item():.1e}")


if __name__ == "__main__":
    sys.exit(run())
