"""The reference itself: Philox against published vectors and the Triton kernels,
and the hand-written backward against autograd in float64."""
import pytest
import torch

import lorafast
from lorafast import reference
from support.common import fresh_seed

# Random123 known-answer vectors for philox4x32-10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    words = reference.philox4x32_rounds(*(torch.tensor([c]) for c in ctr), *key)
    assert tuple(w.item() for w in words) == expected


def _triton_grid(draw_normal, seed, offset, M, N, BM=4, BN=16):
    import triton
    from support.triton_probes import draw_grid
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(M, N, device=device)
    draw_grid[(triton.cdiv(M, BM), triton.cdiv(N, BN))](out, seed, offset, M, N, BM=BM, BN=BN, NORMAL=draw_normal)
    return out.cpu()


CASES = [(0, 0), (2**63 - 25, 2**32 - 3), (123456789, 7 * 2**40)]


@pytest.mark.parametrize("seed,offset", CASES)
def test_philox_grid_matches_triton_kernels(seed, offset):
    """The kernels' mapping equals the reference's (uniforms bit for bit, normals to a few ulp),
    64-bit call counters and seeds included; 37 columns leave a partial call at each row's end."""
    if "triton" not in lorafast.available_backends():
        pytest.skip("triton not installed")
    assert torch.equal(_triton_grid(False, seed, offset, 5, 37), reference.uniform_grid(seed, offset, 5, 37))
    torch.testing.assert_close(_triton_grid(True, seed, offset, 5, 37), reference.normal_grid(seed, offset, 5, 37),
                               rtol=2e-6, atol=2e-6)


def test_triton_dropout_keep_matches_reference():
    if "triton" not in lorafast.available_backends():
        pytest.skip("triton not installed")
    import triton
    from support.triton_probes import draw_keep
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(9, 45, device=device, dtype=torch.int8)
    draw_keep[(triton.cdiv(9, 4), triton.cdiv(45, 16))](out, 77, 5, 9, 45, 0.3, BM=4, BN=16)
    assert torch.equal(out.cpu().bool(), reference.dropout_keep(77, 5, 9, 45, 0.3))


def test_every_philox_word_is_used_once():
    """Element (m, k) takes word k mod 4 of call offset + m⌈K/4⌉ + ⌊k/4⌋: the uniforms of a
    tensor are the four words of consecutive calls, row after row, with no call reused."""
    seed, offset, M, K = 99, 13, 3, 10
    calls = torch.arange(reference.philox_calls(M, K)) + offset
    words = torch.stack(reference.philox4x32(seed, calls), dim=-1)        # (calls, 4)
    u = (words >> 8).to(torch.float32) / 2**24
    grid = reference.uniform_grid(seed, offset, M, K)
    assert reference.philox_calls(M, K) == M * 3
    assert torch.equal(grid, u.view(M, 12)[:, :K])
    # the next draw starts where this one ended: no overlap
    nxt = reference.uniform_grid(seed, offset + reference.philox_calls(M, K), 1, 4)
    assert torch.equal(nxt[0], reference.philox_uniform4(seed, torch.tensor(offset + 9)))


def test_normals_use_both_box_muller_branches():
    """The four normals of a call are ρ₀₁(cos θ₀₁, sin θ₀₁) and ρ₂₃(cos θ₂₃, sin θ₂₃)."""
    calls = torch.arange(1000) + 2**33
    x0, x1, x2, x3 = (w.double() for w in reference.philox4x32(5, calls))
    z = reference.philox_normal4(5, calls).double()
    for (a, b), cols in (((x0, x1), (0, 1)), ((x2, x3), (2, 3))):
        rho = torch.sqrt(-2 * torch.log((a + 1) * 2.0**-32))
        theta = 2 * torch.pi * torch.floor(b / 256) * 2.0**-24
        torch.testing.assert_close(z[:, cols[0]], rho * torch.cos(theta), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z[:, cols[1]], rho * torch.sin(theta), rtol=1e-5, atol=1e-5)
    # cos and sin of the same angle are uncorrelated, and each column is standard normal
    zz = reference.normal_grid(2**40 + 3, 0, 1, 400_000)[0].double().view(-1, 4)
    assert (zz.mean(0).abs() < 6 / 316).all() and ((zz.std(0) - 1).abs() < 0.01).all()
    assert abs(torch.corrcoef(zz.T)[0, 1].item()) < 0.01 and abs(torch.corrcoef(zz.T)[2, 3].item()) < 0.01


def test_uniforms_look_uniform():
    u = reference.uniform_grid(2**40 + 3, 0, 1, 200_000)
    assert 0 <= u.min() and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005


@pytest.mark.parametrize("variant", ["lora", "xs"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_reference_backward_equals_autograd(variant, dropout_p):
    fresh_seed()
    f64 = torch.float64
    x = torch.randn(2, 5, 7, dtype=f64, requires_grad=True)
    W = torch.randn(6, 7, dtype=f64)
    A = torch.randn(3, 7, dtype=f64, requires_grad=True)
    B = torch.randn(6, 3, dtype=f64, requires_grad=True)
    R = torch.randn(3, 3, dtype=f64, requires_grad=True) if variant == "xs" else None
    b = torch.randn(6, dtype=f64, requires_grad=True)
    kw = dict(scaling=0.6, dropout_p=dropout_p, seed=5, offset=11)
    y, h = reference.lora_linear_forward(x, W, A, B, b, R, **kw)
    gy = torch.randn_like(y)
    inputs = [x, A, B, b] + ([R] if R is not None else [])
    auto = torch.autograd.grad(y, inputs, gy)
    dx, dA, dB, dR, db = reference.lora_linear_backward(gy, x, W, A, B, R, h.detach(), needs=(True,) * 4 + (True,),
                                                        bias_dtype=f64, **kw)
    mine = [dx, dA, dB, db] + ([dR] if R is not None else [])
    for a, m in zip(auto, mine):
        torch.testing.assert_close(m, a, rtol=1e-12, atol=1e-12)


def test_dropout_keep_rate():
    for p in (0.1, 0.5, 0.9):
        keep = reference.dropout_keep(31337, 0, 300, 200, p)
        n = keep.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
