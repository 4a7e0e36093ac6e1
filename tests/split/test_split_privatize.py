"""lorafast.split.privatize: the fused clip-and-noise kernel against the reference, its noise,
its gradients, and bad input."""
import math

import pytest
import torch

from support.common import backend_devices, backend_ids, fresh_seed
from lorafast import _layout, _ops, reference
from lorafast.split.privatize import privatize

MODES = ("sample", "token", "element")
SHAPES = ((3, 5, 7), (2, 131), (4, 9, 3, 5), (1, 1, 1))
LOW = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}   # about 1–2 ulp of the dtype


def _h(shape, dtype, device, layout="contiguous"):
    h = torch.randn(*shape) * 2
    if layout == "transposed":      # same values, non-contiguous memory
        h = h.transpose(0, -1).contiguous().transpose(0, -1)
    return h.to(device=device, dtype=dtype)


def _norms(t, mode):
    rows, length = _layout.privatize_rows(t.shape, mode)
    return t.double().reshape(rows, length).norm(dim=1)


@pytest.mark.parametrize("backend_device", backend_devices("privatize"), ids=backend_ids)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_no_noise_matches_the_float64_reference(backend_device, mode, shape, layout):
    backend, device = backend_device
    fresh_seed()
    for dtype in (torch.float32, torch.float16):
        h = _h(shape, dtype, device, layout)
        clip = 1.3
        y = privatize(h, clip, 0.0, mode=mode, backend=backend)
        want, _ = reference.privatize(h.double(), clip, 0.0, mode=mode, seed=0)
        assert y.dtype == dtype and y.shape == h.shape
        torch.testing.assert_close(y.double(), want, rtol=LOW[dtype], atol=LOW[dtype] * clip)
        if mode == "element":
            assert (y.abs() <= clip).all()
        else:
            assert (_norms(y, mode) <= clip * (1 + 4 * LOW[dtype])).all()
        clipped = _norms(h, mode) > clip if mode != "element" else None
        if clipped is not None and clipped.any() and not clipped.all():
            # rows under the bound pass unchanged
            rows, length = _layout.privatize_rows(h.shape, mode)
            same = ~clipped
            torch.testing.assert_close(y.reshape(rows, length)[same], h.reshape(rows, length)[same], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_bf16_on_gpu(mode):
    fresh_seed()
    h = _h((4, 33, 257), torch.bfloat16, "cuda")
    y = privatize(h, 2.0, 0.5, mode=mode, seed=11, backend="triton")
    want, _ = reference.privatize(h, 2.0, 1.0, mode=mode, seed=11)
    torch.testing.assert_close(y.float(), want.float(), rtol=LOW[torch.bfloat16], atol=LOW[torch.bfloat16] * 2)


def test_long_sample_rows_take_the_two_pass_path(backend_device):
    """A sample longer than one block is normed by a separate launch (atomics over chunks)."""
    backend, device = backend_device
    fresh_seed()
    h = _h((3, 17, 29), torch.float32, device)          # 493 elements per sample
    y = privatize(h, 4.0, 0.0, mode="sample", backend=backend)
    want, _ = reference.privatize(h.double(), 4.0, 0.0, mode="sample", seed=0)
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend_device", backend_devices("privatize"), ids=backend_ids)
@pytest.mark.parametrize("mode", MODES)
def test_noise_equals_the_reference_philox_stream(backend_device, mode):
    backend, device = backend_device
    fresh_seed()
    h = _h((2, 7, 11), torch.float32, device)
    seed = int.from_bytes(torch.randint(0, 2**31, (1,)).numpy().tobytes()[:4], "little")
    y = privatize(h, 0.8, 1.7, mode=mode, seed=seed, backend=backend)
    want, _ = reference.privatize(h, 0.8, 1.7 * 0.8, mode=mode, seed=seed)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_noise_statistics_and_replay(backend_device):
    scipy_stats = pytest.importorskip("scipy.stats")
    backend, device = backend_device
    fresh_seed()
    n = 40_000 if backend == "triton" and device == "cpu" else 200_000
    h = _h((n // 100, 100), torch.float32, device)
    clip, sigma = 1e6, 0.75                 # no clipping: y − h is the noise alone
    y = privatize(h, clip, sigma / clip, mode="element", seed=1234, backend=backend)
    z = ((y - h).double() / sigma).flatten().cpu()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert scipy_stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    assert torch.equal(y, privatize(h, clip, sigma / clip, mode="element", seed=1234, backend=backend))
    assert not torch.equal(y, privatize(h, clip, sigma / clip, mode="element", seed=1235, backend=backend))
    a = privatize(h, clip, sigma / clip, mode="element", backend=backend)       # seeds from the OS
    b = privatize(h, clip, sigma / clip, mode="element", backend=backend)
    assert not torch.equal(a, b)


def test_noise_is_not_tied_to_manual_seed():
    import lorafast
    h = torch.randn(4, 8)
    lorafast.manual_seed(0)
    torch.manual_seed(0)
    a = privatize(h, 1.0, 1.0)
    lorafast.manual_seed(0)
    torch.manual_seed(0)
    assert not torch.equal(a, privatize(h, 1.0, 1.0))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_autograd_on_the_reference(backend_device, mode):
    backend, device = backend_device
    fresh_seed()
    dtype = torch.float64 if backend == "torch" else torch.float32
    h = _h((3, 4, 5), dtype, device)
    with torch.no_grad():
        h[0] *= 0.05                         # a sample (and its tokens) under the bound
        h[1, 0] = 0.0                        # a zero token
        h[2, 1, 2] = 1.0                     # an element exactly at the bound
    h.requires_grad_(True)
    clip = 1.0
    y = privatize(h, clip, 0.3, mode=mode, seed=7, backend=backend)
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, h, g)

    h_ref = h.detach().double().requires_grad_(True)
    y_ref, _ = reference.privatize(h_ref, clip, 0.3 * clip, mode=mode, seed=7)
    (want,) = torch.autograd.grad(y_ref, h_ref, g.double())
    assert torch.isfinite(got).all()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if mode != "element":
        # the clipped rows' gradients are orthogonal to their rows: the Jacobian projects out x̂
        rows, length = _layout.privatize_rows(h.shape, mode)
        big = _norms(h.detach(), mode) > clip
        dots = (got.double().reshape(rows, length) * h.detach().double().reshape(rows, length)).sum(1)
        proj = (g.double().reshape(rows, length) * h.detach().double().reshape(rows, length)).sum(1)
        assert big.any() and (dots[big].abs() < 1e-5 * (1 + proj[big].abs())).all()


def test_gradcheck_float64():
    fresh_seed()
    h = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda t, m=mode: privatize(t, 1.0, 0.0, mode=m, backend="torch"), (h,))


def test_opcheck():
    h = torch.randn(3, 4, 5)
    for mode in MODES:
        torch.library.opcheck(_ops.REGISTERED["privatize"], (h, 1.0, 0.5, mode, 3, 0, "torch"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(clip_norm=-1.0), "clip_norm"),
    (dict(clip_norm=float("nan")), "clip_norm"),
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(noise_multiplier=float("inf")), "noise_multiplier"),
    (dict(mode="row"), "mode"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
])
def test_bad_input(kwargs, match):
    args = dict(clip_norm=1.0, noise_multiplier=1.0)
    args.update(kwargs)
    h = torch.randn(2, 3)
    before = h.clone()
    with pytest.raises(ValueError, match=match):
        privatize(h, args.pop("clip_norm"), args.pop("noise_multiplier"), **args)
    assert torch.equal(h, before)
    with pytest.raises(ValueError, match="h must"):
        privatize(torch.randn(5), 1.0, 1.0)
    with pytest.raises(ValueError, match="h must"):
        privatize(torch.arange(6).view(2, 3), 1.0, 1.0)



def test_cuda_backend_says_why_it_cannot_run():
    import lorafast
    usable, why = lorafast._backend.cuda_status()
    if usable:
        pytest.skip("the CUDA backend is usable here")
    with pytest.raises(RuntimeError, match="backend='cuda' was requested but"):
        privatize(torch.randn(2, 3), 1.0, 1.0, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_kernel_matches_the_reference_and_triton(mode, dtype):
    fresh_seed()
    for shape in ((3, 5, 7), (2, 4099), (4, 33, 257)):      # one-pass and two-pass rows
        h = _h(shape, dtype, "cuda")
        y = privatize(h, 1.3, 0.0, mode=mode, backend="cuda")
        want, _ = reference.privatize(h.double(), 1.3, 0.0, mode=mode, seed=0)
        torch.testing.assert_close(y.double(), want, rtol=LOW[dtype], atol=LOW[dtype] * 1.3)
        noisy = privatize(h, 1.3, 0.8, mode=mode, seed=42, backend="cuda")
        same = privatize(h, 1.3, 0.8, mode=mode, seed=42, backend="triton")
        torch.testing.assert_close(noisy, same, rtol=LOW[dtype], atol=LOW[dtype] * 1.3)
