"""Finding the layers of a model that adapters go into, by PEFT's naming rules."""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from ..layers import LoRALinear, is_conv1d

PEFT_PREFIX = "base_model.model."   # PEFT's key prefix: PeftModel.base_model (LoraModel).model


def is_peft_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.") and hasattr(model, "peft_config")


def hf_root(model: nn.Module) -> nn.Module:
    """The transformers model itself: ``model``, or the one a PeftModel wraps. Module names
    relative to it are the names PEFT's config and files use (after ``PEFT_PREFIX``)."""
    return model.base_model.model if is_peft_model(model) else model


def is_linear(module: nn.Module) -> bool:
    """A layer an adapter can wrap: ``nn.Linear`` or transformers' ``Conv1D``, not yet adapted."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, LoRALinear)


def is_peft_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (``peft.tuners.lora.LoraLayer``: lora.Linear and kin) that
    ``lorafast.from_peft`` has not converted; told apart without importing PEFT."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "lora_A") \
        and hasattr(module, "get_base_layer")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{name relative to hf_root(model): layer} for every LoRALinear."""
    return {n: m for n, m in hf_root(model).named_modules() if isinstance(m, LoRALinear)}


def _output_layer(root: nn.Module):
    get = getattr(root, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def _candidates(root: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in root.named_modules() if n and is_linear(m)})


def match_targets(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> list[str]:
    """Names (relative to hf_root) of the layers ``target_modules`` selects.

    As PEFT: an entry ``t`` selects module ``n`` when ``n == t`` or ``n`` ends with
    ``"." + t``; ``"all-linear"`` selects every nn.Linear / Conv1D except the output
    layer. Every entry must select something, and only linear layers."""
    root = hf_root(model)
    if target_modules == "all-linear":
        out_layer = _output_layer(root)
        names = [n for n, m in root.named_modules() if n and is_linear(m) and m is not out_layer]
        if not names:
            raise ValueError("target_modules='all-linear' matched no nn.Linear or Conv1D layer in model")
        return names
    if isinstance(target_modules, str) or not isinstance(target_modules, (list, tuple, set)) \
            or not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError("target_modules must be 'all-linear' or a non-empty list of module-name suffixes "
                         f"(e.g. ['q_proj', 'v_proj']), got {target_modules!r}")
    modules = dict(root.named_modules())
    chosen: dict[str, None] = {}
    unmatched = []
    for t in target_modules:
        hits = [n for n in modules if n and (n == t or n.endswith("." + t))]
        if not hits:
            unmatched.append(t)
        chosen.update(dict.fromkeys(hits))
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no module of {type(root).__name__}; "
                         f"the linear layers are named {_candidates(root)}")
    for n in chosen:
        m = modules[n]
        if isinstance(m, LoRALinear):
            raise ValueError(f"target_modules selects {n!r}, which already has a lorafast adapter")
        if not is_linear(m):
            raise ValueError(f"target_modules selects {n!r}, a {type(m).__name__}; adapters go into nn.Linear or "
                             f"Conv1D layers, named {_candidates(root)}")
    return list(chosen)


def replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is, in the train/eval mode of the module it replaces."""
    parent, _, child = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    new.train(getattr(owner, child).training)
    setattr(owner, child, new)


def multi_lora_layers(model: nn.Module) -> dict:
    """{name: MultiLoRALinear} of the model."""
    from ..multi_lora import MultiLoRALinear
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def freeze_all_but_adapters(root: nn.Module) -> None:
    """requires_grad=False for every parameter except the trainable adapter factors."""
    from ..multi_lora import MultiLoRALinear
    keep = set()
    for m in root.modules():
        if isinstance(m, (LoRALinear, MultiLoRALinear)):
            keep.update(id(p) for p in (m.lora_A, m.lora_B, m.lora_R) if p is not None and p.requires_grad)
    for p in root.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
