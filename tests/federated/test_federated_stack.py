"""federated.aggregate on stacked adapters: (k, r, in) and (k, out, r) stacks give what the
lists give, and aggregate(MultiLoRALinear) merges every client exactly and writes the global
adapter back into all k slots; refusals leave everything as it was."""
import pytest
import torch

from lorafast import MultiLoRALinear
from lorafast.federated import aggregate
from support.common import fresh_seed

K, R, IN, OUT = 4, 3, 11, 7


def stacks(dtype=torch.float32):
    return torch.randn(K, R, IN, dtype=dtype), torch.randn(K, OUT, R, dtype=dtype)


@pytest.mark.parametrize("method", ["fedavg", "fedex", "ffa", "flora"])
def test_stacks_equal_lists(method):
    fresh_seed()
    A, B = stacks()
    if method == "ffa":
        A[:] = A[0]
    W = torch.randn(OUT, IN)
    p = torch.rand(K).tolist()
    W_list, W_stack = W.clone(), W.clone()
    by_list = aggregate(W_list, list(A), list(B), method=method, client_weights=p, scaling=0.5)
    by_stack = aggregate(W_stack, A, B, method=method, client_weights=p, scaling=0.5)
    assert torch.equal(W_list, W_stack)
    assert torch.allclose(by_list.lora_A, by_stack.lora_A, atol=1e-7)
    assert torch.allclose(by_list.lora_B, by_stack.lora_B, atol=1e-7)
    if method == "fedex":
        assert not torch.equal(W_stack, W)
        for u, v in zip(by_list.residual, by_stack.residual):
            assert torch.allclose(u, v, atol=1e-7)


def test_multi_layer_is_merged_exactly_and_written_back():
    """After aggregate(layer): W' + s·B̄Ā = Σ pᵢ (W + s·BᵢAᵢ) (float64), every slot holds (Ā, B̄)."""
    fresh_seed()
    layer = MultiLoRALinear(IN, OUT, K, r=R, lora_alpha=6, dtype=torch.float64)
    with torch.no_grad():   # float64 adapters too, so that exact means to float64's rounding
        layer.lora_A.data = torch.randn(K, R, IN, dtype=torch.float64)
        layer.lora_B.data = torch.randn(K, OUT, R, dtype=torch.float64)
    p = torch.rand(K, dtype=torch.float64)
    p /= p.sum()
    s = layer.scaling
    W = layer.base_weight.detach().clone()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    want = sum(p[i] * (W + s * B[i] @ A[i]) for i in range(K))
    result = aggregate(layer, method="fedex", client_weights=p.tolist())
    assert result.weight is layer.base_weight or result.weight.data_ptr() == layer.base_weight.data_ptr()
    for i in range(K):
        assert torch.equal(layer.lora_A[i], result.lora_A) and torch.equal(layer.lora_B[i], result.lora_B)
        got = layer.base_weight.double() + s * layer.lora_B[i].double() @ layer.lora_A[i].double()
        assert torch.allclose(got, want, atol=1e-12), i


def test_multi_layer_flora_merges_into_the_base_and_restarts():
    """flora on a layer, as the Flower strategy: W' = W + s·Σ pᵢBᵢAᵢ, the slots hold (Ā, 0)."""
    fresh_seed()
    layer = MultiLoRALinear(IN, OUT, K, r=R, lora_alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B, W = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.weight.detach().double()
    p = torch.rand(K, dtype=torch.float64)
    p /= p.sum()
    want = W + layer.scaling * sum(p[i] * B[i] @ A[i] for i in range(K))
    aggregate(layer, method="flora", client_weights=p.tolist())
    assert torch.allclose(layer.weight.double(), want, atol=1e-5)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.allclose(layer.lora_A[1].double(), torch.einsum("k,kri->ri", p, A), atol=1e-6)


def test_multi_layer_ffa_and_fedavg_leave_the_base():
    fresh_seed()
    layer = MultiLoRALinear(IN, OUT, K, r=R, variant="ffa")
    with torch.no_grad():
        layer.lora_B.normal_()
    W = layer.weight.detach().clone()
    B_mean = layer.lora_B.detach().mean(0)
    aggregate(layer, method="ffa")
    assert torch.equal(layer.weight, W)
    assert torch.allclose(layer.lora_B[2], B_mean, atol=1e-6)
    aggregate(layer, method="fedavg")
    assert torch.equal(layer.weight, W)


@pytest.mark.parametrize("make, kw, match", [
    (lambda: MultiLoRALinear(IN, OUT, 3, r=[2, 3, 3]), {}, r"different ranks \[2, 3, 3\]"),
    (lambda: MultiLoRALinear(IN, OUT, 3, r=2), dict(client_A=torch.zeros(3, 2, IN)), "leave client_A"),
    (lambda: MultiLoRALinear(IN, OUT, 3, r=2), dict(scaling=3.0), "not the layer's scaling"),
    (lambda: MultiLoRALinear(IN, OUT, 3, r=2, variant="xs"), {}, "aggregate_r"),
])
def test_multi_layer_refusals_change_nothing(make, kw, match):
    layer = make()
    with torch.no_grad():
        layer.lora_B.normal_()
    before = {n: t.detach().clone() for n, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        aggregate(layer, **kw)
    for n, t in layer.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_bad_stacks_change_nothing():
    A, B = stacks()
    W = torch.randn(OUT, IN)
    W0 = W.clone()
    with pytest.raises(ValueError, match="same k clients and rank r"):
        aggregate(W, A, B[:3])
    with pytest.raises(ValueError, match="3-D floating-point stack"):
        aggregate(W, A, B[0])
    bad = B.clone()
    bad[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="client 2 sent a non-finite adapter"):
        aggregate(W, A, bad)
    with pytest.raises(ValueError, match=r"weight has shape \(8, 11\)"):
        aggregate(torch.randn(OUT + 1, IN), A, B)
    assert torch.equal(W, W0)
