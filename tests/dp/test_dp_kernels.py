"""DP-SGD kernels against lorafast.reference: per-sample adapter gradients, squared norms,
the fused clip-reduce-noise step, and Philox Gaussian noise."""
import math

import pytest
import torch

import lorafast
from support.common import DTYPES, HAS_CUDA, backend_devices, backend_ids, fresh_seed, rel_err
from lorafast import _ops, reference

# Per-sample gradients read x and dY in their dtype but accumulate in fp32, so against a
# float64 reference on the same inputs the error is fp32's, except on a GPU where the
# rank-r dots of half-precision inputs may use TF32.
PS_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
if HAS_CUDA:
    PS_TOL.update({torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-3})

LAYOUTS = [  # (batch, T, in, out, r, layout)
    (13, 1, 33, 47, 3, "2d"),          # T = 1: a row block holds many samples
    (3, 5, 33, 47, 1, "3d"),           # blocks straddle sample boundaries
    (2, 20, 17, 24, 5, "transposed"),  # non-contiguous x
]


def _inputs(batch, T, in_f, out_f, r, layout, dtype, device, variant):
    if layout == "2d":
        x = torch.randn(batch, in_f)
    elif layout == "3d":
        x = torch.randn(batch, T, in_f)
    else:
        x = torch.randn(in_f, T, batch).permute(2, 1, 0)
    x = x.to(device=device, dtype=dtype)
    gy = torch.randn(*x.shape[:-1], out_f, device=device).to(dtype)
    W = (torch.randn(out_f, in_f) / in_f ** 0.5).to(device, dtype)
    A = (torch.randn(r, in_f) / in_f ** 0.5).to(device)
    B = torch.randn(out_f, r, device=device)
    R = torch.randn(r, r, device=device) if variant == "xs" else None
    return x, gy, W, A, B, R


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["lora", "ffa", "xs"])
@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: f"{s[5]}-N{s[0]}-T{s[1]}-r{s[4]}")
def test_per_sample_grads_match_float64(lora_backend_device, shape, variant, dtype, dropout_p):
    backend, device = lora_backend_device
    fresh_seed()
    batch, T, in_f, out_f, r, layout = shape
    x, gy, W, A, B, R = _inputs(batch, T, in_f, out_f, r, layout, dtype, device, variant)
    s, seed, offset, ps_scale = 0.7, 1234, 5, 3.0
    _, h = _ops.lora_linear_fwd(x, W, A, B, None, R, s, dropout_p, seed, offset, "torch")
    trains = {"lora": (True, True, False), "ffa": (False, True, False), "xs": (False, False, True)}[variant]
    shapes = ((batch, r, in_f), (batch, out_f, r), (batch, r, r))
    # the buffers start non-zero: the op accumulates into them
    start = [torch.randn(sh, device=device) if t else None for sh, t in zip(shapes, trains)]
    bufs = [b.clone() if b is not None else None for b in start]
    dx = _ops.lora_linear_bwd_ps(gy, x, W, A, B, R, h, s, dropout_p, seed, offset, batch, True,
                                               *bufs, ps_scale, backend)

    f64 = lambda t: t.double() if t is not None else None  # noqa: E731
    truth = reference.lora_linear_per_sample_grads(f64(gy), f64(x), f64(A), f64(B), f64(R), f64(h), batch=batch,
                                                   scaling=s, dropout_p=dropout_p, seed=seed, offset=offset,
                                                   needs=trains)
    for name, got, s0, ref in zip("ABR", bufs, start, truth):
        if got is None:
            assert ref is None or not trains["ABR".index(name)]
            continue
        err = rel_err(got - s0, ps_scale * ref)
        assert err <= PS_TOL[dtype], f"per-sample d{name}: rel err {err:.2e}"
    dx_ref = reference.lora_linear_backward(f64(gy), f64(x), f64(W), f64(A), f64(B), f64(R), f64(h), scaling=s,
                                            dropout_p=dropout_p, seed=seed, offset=offset,
                                            needs=(True, False, False, False, False))[0]
    assert dx.shape == x.shape and dx.dtype == dtype
    assert rel_err(dx, dx_ref) <= {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize("variant", ["lora", "xs"])
def test_per_sample_grads_sum_to_batch_grads(lora_backend_device, variant):
    backend, device = lora_backend_device
    fresh_seed()
    x, gy, W, A, B, R = _inputs(4, 6, 19, 21, 3, "3d", torch.float32, device, variant)
    _, h = _ops.lora_linear_fwd(x, W, A, B, None, R, 0.5, 0.0, 0, 0, "torch")
    bufs = [torch.zeros(4, 3, 19, device=device), torch.zeros(4, 21, 3, device=device),
            torch.zeros(4, 3, 3, device=device) if R is not None else None]
    _ops.lora_linear_bwd_ps(gy, x, W, A, B, R, h, 0.5, 0.0, 0, 0, 4, False, *bufs, 1.0, backend)
    _, dA, dB, dR, _ = reference.lora_linear_backward(gy, x, W, A, B, R, h, scaling=0.5, dropout_p=0.0, seed=0,
                                                      offset=0, needs=(False, True, True, R is not None, False))
    for got, ref in zip(bufs, (dA, dB, dR)):
        if got is not None:
            assert rel_err(got.sum(0), ref) < 1e-5


def test_empty_batch(lora_backend_device):
    backend, device = lora_backend_device
    x, gy, W, A, B, _ = _inputs(1, 3, 8, 9, 2, "3d", torch.float32, device, "lora")
    x, gy = x[:0], gy[:0]
    h = torch.zeros(0, 2, device=device)
    bufs = [torch.zeros(0, 2, 8, device=device), torch.zeros(0, 9, 2, device=device), None]
    dx = _ops.lora_linear_bwd_ps(gy, x, W, A, B, None, h, 1.0, 0.0, 0, 0, 0, True, *bufs, 1.0,
                                               backend)
    assert dx.shape == x.shape


SEGMENTS = [0, 40, 40, 103, 150]   # includes an empty parameter


def _grad_sample(n, device):
    g = torch.randn(n, SEGMENTS[-1], device=device) * torch.rand(n, 1, device=device) * 3
    return g


@pytest.mark.parametrize("backend_device", backend_devices("grad_sample_norms"), ids=backend_ids)
def test_sq_norms_match_float64(backend_device):
    backend, device = backend_device
    fresh_seed()
    g = _grad_sample(9, device)
    sq = _ops.grad_sample_norms(g, SEGMENTS, backend)
    ref = reference.grad_sample_sq_norms(g.double(), SEGMENTS)
    assert sq.shape == (9, 4) and sq.dtype == torch.float32
    assert rel_err(sq, ref) < 1e-5
    assert (sq[:, 1] == 0).all()


@pytest.mark.parametrize("backend_device", backend_devices("clip_reduce_noise"), ids=backend_ids)
@pytest.mark.parametrize("per_layer", [False, True], ids=["flat", "per_layer"])
@pytest.mark.parametrize("noise", ["none", "philox", "tensor"])
def test_clip_reduce_noise_matches_float64(backend_device, per_layer, noise):
    backend, device = backend_device
    fresh_seed()
    g = _grad_sample(37, device)
    g[3, 7] = float("inf")
    g[5, 120] = float("nan")
    g[8] = 0.0                                      # zero norm: factor 1, contributes 0
    sq = reference.grad_sample_sq_norms(g, SEGMENTS).float()
    bounds = [1.5, 0.5, 4.0, 2.0] if per_layer else [3.0]
    acc = torch.randn(SEGMENTS[-1], device=device)
    noise_t = torch.randn(SEGMENTS[-1], device=device) if noise == "tensor" else None
    std = 0.0 if noise == "none" else 0.8
    kw = dict(per_layer=per_layer, acc=acc, noise=noise_t, noise_std=std, seed=2**62 + 9, offset=2**33 + 1,
              out_scale=0.25)
    got = _ops.clip_reduce_noise(g, sq, SEGMENTS, bounds, per_layer, acc, noise_t, std, kw["seed"],
                                               kw["offset"], 0.25, backend)
    ref = reference.clip_reduce_noise(g.double(), sq.double(), SEGMENTS, bounds, **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < 2e-5


def test_clip_bounds_every_sample(backend_device):
    """Each clipped sample has norm ≤ C: summing one sample at a time shows it."""
    backend, device = backend_device
    fresh_seed()
    g = _grad_sample(6, device) * 10
    sq = _ops.grad_sample_norms(g, SEGMENTS, backend)
    for i in range(6):
        one = _ops.clip_reduce_noise(g[i:i + 1], sq[i:i + 1], SEGMENTS, [0.7], False, None, None, 0.0,
                                                   0, 0, 1.0, backend)
        norm = one.norm().item()
        assert norm <= 0.7 * (1 + 1e-5)
        assert math.isclose(norm, min(0.7, g[i].norm().item()), rel_tol=1e-5)


# ---------------------------------------------------------------- noise


def _kernel_noise(backend, device, n, seed, offset):
    """Pure noise from the fused step: no samples, std 1."""
    empty = torch.zeros(0, n, device=device)
    return _ops.clip_reduce_noise(empty, torch.zeros(0, 1, device=device), [0, n], [1.0], False,
                                                None, None, 1.0, seed, offset, 1.0, backend)


@pytest.fixture(params=backend_devices("lora_linear_fwd"), ids=backend_ids)
def lora_backend_device(request):
    """The LoRA linear's backends, its hybrid plan (torch.mm base GEMMs) included."""
    return request.param


@pytest.mark.parametrize("backend_device", backend_devices("clip_reduce_noise"), ids=backend_ids)
def test_noise_of_parameters_that_start_between_philox_calls(backend_device):
    """The noise of column j is number j mod 4 of call offset + ⌊j/4⌋ whatever the parameter
    boundaries: chunks that start in the middle of a call (5, 38) still draw the right words."""
    backend, device = backend_device
    segments = [0, 5, 38, 1001]
    empty = torch.zeros(0, segments[-1], device=device)
    got = _ops.clip_reduce_noise(empty, torch.zeros(0, 3, device=device), segments, [1.0, 2.0, 3.0],
                                               True, None, None, 1.0, 77, 3, 1.0, backend)
    torch.testing.assert_close(got.cpu(), reference.normal_grid(77, 3, 1, segments[-1])[0], rtol=2e-5, atol=2e-5)


def test_kernel_noise_equals_reference(backend_device):
    backend, device = backend_device
    for seed, offset in [(0, 0), (2**63 - 25, 2**32 - 100), (987654321, 7 * 2**40)]:
        got = _kernel_noise(backend, device, 3000, seed, offset)
        ref = reference.normal_grid(seed, offset, 1, 3000)[0]
        torch.testing.assert_close(got.cpu(), ref, rtol=2e-5, atol=2e-5)


def test_noise_is_standard_normal(backend_device):
    stats = pytest.importorskip("scipy.stats")
    backend, device = backend_device
    n = 120_000
    z = _kernel_noise(backend, device, n, int.from_bytes(__import__("os").urandom(7), "little"), 0).double().cpu()
    # mean and std within 6 standard errors; KS against N(0, 1)
    assert abs(z.mean().item()) < 6 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 6 * math.sqrt(0.5 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    assert (z.abs() < 6.7).all()   # the Box–Muller tail bound of a 32-bit u1


def test_noise_replays_from_seed(backend_device):
    backend, device = backend_device
    a = _kernel_noise(backend, device, 500, 42, 10)
    b = _kernel_noise(backend, device, 500, 42, 10)
    c = _kernel_noise(backend, device, 500, 43, 10)
    d = _kernel_noise(backend, device, 500, 42, 510)
    assert torch.equal(a, b)
    for other in (c, d):   # other keys or counters: unrelated draws
        assert torch.isclose(a, other).float().mean() < 0.01
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 0.2


def test_chunks_start_on_philox_calls_and_cover_every_column_once():
    from lorafast.kernels.dp import chunk_rows
    segments = (0, 5, 38, 1001, 1001, 1300)
    for bd in (8, 64, 256):
        rows = chunk_rows(segments, bd)
        covered = [c for a, b, _ in rows for c in range(a, b)]
        assert covered == list(range(segments[-1]))
        for a, b, p in rows:
            assert segments[p] <= a < b <= segments[p + 1] and b - (a - a % 4) <= bd


@pytest.mark.skipif("triton" not in lorafast.available_backends() or HAS_CUDA, reason="needs the Triton interpreter")
def test_a_warm_step_builds_no_device_tensor(monkeypatch):
    """The chunk table and the clip bounds are built once per layout: a later step makes no
    host→device copy (torch.tensor is never called)."""
    from lorafast.kernels import dp as D
    g = torch.randn(3, 40)
    segments = [0, 24, 40]
    sq = D.grad_sample_sq_norms(g, segments)
    kw = dict(per_layer=True, acc=None, noise=None, noise_std=1.0, seed=1, out_scale=1.0)
    first = D.clip_reduce_noise(g, sq, segments, [1.0, 0.5], offset=0, **kw)
    built = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or real(*a, **k))
    again = D.clip_reduce_noise(g, sq, segments, [1.0, 0.5], offset=0, **kw)
    D.grad_sample_sq_norms(g, segments)
    assert built == [] and torch.equal(first, again)
