"""Adapters into an existing model: inject, merge, unmerge."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

from torch import nn

from .._checks import check_choice, check_count, check_positive
from ..layers import VARIANTS, LoRALinear
from ..multi_lora import MultiLoRALinear
from ..quant import unsupported_reason
from .targets import freeze_all_but_adapters, hf_root, lora_layers, match_targets, replace


def check_adapter_args(r, lora_alpha, lora_dropout, variant, use_rslora, clients=None) -> None:
    """The adapter arguments of ``inject_adapters`` (and of a loaded config), each refused
    with a ValueError naming it."""
    if clients is not None:
        check_count("clients", clients, minimum=1)
    if clients is None or not isinstance(r, (list, tuple)):
        check_count("r", r, minimum=1)
    elif len(r) != clients:
        raise ValueError(f"r must be one rank or a list of {clients} ranks (one per client), got {len(r)}")
    else:
        for q in r:
            check_count("r", q, minimum=1)
    check_choice("variant", variant, VARIANTS)
    check_positive("lora_alpha", lora_alpha)
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be a bool, got {use_rslora!r}")


def inject_adapters(model: nn.Module, target_modules: Union[str, Sequence[str]], *, r: int = 8,
                    lora_alpha: float = 8, lora_dropout: float = 0.0, variant: str = "lora",
                    use_rslora: bool = False, clients: Optional[int] = None, strict: bool = True) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` (or GPT-2 ``Conv1D``) that ``target_modules``
    selects with a fused ``LoRALinear`` sharing its frozen weight and bias, and freeze every
    other parameter of ``model``. Returns ``model``.

    ``target_modules``: module-name suffixes as PEFT's (``["q_proj", "v_proj"]``) or
    ``"all-linear"`` (every linear layer but the output layer). A Conv1D keeps its (in, out)
    weight (``LoRALinear(fan_in_fan_out=True)``), so the state dict keeps its layout.

    ``clients=k`` makes each a ``MultiLoRALinear`` of k clients' adapters over the shared
    base (``r`` may then list one rank per client); run the model inside
    ``with lorafast.clients(model, client_ids):``. Nothing is changed when an argument is
    refused.

    A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` gets a ``QLoRALinear`` over its quantised
    weight (QLoRA; lorafast.qlora). One lorafast cannot compute on (an unsupported quant type,
    compute dtype or bitsandbytes version, or ``clients=`` over it) raises ValueError naming
    each such layer and why; with ``strict=False`` those layers stay as they are, without an
    adapter, a warning names them and ``model.lorafast_unfused`` lists ``[(name, why), ...]``."""
    check_adapter_args(r, lora_alpha, lora_dropout, variant, use_rslora, clients)
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be a bool, got {strict!r}")
    root = hf_root(model)
    names = match_targets(model, target_modules)
    reasons = {n: unsupported_reason(root.get_submodule(n), "layer", clients) for n in names}
    unfused = [(n, why) for n, why in reasons.items() if why is not None]
    if unfused and strict:
        listed = "\n".join(f"  {n}: {why}" for n, why in unfused)
        raise ValueError(f"inject_adapters cannot adapt {len(unfused)} layer(s):\n{listed}\n"
                         "pass strict=False to leave them without an adapter")
    skipped = {n for n, _ in unfused}
    names = [n for n in names if n not in skipped]
    kw = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, variant=variant, use_rslora=use_rslora)
    if clients is None:
        new = {n: LoRALinear.from_linear(root.get_submodule(n), **kw) for n in names}
    else:
        new = {n: MultiLoRALinear.from_linear(root.get_submodule(n), clients, **kw) for n in names}
    for n, layer in new.items():
        replace(root, n, layer)
    freeze_all_but_adapters(root)
    if unfused:
        warnings.warn(f"inject_adapters left {len(unfused)} layer(s) without an adapter: "
                      + "; ".join(f"{n} ({why})" for n, why in unfused), stacklevel=2)
    model.lorafast_unfused = unfused
    return model


def _all_layers(model: nn.Module, merged: bool, verb: str) -> list[LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"model has no LoRALinear layers to {verb}")
    wrong = [n for n, m in layers.items() if m.merged == merged]
    if wrong:
        raise ValueError(f"cannot {verb}: layers {wrong[:5]}{' ...' if len(wrong) > 5 else ''} are "
                         f"{'already merged' if merged else 'not merged'}")
    return list(layers.values())


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold s·B(R)A into every LoRALinear's base weight (inference without the adapter cost).
    Checked for every layer before any is changed.

    A quantised base (QLoRALinear) is dequantised, merged and requantised with its own quant
    type: that rounds the merged weight again, so the result is not exact. Each such layer's
    error (``qlora.MergeError``) is in ``model.lorafast_merge_errors`` ({name: error}) and a
    warning reports the largest; ``unmerge_adapters`` restores the quantised weights exactly."""
    _all_layers(model, merged=True, verb="merge")
    errors = {}
    for name, layer in lora_layers(model).items():
        error = layer.merge()
        if error is not None:
            errors[name] = error
    if errors:
        worst = max(errors, key=lambda n: errors[n].relative_to_update)
        e = errors[worst]
        warnings.warn(f"merge_adapters requantised {len(errors)} quantised layer(s); the largest error, at {worst}: "
                      f"‖Ŵ − W*‖ is {e.relative_to_weight:.3g} of ‖W*‖ and {e.relative_to_update:.3g} of the "
                      f"merged update (max |Ŵ − W*| {e.max_abs:.3g}); model.lorafast_merge_errors has every layer's",
                      stacklevel=2)
    model.lorafast_merge_errors = errors
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters``: W is restored up to W's dtype rounding (exact in fp64)."""
    for layer in _all_layers(model, merged=False, verb="unmerge"):
        layer.unmerge()
    return model
