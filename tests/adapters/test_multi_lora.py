"""MultiLoRALinear: k clients' adapters over one base equal k separate LoRALinear layers
(outputs and gradients, mixed ranks, every variant); padding never trains; lorafast.clients;
conversion of Hugging Face and PEFT models; one client's adapter out in PEFT's format."""
import copy

import pytest
import torch
from torch import nn

import lorafast
from lorafast import LoRALinear, MultiLoRALinear
from support.common import fresh_seed, rel_err
from support.hf_models import peft, peft_lora, tiny_llama, token_ids

BACKENDS = [b for b in ("torch", "triton") if b in lorafast.available_backends()]


def _randomise(layer: MultiLoRALinear) -> None:
    """Non-zero adapters within each client's rank (B is zeros at init)."""
    with torch.no_grad():
        for c, q in enumerate(layer.ranks):
            layer.lora_B[c, :, :q].normal_()
            if layer.lora_R is not None:
                layer.lora_R[c, :q, :q].normal_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["lora", "ffa", "xs"])
@pytest.mark.parametrize("ranks", [3, [2, 5, 1]], ids=["r3", "mixed"])
def test_equals_separate_layers(backend, variant, ranks):
    fresh_seed()
    k, in_f, out_f = 3, 19, 13
    layer = MultiLoRALinear(in_f, out_f, k, r=ranks, lora_alpha=6, variant=variant)
    _randomise(layer)
    singles = [layer.client_layer(c) for c in range(k)]
    for s in singles:
        for name in ("lora_A", "lora_B", "lora_R"):
            p = getattr(s, name)
            if p is not None:
                p.requires_grad_(getattr(layer, name).requires_grad)
    ids = torch.tensor([2, 0, 2, 1, 0])
    x = torch.randn(5, 4, in_f)
    gy = torch.randn(5, 4, out_f)
    with lorafast.use_backend(backend):
        y = layer(x, ids)
        (y * gy).sum().backward()
        for i, c in enumerate(ids.tolist()):
            yi = singles[c](x[i:i + 1])
            assert rel_err(y[i:i + 1], yi) < 1e-5
            (yi * gy[i:i + 1]).sum().backward()
    for c, s in enumerate(singles):
        q = layer.ranks[c]
        for name, cut in (("lora_A", (c, slice(0, q))), ("lora_B", (c, slice(None), slice(0, q))),
                          ("lora_R", (c, slice(0, q), slice(0, q)))):
            p = getattr(layer, name)
            if p is None or not p.requires_grad:
                continue
            assert rel_err(p.grad[cut], getattr(s, name).grad) < 1e-5, (c, name)
    if isinstance(ranks, list):   # the padding's gradients are zero
        for c, q in enumerate(layer.ranks):
            if layer.lora_B.requires_grad:
                assert torch.count_nonzero(layer.lora_B.grad[c, :, q:]) == 0
            if layer.lora_A.requires_grad:
                assert torch.count_nonzero(layer.lora_A.grad[c, q:]) == 0


def test_padding_never_trains():
    fresh_seed()
    layer = MultiLoRALinear(8, 6, 2, r=[1, 4], lora_alpha=4)
    _randomise(layer)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        layer(torch.randn(4, 8), torch.tensor([0, 1, 0, 1])).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(layer.lora_A[0, 1:]) == 0 and torch.count_nonzero(layer.lora_B[0, :, 1:]) == 0
    assert torch.count_nonzero(layer.lora_A[1]) > 0
    assert isinstance(layer.scaling, torch.Tensor) and layer.scaling.tolist() == [4.0, 1.0]


def test_init_is_lorlinears_and_from_linear_shares_the_base():
    linear = nn.Linear(10, 7)
    layer = MultiLoRALinear.from_linear(linear, 3, r=[4, 2, 4], lora_alpha=8, seed=11)
    assert layer.weight is linear.weight and layer.bias is linear.bias and not layer.weight.requires_grad
    for c, q in enumerate(layer.ranks):
        ref = LoRALinear(10, 7, q, 8, seed=11)
        assert torch.equal(layer.lora_A[c, :q], ref.lora_A) and torch.equal(layer.lora_B[c, :, :q], ref.lora_B)
        assert layer.client_scaling(c) == ref.scaling
    assert torch.count_nonzero(layer.lora_A[1, 2:]) == 0


def test_clients_context_and_its_errors():
    fresh_seed()
    model = nn.Sequential(MultiLoRALinear(6, 5, 3, r=2), nn.ReLU(), MultiLoRALinear(5, 4, 3, r=2))
    for m in (model[0], model[2]):
        _randomise(m)
    x, ids = torch.randn(4, 6), torch.tensor([1, 2, 0, 1])
    want = model[2](torch.relu(model[0](x, ids)), ids)
    with lorafast.clients(model, ids):
        assert torch.allclose(model(x), want)
    with pytest.raises(ValueError, match="client_ids is required"):
        model(x)
    with pytest.raises(ValueError, match=r"client_ids must be in \[0, 3\)"):
        with lorafast.clients(model, torch.tensor([0, 3, 1, 1])):
            pass
    with pytest.raises(ValueError, match="client_ids must be int64"):
        with lorafast.clients(model, torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        with lorafast.clients(nn.Linear(2, 2), ids):
            pass
    mixed = nn.Sequential(MultiLoRALinear(6, 5, 3), MultiLoRALinear(5, 4, 2))
    with pytest.raises(ValueError, match=r"different client counts \[2, 3\]"):
        with lorafast.clients(mixed, ids):
            pass


@pytest.mark.parametrize("bad, match", [(dict(r=[2, 3]), "list of 3 positive integers"), (dict(r=0), "r must be"),
                                        (dict(clients=0), "clients must be a positive integer"),
                                        (dict(variant="dora"), "variant must be one of")])
def test_bad_arguments(bad, match):
    kw = dict(in_features=4, out_features=3, clients=3, r=2) | bad
    with pytest.raises(ValueError, match=match):
        MultiLoRALinear(**kw)


def _client_model(model, i):
    """A copy of ``model`` whose MultiLoRALinear layers are client i's LoRALinear."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, MultiLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, m.client_layer(i))
    return out


def test_inject_clients_and_client_adapter_round_trip_through_peft(tmp_path):
    """inject_adapters(clients=k): each client's loss is its single-adapter model's; its adapter
    saved in PEFT's format loads into PEFT and gives the same logits."""
    fresh_seed()
    base = tiny_llama()
    model = lorafast.inject_adapters(copy.deepcopy(base), ["q_proj", "v_proj"], r=[2, 4, 3], lora_alpha=8, clients=3)
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == 4 and all(m.lora_A.requires_grad for m in layers)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    for m in layers:
        _randomise(m)
    ids_tok = token_ids(batch=3, seq=6)
    clients = torch.tensor([2, 0, 1])
    with lorafast.clients(model, clients):
        logits = model(input_ids=ids_tok).logits
    for i, c in enumerate(clients.tolist()):
        want = _client_model(model, c)(input_ids=ids_tok[i:i + 1]).logits
        assert rel_err(logits[i:i + 1], want) < 1e-5

    tensors = lorafast.client_adapter(model, 1)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 32) and len(tensors) == 8
    lorafast.save_adapters(model, tmp_path / "c1", client=1)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "c1"))
    want = _client_model(model, 1)(input_ids=ids_tok).logits
    assert rel_err(loaded(input_ids=ids_tok).logits, want) < 1e-5
    with pytest.raises(ValueError, match="pass client=i"):
        lorafast.save_adapters(model, tmp_path / "all")
    with pytest.raises(ValueError, match=r"client must be an integer in \[0, 3\)"):
        lorafast.client_adapter(model, 3)


def test_from_peft_clients_start_from_the_peft_adapter():
    fresh_seed()
    pm = peft_lora(tiny_llama(), ["q_proj", "v_proj"])
    ids_tok = token_ids(batch=2, seq=5)
    want = pm(input_ids=ids_tok).logits
    lorafast.from_peft(pm, clients=4)
    layers = [m for m in pm.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == 4 and all(m.clients == 4 and m.scaling == 2.0 for m in layers)
    with lorafast.clients(pm, torch.tensor([3, 1])):
        assert rel_err(pm(input_ids=ids_tok).logits, want) < 1e-5
    with pytest.raises(ValueError, match="clients must be"):
        lorafast.from_peft(peft_lora(tiny_llama(), ["q_proj"]), clients=0)
