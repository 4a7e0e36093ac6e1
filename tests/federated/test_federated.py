"""Federated aggregation: every method's invariant against float64, the fused merge against
the reference, compensation for half-precision weights, and refused input changing nothing."""
import pytest
import torch

import lorafast
from support.common import fresh_seed
from lorafast import _ops, reference
from lorafast.federated import aggregate, aggregate_r

BACKENDS = [b for b in ("torch", "triton") if b in lorafast.available_backends()]
OUT, IN = 47, 33


def _clients(ranks, scale=1.0, dtype=torch.float32):
    A = [(torch.randn(r, IN) * scale).to(dtype) for r in ranks]
    B = [(torch.randn(OUT, r) * scale).to(dtype) for r in ranks]
    return A, B


def _p(weights, k):
    w = torch.ones(k, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


def _truth(W0, A, B, p, s):
    """Σ pᵢ (W + s·BᵢAᵢ) in float64: the average of the clients' effective weights."""
    return sum(pi * (W0.double() + s * b.double() @ a.double()) for pi, a, b in zip(p, A, B))


def _effective(res, s):
    return res.weight.double() + s * res.lora_B.double() @ res.lora_A.double()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks,weights", [((3, 3, 3), None), ((4, 1, 3, 2), [5, 1, 0, 2.5])],
                         ids=["equal", "mixed-ranks-weighted"])
def test_fedex_is_exact(backend, ranks, weights):
    fresh_seed()
    W = torch.randn(OUT, IN)
    W0 = W.clone()
    A, B = _clients(ranks)
    s = 0.7
    res = aggregate(W, A, B, method="fedex", client_weights=weights, scaling=s, backend=backend)
    assert res.weight is W
    p = _p(weights, len(ranks))
    assert _rel(_effective(res, s), _truth(W0, A, B, p, s)) <= 1e-5
    # the global adapters are the weighted means, and the residual is what was applied
    assert res.lora_A.shape == (max(ranks), IN) and res.lora_B.shape == (OUT, max(ranks))
    U, V = res.residual
    assert _rel(W.double() - W0.double(), U.double() @ V.double()) < 1e-5
    ref = reference.fedex_residual(A, B, weights, s)
    assert _rel(U.double() @ V.double(), ref.double()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fedex_on_a_strided_weight(backend):
    fresh_seed()
    storage = torch.randn(IN, OUT)
    W = storage.T                       # (OUT, IN) view, column-major
    W0 = W.clone()
    A, B = _clients((2, 2))
    res = aggregate(W, A, B, scaling=1.5, backend=backend)
    assert res.weight is W
    assert _rel(_effective(res, 1.5), _truth(W0, A, B, _p(None, 2), 1.5)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_clients_leave_the_weight_bit_identical(backend):
    """The centred form has no cancellation: agreeing clients give a residual of exactly 0."""
    W = torch.randn(OUT, IN).bfloat16()
    before = W.clone()
    A, B = _clients((3,))
    aggregate(W, A * 4, B * 4, scaling=2.0, backend=backend)
    assert torch.equal(W, before)


@pytest.mark.parametrize("backend,dtype", [(b, torch.bfloat16) for b in BACKENDS] + [("torch", torch.float16)],
                         ids=str)
def test_compensation_keeps_100_rounds_exact(backend, dtype):
    """100 rounds of small updates into a half-precision weight: with an fp32 compensation the
    accumulated change matches a float64 run; without it most of the change is lost."""
    fresh_seed()
    W = torch.randn(OUT, IN).to(dtype)
    C = torch.zeros(OUT, IN)
    W_plain = W.clone()
    start = W.double().clone()
    truth = start.clone()
    for _ in range(100):
        A, B = _clients((3, 3, 3, 3), scale=1e-2)
        aggregate(W, A, B, scaling=0.5, compensation=C, backend=backend)
        aggregate(W_plain, A, B, scaling=0.5, backend="torch")
        truth += reference.fedex_residual([a.double() for a in A], [b.double() for b in B], None, 0.5)
    change = truth - start
    assert _rel(W.double() + C.double() - start, change) <= 1e-3
    assert _rel(W_plain.double() - start, change) > 0.1     # what compensation is for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_merge_matches_reference(dtype):
    if "triton" not in BACKENDS:
        pytest.skip("triton not installed")
    fresh_seed()
    W = torch.randn(70, 45).to(dtype)
    U, V = torch.randn(70, 19), torch.randn(19, 45)
    C = torch.randn(70, 45) * 1e-3 if dtype != torch.float32 else None
    W_ref, C_ref = W.clone(), C.clone() if C is not None else None
    _ops.fedex_merge_(W, U, V, C, backend="triton")
    _ops.fedex_merge_(W_ref, U, V, C_ref, backend="torch")
    if dtype == torch.float32:
        torch.testing.assert_close(W, W_ref, rtol=1e-6, atol=1e-5)
    else:   # the same rounding: at most one bf16 ulp apart where the fp32 sums differ in the last bit
        assert (W.float() - W_ref.float()).abs().max() <= W_ref.float().abs().max() * 2**-7
        torch.testing.assert_close(W.double() + C.double(), W_ref.double() + C_ref.double(), rtol=1e-6, atol=1e-5)


def test_fedavg_is_the_inexact_baseline():
    fresh_seed()
    W = torch.randn(OUT, IN)
    before = W.clone()
    A, B = _clients((3, 3, 3))
    w = [1, 2, 3]
    res = aggregate(W, A, B, method="fedavg", client_weights=w)
    assert torch.equal(W, before) and res.residual is None
    p = _p(w, 3)
    torch.testing.assert_close(res.lora_A.double(), sum(pi * a.double() for pi, a in zip(p, A)))
    torch.testing.assert_close(res.lora_B.double(), sum(pi * b.double() for pi, b in zip(p, B)))
    assert _rel(_effective(res, 1.0), _truth(before, A, B, p, 1.0)) > 1e-2   # mean(B)·mean(A) ≠ mean(B·A)


def test_ffa_is_exact_and_needs_a_shared_A():
    fresh_seed()
    W = torch.randn(OUT, IN)
    before = W.clone()
    A_shared = torch.randn(3, IN)
    B = [torch.randn(OUT, 3) for _ in range(4)]
    w = [3, 1, 1, 5]
    res = aggregate(W, [A_shared.clone() for _ in B], B, method="ffa", client_weights=w, scaling=2.0)
    assert torch.equal(W, before)
    assert torch.equal(res.lora_A, A_shared)
    assert _rel(_effective(res, 2.0), _truth(before, [A_shared] * 4, B, _p(w, 4), 2.0)) <= 1e-6
    A_other = [A_shared.clone() for _ in B]
    A_other[2][0, 0] += 1e-6
    with pytest.raises(ValueError, match="client 2"):
        aggregate(W, A_other, B, method="ffa")


def test_flora_stacking_is_exact_with_every_client():
    fresh_seed()
    W = torch.randn(OUT, IN)
    before = W.clone()
    A, B = _clients((2, 3, 1))
    w = [1, 1, 2]
    res = aggregate(W, A, B, method="flora", client_weights=w, scaling=0.5)
    assert torch.equal(W, before)
    assert res.lora_A.shape == (6, IN) and res.lora_B.shape == (OUT, 6)
    assert _rel(_effective(res, 0.5), _truth(before, A, B, _p(w, 3), 0.5)) <= 1e-6


def test_aggregate_r_is_the_weighted_mean():
    fresh_seed()
    R = [torch.randn(4, 4) for _ in range(3)]
    got = aggregate_r(R, client_weights=[2, 0, 6])
    torch.testing.assert_close(got.double(), 0.25 * R[0].double() + 0.75 * R[2].double())
    torch.testing.assert_close(aggregate_r(R), sum(R) / 3)
    with pytest.raises(ValueError, match="client_R\\[1\\]"):
        aggregate_r([R[0], torch.randn(3, 3)])
    with pytest.raises(ValueError, match="client 1"):
        aggregate_r([R[0], torch.full((4, 4), float("nan"))])
    with pytest.raises(ValueError, match="non-empty"):
        aggregate_r([])


def _bad_cases():
    A, B = _clients((2, 2, 2))
    nan_A = [a.clone() for a in A]
    nan_A[1][0, 0] = float("nan")
    inf_B = [b.clone() for b in B]
    inf_B[2][1, 1] = float("inf")
    return [
        (dict(client_A=A[:2], client_B=B), "client_A has 2 clients"),
        (dict(client_A=[], client_B=[]), "at least one client"),
        (dict(client_A=[torch.randn(2, IN + 1)] + A[1:], client_B=B), "client 0"),
        (dict(client_A=A, client_B=[torch.randn(OUT, 3)] + B[1:]), "client 0"),
        (dict(client_A=A, client_B=B, client_weights=[1, -1, 1]), "client_weights"),
        (dict(client_A=A, client_B=B, client_weights=[0, 0, 0]), "client_weights"),
        (dict(client_A=A, client_B=B, client_weights=[1, 1]), "client_weights"),
        (dict(client_A=nan_A, client_B=B), "client 1"),
        (dict(client_A=A, client_B=inf_B), "client 2"),
        (dict(client_A=A, client_B=B, method="median"), "method"),
        (dict(client_A=A, client_B=B, compensation=torch.zeros(OUT, IN, dtype=torch.float64)), "compensation"),
        (dict(client_A=A, client_B=B, scaling=float("nan")), "scaling"),
    ]


@pytest.mark.parametrize("i", range(12))
def test_bad_input_raises_and_changes_nothing(i):
    kw, match = _bad_cases()[i]
    W = torch.randn(OUT, IN).bfloat16()
    C = torch.randn(OUT, IN) * 1e-3
    kw.setdefault("compensation", C)
    before_W, before_C = W.clone(), C.clone()
    with pytest.raises(ValueError, match=match):
        aggregate(W, **kw)
    assert torch.equal(W.view(torch.int16), before_W.view(torch.int16))
    assert torch.equal(C, before_C)


def test_weight_dtype_message_names_every_accepted_dtype():
    A, B = _clients((2, 2))
    with pytest.raises(ValueError, match=r"weight must be one of float32, float16, bfloat16, float64, got torch.int32"):
        aggregate(torch.zeros(OUT, IN, dtype=torch.int32), A, B)
    W = torch.randn(OUT, IN, dtype=torch.float64)          # fp64 is accepted and merged in fp64
    W0 = W.clone()
    A, B = [a.double() for a in A], [b.double() for b in B]
    aggregate(W, A, B, scaling=0.5)
    assert _rel(W - W0, reference.fedex_residual(A, B, None, 0.5)) <= 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_cuda_merge_matches_reference(dtype, transposed):
    if "cuda" not in lorafast.available_backends():
        pytest.skip(f"CUDA backend unusable: {lorafast._backend.cuda_status()[1]}")
    fresh_seed()
    W = torch.randn(45, 70, device="cuda").to(dtype)
    W = W.T if transposed else W.T.contiguous()           # (70, 45), strided or not
    U, V = torch.randn(70, 19, device="cuda"), torch.randn(19, 45, device="cuda")
    C = torch.randn(70, 45, device="cuda") * 1e-3 if dtype != torch.float32 else None
    W_ref, C_ref = W.clone(), C.clone() if C is not None else None
    _ops.fedex_merge_(W, U, V, C, backend="cuda")
    _ops.fedex_merge_(W_ref, U.double(), V.double(), C_ref, backend="torch")   # the reference, U V in fp64
    if C is None:
        torch.testing.assert_close(W, W_ref, rtol=1e-5, atol=1e-5)
    else:
        ulp = torch.finfo(dtype).eps
        assert (W.float() - W_ref.float()).abs().max() <= W_ref.float().abs().max() * ulp
        torch.testing.assert_close(W.double() + C.double(), W_ref.double() + C_ref.double(), rtol=1e-5, atol=1e-5)
