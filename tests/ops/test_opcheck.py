"""torch.library.opcheck for every registered lorafast:: op on every backend present: the
schema (aliasing and mutation as declared), the fake kernel against the real one, the
autograd registration and AOT dispatch. Tiny CPU tensors: Triton runs interpreted there,
and the CUDA kernels under their host emulation."""
import pytest
import torch

from support.common import backend_devices, backend_ids
from lorafast import _backend, _ops

M, T, IN, OUT, R = 2, 3, 13, 9, 3


def _rand(*shape, grad=False):
    return torch.randn(*shape).requires_grad_(grad)


def _lora(with_r: bool):
    x = _rand(M, T, IN, grad=True)
    W = _rand(OUT, IN) / IN ** 0.5
    A, B = _rand(R, IN, grad=True), _rand(OUT, R, grad=True)
    Rm = _rand(R, R, grad=True) if with_r else None
    return x, W, A, B, _rand(OUT, grad=True), Rm


def _args(op: str, backend: str, variant: int):
    """The op's arguments; ``variant`` 0/1 toggles its optional inputs (lora_R, dropout, noise,
    compensation, clipping mode)."""
    p = 0.2 * variant
    if op == "lora_linear_fwd":
        x, W, A, B, b, Rm = _lora(bool(variant))
        return (x, W, A, B, b, Rm, 0.5, p, 17, 4, backend)
    if op in ("lora_linear_bwd", "lora_linear_bwd_ps"):
        x, W, A, B, b, Rm = (t.detach() if t is not None else None for t in _lora(bool(variant)))
        h = torch.randn(M * T, R)
        gy = torch.randn(M, T, OUT)
        if op == "lora_linear_bwd":
            needs = [True, True, True, Rm is not None, True]
            return (gy, x, W, A, B, Rm, b, h, 0.5, p, 17, 4, needs, backend)
        bufs = (torch.zeros(M, R, IN), torch.zeros(M, OUT, R), torch.zeros(M, R, R) if Rm is not None else None)
        return (gy, x, W, A, B, Rm, h, 0.5, p, 17, 4, M, True, *bufs, 0.25, backend)
    if op.startswith("lora_linear_multi"):
        k = 3   # samples of clients 2 and 0 (client 1 has none)
        rows, seg = _ops.client_segments(torch.tensor([2, 0]), T)
        scale = torch.tensor([0.5, 1.0, 2.0])
        x, W, b = _rand(M, T, IN, grad=True), _rand(OUT, IN) / IN ** 0.5, _rand(OUT, grad=True)
        A, B = _rand(k, R, IN, grad=True), _rand(k, OUT, R, grad=True)
        Rm = _rand(k, R, R, grad=True) if variant else None
        if op == "lora_linear_multi_fwd":
            return (x, W, A, B, b, Rm, rows, seg, scale, p, 17, 4, backend)
        x, A, B, b, Rm = (t.detach() if t is not None else None for t in (x, A, B, b, Rm))
        gy, h = torch.randn(M, T, OUT), torch.randn(M * T, R)
        if op == "lora_linear_multi_bwd_ps":
            bufs = (torch.zeros(M, R, IN), torch.zeros(M, OUT, R), torch.zeros(M, R, R) if Rm is not None else None)
            return (gy, x, W, A, B, Rm, h, rows, seg, scale, p, 17, 4, True, *bufs, 0.25, backend)
        needs = [True, True, True, Rm is not None, True]
        return (gy, x, W, A, B, Rm, b, h, rows, seg, scale, p, 17, 4, needs, backend)
    segments = [0, 7, 20]
    g = torch.randn(5, segments[-1]) * 2
    if op == "grad_sample_norms":
        return (g, segments, backend)
    if op == "clip_reduce_noise":
        sq = _ops.grad_sample_norms(g, segments, "torch")
        acc = torch.randn(segments[-1]) if variant else None
        return (g, sq, segments, [1.0, 0.5] if variant else [1.5], bool(variant), acc, None, 0.3 * variant, 5, 8,
                0.5, backend)
    if op == "fedex_merge_":
        return (torch.randn(OUT, IN), torch.randn(OUT, 2 * R), torch.randn(2 * R, IN),
                torch.zeros(OUT, IN) if variant else None, backend)
    if op == "privatize":
        return (_rand(M, T, IN, grad=True), 1.0, 0.5 * variant, ("sample", "token")[variant], 3, 0, backend)
    if op in ("dequantize_", "lora_linear_q_fwd", "lora_linear_q_bwd"):
        q = _ops.quant_args(_quant_weight(variant))
        if op == "dequantize_":
            return (*q, torch.empty(OUT, IN), backend)
        x, _, A, B, b, Rm = _lora(bool(variant))
        U, V = (torch.randn(OUT, 2) * 0.1, torch.randn(2, IN)) if variant else (None, None)
        if op == "lora_linear_q_fwd":
            return (x, *q, A, B, b, Rm, U, V, 0.5, p, 17, 4, False, backend)
        x, A, B, b, Rm = (t.detach() if t is not None else None for t in (x, A, B, b, Rm))
        needs = [True, True, True, Rm is not None, True]
        return (torch.randn(M, T, OUT), x, *q, A, B, Rm, b, torch.randn(M * T, R), U, V, 0.5, p, 17, 4, needs, False,
                backend)
    raise AssertionError(op)


def _quant_weight(variant: int):
    """A random (OUT, IN) quantised weight: 4-bit with double quantisation, or int8 row-wise."""
    from lorafast.reference import QuantWeight
    if variant:
        return QuantWeight(torch.randint(-127, 128, (OUT, IN), dtype=torch.int8), torch.rand(OUT), None, None, None,
                           None, 8, IN, 1, (OUT, IN))
    n = OUT * IN
    blocks = -(-n // 16)
    return QuantWeight(torch.randint(0, 256, (-(-n // 2), 1), dtype=torch.uint8),
                       torch.randint(0, 256, (blocks,), dtype=torch.uint8), torch.linspace(-1, 1, 16),
                       torch.rand(-(-blocks // 4)), torch.linspace(-1, 1, 256), torch.rand(1), 4, 16, 4, (OUT, IN))


CASES = [(op, pair) for op in _backend.OPS for pair in backend_devices(op) if pair[1] == "cpu"]


def test_every_registered_op_is_checked():
    assert set(_ops.REGISTERED) == set(_backend.OPS)
    assert {op for op, _ in CASES} == set(_backend.OPS)


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("op, backend_device", CASES, ids=[f"{op}-{backend_ids(p)}" for op, p in CASES])
def test_opcheck(op, backend_device, variant):
    backend, _ = backend_device
    torch.library.opcheck(_ops.REGISTERED[op], _args(op, backend, variant))
