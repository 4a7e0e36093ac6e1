"""PEFT LoRA layers → fused LoRALinear layers sharing the same parameter tensors."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .._checks import check_count
from ..layers import LoRALinear, is_conv1d
from ..multi_lora import MultiLoRALinear
from ..quant import is_quantised, unsupported_reason
from .targets import replace

_ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _peft_lora():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:
        raise ImportError("lorafast.from_peft needs PEFT: pip install 'lorafast[hf]'") from e
    return lora_layer


def _fusable_types(lora_layer) -> tuple:
    """PEFT's LoRA layer classes that become LoRALinear: lora.Linear, and its bitsandbytes
    layers (lora.bnb.Linear4bit / Linear8bitLt, which PEFT uses for a model loaded quantised)."""
    types = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as peft_bnb
        types += [getattr(peft_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(peft_bnb, n)]
    except ImportError:
        pass
    return tuple(types)


def _unfusable(module: nn.Module, lora_layer, clients: Optional[int] = None) -> Optional[str]:
    """Why this PEFT LoRA layer cannot become a LoRALinear, or None."""
    if type(module) not in _fusable_types(lora_layer):
        return (f"layer type {type(module).__module__}.{type(module).__name__} (only lora.Linear and PEFT's "
                "bitsandbytes Linear4bit / Linear8bitLt are fused)")
    base = module.get_base_layer()
    quantised = is_quantised(base)
    if quantised:
        why = unsupported_reason(base, "its base layer", clients)
        if why is not None:
            return why
        compute = getattr(base, "compute_dtype", None)
    elif type(base) is not nn.Linear and not is_conv1d(base):
        return f"custom base layer {type(base).__module__}.{type(base).__name__}"
    elif type(base.weight) is not nn.Parameter or base.weight.dtype not in _ADAPTER_DTYPES:
        return f"quantised base weight ({type(base.weight).__name__}, {base.weight.dtype})"
    else:
        compute = base.weight.dtype
    names = list(module.lora_A.keys())
    active = _active(module)
    if len(active) > 1:
        return f"multiple active adapters {active}"
    if not active:
        return "no active adapter"
    name = active[0]
    if len(names) > 1:
        return f"several adapters {names} (only the active one, {name!r}, could be fused; the others would be lost)"
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight (call unmerge_adapter() first)"
    if module.use_dora.get(name) or name in module.lora_magnitude_vector:
        return "DoRA"
    if name in getattr(module, "lora_variant", {}):
        return f"LoRA variant {type(module.lora_variant[name]).__name__}"
    if module.lora_bias.get(name):
        return "lora_bias (a trainable bias on lora_B)"
    drop = module.lora_dropout[name]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"dropout module {type(drop).__name__}"
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    for t, what in ((A, "lora_A"), (B, "lora_B")):
        if t.dtype != torch.float32 and (compute is None or t.dtype != compute):
            return (f"{what} in {t.dtype}, neither fp32 nor the base's "
                    f"{'compute dtype' if quantised else 'dtype'} {compute}")
        if t.device != base.weight.device:
            return f"{what} on {t.device}, the base on {base.weight.device}"
    return None


def _active(module: nn.Module) -> list[str]:
    return [a for a in module.active_adapters if a in module.lora_A]


def _fused(module: nn.Module, clients: Optional[int] = None) -> nn.Module:
    name = _active(module)[0]
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    drop = module.lora_dropout[name]
    trains_A = A.requires_grad
    kw = dict(r=module.r[name], lora_alpha=module.lora_alpha[name],
              lora_dropout=drop.p if isinstance(drop, nn.Dropout) else 0.0,
              variant="lora" if trains_A or not B.requires_grad else "ffa",
              use_rslora=bool(module.use_rslora.get(name, False)),
              seed=0)   # a fixed key: the adapters are PEFT's, so draw nothing from the stream
    if clients is not None:   # every client starts from PEFT's adapter, in its own slot of the stacks
        layer = MultiLoRALinear.from_linear(module.get_base_layer(), clients, **kw)
        with torch.no_grad():
            layer.lora_A.copy_(A.detach().float().expand_as(layer.lora_A))
            layer.lora_B.copy_(B.detach().float().expand_as(layer.lora_B))
    else:
        layer = LoRALinear.from_linear(module.get_base_layer(), **kw)
        layer.lora_A, layer.lora_B = A, B       # the same Parameter objects: optimizers keep working
    layer.scaling = float(module.scaling[name])
    return layer


def _survey(peft_model: nn.Module, clients: Optional[int] = None) -> list[tuple[str, nn.Module, Optional[str]]]:
    """(name, layer, the feature the fused op lacks or None) of each PEFT LoRA layer."""
    lora_layer = _peft_lora()
    return [(name, module, _unfusable(module, lora_layer, clients)) for name, module in peft_model.named_modules()
            if isinstance(module, lora_layer.LoraLayer)]


def unfusable_layers(peft_model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, layer, feature the fused op lacks) of each PEFT LoRA layer that ``from_peft``
    would leave as it is; nothing is changed."""
    return [entry for entry in _survey(peft_model) if entry[2]]


def from_peft(peft_model: nn.Module, *, strict: bool = True, clients: Optional[int] = None) -> nn.Module:
    """Replace, in place, each PEFT LoRA layer of ``peft_model`` with a fused ``LoRALinear``
    that shares its parameter tensors (base weight and bias, lora_A, lora_B), and carries
    over r, lora_alpha, the scaling (rsLoRA included) and the dropout. Returns ``peft_model``.

    A bitsandbytes-quantised base (QLoRA: ``Linear4bit`` NF4/FP4, ``Linear8bitLt``) gives a
    ``QLoRALinear`` that keeps bitsandbytes' packed weight (lorafast.qlora).

    Layers with a feature the fused op does not compute (DoRA, several adapters, a custom or
    unsupported quantised base, lora_bias, ...) raise ValueError naming each layer and feature; with
    ``strict=False`` they stay PEFT layers, a warning lists them and
    ``peft_model.lorafast_unfused`` holds ``[(name, feature), ...]``.

    The PEFT wrapper stays (``print_trainable_parameters``, generation), but PEFT's adapter
    management no longer sees the fused layers: use ``lorafast.save_adapters`` (PEFT's
    format) instead of ``save_pretrained``, ``lorafast.merge_adapters`` instead of
    ``merge_and_unload``; ``disable_adapter()`` and ``set_adapter`` do not apply.

    ``clients=k`` makes each layer a ``MultiLoRALinear`` whose k clients all start from the
    PEFT adapter (copies in stacked parameters: build the optimizer after converting).
    """
    if not isinstance(peft_model, nn.Module):
        raise ValueError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be a bool, got {strict!r}")
    if clients is not None:
        check_count("clients", clients, minimum=1)
    survey = _survey(peft_model, clients)
    plan = [(name, module) for name, module, why in survey if not why]
    unfused = [(name, why) for name, _, why in survey if why]
    if not plan and not unfused:
        raise ValueError(f"peft_model ({type(peft_model).__name__}) has no PEFT LoRA layers")
    if unfused and strict:
        listed = "\n".join(f"  {n}: {why}" for n, why in unfused)
        raise ValueError(f"from_peft cannot fuse {len(unfused)} PEFT LoRA layer(s):\n{listed}\n"
                         "pass strict=False to keep them as PEFT layers")
    fused = [(name, _fused(module, clients)) for name, module in plan]
    for name, layer in fused:
        replace(peft_model, name, layer)
    if unfused:
        warnings.warn(f"from_peft kept {len(unfused)} PEFT LoRA layer(s) unfused: "
                      + "; ".join(f"{n} ({why})" for n, why in unfused), stacklevel=2)
    peft_model.lorafast_unfused = unfused
    return peft_model
