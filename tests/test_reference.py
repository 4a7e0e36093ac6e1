"""The reference itself: Philox against published vectors and the Triton kernels,
and the hand-written backward against autograd in float64."""
import pytest
import torch

import lorafast
from lorafast import reference
from helpers import fresh_seed

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


def test_philox_matches_triton_kernels():
    """The kernels' counter mapping equals the reference's, 64-bit counters and seeds included."""
    if "triton" not in lorafast.available_backends():
        pytest.skip("triton not installed")
    from triton_probes import draw_uniform as draw
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed, base in [(0, 0), (2**63 - 25, 2**32 - 100), (123456789, 7 * 2**40)]:
        out = torch.empty(300, device=device)
        draw[(3,)](out, seed, base, 300, BLOCK=128)
        ref = reference.philox_uniform(seed, torch.arange(300, dtype=torch.int64) + base)
        assert torch.equal(out.cpu(), ref), (seed, base)


def test_uniforms_look_uniform():
    u = reference.philox_uniform(2**40 + 3, torch.arange(200_000))
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
