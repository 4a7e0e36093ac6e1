"""bitsandbytes-quantised layers and models for the QLoRA tests (no tests here).

bitsandbytes quantises a Linear4bit / Linear8bitLt when it is moved to its device
(``.to("cpu")`` here). Its own CPU decoding is only right for in_features that are multiples
of its block size (64), so the layers here keep to such shapes wherever bitsandbytes or PEFT
computes a reference; lorafast's results are compared with ``reference.dequantize`` of the
packed weight (``dequantised``).

transformers does not build a model reproducibly twice, even after torch.manual_seed: build
the quantised base once (``tiny_qllama``) and ``copy.deepcopy`` it for every other copy.

The models here are in training mode (no dropout anywhere, so it computes what eval would):
in eval mode, on a CPU with AVX512-BF16, bitsandbytes' Linear4bit.forward repacks its weight
in place for its CPU kernel (``quant_state.packing_format_for_cpu``: another nibble layout,
absmax decoded and rounded to bf16), which changes both what it computes and what the packed
tensors mean.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import lorafast  # noqa: F401  (before bitsandbytes: it sets up the Triton interpreter)
from lorafast import quant, reference

bnb = pytest.importorskip("bitsandbytes")

VOCAB = 64
TARGETS = ["q_proj", "v_proj", "down_proj"]
# (quant type, double quantisation, compute dtype) of the 4-bit cases, and the 8-bit one
CASES = [("nf4", True, torch.float32), ("nf4", False, torch.bfloat16), ("fp4", True, torch.bfloat16),
         ("fp4", False, torch.float32), ("int8", None, None)]


def case_id(case) -> str:
    kind, nested, cdt = case
    if kind == "int8":
        return "int8"
    return f"{kind}-{'nested' if nested else 'plain'}-{str(cdt).removeprefix('torch.')}"


def quantise(linear: nn.Linear, kind: str = "nf4", nested: bool = True, compute_dtype=torch.float32) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight and bias, quantised: ``kind`` "nf4" /
    "fp4" (Linear4bit) or "int8" (Linear8bitLt with has_fp16_weights=False)."""
    bias = linear.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=nested, quant_type=kind)
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")


def quantised_linear(in_f: int, out_f: int, kind: str = "nf4", nested: bool = True, compute_dtype=torch.float32,
                     bias: bool = True) -> nn.Module:
    return quantise(nn.Linear(in_f, out_f, bias=bias), kind, nested, compute_dtype)


def dequantised(layer: nn.Module, dtype=torch.float32) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes layer (or a QLoRALinear) encodes, by lorafast.reference."""
    return reference.dequantize(quant.quant_weight(layer), dtype)


def packed_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every tensor the quantised weight is made of (for bit-for-bit comparisons)."""
    qw = quant.quant_weight(layer)
    return {f: getattr(qw, f).clone() for f in ("data", "absmax", "code", "absmax2", "code2", "offset")
            if getattr(qw, f) is not None}


def assert_packed_equal(layer: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = packed_state(layer)
    assert now.keys() == before.keys()
    for k, t in before.items():
        assert now[k].dtype == t.dtype and torch.equal(now[k], t), f"{k} changed"


def quantise_model(model: nn.Module, skip=("lm_head",), **kw) -> nn.Module:
    """Every nn.Linear of ``model`` (but those named in ``skip``) replaced by its quantised copy."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name.rpartition(".")[2] not in skip:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, quantise(m, **kw))
    return model


def tiny_qllama(seed: int = 0):
    """A one-layer Llama whose linear layers (all but lm_head) are NF4 Linear4bit, fp32 compute."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return quantise_model(transformers.LlamaForCausalLM(cfg)).train()


def qlora_peft(base: nn.Module, bnb_layers: bool = False, targets=TARGETS, std: float = 0.1):
    """PEFT LoRA (r=4, alpha=8) on a deepcopy of the quantised ``base``, with random B. PEFT
    wraps a Linear4bit in lora.Linear, or in lora.bnb.Linear4bit (``bnb_layers``: what it does
    for a model loaded in 4 bits, ``is_loaded_in_4bit``)."""
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(base)
    if bnb_layers:
        model.is_loaded_in_4bit = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=std)
    return pm.train()


def token_ids(batch: int = 2, seq: int = 7):
    return torch.randint(0, VOCAB, (batch, seq))


def quantised_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the bitsandbytes layers of ``model``."""
    return {n: m for n, m in model.named_modules() if quant.is_quantised(m)}
