"""LoRALinear: variants, PEFT attribute names, from_linear, training."""
import copy
import math

import pytest
import torch
from torch import nn

import lorafast
from lorafast import LoRALinear, reference
from support.common import fresh_seed

TRAINABLE = {"lora": {"lora_A", "lora_B"}, "ffa": {"lora_B"}, "xs": {"lora_R"}, "sb": {"lora_R"}}


@pytest.mark.parametrize("variant", ["lora", "ffa", "xs", "sb"])
def test_variant_parameters(variant):
    layer = LoRALinear(33, 47, r=3, lora_alpha=6, variant=variant)
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == TRAINABLE[variant]
    assert layer.lora_A.shape == (3, 33) and layer.lora_B.shape == (47, 3)
    assert (layer.lora_R is None) == (variant in ("lora", "ffa"))
    if layer.lora_R is not None:
        assert layer.lora_R.shape == (3, 3)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.scaling == 2.0 and layer.r == 3 and layer.lora_alpha == 6
    assert layer.lora_A.dtype == torch.float32


@pytest.mark.parametrize("variant", ["lora", "ffa", "xs", "sb"])
def test_starts_at_the_base_layer(variant):
    fresh_seed()
    layer = LoRALinear(33, 47, r=3, variant=variant)
    x = torch.randn(5, 33)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_rslora_scaling():
    assert LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))


def test_ffa_seed_shares_the_frozen_A():
    a = LoRALinear(20, 10, r=4, variant="ffa", seed=7)
    b = LoRALinear(20, 10, r=4, variant="ffa", seed=7)
    c = LoRALinear(20, 10, r=4, variant="ffa")
    assert torch.equal(a.lora_A, b.lora_A)
    assert not torch.equal(a.lora_A, c.lora_A)


def test_from_linear_shares_weights_and_matches_functional():
    fresh_seed()
    lin = nn.Linear(33, 47).to(torch.float16)
    layer = LoRALinear.from_linear(lin, r=3, lora_alpha=3)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.device == lin.weight.device
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 33, dtype=torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16
    ref = reference.lora_linear(x, lin.weight, layer.lora_A, layer.lora_B, lin.bias, scaling=1.0)
    torch.testing.assert_close(y, ref)


def test_dropout_only_in_training():
    layer = LoRALinear(16, 16, r=4, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))   # a fresh mask each call


@pytest.mark.parametrize("bad", [dict(r=0), dict(variant="dora"), dict(lora_dropout=1.0)])
def test_bad_layer_arguments(bad):
    kw = dict(r=4)
    kw.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoRALinear(8, 8, **kw)


def test_from_linear_rejects_other_modules():
    with pytest.raises(ValueError, match="linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("variant", ["lora", "ffa", "xs"])
def test_training_reduces_loss(backend_device, variant):
    backend, device = backend_device
    fresh_seed()
    layer = LoRALinear(16, 24, r=4, lora_alpha=8, variant=variant, device=device)
    teacher = copy.deepcopy(layer)            # a reachable target: same variant, other adapter values
    with torch.no_grad():
        for p in teacher.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    x = torch.randn(64, 16, device=device)
    target = teacher(x).detach()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    with lorafast.use_backend(backend):
        for _ in range(25):
            loss = (layer(x) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
