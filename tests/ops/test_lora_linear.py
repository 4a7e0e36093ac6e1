"""lora_linear on every backend present against a float64 reference."""
import pytest
import torch

import lorafast
from support.common import DTYPES, assert_close, backend_devices, backend_ids, fresh_seed, rel_err
from support.lora_inputs import assert_matches_reference, baseline_forward, leaves, make_params, make_x, truth


@pytest.fixture(params=backend_devices("lora_linear_fwd"), ids=backend_ids)
def backend_device(request):
    """Every backend of the LoRA linear, the hybrid plan (torch.mm base GEMMs) included."""
    return request.param

SHAPES = [  # (x layout, in, out, r, bias, bias trains)
    ("2d", 33, 47, 3, True, True),
    ("3d", 33, 47, 1, False, False),
    ("strided", 40, 24, 3, True, False),
    ("transposed", 17, 33, 5, True, True),
]


def run(fn, x, p, gy):
    y = fn(x, p)
    ls = leaves(x, p)
    grads = torch.autograd.grad(y, [t for _, t in ls], gy) if ls else ()
    return y, {n: g for (n, _), g in zip(ls, grads)}


def lorafast_fn(backend, scaling, dropout_p=0.0, seed=None):
    def fn(x, p):
        return lorafast.lora_linear(x, p["weight"], p["A"], p["B"], p["bias"], scaling=scaling, lora_R=p["R"],
                                    dropout_p=dropout_p, backend=backend, seed=seed)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["lora", "ffa", "xs"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-in{s[1]}-out{s[2]}-r{s[3]}")
def test_matches_float64_reference(backend_device, dtype, variant, shape):
    backend, device = backend_device
    fresh_seed()
    case, in_f, out_f, r, bias, bias_grad = shape
    x = make_x(case, in_f, dtype, device).requires_grad_(True)
    p = make_params(in_f, out_f, r, dtype, device, variant=variant, bias=bias, bias_grad=bias_grad)
    s = 0.75
    y_shape = (*x.shape[:-1], out_f)
    gy = torch.randn(y_shape, device=device).to(dtype)

    y, grads = run(lorafast_fn(backend, s), x, p, gy)
    assert y.shape == y_shape
    assert_matches_reference(y, grads, x, p, truth(x, p, s, gy), run(lambda x, p: baseline_forward(x, p, s), x, p, gy),
                             dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_f", [9, 47, 33])
def test_odd_out_features_with_a_bias(backend_device, dtype, out_f):
    """A classifier head of 9 classes, and other out_features that no tile or vector width
    divides, with a trained bias and dropout: the GEMM's last tile wraps its columns. On a GPU a
    false alignment promise there faults; under the interpreter the contract checks see it."""
    backend, device = backend_device
    fresh_seed()
    in_f, r, s = 40, 4, 0.5
    x = make_x("3d", in_f, dtype, device).requires_grad_(True)
    p = make_params(in_f, out_f, r, dtype, device, bias=True, bias_grad=True)
    gy = torch.randn((*x.shape[:-1], out_f), device=device).to(dtype)
    y, grads = run(lorafast_fn(backend, s), x, p, gy)
    y_base, g_base = run(lambda x, p: baseline_forward(x, p, s), x, p, gy)
    y_ref, g_ref = truth(x, p, s, gy)
    assert_close("y", y, y_ref, y_base, dtype)
    assert set(grads) == {"x", "A", "B", "bias"}
    for name, g in grads.items():
        assert_close(f"d{name}", g, g_ref[name], g_base[name], dtype)


@pytest.mark.parametrize("variant", ["lora", "ffa", "xs"])
def test_only_needed_grads_are_computed(backend_device, variant):
    backend, device = backend_device
    fresh_seed()
    x = make_x("2d", 33, torch.float32, device)          # x does not require grad
    p = make_params(33, 47, 3, torch.float32, device, variant=variant)
    y = lorafast_fn(backend, 0.5)(x, p)
    y.sum().backward()
    assert x.grad is None
    for k in ("A", "B", "R"):
        t = p[k]
        if t is not None:
            assert (t.grad is not None) == t.requires_grad, k


def test_frozen_adapters_skip_kernels(monkeypatch):
    """With only B trainable and x frozen, the backward runs no GEMM and no pass over x."""
    if "triton" not in lorafast.available_backends() or torch.cuda.is_available():
        pytest.skip("counts interpreter launches on CPU")
    from lorafast.kernels import lora_linear as K
    calls = []
    for name in ("project", "gemm"):
        orig = getattr(K, name)
        monkeypatch.setattr(K, name,
                            lambda *a, _o=orig, _n=name, **kw: (calls.append((_n, a[0].shape)), _o(*a, **kw))[1])
    p = make_params(33, 47, 3, torch.float32, "cpu", variant="ffa")
    x = torch.randn(9, 33)
    y = lorafast.lora_linear(x, p["weight"], p["A"], p["B"], p["bias"], backend="triton")
    assert [c[0] for c in calls] == ["project", "gemm"]
    calls.clear()
    y.sum().backward()
    assert [c[0] for c in calls] == ["project"], calls  # one pass over dY gives dB
    assert p["B"].grad is not None and p["A"].grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["lora", "xs"])
def test_dropout_matches_reference(backend_device, dtype, variant):
    backend, device = backend_device
    fresh_seed()
    x = make_x("3d", 33, dtype, device).requires_grad_(True)
    p = make_params(33, 47, 3, dtype, device, variant=variant)
    gy = torch.randn(2, 7, 47, device=device).to(dtype)
    seed, pdrop = 1234567, 0.4
    y, grads = run(lorafast_fn(backend, 0.5, pdrop, seed), x, p, gy)
    y_base, g_base = run(lambda x, p: baseline_forward(x, p, 0.5, pdrop, seed), x, p, gy)
    y_ref, g_ref = truth(x, p, 0.5, gy, pdrop, seed)
    assert_close("y", y, y_ref, y_base, dtype)
    for name, g in grads.items():
        assert_close(f"d{name}", g, g_ref[name], g_base[name], dtype)
    # the mask depends on the seed
    y_other = lorafast_fn(backend, 0.5, pdrop, seed + 1)(x, p)
    assert rel_err(y_other, y) > 1e-3


def test_dropout_mask_keep_rate_and_replay(backend_device):
    """With A = B = I, W = 0 and s = 1, y = drop(x): read the mask off the output."""
    backend, device = backend_device
    n, pdrop = 64, 0.3
    eye = torch.eye(n, device=device)
    x = torch.rand(40, n, device=device) + 0.5
    fn = lambda seed: lorafast.lora_linear(x, torch.zeros(n, n, device=device), eye, eye, scaling=1.0,  # noqa: E731
                                           dropout_p=pdrop, backend=backend, seed=seed)
    y = fn(99)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - pdrop), rtol=1e-6, atol=0)
    rate, count = kept.double().mean().item(), kept.numel()
    sigma = ((1 - pdrop) * pdrop / count) ** 0.5
    assert abs(rate - (1 - pdrop)) < 5 * sigma, rate
    assert torch.equal(fn(99), y)                      # same seed, same mask
    assert not torch.equal(fn(100) != 0, kept)         # another seed, another mask


def test_dropout_gradient_finite_difference(backend_device):
    """At a fixed seed the layer is linear in x, A and B separately, so a central difference
    along a random direction must equal the analytic directional derivative: this fails if
    the backward regenerated a different mask than the forward used."""
    backend, device = backend_device
    fresh_seed()
    p = make_params(33, 47, 3, torch.float32, device, variant="lora")
    x = make_x("2d", 33, torch.float32, device).requires_grad_(True)
    gy = torch.randn(13, 47, device=device)
    f = lorafast_fn(backend, 0.5, 0.35, 2024)
    loss = lambda x, A, B: (f(x, dict(p, A=A, B=B)) * gy).sum()  # noqa: E731
    l0 = loss(x, p["A"], p["B"])
    gx, gA, gB = torch.autograd.grad(l0, [x, p["A"], p["B"]])
    eps = 1e-2
    for i, g in enumerate((gx, gA, gB)):
        v = torch.randn_like(g)
        args_p = [x.detach(), p["A"].detach(), p["B"].detach()]
        args_m = list(args_p)
        args_p[i] = args_p[i] + eps * v
        args_m[i] = args_m[i] - eps * v
        with torch.no_grad():
            fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
        analytic = (g * v).sum()
        assert abs(fd - analytic) <= 1e-3 * (abs(analytic) + 1), (i, fd.item(), analytic.item())


def test_reference_backward_gradcheck_with_dropout():
    """torch.autograd.gradcheck of the op (torch backend) in float64 at a fixed dropout seed."""
    fresh_seed()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 6, dtype=torch.float64)
    A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    R = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    f = lambda x, A, B, R, b: lorafast.lora_linear(x, W, A, B, b, scaling=0.3, lora_R=R, dropout_p=0.25,  # noqa: E731
                                                   backend="torch", seed=77)
    assert torch.autograd.gradcheck(f, (x, A, B, R, b))


def test_empty_batch(backend_device):
    backend, device = backend_device
    p = make_params(33, 47, 3, torch.float32, device)
    x = torch.randn(0, 33, device=device, requires_grad=True)
    y = lorafast_fn(backend, 1.0)(x, p)
    assert y.shape == (0, 47)
    y.sum().backward()
    assert p["B"].grad.abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 64])
def test_bf16_at_model_size_on_gpu(r):
    fresh_seed()
    dtype, dev = torch.bfloat16, "cuda"
    x = torch.randn(4, 512, 1024, device=dev, dtype=dtype, requires_grad=True)
    p = make_params(1024, 2048, r, dtype, dev, variant="lora")
    gy = torch.randn(4, 512, 2048, device=dev, dtype=dtype)
    y, grads = run(lorafast_fn("triton", 2.0), x, p, gy)
    y_base, g_base = run(lambda x, p: baseline_forward(x, p, 2.0), x, p, gy)
    y_ref, g_ref = truth(x, p, 2.0, gy)
    assert_close("y", y, y_ref, y_base, dtype)
    for name, g in grads.items():
        assert_close(f"d{name}", g, g_ref[name], g_base[name], dtype)


@pytest.mark.parametrize("rows", [10, 40], ids=["split-K", "row-blocks"])
@pytest.mark.parametrize("variant", ["lora", "xs"])
def test_projection_reductions_split_k_and_staggered(rows, variant):
    """The projection's reductions (h, dA, dB, dR, dbias) when K is split over programs (few
    rows: OUT summed with atomics) and when each program starts its K walk at a different
    tile: K = 100 is four interpreted tiles, the last one partial. fp32, with dropout, against
    the float64 reference (the same mask)."""
    if "triton" not in lorafast.available_backends() or torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (on a GPU the block sizes differ)")
    from lorafast.kernels import lora_linear as K
    bm, bk, splits = K._project_grid(rows, 100, per_sample=0, r_pad=16, can_split=variant == "lora", device=None)
    assert (splits > 1) == (rows == 10 and variant == "lora") and triton_tiles(100, bk) == 4
    fresh_seed()
    x = torch.randn(rows, 100, requires_grad=True)
    p = make_params(100, 24, 3, torch.float32, "cpu", variant=variant, bias=True, bias_grad=True)
    gy = torch.randn(rows, 24)
    fn = lorafast_fn("triton", 0.5, dropout_p=0.2, seed=1234)
    y, grads = run(fn, x, p, gy)
    y_ref, g_ref = truth(x, p, 0.5, gy, dropout_p=0.2, seed=1234)
    assert rel_err(y, y_ref) < 1e-5
    for name, g in grads.items():
        assert rel_err(g, g_ref[name]) < 1e-5, name


def triton_tiles(k, bk):
    return -(-k // bk)
