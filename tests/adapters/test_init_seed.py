"""Adapter init follows torch.manual_seed (as nn.Linear and PEFT do) unless ``seed=`` is given.

Dropout and DP noise keep their own OS-seeded streams: building a layer draws nothing from
lorafast's dropout stream.
"""
import pytest
import torch
from torch import nn

import lorafast
from lorafast import LoRALinear, _random
from lorafast.init import lora_xs_
from lorafast.interop.inject import inject_adapters

VARIANTS = ["lora", "ffa", "xs", "sb"]


@pytest.fixture(autouse=True)
def _keep_lorafast_stream():
    """Tests here seed lorafast's dropout stream; give the other tests back an unpredictable one."""
    state = _random._stream.getstate()
    yield
    _random._stream.setstate(state)


def _build(variant, torch_seed=None, **kw):
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    return LoRALinear(24, 40, r=4, variant=variant, **kw)


def _adapters(layer):
    return {n: p.detach().clone() for n, p in layer.named_parameters() if n.startswith("lora_")}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_manual_seed_replays_the_init(variant):
    a, b = _build(variant, 0), _build(variant, 0)
    assert a.seed == b.seed
    assert _same(_adapters(a), _adapters(b))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_other_torch_seeds_give_other_adapters(variant):
    a, b = _build(variant, 0), _build(variant, 1)
    assert a.seed != b.seed
    assert not torch.equal(a.lora_A, b.lora_A)
    if variant in ("xs", "sb"):
        assert not torch.equal(a.lora_B, b.lora_B)


@pytest.mark.parametrize("variant", VARIANTS)
def test_injected_model_follows_torch_manual_seed(variant):
    def build(seed):
        torch.manual_seed(seed)
        return inject_adapters(_mlp(), ["0", "2"], r=3, variant=variant).state_dict()

    a, b, c = build(5), build(5), build(6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.lora_A"], c["0.lora_A"])
    assert not torch.equal(a["0.lora_A"], a["2.lora_A"][:, :12])   # each layer draws its own seed


@pytest.mark.parametrize("variant", VARIANTS)
def test_explicit_seed_wins_and_leaves_torch_stream_alone(variant):
    a, b = _build(variant, 0, seed=7), _build(variant, 1, seed=7)
    assert a.seed == b.seed == 7
    assert _same(_adapters(a), _adapters(b))
    # A as drawn from the seed's own generator, as before
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(a.lora_A, torch.empty(4, 24).uniform_(-24**-0.5, 24**-0.5, generator=gen))
    # the base layer draws what nn.Linear draws, and nothing more is taken from torch's stream
    torch.manual_seed(3)
    layer = LoRALinear(24, 40, r=4, variant=variant, seed=7)
    after_layer = torch.rand(5)
    torch.manual_seed(3)
    linear = nn.Linear(24, 40)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert torch.equal(after_layer, torch.rand(5))


def test_base_weight_still_matches_nn_linear_without_a_seed():
    torch.manual_seed(11)
    layer = LoRALinear(24, 40, r=4)
    torch.manual_seed(11)
    linear = nn.Linear(24, 40)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_seed_names_the_init(variant):
    a = _build(variant, 0)
    assert isinstance(a.seed, int) and 0 <= a.seed < 2**63
    before = _adapters(a)
    torch.manual_seed(99)   # the global stream moved on; reset_adapters does not use it
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(1.0)
    a.reset_adapters()
    assert _same(_adapters(a), before)
    # a layer built from the recorded seed is the same layer
    assert _same(_adapters(_build(variant, 123, seed=a.seed)), before)


def test_ffa_clients_share_A_through_torch_seed_or_layer_seed():
    client0, client1 = _build("ffa", 4), _build("ffa", 4)
    assert torch.equal(client0.lora_A, client1.lora_A)
    client2 = _build("ffa", 5, seed=client0.seed)   # a client that was sent the seed
    assert torch.equal(client0.lora_A, client2.lora_A)
    # wrapping a (pretrained) layer: only the seed is drawn, so the base's values do not matter
    wrapped = []
    for scale in (1.0, 2.0):
        lin = nn.Linear(24, 40)
        with torch.no_grad():
            lin.weight.mul_(scale)
        torch.manual_seed(4)
        wrapped.append(LoRALinear.from_linear(lin, r=4, variant="ffa"))
    assert wrapped[0].seed == wrapped[1].seed and torch.equal(wrapped[0].lora_A, wrapped[1].lora_A)


def test_lora_xs_R_follows_torch_manual_seed():
    def build(seed):
        torch.manual_seed(seed)
        model = inject_adapters(_mlp(), ["0", "2"], r=3, variant="xs")
        return lora_xs_(model, r_std=1e-2)

    a, b, c = build(8), build(8), build(9)
    assert torch.equal(a[0].lora_R, b[0].lora_R) and torch.equal(a[2].lora_R, b[2].lora_R)
    assert not torch.equal(a[0].lora_R, c[0].lora_R)


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_does_not_consume_the_dropout_stream(variant):
    lorafast.manual_seed(2024)
    expected = _random.next_seed()
    for torch_seed in (None, 0, 1):
        lorafast.manual_seed(2024)
        _build(variant, torch_seed)
        LoRALinear.from_linear(nn.Linear(8, 8), r=2, variant=variant)
        inject_adapters(_mlp(), ["0"], r=2, variant=variant)
        assert _random.next_seed() == expected


def test_dropout_masks_do_not_follow_torch_manual_seed():
    # a layer with dropout: the same torch seed gives the same adapters but fresh masks
    x = torch.randn(16, 24)
    outs = []
    for _ in range(2):
        layer = _build("lora", 0, lora_dropout=0.5)
        with torch.no_grad():
            layer.lora_B.fill_(1.0)
        outs.append(layer.train()(x))
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, True, "7"])
def test_bad_seed_is_refused(bad):
    with pytest.raises(ValueError, match="seed"):
        LoRALinear(8, 8, r=2, seed=bad)
