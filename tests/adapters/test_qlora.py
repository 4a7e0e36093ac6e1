"""QLoRALinear (a LoRA adapter over a bitsandbytes Linear4bit / Linear8bitLt base): the packed
weight is shared, not copied; output and gradients are the LoRA linear on the dequantised
weight; from_peft, inject_adapters, merge / unmerge and PEFT-format save / load on a tiny
QLoRA Llama."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorafast  # noqa: F401  (before bitsandbytes: it sets up the Triton interpreter)
from lorafast import quant
from lorafast.qlora import MergeError, QLoRALinear
from support.common import fresh_seed
from support.lora_inputs import baseline_forward, truth
from support.qlora_models import (CASES, TARGETS, assert_packed_equal, bnb, case_id, dequantised, packed_state,
                                  qlora_peft, quantised_layers, quantised_linear, tiny_qllama, token_ids)

IN, OUT, R = 128, 64, 4
ATOL = {torch.float32: 5e-5, torch.bfloat16: 1e-2}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _qlora(case, bias=True, **kw):
    kind, nested, cdt = case
    q = quantised_linear(IN, OUT, kind, nested, cdt, bias=bias)
    layer = QLoRALinear.from_linear(q, r=R, lora_alpha=8, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)      # B starts at zero: make the adapter matter
    return q, layer


def _grads(fn, x, params, gy):
    y = fn(x)
    return y, dict(zip(["x", *params], torch.autograd.grad(y, [x, *params.values()], gy)))


# ------------------------------------------------------------------ the layer


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_from_linear_shares_the_packed_weight_and_copies_nothing(case):
    fresh_seed()
    q, layer = _qlora(case)
    assert type(lorafast.LoRALinear.from_linear(q)) is QLoRALinear
    assert layer.weight is q.weight and layer.weight.data_ptr() == q.weight.data_ptr()
    assert layer.bias is q.bias and not layer.weight.requires_grad and not layer.bias.requires_grad
    if case[0] == "int8":
        assert layer.weight.dtype == torch.int8 and layer.weight.SCB is q.weight.SCB
    else:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state is q.weight.quant_state
        assert layer.compute_dtype == case[2]
    # no dense (out, in) copy anywhere in the layer: parameters, buffers, state dict, attributes
    tensors = [t for _, t in layer.named_parameters()] + [t for _, t in layer.named_buffers()] + \
        list(layer.state_dict().values()) + [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        assert not (t.is_floating_point() and t.numel() >= OUT * IN), tuple(t.shape)
    qw = quant.quant_weight(layer)
    packed = sum(t.numel() * t.element_size() for t in (qw.data, qw.absmax, qw.code, qw.absmax2, qw.code2, qw.offset)
                 if t is not None)
    mem = layer.memory_bytes()
    assert mem == {"base": packed, "correction": 0, "adapters": 4 * R * (IN + OUT)}
    assert qw.data.numel() * qw.data.element_size() == OUT * IN * (1 if case[0] == "int8" else 0.5)
    assert mem["base"] < OUT * IN * 4 / 3      # under a third of the fp32 weight, scales and code tables included
    # base_weight is a dequantised fp32 copy, writing to it changes nothing
    w = layer.base_weight
    assert w.dtype == torch.float32 and tuple(w.shape) == (OUT, IN)
    torch.testing.assert_close(w, dequantised(q), rtol=0, atol=0)
    before = packed_state(layer)
    w.add_(1.0)
    assert_packed_equal(layer, before)
    torch.testing.assert_close(layer.base_weight, dequantised(q), rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_output_and_grads_are_the_lora_linear_on_the_dequantised_weight(case, x_dtype):
    """y = x deq(W)ᵀ + b + s·x Aᵀ Bᵀ computed in the compute dtype (x's own for Linear8bitLt) and
    returned in x's dtype; against float64 on the dequantised weight, within 2× PyTorch's own
    error in the coarser of the two dtypes plus the tolerance table's floor."""
    fresh_seed()
    q, layer = _qlora(case)
    cdt = case[2] or x_dtype
    coarse = torch.bfloat16 if torch.bfloat16 in (cdt, x_dtype) else torch.float32
    x = torch.randn(3, 5, IN).to(x_dtype).requires_grad_(True)
    gy = torch.randn(3, 5, OUT).to(x_dtype)
    params = {"A": layer.lora_A, "B": layer.lora_B}

    y, g = _grads(layer, x, params, gy)
    assert y.dtype == x_dtype and g["x"].dtype == x_dtype and tuple(y.shape) == (3, 5, OUT)
    assert layer.weight.grad is None and layer.bias.grad is None

    p = dict(weight=dequantised(q, cdt), A=layer.lora_A, B=layer.lora_B, R=None, bias=layer.bias)
    y_ref, g_ref = truth(x.to(cdt), p, layer.scaling, gy)
    y_base, g_base = _grads(lambda x: baseline_forward(x.to(cdt), dict(p, bias=p["bias"].to(cdt)),
                                                       layer.scaling).to(x_dtype), x, params, gy)
    for name, got, ref, base in [("y", y, y_ref, y_base)] + [(n, g[n], g_ref[n], g_base[n]) for n in ("x", "A", "B")]:
        err, tol = _rel(got, ref), 2 * _rel(base, ref) + ATOL[coarse]
        assert err <= tol, f"{name}: rel err {err:.3e} > {tol:.3e}"
    if case[0] != "int8":      # bitsandbytes' own forward on the same weight (what PEFT calls)
        with torch.no_grad():
            want = q(x.to(cdt)).double() + layer.scaling * (x.double() @ layer.lora_A.double().T) @ \
                layer.lora_B.double().T
        assert _rel(y, want) <= 2 * _rel(y_base, y_ref) + 2 * ATOL[coarse]


def test_training_changes_only_the_adapters():
    fresh_seed()
    q, layer = _qlora(CASES[0])
    before = packed_state(layer)
    bias = layer.bias.detach().clone()
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, IN), torch.randn(16, OUT)
    losses = []
    for _ in range(3):
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert_packed_equal(layer, before)
    assert torch.equal(layer.bias, bias) and layer.weight.grad is None
    assert not torch.equal(layer.lora_A, A) and not torch.equal(layer.lora_B, B)
    assert layer.weight is q.weight


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=case_id)
def test_fused_equals_the_default_path(case):
    fresh_seed()
    q, layer = _qlora(case)
    fused = QLoRALinear.from_linear(q, r=R, lora_alpha=8, fused=True)
    fused.lora_A, fused.lora_B = layer.lora_A, layer.lora_B
    x = torch.randn(2, 7, IN, requires_grad=True)
    gy = torch.randn(2, 7, OUT)
    params = {"A": layer.lora_A, "B": layer.lora_B}
    y, g = _grads(layer, x, params, gy)
    y_f, g_f = _grads(fused, x, params, gy)
    assert _rel(y_f, y) < 1e-5
    for n in g:
        assert _rel(g_f[n], g[n]) < 1e-5, n


def test_multi_lora_refuses_a_quantised_base():
    q = quantised_linear(IN, OUT)
    with pytest.raises(ValueError, match="Linear4bit.*MultiLoRALinear needs a dense base"):
        lorafast.MultiLoRALinear.from_linear(q, 2)


def test_unsupported_layers_are_refused_by_name():
    q = quantised_linear(IN, OUT)
    q.weight.quant_state.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type 'int4'"):
        QLoRALinear.from_linear(q)
    q = quantised_linear(IN, OUT)
    q.compute_dtype = torch.float64
    with pytest.raises(quant.Unsupported, match="compute_dtype torch.float64"):
        lorafast.LoRALinear.from_linear(q)
    with pytest.raises(ValueError, match="Linear8bitLt with has_fp16_weights=True"):
        QLoRALinear.from_linear(bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True).to("cpu"))
    with pytest.raises(ValueError, match="not quantised yet"):
        QLoRALinear.from_linear(bnb.nn.Linear4bit(IN, OUT))
    with pytest.raises(ValueError, match="bitsandbytes Linear4bit or Linear8bitLt"):
        QLoRALinear.from_linear(nn.Linear(IN, OUT))


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_a_weight_bitsandbytes_repacked_for_its_cpu_kernel_is_read_right_or_refused(nested):
    """Linear4bit.forward in eval mode on a CPU with AVX512-BF16 repacks the weight in place
    for bitsandbytes' CPU kernel (another nibble order, absmax decoded and rounded to bf16,
    ``quant_state.packing_format_for_cpu``). Running a PEFT QLoRA model for inference before
    from_peft does that. The packed tensors then mean something else: lorafast must decode
    them as they are now or refuse the layer with a ValueError that says why."""
    import bitsandbytes.functional as bF
    fresh_seed()
    q = quantised_linear(IN, OUT, nested=nested)
    W0 = dequantised(q)
    q.weight.data, q.weight.quant_state = bF._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    try:
        layer = QLoRALinear.from_linear(q, r=R)
    except ValueError as e:
        assert "packing_format_for_cpu" in str(e) or "CPU" in str(e), str(e)
        return
    x = torch.randn(5, IN)
    y = layer(x).detach()         # B = 0: the base alone, which only lost absmax's rounding to bf16
    assert _rel(y, x @ W0.T + q.bias) < 1e-2


# ------------------------------------------------------------------ the tiny QLoRA Llama


@pytest.fixture(scope="module")
def qbase():
    """The quantised tiny Llama, built once (deepcopy it: a second build would differ)."""
    return tiny_qllama()


def _loss_and_grads(model, ids):
    from support.hf_models import adapter_grads
    for p in model.parameters():
        p.grad = None
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in adapter_grads(model).items()}


def _peft_layer_types():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import bnb as peft_bnb
    return {False: peft.tuners.lora.layer.Linear, True: peft_bnb.Linear4bit}


@pytest.mark.parametrize("bnb_layers", [False, True], ids=["lora.Linear", "lora.bnb.Linear4bit"])
def test_from_peft_gives_peft_logits_and_grads(qbase, bnb_layers):
    fresh_seed()
    pm = qlora_peft(qbase, bnb_layers)
    peft_layers = {n: m for n, m in pm.named_modules() if type(m) is _peft_layer_types()[bnb_layers]}
    assert len(peft_layers) == len(TARGETS)
    shared = {n: (m.lora_A["default"].weight, m.lora_B["default"].weight, m.get_base_layer().weight)
              for n, m in peft_layers.items()}
    ids = token_ids()
    logits_ref, grads_ref = _loss_and_grads(pm, ids)

    lorafast.from_peft(pm)
    assert pm.lorafast_unfused == []
    for name, (A, B, W) in shared.items():
        layer = pm.get_submodule(name)
        assert type(layer) is QLoRALinear
        assert layer.lora_A is A and layer.lora_B is B and layer.weight is W
        assert (layer.r, layer.scaling) == (4, 2.0)
    logits, grads = _loss_and_grads(pm, ids)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(TARGETS)
    for layer, g in grads.items():
        for kind in ("lora_A", "lora_B"):
            ref = grads_ref[layer][kind]
            assert ref.abs().max() > 0
            assert _rel(g[kind], ref) < 1e-4, f"{layer}.{kind}"


def test_from_peft_after_peft_ran_in_eval_mode(qbase):
    """The usual flow: look at PEFT's output (eval, no grad), then convert. Where bitsandbytes
    repacks its weights for its CPU kernel in eval mode (AVX512-BF16), from_peft must read the
    repacked layers right (up to absmax's rounding to bf16) or refuse them by name."""
    fresh_seed()
    pm = qlora_peft(qbase)
    ids = token_ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits          # training mode: bitsandbytes' plain decoding
        pm.eval()
        pm(input_ids=ids)                         # may repack every Linear4bit in place
    pm.train()
    try:
        lorafast.from_peft(pm)
    except ValueError as e:
        assert "packing_format_for_cpu" in str(e) or "CPU" in str(e), str(e)
        return
    with torch.no_grad():
        assert _rel(pm(input_ids=ids).logits, want) < 1e-2


def _patched(pm, which: str):
    """Make the base of one PEFT layer unsupported; returns that layer's name and the reason."""
    name = "base_model.model.model.layers.0.self_attn.v_proj"
    base = pm.get_submodule(name).get_base_layer()
    if which == "quant_type":
        base.weight.quant_state.quant_type = "int4"
        return name, "quant_type 'int4'"
    base.compute_dtype = torch.float64
    return name, "compute_dtype torch.float64"


@pytest.mark.parametrize("bnb_layers", [False, True], ids=["lora.Linear", "lora.bnb.Linear4bit"])
@pytest.mark.parametrize("which", ["quant_type", "compute_dtype"])
def test_from_peft_refuses_unsupported_quantised_bases(qbase, which, bnb_layers):
    fresh_seed()
    pm = qlora_peft(qbase, bnb_layers)
    peft_type = _peft_layer_types()[bnb_layers]
    name, why = _patched(pm, which)
    modules = dict(pm.named_modules())
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with pytest.raises(ValueError, match=rf"(?s){name.removeprefix('base_model.model.')}.*{why}"):
        lorafast.from_peft(pm)
    assert dict(pm.named_modules()) == modules            # nothing replaced
    assert not any(isinstance(m, QLoRALinear) for m in pm.modules())
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]), n

    with pytest.warns(UserWarning, match=why):
        lorafast.from_peft(pm, strict=False)
    assert [n for n, _ in pm.lorafast_unfused] == [name] and why in pm.lorafast_unfused[0][1]
    assert type(pm.get_submodule(name)) is peft_type
    fused = [n for n, m in pm.named_modules() if isinstance(m, QLoRALinear)]
    assert len(fused) == len(TARGETS) - 1 and name not in fused
    for n in fused:               # each fused layer computes what its PEFT layer did, on the same tensors
        x = torch.randn(3, pm.get_submodule(n).in_features)
        torch.testing.assert_close(pm.get_submodule(n)(x), modules[n](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bnb_layers", [False, True], ids=["lora.Linear", "lora.bnb.Linear4bit"])
def test_from_peft_refuses_clients_over_a_quantised_base(qbase, bnb_layers):
    pm = qlora_peft(qbase, bnb_layers)
    modules = dict(pm.named_modules())
    with pytest.raises(ValueError, match="clients= over a quantised base"):
        lorafast.from_peft(pm, clients=2)
    assert dict(pm.named_modules()) == modules
    with pytest.warns(UserWarning, match="clients="):
        lorafast.from_peft(pm, clients=2, strict=False)
    assert len(pm.lorafast_unfused) == len(TARGETS)
    assert not any(isinstance(m, (QLoRALinear, lorafast.MultiLoRALinear)) for m in pm.modules())


def test_inject_adapters_over_the_quantised_model(qbase):
    fresh_seed()
    model = copy.deepcopy(qbase)
    bases = {n: m for n, m in quantised_layers(model).items() if n.rpartition(".")[2] in ("q_proj", "v_proj")}
    ids = token_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    lorafast.inject_adapters(model, ["q_proj", "v_proj"], r=3, lora_alpha=6)
    assert model.lorafast_unfused == []
    for n, q in bases.items():
        layer = model.get_submodule(n)
        assert type(layer) is QLoRALinear and layer.weight is q.weight and layer.r == 3
    assert len(quantised_layers(model)) == 7 - len(bases)     # the others stay bitsandbytes layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in bases for k in ("lora_A", "lora_B")}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)    # B = 0 at init


def test_inject_adapters_refuses_unsupported_layers_and_changes_nothing(qbase):
    model = copy.deepcopy(qbase)
    name = "model.layers.0.self_attn.v_proj"
    model.get_submodule(name).compute_dtype = torch.float64
    modules = dict(model.named_modules())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"(?s)cannot adapt 1 layer.*{name}: .*compute_dtype torch.float64"):
        lorafast.inject_adapters(model, ["q_proj", "v_proj"])
    assert dict(model.named_modules()) == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with pytest.raises(ValueError, match="clients= over a quantised base"):
        lorafast.inject_adapters(model, ["q_proj"], clients=2)
    assert dict(model.named_modules()) == modules

    with pytest.warns(UserWarning, match=rf"{name} \(.*compute_dtype"):
        lorafast.inject_adapters(model, ["q_proj", "v_proj"], strict=False)
    assert [n for n, _ in model.lorafast_unfused] == [name]
    assert model.get_submodule(name) is modules[name]
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is QLoRALinear


# ------------------------------------------------------------------ merge / unmerge


def test_merge_requantises_reports_the_error_and_unmerge_is_exact(qbase):
    fresh_seed()
    pm = lorafast.from_peft(qlora_peft(qbase))
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, QLoRALinear)}
    assert len(layers) == len(TARGETS)
    ids = token_ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    packed = {n: packed_state(m) for n, m in layers.items()}
    # the exact merged weight W* = deq(W) + s·BA, in float64, and a layer input
    deq = {n: dequantised(m).double() for n, m in layers.items()}
    exact = {n: deq[n] + m.scaling * m.lora_B.detach().double() @ m.lora_A.detach().double()
             for n, m in layers.items()}
    xs = {n: torch.randn(4, m.in_features) for n, m in layers.items()}
    unmerged_out = {n: m(xs[n]).detach() for n, m in layers.items()}

    with pytest.warns(UserWarning, match="requantised 3 quantised layer"):
        lorafast.merge_adapters(pm)
    errors = pm.lorafast_merge_errors         # named as in the transformers model inside the PeftModel
    assert set(errors) == {n.removeprefix("base_model.model.") for n in layers}
    for n, m in layers.items():
        e = errors[n.removeprefix("base_model.model.")]
        assert isinstance(e, MergeError) and m.merged and m.merge_error is e
        assert m.weight.dtype == torch.uint8 and type(m.weight).__name__ == "Params4bit"
        decoded = dequantised(m).double()
        diff = decoded - exact[n]
        assert 0 < e.max_abs < float("inf")
        assert e.max_abs == pytest.approx(diff.abs().max().item(), rel=1e-6)
        assert e.relative_to_weight == pytest.approx((diff.norm() / exact[n].norm()).item(), rel=1e-6)
        assert e.relative_to_update == pytest.approx((diff.norm() / (exact[n] - deq[n]).norm()).item(), rel=1e-6)
        assert 0 < e.relative_to_weight < 0.2
        # the merged layer computes the plain linear map on the requantised weight
        y = m(xs[n]).detach()
        torch.testing.assert_close(y.double(), xs[n].double() @ decoded.T, rtol=1e-5, atol=1e-5)
        # as far from the unmerged output (x W*ᵀ) as the requantisation error says
        assert 0 < _rel(y, unmerged_out[n]) < 3 * e.relative_to_weight
    with torch.no_grad():
        merged = pm(input_ids=ids).logits
    assert 0 < _rel(merged, want) < 0.25

    lorafast.unmerge_adapters(pm)
    for n, m in layers.items():
        assert not m.merged
        assert_packed_equal(m, packed[n])
        torch.testing.assert_close(m(xs[n]).detach(), unmerged_out[n], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=0, atol=0)


# ------------------------------------------------------------------ PEFT-format save / load


def _peft_load(base, directory):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).train()   # see qlora_models


def test_lorafast_saved_qlora_adapters_load_into_peft(qbase, tmp_path):
    fresh_seed()
    pm = lorafast.from_peft(qlora_peft(qbase))
    ids = token_ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    lorafast.save_adapters(pm, tmp_path / "adapter")
    loaded = _peft_load(qbase, tmp_path / "adapter")
    assert len(quantised_layers(loaded)) == 7                # PEFT's layers over the bitsandbytes bases
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_saved_qlora_adapters_load_into_lorafast(qbase, tmp_path):
    fresh_seed()
    pm = qlora_peft(qbase)
    ids = token_ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    pm.save_pretrained(str(tmp_path))
    model = copy.deepcopy(qbase)
    bases = {n: m.weight for n, m in quantised_layers(model).items()}
    lorafast.load_adapters(model, tmp_path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert sorted(n.rpartition(".")[2] for n in layers) == sorted(TARGETS)
    for n, m in layers.items():
        assert m.weight is bases[n] and type(m.weight).__name__ == "Params4bit" and m.weight.dtype == torch.uint8
        torch.testing.assert_close(m.lora_B, pm.get_submodule("base_model.model." + n).lora_B["default"].weight,
                                   rtol=0, atol=0)
    rest = quantised_layers(model)
    assert len(rest) == 7 - len(TARGETS) and all(m.weight.dtype == torch.uint8 for m in rest.values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bnb_layer", [False, True], ids=["lora.Linear", "lora.bnb.Linear8bitLt"])
def test_from_peft_over_an_int8_base_after_bitsandbytes_ran_it(bnb_layer):
    """A Linear8bitLt's first forward moves its row scales from the weight to the layer's
    state: the converted layer still finds them, and gives PEFT's output."""
    from peft import LoraConfig, get_peft_model
    fresh_seed()
    holder = nn.Module()
    holder.proj = quantised_linear(128, 64, "int8")
    holder.forward = lambda x: holder.proj(x)
    if bnb_layer:
        holder.is_loaded_in_8bit = True
    x = torch.randn(5, 128)
    holder.proj(x)                                   # bitsandbytes' own forward: SCB leaves the weight
    assert getattr(holder.proj.weight, "SCB", None) is None
    expected = bnb.functional.int8_vectorwise_dequant(holder.proj.weight.data.clone(), holder.proj.state.SCB.clone())
    pm = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ref = pm(x)
    lorafast.from_peft(pm)
    layer = pm.base_model.model.proj
    assert isinstance(layer, QLoRALinear) and layer.kind == 8
    assert _rel(pm(x), ref) < 1e-5
    assert torch.equal(layer.base_weight, expected)
