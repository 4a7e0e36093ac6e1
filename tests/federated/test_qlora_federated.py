"""FedEx over QLoRA clients: the residual cannot go into the 4-bit base, so ``aggregate`` keeps
it beside the base as the layer's low-rank correction. The server's model is the average of the
clients' models (exact while the correction fits ``correction_rank``), rounds accumulate, a
truncated correction reports exactly the energy it dropped, clients that apply the residual
match the server, and ``compensation=`` is refused."""
import copy

import pytest
import torch

import lorafast  # noqa: F401  (before bitsandbytes: it sets up the Triton interpreter)
from lorafast.federated import aggregate
from lorafast.qlora import CorrectionReport, QLoRALinear
from support.common import fresh_seed
from support.qlora_models import assert_packed_equal, dequantised, packed_state, quantised_linear

IN, OUT, R, K = 128, 64, 2, 3


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def server_layer(kind="nf4", nested=True) -> QLoRALinear:
    layer = QLoRALinear.from_linear(quantised_linear(IN, OUT, kind, nested, torch.float32), r=R, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    return layer


def clients_of(server: QLoRALinear, k: int = K) -> list[QLoRALinear]:
    """k copies of the server (its base, correction and adapters), each trained differently:
    here, its adapters moved by a random step."""
    out = []
    for _ in range(k):
        c = copy.deepcopy(server)
        with torch.no_grad():
            c.lora_A.add_(0.1 * torch.randn_like(c.lora_A))
            c.lora_B.add_(0.1 * torch.randn_like(c.lora_B))
        out.append(c)
    return out


def load_global(layer: QLoRALinear, result) -> None:
    with torch.no_grad():
        layer.lora_A.copy_(result.lora_A)
        layer.lora_B.copy_(result.lora_B)


def effective(layer: QLoRALinear) -> torch.Tensor:
    """deq(W) + U V + s·BA in float64: the weight the layer computes with."""
    return layer.base_weight.double() + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()


def exact_correction(layer: QLoRALinear) -> torch.Tensor:
    if layer.correction_U is None:
        return torch.zeros(OUT, IN, dtype=torch.float64)
    return layer.correction_U.double() @ layer.correction_V.double()


@pytest.mark.parametrize("kind,nested", [("nf4", True), ("fp4", False)], ids=["nf4-nested", "fp4-plain"])
def test_fedex_round_gives_the_average_of_the_clients_models(kind, nested):
    fresh_seed()
    server = server_layer(kind, nested)
    packed = packed_state(server)
    deq = dequantised(server).double()
    clients = clients_of(server)
    x = torch.randn(9, IN)
    want = torch.stack([c(x).detach().double() for c in clients]).mean(0)
    want_w = torch.stack([effective(c) for c in clients]).mean(0)

    res = aggregate(server, [c.lora_A.detach() for c in clients], [c.lora_B.detach() for c in clients])
    assert res.weight is None
    assert isinstance(res.correction, CorrectionReport)
    # K clients' centred factors stacked: U (out, K·r), V (K·r, in); the centred B's sum to zero, so
    # their product has rank (K-1)·r only, but the stack keeps all K·r columns
    U, V = res.residual
    assert tuple(U.shape) == (OUT, K * R) and tuple(V.shape) == (K * R, IN)
    assert (res.correction.rank, res.correction.discarded, res.correction.relative) == (K * R, 0.0, 0.0)
    assert int(torch.linalg.matrix_rank(U.double() @ V.double())) == (K - 1) * R
    assert torch.equal(server.correction_U, U) and torch.equal(server.correction_V, V)
    assert server.memory_bytes()["correction"] == 4 * K * R * (OUT + IN)
    assert_packed_equal(server, packed)                 # the quantised base is not written

    load_global(server, res)
    assert _rel(server(x), want) < 1e-5
    assert _rel(effective(server), want_w) < 1e-5
    # the correction is exactly the residual: base_weight = deq(W) + U V
    assert _rel(server.base_weight.double() - deq, U.double() @ V.double()) < 1e-6

    # clients that apply the residual and load the global adapters are the server
    for c in clients:
        rep = c.add_correction(*res.residual)
        load_global(c, res)
        assert rep == res.correction
        assert torch.equal(c.base_weight, server.base_weight)
        torch.testing.assert_close(c(x), server(x), rtol=0, atol=0)


def test_a_second_round_accumulates():
    fresh_seed()
    server = server_layer()
    x = torch.randn(7, IN)
    residuals = []
    for round_ in (1, 2):
        clients = clients_of(server)                    # clients start from the server's current model
        want = torch.stack([c(x).detach().double() for c in clients]).mean(0)
        before = exact_correction(server)
        res = aggregate(server, [c.lora_A.detach() for c in clients], [c.lora_B.detach() for c in clients])
        load_global(server, res)
        residuals.append(res.residual)
        assert (res.correction.rank, res.correction.relative) == (round_ * K * R, 0.0)
        assert tuple(server.correction_U.shape) == (OUT, round_ * K * R)
        U, V = res.residual
        assert _rel(exact_correction(server), before + U.double() @ V.double()) < 1e-6
        assert _rel(server(x), want) < 1e-5
    # the stack is the two rounds' factors side by side
    assert torch.equal(server.correction_U, torch.cat([residuals[0][0], residuals[1][0]], 1))
    assert torch.equal(server.correction_V, torch.cat([residuals[0][1], residuals[1][1]], 0))


def test_a_truncated_correction_reports_the_energy_it_drops():
    fresh_seed()
    server = server_layer()
    server.correction_rank = 2
    x = torch.randn(7, IN)
    for _ in range(2):
        clients = clients_of(server)                    # they inherit correction_rank = 2
        want_w = torch.stack([effective(c) for c in clients]).mean(0)
        before = exact_correction(server)
        res = aggregate(server, [c.lora_A.detach() for c in clients], [c.lora_B.detach() for c in clients])
        U, V = res.residual
        exact = before + U.double() @ V.double()        # the accumulated correction without truncation
        S = torch.linalg.svdvals(exact)
        dropped = S[2:].square().sum().item()
        assert res.correction.rank == 2 and tuple(server.correction_U.shape) == (OUT, 2)
        assert dropped > 0 and res.correction.relative > 0
        assert res.correction.discarded == pytest.approx(dropped, rel=1e-6)
        assert res.correction.relative == pytest.approx(dropped / S.square().sum().item(), rel=1e-6)
        # what is kept is the best rank-2 approximation (Eckart–Young)
        P, _, Qh = torch.linalg.svd(exact)
        best = (P[:, :2] * S[:2]) @ Qh[:2]
        assert _rel(exact_correction(server), best) < 1e-5
        # the server's model is off the clients' average by exactly what was dropped
        load_global(server, res)
        err = (effective(server) - want_w).norm().item()
        assert err == pytest.approx(dropped ** 0.5, rel=1e-4)
        # a client applying the residual truncates the same way and matches the server
        c = clients[0]
        assert c.correction_rank == 2
        assert c.add_correction(*res.residual) == res.correction
        load_global(c, res)
        assert torch.equal(c.base_weight, server.base_weight)
        torch.testing.assert_close(c(x), server(x), rtol=0, atol=0)


def test_compensation_is_refused_and_nothing_changes():
    fresh_seed()
    server = server_layer()
    clients = clients_of(server)
    packed = packed_state(server)
    A, B = server.lora_A.detach().clone(), server.lora_B.detach().clone()
    comp = torch.zeros(OUT, IN)
    with pytest.raises(ValueError, match="compensation does not apply to a QLoRALinear"):
        aggregate(server, [c.lora_A.detach() for c in clients], [c.lora_B.detach() for c in clients],
                  compensation=comp)
    assert server.correction_U is None and server.correction_V is None
    assert_packed_equal(server, packed)
    assert torch.equal(server.lora_A, A) and torch.equal(server.lora_B, B)
    assert torch.equal(comp, torch.zeros(OUT, IN))


def test_flower_clients_keep_the_residual_as_their_correction_and_refuse_a_dense_base():
    """apply_global_adapters on a QLoRA model: the server's residual becomes the layer's
    correction (the same effective weight as the server's), and a dense P.weight is refused
    before anything is written."""
    pytest.importorskip("flwr")
    from torch import nn

    from lorafast.integrations.flower import apply_global_adapters
    fresh_seed()
    server = server_layer()
    clients = clients_of(server)
    res = aggregate(server, [c.lora_A.detach() for c in clients], [c.lora_B.detach() for c in clients])
    load_global(server, res)
    node = nn.Sequential()
    node.add_module("proj", copy.deepcopy(clients[0]))
    U, V = res.residual
    arrays = {"proj.lora_A": res.lora_A, "proj.lora_B": res.lora_B, "proj.residual_U": U, "proj.residual_V": V}
    apply_global_adapters(node, arrays)
    assert torch.equal(node.proj.correction_U, server.correction_U)
    assert _rel(effective(node.proj), effective(server)) < 1e-6
    before = packed_state(node.proj)
    A = node.proj.lora_A.detach().clone()
    with pytest.raises(ValueError, match="quantised"):
        apply_global_adapters(node, {"proj.lora_A": torch.zeros_like(A), "proj.weight": torch.zeros(OUT, IN)})
    assert torch.equal(node.proj.lora_A, A)
    assert_packed_equal(node.proj, before)
