"""federated.aggregate on GPT-2 Conv1D layers, whose weight is stored (in, out): passed the
layer, it updates the (out, in) ``base_weight`` with the layer's scaling; a weight whose
layout does not fit the clients' factors is refused, and a refused call changes nothing.

Checked in float64 against the plain residual (``reference.fedex_residual``) applied to
the effective (out, in) weight."""
import pytest
import torch

import lorafast
from support.common import fresh_seed
from lorafast import LoRALinear, reference
from lorafast.federated import aggregate

BACKENDS = [b for b in ("torch", "triton") if b in lorafast.available_backends()]
RANKS, WEIGHTS = (2, 3, 1), [3.0, 1.0, 2.0]


def _gpt2_layer(name):
    """A Conv1D of a tiny GPT-2 (float64) turned into a LoRALinear by inject_adapters."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=31, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    model = lorafast.inject_adapters(model, ["c_attn", "c_proj"], r=2, lora_alpha=3)
    return model.get_submodule(f"transformer.h.0.{name}")


def _constructed_layer(in_f, out_f, dtype=torch.float64):
    torch.manual_seed(1)
    return LoRALinear(in_f, out_f, r=2, lora_alpha=5, fan_in_fan_out=True, dtype=dtype, seed=3)


LAYERS = {
    "gpt2-attn.c_proj-square": lambda: _gpt2_layer("attn.c_proj"),        # 16 → 16
    "gpt2-attn.c_attn": lambda: _gpt2_layer("attn.c_attn"),               # 16 → 48
    "gpt2-mlp.c_proj": lambda: _gpt2_layer("mlp.c_proj"),                 # 64 → 16
    "constructor-square": lambda: _constructed_layer(12, 12),
    "constructor": lambda: _constructed_layer(7, 12),
}


def _clients(layer, dtype=torch.float64, scale=0.5):
    A = [torch.randn(r, layer.in_features, dtype=dtype) * scale for r in RANKS]
    B = [torch.randn(layer.out_features, r, dtype=dtype) * scale for r in RANKS]
    return A, B


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("make", list(LAYERS.values()), ids=list(LAYERS))
def test_fedex_on_the_layer_updates_its_out_by_in_base_weight(make):
    fresh_seed()
    layer = make()
    assert layer.fan_in_fan_out and tuple(layer.weight.shape) == (layer.in_features, layer.out_features)
    W0, stored0 = layer.base_weight.detach().clone(), layer.weight.detach().clone()
    A, B = _clients(layer)
    s = layer.scaling

    res = aggregate(layer, A, B, client_weights=WEIGHTS)

    residual = reference.fedex_residual(A, B, WEIGHTS, s)                   # (out, in), float64
    assert res.weight.data_ptr() == layer.weight.data_ptr() and tuple(res.weight.shape) == tuple(W0.shape)
    assert _rel(layer.base_weight, W0 + residual) <= 1e-12
    assert _rel(layer.weight, stored0 + residual.T) <= 1e-12               # the Conv1D layout, transposed
    U, V = res.residual
    assert _rel(U @ V, residual) <= 1e-12
    # the global model is the weighted average of the clients' models, with the layer's scaling
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    truth = sum(pi * (W0 + s * b @ a) for pi, a, b in zip(p.tolist(), A, B))
    assert _rel(layer.base_weight + s * res.lora_B.double() @ res.lora_A.double(), truth) <= 1e-12


@pytest.mark.parametrize("make", [LAYERS["gpt2-attn.c_proj-square"], LAYERS["constructor"]],
                         ids=["gpt2-square", "constructor"])
def test_the_layer_and_its_base_weight_give_the_same_merge(make):
    fresh_seed()
    layer, twin = make(), make()
    A, B = _clients(layer)
    res = aggregate(layer, A, B, method="fedex", client_weights=WEIGHTS)
    again = aggregate(twin.base_weight, A, B, client_weights=WEIGHTS, scaling=twin.scaling)
    assert torch.equal(layer.weight, twin.weight)
    assert torch.equal(res.lora_A, again.lora_A) and torch.equal(res.lora_B, again.lora_B)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_conv1d_with_compensation(backend):
    """A bf16 Conv1D base with an fp32 compensation of base_weight's (out, in) shape."""
    fresh_seed()
    layer = _constructed_layer(12, 20, dtype=torch.bfloat16)
    W0 = layer.base_weight.double().clone()
    C = torch.zeros(layer.out_features, layer.in_features)
    A, B = _clients(layer, dtype=torch.float32, scale=0.1)
    aggregate(layer, A, B, client_weights=WEIGHTS, compensation=C, backend=backend)
    want = W0 + reference.fedex_residual([a.double() for a in A], [b.double() for b in B], WEIGHTS, layer.scaling)
    assert _rel(layer.base_weight.double() + C.double(), want) <= 1e-6


@pytest.mark.parametrize("method", ["fedavg", "ffa", "flora"])
def test_other_methods_leave_the_layer_alone(method):
    fresh_seed()
    layer = _constructed_layer(7, 12)
    before = layer.weight.detach().clone()
    A, B = _clients(layer)
    if method == "ffa":
        A = [A[0].clone() for _ in A]
        B = [torch.randn(layer.out_features, RANKS[0], dtype=torch.float64) for _ in A]
    res = aggregate(layer, A, B, method=method, client_weights=WEIGHTS)
    assert torch.equal(layer.weight, before) and res.residual is None
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    if method != "fedavg":     # exact, with the layer's scaling
        s = layer.scaling
        truth = sum(pi * (layer.base_weight + s * b @ a) for pi, a, b in zip(p.tolist(), A, B))
        assert _rel(layer.base_weight + s * res.lora_B @ res.lora_A, truth) <= 1e-12


def _assert_refused(layer, match, *args, **kwargs):
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        aggregate(*args, **kwargs)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("make", [LAYERS["gpt2-attn.c_attn"], LAYERS["gpt2-mlp.c_proj"], LAYERS["constructor"]],
                         ids=["gpt2-attn.c_attn", "gpt2-mlp.c_proj", "constructor"])
def test_the_stored_in_by_out_weight_is_refused(make):
    """layer.weight of a non-square Conv1D is (in, out): refused with a message that names
    base_weight and the (out, in) expected, and reads the shapes the right way round."""
    fresh_seed()
    layer = make()
    out_f, in_f = layer.out_features, layer.in_features
    A, B = _clients(layer)
    match = (rf"weight has shape \({in_f}, {out_f}\) .* need an \(out, in\) = \({out_f}, {in_f}\) base_weight; "
             r".*Conv1D.*layer\.base_weight")
    _assert_refused(layer, match, layer.weight, A, B, scaling=layer.scaling)


def test_a_weight_of_another_shape_is_refused_and_the_hint_says_what_to_pass():
    fresh_seed()
    layer = _constructed_layer(7, 12)
    A, B = _clients(layer)
    other = torch.randn(12, 8, dtype=torch.float64)
    before = other.clone()
    with pytest.raises(ValueError, match=r"\(12, 7\) base_weight; pass the adapted LoRALinear itself"):
        aggregate(other, A, B)
    assert torch.equal(other, before)
    wrong = _constructed_layer(8, 12)          # the clients' adapters are for another layer
    _assert_refused(wrong, r"layer\.base_weight has shape \(12, 8\) .*do not belong to this layer", wrong, A, B)


def test_scaling_defaults_to_the_layers_and_a_different_one_is_refused():
    fresh_seed()
    layer = _constructed_layer(7, 12)
    A, B = _clients(layer)
    _assert_refused(layer, "scaling=1.0 is not the layer's scaling 2.5", layer, A, B, scaling=1.0)
    _assert_refused(layer, "scaling", layer, A, B, scaling=float("nan"))
    W0 = layer.base_weight.detach().clone()
    aggregate(layer, A, B, scaling=2.5)                   # the layer's own value is accepted
    assert _rel(layer.base_weight, W0 + reference.fedex_residual(A, B, None, 2.5)) <= 1e-12
