"""Check every kernel on this machine against the float64 reference.

Each row is one (op, backend, device, dtype, case) with the largest relative error
‖got − ref‖ / ‖ref‖ over the output and every gradient, and the dtype's tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from . import _backend, _ops, reference
from ._ops import lora_linear

TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (variant, x shape, in, out, r, dropout_p)
CASES = [
    ("lora", (13, 33), 33, 47, 3, 0.0),
    ("ffa", (2, 5, 40), 40, 24, 1, 0.0),
    ("xs", (11, 17), 17, 33, 5, 0.0),
    ("lora", (2, 7, 33), 33, 47, 4, 0.3),
]


@dataclass
class Row:
    op: str
    backend: str
    device: str
    dtype: str
    shape: str
    max_rel_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tolerance


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64 on ref's device; inf if a has a non-finite value."""
    a, ref = a.detach().to(ref.device, torch.float64), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_lora_linear(backend: str, device: str, dtype: torch.dtype, case) -> Row:
    variant, xshape, in_f, out_f, r, p = case
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(*xshape).to(device, dtype).requires_grad_(True)
    W = (rnd(out_f, in_f) / in_f ** 0.5).to(device, dtype)
    A, B = (rnd(r, in_f) / in_f ** 0.5).to(device), rnd(out_f, r).to(device)
    R = rnd(r, r).to(device) if variant == "xs" else None
    bias = rnd(out_f).to(device, dtype)
    trains = {"lora": [A, B], "ffa": [B], "xs": [R]}[variant]
    for t in trains:
        t.requires_grad_(True)
    seed = 4242

    gy = rnd(*xshape[:-1], out_f).to(dtype)  # the same output gradient values for both

    def run(tensors, fn):
        y = fn(*tensors)
        grads = torch.autograd.grad(y, [t for t in tensors if t is not None and t.requires_grad],
                                    gy.to(y.device, y.dtype))
        return [y, *grads]

    def ours(x, W, A, B, R, b):
        return lora_linear(x, W, A, B, b, scaling=0.5, lora_R=R, dropout_p=p, backend=backend, seed=seed)

    def ref(x, W, A, B, R, b):
        return reference.lora_linear(x, W, A, B, b, scaling=0.5, lora_R=R, dropout_p=p, seed=seed)

    to64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
            for t in (x, W, A, B, R, bias)]
    got = run([x, W, A, B, R, bias], ours)
    want = run(to64, ref)
    err = max(rel_err(a, b) for a, b in zip(got, want))
    shape = f"{variant} x={tuple(xshape)} out={out_f} r={r}" + (f" p={p}" if p else "")
    return Row("lora_linear", backend, device, str(dtype).replace("torch.", ""), shape, err, TOLERANCES[dtype])


# many clients over one base: (variant, x shape, in, out, r, clients, dropout_p)
MULTI_CASES = [
    ("lora", (7, 3, 33), 33, 47, 3, 4, 0.0),
    ("xs", (5, 17), 17, 33, 5, 3, 0.0),
    ("ffa", (6, 2, 40), 40, 24, 2, 3, 0.3),
]


def check_lora_linear_multi(backend: str, device: str, dtype: torch.dtype, case) -> Row:
    """lorafast::lora_linear_multi_fwd/bwd: samples of shuffled clients (one with none) against
    the float64 spec, the output and every gradient."""
    variant, xshape, in_f, out_f, r, k, p = case
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(*xshape).to(device, dtype).requires_grad_(True)
    W, bias = (rnd(out_f, in_f) / in_f ** 0.5).to(device, dtype), rnd(out_f).to(device, dtype)
    A, B = (rnd(k, r, in_f) / in_f ** 0.5).to(device), rnd(k, out_f, r).to(device)
    R = rnd(k, r, r).to(device) if variant == "xs" else None
    for t in {"lora": [A, B], "ffa": [B], "xs": [R]}[variant]:
        t.requires_grad_(True)
    ids = torch.randint(0, k - 1, (xshape[0],), generator=g).to(device)     # client k-1 has no samples
    scale = (torch.rand(k, generator=g) + 0.5).to(device)
    gy = rnd(*xshape[:-1], out_f).to(device, dtype)
    leaves = [t for t in (x, A, B, R) if t is not None and t.requires_grad]
    y = _ops.lora_linear_multi(x, W, A, B, bias, client_ids=ids, scaling=scale, lora_R=R, dropout_p=p,
                               backend=backend, seed=77)
    got = [y, *torch.autograd.grad(y, leaves, gy)]
    d64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, A, B, R)]
    rows_per = x[0].numel() // in_f
    ref, _ = reference.lora_linear_multi_forward(d64[0], W.double(), d64[1], d64[2], bias.double(), d64[3],
                                                 row_clients=ids.repeat_interleave(rows_per),
                                                 scaling=scale.double(), dropout_p=p, seed=77)
    want = [ref, *torch.autograd.grad(ref, [t for t in d64 if t is not None and t.requires_grad], gy.double())]
    err = max(rel_err(a, b) for a, b in zip(got, want))
    shape = f"{variant} x={tuple(xshape)} out={out_f} r={r} k={k}" + (f" p={p}" if p else "")
    return Row("lora_linear_multi", backend, device, str(dtype).replace("torch.", ""), shape, err, TOLERANCES[dtype])


# per-sample backward: (variant, batch, T, in, out, r, dropout_p)
PS_CASES = [
    ("lora", 3, 5, 33, 47, 3, 0.0),
    ("ffa", 13, 1, 40, 24, 1, 0.0),
    ("xs", 2, 7, 17, 33, 5, 0.3),
]


def check_lora_per_sample(backend: str, device: str, dtype: torch.dtype, case) -> Row:
    """lorafast::lora_linear_bwd_ps: per-sample adapter gradients and dx against float64."""
    variant, n, T, in_f, out_f, r, p = case
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x, gy = rnd(n, T, in_f).to(dtype), rnd(n, T, out_f).to(dtype)
    W = (rnd(out_f, in_f) / in_f ** 0.5).to(dtype)
    A, B = rnd(r, in_f) / in_f ** 0.5, rnd(out_f, r)
    R = rnd(r, r) if variant == "xs" else None
    needs = {"lora": (True, True, False), "ffa": (False, True, False), "xs": (False, False, True)}[variant]
    shapes = ((n, r, in_f), (n, out_f, r), (n, r, r))
    bufs = [torch.zeros(sh, device=device) if k else None for sh, k in zip(shapes, needs)]
    kw = dict(scaling=0.5, dropout_p=p, seed=99, offset=0)
    _, h = reference.lora_linear_forward(x, W, A, B, None, R, **kw)
    dx = _ops.lora_linear_bwd_ps(gy, x, W, A, B, R, h, 0.5, p, 99, 0, n, True, *bufs, 1.0, backend)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    want = reference.lora_linear_per_sample_grads(d(gy), d(x), d(A), d(B), d(R), d(h), batch=n, needs=needs, **kw)
    dx_want = reference.lora_linear_backward(d(gy), d(x), d(W), d(A), d(B), d(R), d(h), needs=(True,) + (False,) * 4,
                                             **kw)[0]
    errs = [rel_err(b, w) for b, w in zip(bufs, want) if b is not None] + [rel_err(dx, dx_want)]
    shape = f"{variant} N={n} T={T} in={in_f} out={out_f} r={r}" + (f" p={p}" if p else "")
    return Row("lora_linear_bwd_ps", backend, device, str(dtype).replace("torch.", ""), shape, max(errs),
               TOLERANCES[dtype])


def check_clip_reduce_noise(backend: str, device: str, per_layer: bool) -> Row:
    """lorafast::grad_sample_norms and lorafast::clip_reduce_noise against float64, with a
    non-finite sample and Philox noise."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    segments = [0, 40, 103, 150]
    gs = (torch.randn(9, 150, generator=g) * 3).to(device)
    gs[4, 7] = float("inf")
    bounds = [1.0, 0.5, 2.0] if per_layer else [2.5]
    sq = _ops.grad_sample_norms(gs, segments, backend)
    out = _ops.clip_reduce_noise(gs, sq, segments, bounds, per_layer, None, None, 0.7, 5, 2**33, 0.25, backend)
    sq_want = reference.grad_sample_sq_norms(gs.double(), segments)
    want = reference.clip_reduce_noise(gs.double(), sq_want, segments, bounds, per_layer=per_layer,
                                       noise_std=0.7, seed=5, offset=2**33, out_scale=0.25)
    finite = torch.isfinite(sq_want.sum(1))
    err = max(rel_err(sq[finite], sq_want[finite]), rel_err(out, want))
    shape = f"N=9 D=150 P=3 {'per_layer' if per_layer else 'flat'}, one non-finite sample"
    return Row("clip_reduce_noise", backend, device, "float32", shape, err, TOLERANCES[torch.float32])


def check_fedex_merge(backend: str, device: str, dtype: torch.dtype) -> Row:
    """lorafast::fedex_merge_ through ``aggregate``: W + s·B̄Ā against Σ pᵢ(W + s·BᵢAᵢ) in float64;
    half-precision weights carry an fp32 compensation, so W + C is compared."""
    from .federated import aggregate
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    out_f, in_f, ranks, w = 45, 38, (3, 1, 4), [2.0, 1.0, 5.0]
    A, B = [rnd(r, in_f) for r in ranks], [rnd(out_f, r) for r in ranks]
    W = rnd(out_f, in_f).to(dtype)
    comp = torch.zeros(out_f, in_f, device=device) if dtype != torch.float32 else None
    p = torch.tensor(w, dtype=torch.float64) / sum(w)
    truth = sum(pi * (W.double() + 0.5 * b.double() @ a.double()) for pi, a, b in zip(p.tolist(), A, B))
    res = aggregate(W, A, B, client_weights=w, scaling=0.5, compensation=comp, backend=backend)
    merged = W.double() + (comp.double() if comp is not None else 0)
    err = rel_err(merged + 0.5 * res.lora_B.double() @ res.lora_A.double(), truth)
    extra = " + fp32 compensation" if comp is not None else ""
    return Row("fedex_merge", backend, device, str(dtype).replace("torch.", ""),
               f"k=3 ranks={ranks} W={out_f}x{in_f}{extra}", err, TOLERANCES[torch.float32])


def check_privatize(backend: str, device: str, dtype: torch.dtype, mode: str) -> Row:
    """lorafast::privatize (clip + Philox noise) against float64 with the same noise stream."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    h = (torch.randn(3, 7, 45, generator=g) * 2).to(device=device, dtype=dtype)
    y, _ = _ops.privatize(h, 1.5, 0.6, mode, 9, 0, backend)
    want, _ = reference.privatize(h.double(), 1.5, 0.6, mode=mode, seed=9)
    return Row("privatize", backend, device, str(dtype).replace("torch.", ""), f"B=3 T=7 d=45 {mode}",
               rel_err(y, want), TOLERANCES[dtype])


# quantised bases (QLoRA): (layout, x shape, in, out, r, fused)
Q_CASES = [
    ("nf4+dq", (2, 5, 70), 70, 33, 3, False),
    ("fp4", (9, 64), 64, 40, 2, False),
    ("int8", (7, 33), 33, 47, 4, False),
    ("nf4+dq", (2, 5, 70), 70, 33, 3, True),
]


def random_quant_weight(layout: str, out_f: int, in_f: int, g: torch.Generator, device) -> reference.QuantWeight:
    """A random quantised (out, in) weight in bitsandbytes' layout: 4-bit codes over a sorted
    random codebook with per-block scales of blocks of 16 (and, with double quantisation, their
    8-bit codes in blocks of 4), or int8 with row scales."""
    n = out_f * in_f
    if layout == "int8":
        return reference.QuantWeight(torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8).to(device),
                                     (torch.rand(out_f, generator=g) / in_f ** 0.5).to(device), None, None, None, None,
                                     8, in_f, 1, (out_f, in_f))
    blocks = -(-n // 16)
    data = torch.randint(0, 256, (-(-n // 2), 1), generator=g, dtype=torch.uint8).to(device)
    code = torch.sort(torch.randn(16, generator=g)).values.to(device)
    if layout == "fp4":
        return reference.QuantWeight(data, (torch.rand(blocks, generator=g) / in_f ** 0.5).to(device), code, None,
                                     None, None, 4, 16, 1, (out_f, in_f))
    return reference.QuantWeight(data, torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8).to(device),
                                 code, (torch.rand(-(-blocks // 4), generator=g) / in_f ** 0.5).to(device),
                                 torch.linspace(-1, 1, 256).to(device), torch.rand(1, generator=g).to(device) * 0.01,
                                 4, 16, 4, (out_f, in_f))


def check_dequantize(backend: str, device: str, dtype: torch.dtype, layout: str) -> Row:
    """lorafast::dequantize_ against the spec, which rounds the fp32 decoding once (exact: 0)."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    qw = random_quant_weight(layout, 37, 70, g, device)
    got = _ops.dequantize_(qw, torch.empty(qw.shape, device=device, dtype=dtype), backend)
    return Row("dequantize", backend, device, str(dtype).replace("torch.", ""), f"{layout} W=37x70",
               rel_err(got, reference.dequantize(qw, dtype)), 0.0)


def check_lora_linear_q(backend: str, device: str, dtype: torch.dtype, case) -> Row:
    """lorafast::lora_linear_q_fwd/bwd (QLoRA, with a FedEx correction unless fused): the output
    and every gradient against the float64 spec on the decoded weight (rounded to x's dtype)."""
    layout, xshape, in_f, out_f, r, fused = case
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    qw = random_quant_weight(layout, out_f, in_f, g, device)
    x = rnd(*xshape).to(device, dtype).requires_grad_(True)
    A, B = (rnd(r, in_f) / in_f ** 0.5).to(device).requires_grad_(True), rnd(out_f, r).to(device).requires_grad_(True)
    bias = rnd(out_f).to(device, dtype)
    U, V = (None, None) if fused else ((rnd(out_f, 2) * 0.01).to(device), rnd(2, in_f).to(device))
    gy = rnd(*xshape[:-1], out_f).to(device, dtype)
    y = _ops.lora_linear_q(x, qw, A, B, bias, scaling=0.5, correction=None if fused else (U, V), fused=fused,
                           backend=backend)
    got = [y, *torch.autograd.grad(y, [x, A, B], gy)]
    W = reference.dequantize(qw).double() + (U.double() @ V.double() if U is not None else 0)
    d64 = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    ref = reference.lora_linear(d64[0], W.to(dtype).double(), d64[1], d64[2], bias.double(), scaling=0.5)
    want = [ref, *torch.autograd.grad(ref, d64, gy.double())]
    err = max(rel_err(a, b) for a, b in zip(got, want))
    shape = f"{layout} x={tuple(xshape)} out={out_f} r={r}" + (" fused" if fused else " +correction")
    return Row("lora_linear_q", backend, device, str(dtype).replace("torch.", ""), shape, err, TOLERANCES[dtype])


def targets() -> Iterator[tuple[str, str]]:
    """(backend, device) pairs usable here."""
    yield "torch", "cpu"
    if "triton" in _backend.available_backends():
        yield "triton", "cuda" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        yield "torch", "cuda"
    if "cuda" in _backend.available_backends():
        yield "cuda", "cuda"       # the first use JIT-compiles csrc/ unless the extension is prebuilt


def run_checks(progress: Optional[callable] = None) -> list[Row]:
    pairs = list(targets())
    # the LoRA linear also runs its default GPU plan: cuBLAS (torch.mm) base GEMMs, Triton rank-r passes
    lora_pairs = pairs + [("hybrid", d) for b, d in pairs if b == "triton"]
    jobs = [(check_lora_linear, (b, d, dt, c)) for b, d in lora_pairs for dt in TOLERANCES for c in CASES]
    jobs += [(check_lora_per_sample, (b, d, dt, c)) for b, d in lora_pairs for dt in TOLERANCES for c in PS_CASES]
    multi_pairs = [(b, d) for b, d in lora_pairs if b != "cuda"]    # the CUDA backend has no multi-client kernels
    jobs += [(check_lora_linear_multi, (b, d, dt, c)) for b, d in multi_pairs for dt in TOLERANCES for c in MULTI_CASES]
    q_pairs = [(b, d) for b, d in lora_pairs if b != "cuda"]    # no CUDA kernel decodes bitsandbytes weights
    jobs += [(check_dequantize, (b, d, dt, lay)) for b, d in pairs if b != "cuda" for dt in TOLERANCES
             for lay in ("nf4+dq", "fp4", "int8")]
    jobs += [(check_lora_linear_q, (b, d, dt, c)) for b, d in q_pairs for dt in TOLERANCES for c in Q_CASES
             if not c[-1] or b == "triton"]
    jobs += [(check_clip_reduce_noise, (b, d, pl)) for b, d in pairs for pl in (False, True)]
    jobs += [(check_fedex_merge, (b, d, dt)) for b, d in pairs for dt in TOLERANCES]
    jobs += [(check_privatize, (b, d, dt, m)) for b, d in pairs for dt in TOLERANCES
             for m in ("sample", "token", "element")]
    rows = []
    for i, (fn, args) in enumerate(jobs):
        rows.append(fn(*args))
        if progress:
            progress(i + 1, len(jobs), rows[-1])
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("op", "backend", "device", "dtype", "shape", "max rel. error", "tolerance", "verdict")
    body = [(r.op, r.backend, r.device, r.dtype, r.shape, f"{r.max_rel_err:.2e}", f"{r.tolerance:.0e}",
             "ok" if r.ok else "FAIL") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
