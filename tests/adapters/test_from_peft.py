"""lorafast.from_peft: PEFT LoRA layers become fused LoRALinear layers that share PEFT's
tensors and give the same logits and adapter gradients."""
import copy
import math

import pytest
import torch

import lorafast
from support.common import backend_devices, backend_ids, fresh_seed
from support.hf_models import adapter_grads, peft, peft_lora, tiny_gpt2, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _loss_and_grads(model, ids):
    for p in model.parameters():
        p.grad = None
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), adapter_grads(model)


@pytest.mark.parametrize("backend_device", [p for p in backend_devices() if p[1] == "cpu"], ids=backend_ids)
def test_logits_and_adapter_grads_match_peft(backend_device):
    backend, _ = backend_device
    fresh_seed()
    pm = peft_lora(tiny_llama(), TARGETS)
    ids = token_ids()
    logits_ref, grads_ref = _loss_and_grads(pm, ids)

    fm = lorafast.from_peft(copy.deepcopy(pm))
    fused = [m for m in fm.modules() if isinstance(m, lorafast.LoRALinear)]
    assert len(fused) == 2 * len(TARGETS)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in fm.modules())
    with lorafast.use_backend(backend):
        logits, grads = _loss_and_grads(fm, ids)

    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * len(TARGETS)
    for layer, g in grads.items():
        for kind in ("lora_A", "lora_B"):
            ref = grads_ref[layer][kind]
            assert ref.abs().max() > 0, (layer, kind)
            torch.testing.assert_close(g[kind], ref, rtol=1e-4, atol=1e-6, msg=f"{layer}.{kind}")


def test_shares_parameters_and_carries_the_config():
    fresh_seed()
    pm = peft_lora(tiny_llama(), ["q_proj", "o_proj"], r=3, lora_alpha=5, use_rslora=True, lora_dropout=0.25)
    peft_layer = pm.base_model.model.model.layers[1].self_attn.q_proj
    A, B, W = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight, peft_layer.base_layer.weight
    lorafast.from_peft(pm)
    layer = pm.base_model.model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, lorafast.LoRALinear)
    assert layer.lora_A is A and layer.lora_B is B and layer.weight is W
    assert (layer.r, layer.lora_alpha, layer.use_rslora, layer.lora_dropout) == (3, 5, True, 0.25)
    assert layer.scaling == pytest.approx(5 / math.sqrt(3))
    assert layer.bias is None and not layer.weight.requires_grad
    assert A.requires_grad and B.requires_grad
    assert pm.lorafast_unfused == []


def test_base_bias_is_carried_over():
    fresh_seed()
    model = tiny_gpt2()                           # Conv1D layers with biases
    pm = peft_lora(model, ["c_attn", "c_fc"], fan_in_fan_out=True)
    ids = token_ids()
    want = pm(input_ids=ids).logits
    peft_layer = pm.base_model.model.transformer.h[0].attn.c_attn
    bias = peft_layer.base_layer.bias
    lorafast.from_peft(pm)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.bias is bias
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_dropout_is_fused_and_off_in_eval():
    fresh_seed()
    pm = peft_lora(tiny_llama(), TARGETS, lora_dropout=0.5).eval()
    ids = token_ids()
    want = pm(input_ids=ids).logits
    lorafast.from_peft(pm)
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    pm.train()
    a, b = pm(input_ids=ids).logits, pm(input_ids=ids).logits
    assert not torch.equal(a, b)                  # fresh Philox masks per call


def _dora_model():
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    return peft.get_peft_model(base, cfg)


def test_dora_is_refused_with_layer_and_feature():
    pm = _dora_model()
    before = {n: p.clone() for n, p in pm.named_parameters()}
    with pytest.raises(ValueError, match=r"(?s)model\.layers\.0\.self_attn\.q_proj.*DoRA"):
        lorafast.from_peft(pm)
    assert not any(isinstance(m, lorafast.LoRALinear) for m in pm.modules())      # nothing replaced
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]), n


def test_strict_false_keeps_unfusable_layers_and_reports_them():
    base = tiny_llama()
    pm = peft_lora(base, ["q_proj", "v_proj"])
    # DoRA on one layer only: add a DoRA adapter config for v_proj in a second model, then swap that layer in
    dora = _dora_model()
    pm.base_model.model.model.layers[0].self_attn.v_proj = dora.base_model.model.model.layers[0].self_attn.v_proj
    ids = token_ids()
    want = pm(input_ids=ids).logits
    with pytest.warns(UserWarning, match="DoRA"):
        lorafast.from_peft(pm, strict=False)
    assert [n for n, _ in pm.lorafast_unfused] == ["base_model.model.model.layers.0.self_attn.v_proj"]
    assert "DoRA" in pm.lorafast_unfused[0][1]
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.v_proj, peft.tuners.lora.LoraLayer)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, lorafast.LoRALinear)
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_several_adapters_are_refused():
    pm = peft_lora(tiny_llama(), ["q_proj"])
    pm.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="several adapters"):
        lorafast.from_peft(pm)
    pm.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="multiple active adapters"):
        lorafast.from_peft(pm)


def test_lora_bias_is_refused():
    pm = peft_lora(tiny_gpt2(), ["c_attn"], lora_bias=True, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="lora_bias"):
        lorafast.from_peft(pm)


def test_not_a_peft_model():
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        lorafast.from_peft(tiny_llama())
