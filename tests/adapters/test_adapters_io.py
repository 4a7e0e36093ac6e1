"""inject_adapters, save_adapters / load_adapters in PEFT's format, merge / unmerge."""
import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import lorafast
from support.common import backend_devices, backend_ids, fresh_seed
from support.hf_models import peft, peft_lora, tiny_gpt2, tiny_llama, token_ids, transformers


def _peft_load(base, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def _randomize_B(model, std=0.2):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lorafast.LoRALinear):
                m.lora_B.normal_(0, std)


def _train(model, ids, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------ inject


def test_inject_gpt2_conv1d_uses_the_transposed_weight():
    """GPT-2's Conv1D computes x W + b with W (in, out): the adapter must add (s·BA)ᵀ to W."""
    fresh_seed()
    base = tiny_gpt2()
    model = lorafast.inject_adapters(copy.deepcopy(base), ["c_attn", "c_fc"], r=3, lora_alpha=6)
    layer = model.transformer.h[1].attn.c_attn
    assert layer.fan_in_fan_out and tuple(layer.weight.shape) == (32, 96) and tuple(layer.lora_A.shape) == (3, 32)
    assert layer.weight is model.state_dict(keep_vars=True)["transformer.h.1.attn.c_attn.weight"]
    ids = token_ids()
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)   # B = 0 at init

    _randomize_B(model)
    want = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, lorafast.LoRALinear):
                conv = want.get_submodule(name)
                conv.weight += (m.scaling * m.lora_B @ m.lora_A).T
    torch.testing.assert_close(model(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_inject_freezes_everything_but_the_adapters():
    model = lorafast.inject_adapters(tiny_llama(), "all-linear", r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n for n, m in model.named_modules() if isinstance(m, lorafast.LoRALinear)}
    assert len(adapted) == 2 * 7 and "lm_head" not in adapted          # all-linear spares the output layer
    assert trainable == {f"{n}.{k}" for n in adapted for k in ("lora_A", "lora_B")}
    model = lorafast.inject_adapters(tiny_llama(), ["q_proj"], variant="xs")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"model.layers.{i}.self_attn.q_proj.lora_R" for i in range(2)}


def test_inject_keeps_eval_mode():
    model = lorafast.inject_adapters(tiny_llama().eval(), ["q_proj"])
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["q_proj"], variant="dora"), "variant"),
    (dict(target_modules=["q_proj"], r=0), "r must be"),
    (dict(target_modules=["q_proj"], r=-2), "r must be"),
    (dict(target_modules=["q_proj"], lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=["q_proj", "nonesuch"]), r"(?s)\['nonesuch'\].*'q_proj'.*'v_proj'"),
    (dict(target_modules=["self_attn"]), "LlamaAttention"),
    (dict(target_modules="q_proj"), "list of module-name suffixes"),
    (dict(target_modules=[]), "list of module-name suffixes"),
])
def test_inject_bad_input_changes_nothing(kwargs, match):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        lorafast.inject_adapters(model, **kwargs)
    assert not any(isinstance(m, lorafast.LoRALinear) for m in model.modules())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inject_twice_is_refused():
    model = lorafast.inject_adapters(tiny_llama(), ["q_proj"])
    with pytest.raises(ValueError, match="already has a lorafast adapter"):
        lorafast.inject_adapters(model, ["q_proj", "v_proj"])
    assert not any(isinstance(m, lorafast.LoRALinear) for m in model.model.layers[0].self_attn.v_proj.modules())


# ------------------------------------------------------------------ save / load


def test_gpt2_train_save_reload_in_peft(tmp_path):
    fresh_seed()
    base = tiny_gpt2()
    model = lorafast.inject_adapters(copy.deepcopy(base), ["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8)
    model.train()
    ids = token_ids(3, 9)
    losses = _train(model, ids)
    assert losses[-1] < losses[0]
    model.eval()
    lorafast.save_adapters(model, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True and config["r"] == 4
    want = model(input_ids=ids).logits
    got = _peft_load(base, tmp_path / "adapter")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    again = lorafast.load_adapters(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_saved_adapters_load_into_lorafast(tmp_path):
    fresh_seed()
    base = tiny_llama()
    pm = peft_lora(base, ["q_proj", "down_proj"], r=3, lora_alpha=7, use_rslora=True,
                   rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}).eval()
    pm.save_pretrained(str(tmp_path))
    ids = token_ids()
    want = pm(input_ids=ids).logits

    model = lorafast.load_adapters(copy.deepcopy(base), tmp_path)
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, lorafast.LoRALinear) and down.r == 2 and down.scaling == pytest.approx(3 / math.sqrt(2))
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    # into an existing injected model: same tensors land in the existing layers
    injected = lorafast.inject_adapters(copy.deepcopy(base), ["q_proj"], r=3, lora_alpha=7, use_rslora=True)
    injected = lorafast.inject_adapters(injected, ["down_proj"], r=2, lora_alpha=3, use_rslora=True)
    layer = injected.model.layers[0].self_attn.q_proj
    lorafast.load_adapters(injected, tmp_path)
    assert injected.model.layers[0].self_attn.q_proj is layer
    torch.testing.assert_close(injected(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_ranks_alphas_and_rslora_round_trip_through_peft(tmp_path):
    fresh_seed()
    base = tiny_llama()
    model = lorafast.inject_adapters(copy.deepcopy(base), ["q_proj", "k_proj"], r=4, lora_alpha=8)
    model = lorafast.inject_adapters(model, ["gate_proj"], r=2, lora_alpha=5, use_rslora=True)
    _randomize_B(model)
    lorafast.save_adapters(model, tmp_path)
    ids = token_ids()
    want = model(input_ids=ids).logits
    torch.testing.assert_close(_peft_load(base, tmp_path)(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_ffa_saves_its_frozen_A(tmp_path):
    fresh_seed()
    base = tiny_llama()
    model = lorafast.inject_adapters(copy.deepcopy(base), ["v_proj"], variant="ffa", r=3)
    _randomize_B(model)
    lorafast.save_adapters(model, tmp_path)
    ids = token_ids()
    want = model(input_ids=ids).logits
    torch.testing.assert_close(_peft_load(base, tmp_path)(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    fresh = lorafast.inject_adapters(copy.deepcopy(base), ["v_proj"], variant="ffa", r=3)   # another random A
    lorafast.load_adapters(fresh, tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["xs", "sb"])
def test_xs_sb_save_B_times_R_for_peft_and_the_factors_for_lorafast(tmp_path, variant):
    fresh_seed()
    base = tiny_llama()
    model = lorafast.inject_adapters(copy.deepcopy(base), ["q_proj", "up_proj"], variant=variant, r=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lorafast.LoRALinear):
                m.lora_R.normal_(0, 0.5)
    lorafast.save_adapters(model, tmp_path)
    ids = token_ids()
    want = model(input_ids=ids).logits
    torch.testing.assert_close(_peft_load(base, tmp_path)(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    layer = model.model.layers[0].mlp.up_proj
    reloaded = lorafast.load_adapters(copy.deepcopy(base), tmp_path)
    got = reloaded.model.layers[0].mlp.up_proj
    assert got.variant == variant and got.lora_R.requires_grad and not got.lora_B.requires_grad
    for name in ("lora_A", "lora_B", "lora_R"):
        assert torch.equal(getattr(got, name), getattr(layer, name)), name
    torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_plain_peft_adapter_into_an_xs_layer_gives_R_identity(tmp_path):
    fresh_seed()
    base = tiny_llama()
    pm = peft_lora(base, ["q_proj"], r=3).eval()
    pm.save_pretrained(str(tmp_path))
    model = lorafast.inject_adapters(copy.deepcopy(base), ["q_proj"], variant="xs", r=3, lora_alpha=8)
    lorafast.load_adapters(model, tmp_path)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_R, torch.eye(3))
    ids = token_ids()
    torch.testing.assert_close(model(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_from_peft_model_saves_with_peft_names(tmp_path):
    fresh_seed()
    base = tiny_llama()
    pm = lorafast.from_peft(peft_lora(base, ["q_proj", "v_proj"], task_type="CAUSAL_LM").eval())
    lorafast.save_adapters(pm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    ids = token_ids()
    loaded = _peft_load(base, tmp_path)
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_load_refuses_what_it_cannot_reproduce(tmp_path):
    base = tiny_llama()
    pm = peft_lora(base, ["q_proj"])
    pm.save_pretrained(str(tmp_path / "ok"))
    model = copy.deepcopy(base)
    before = copy.deepcopy(model.state_dict())

    with pytest.raises(ValueError, match="no adapter_config.json"):
        lorafast.load_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        lorafast.load_adapters(model, tmp_path / "missing")
    cfg_path = tmp_path / "ok" / "adapter_config.json"
    config = json.loads(cfg_path.read_text())
    for key, value in (("use_dora", True), ("peft_type", "IA3"), ("lora_bias", True)):
        cfg_path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=key):
            lorafast.load_adapters(model, tmp_path / "ok")
    cfg_path.write_text(json.dumps(config))
    wrong_rank = lorafast.inject_adapters(copy.deepcopy(base), ["q_proj"], r=5)
    with pytest.raises(ValueError, match="rank 4"):
        lorafast.load_adapters(wrong_rank, tmp_path / "ok")
    other = tiny_gpt2()
    with pytest.raises(ValueError, match="not a module"):
        lorafast.load_adapters(other, tmp_path / "ok")
    assert not any(isinstance(m, lorafast.LoRALinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_into_an_unconverted_peft_model_says_to_call_from_peft(tmp_path):
    base = tiny_llama()
    peft_lora(base, ["q_proj"]).save_pretrained(str(tmp_path))
    pm = peft_lora(base, ["q_proj"])
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj', which is still a PEFT LoRA "
                                         r"layer .*call lorafast\.from_peft\(model\) first"):
        lorafast.load_adapters(pm, tmp_path)
    assert not any(isinstance(m, lorafast.LoRALinear) for m in pm.modules())
    for k, v in pm.state_dict().items():
        assert torch.equal(v, before[k]), k
    converted = lorafast.load_adapters(lorafast.from_peft(pm), tmp_path)      # what the message says works
    assert isinstance(converted.base_model.model.model.layers[0].self_attn.q_proj, lorafast.LoRALinear)


def _seq_cls(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=61, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


def _train_cls(model, ids, labels, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()


def test_trained_head_is_saved_as_modules_to_save(tmp_path):
    """PEFT's SEQ_CLS model trains the score head too: it must travel with the adapters."""
    fresh_seed()
    base = _seq_cls()
    pm = lorafast.from_peft(peft_lora(base, ["q_proj", "v_proj"], task_type="SEQ_CLS"))
    ids, labels = torch.randint(1, 61, (4, 6)), torch.tensor([0, 2, 1, 2])
    _train_cls(pm, ids, labels)
    pm.eval()
    lorafast.save_adapters(pm, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]
    want = pm(input_ids=ids).logits
    assert not torch.allclose(want, peft_lora(base, ["q_proj"], task_type="SEQ_CLS").eval()(input_ids=ids).logits)
    torch.testing.assert_close(_peft_load(base, tmp_path / "peft")(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    loaded = lorafast.load_adapters(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert loaded.score.weight.requires_grad

    # without PEFT: inject, unfreeze the head, train, save
    model = lorafast.inject_adapters(copy.deepcopy(base), ["q_proj"], r=2)
    model.score.weight.requires_grad_(True)
    _train_cls(model, ids, labels)
    lorafast.save_adapters(model, tmp_path / "plain")
    want = model(input_ids=ids).logits
    torch.testing.assert_close(_peft_load(base, tmp_path / "plain")(input_ids=ids).logits, want, rtol=1e-5,
                               atol=1e-5)


def test_save_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear"):
        lorafast.save_adapters(tiny_llama(), tmp_path)


# ------------------------------------------------------------------ merge / unmerge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variant", ["lora", "xs"])
def test_merge_unmerge_round_trip(dtype, variant):
    fresh_seed()
    model = nn.Sequential(nn.Linear(33, 47), nn.GELU(), nn.Linear(47, 13)).to(dtype)
    lorafast.inject_adapters(model, ["0", "2"], r=3, variant=variant)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lorafast.LoRALinear):
                for p in (m.lora_B, m.lora_R):
                    if p is not None:
                        p.normal_(0, 0.3)
    W = [model[i].weight.detach().clone() for i in (0, 2)]
    x = torch.randn(5, 33, dtype=dtype)
    want = model(x)
    lorafast.merge_adapters(model)
    assert all(model[i].merged for i in (0, 2))
    for i, w in zip((0, 2), W):
        U, V = model[i].delta_factors()
        ref = (w.double() + U.double() @ V.double())
        # one rounding of W + s·B(R)A to W's dtype, on top of the fp32 product's own rounding
        eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
        bound = eps * ref.abs() + 4 * eps32 * (U.double().abs() @ V.double().abs())
        assert ((model[i].weight.double() - ref).abs() <= bound).all()
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(model(x), want, rtol=rtol, atol=rtol)
    with pytest.raises(ValueError, match="already merged"):
        lorafast.merge_adapters(model)
    lorafast.unmerge_adapters(model)
    for i, w in zip((0, 2), W):
        err = (model[i].weight.double() - w.double()).abs()
        # two roundings of W's dtype, at the magnitude of the merged weight
        bound = 2 * torch.finfo(dtype).eps * (w.double().abs() + (model[i].delta_factors()[0].double()
                                                                  @ model[i].delta_factors()[1].double()).abs())
        assert (err <= bound + 1e-300).all()
        if dtype == torch.float64:
            torch.testing.assert_close(model[i].weight, w, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="not merged"):
        lorafast.unmerge_adapters(model)


@pytest.mark.parametrize("backend_device", [p for p in backend_devices() if p[1] == "cpu"], ids=backend_ids)
def test_merge_conv1d_into_the_transposed_weight(backend_device):
    backend, _ = backend_device
    fresh_seed()
    base = tiny_gpt2()
    model = lorafast.inject_adapters(copy.deepcopy(base), ["c_attn"], r=3)
    _randomize_B(model)
    ids = token_ids()
    want = model(input_ids=ids).logits
    with lorafast.use_backend(backend):           # the merge runs the fedex_merge op on a strided view
        lorafast.merge_adapters(model)
    layer = model.transformer.h[0].attn.c_attn
    U, V = layer.delta_factors()
    torch.testing.assert_close(layer.weight, base.transformer.h[0].attn.c_attn.weight + (U @ V).T)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_merged_layers_refuse_private_training():
    from lorafast.dp import PrivacyEngine
    model = nn.Sequential(nn.Linear(8, 8))
    lorafast.inject_adapters(model, ["0"], r=2)
    lorafast.merge_adapters(model)
    engine = PrivacyEngine()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4)
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="merged"):
        model(torch.randn(4, 8))
