"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What PEFT reads (``PeftModel.from_pretrained``, vLLM's LoRA loader):
  * tensors ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
    (out, r), fp32 as trained; the module names are the transformers model's;
  * a LoRA config whose ``target_modules`` lists the adapted modules by full name and
    whose ``lora_alpha`` / ``alpha_pattern`` give each layer's exact scaling
    (s = alpha/r, or alpha/√r with ``use_rslora``); ``rank_pattern`` holds ranks that
    differ from ``r``.

Modules trained besides the adapters (a classifier head: PEFT's ``modules_to_save``,
or any module outside the adapted layers with a trainable parameter) are saved whole
as ``base_model.model.<module>.<param>`` and listed in ``modules_to_save``, as PEFT
does, and loaded back (trainable) by ``load_adapters``.

Variants: an FFA adapter saves its frozen A like any A, so the file reproduces the
outputs. PEFT has no r×r matrix, so an XS/SB adapter saves ``lora_B.weight = B·R``
(then s·x Aᵀ (BR)ᵀ is the same output) and, for lorafast itself, the factors B and
R in ``lorafast_adapter.safetensors`` beside it (keys ``<module>.lora_B.weight`` and
``<module>.lora_R.weight``, variant names in its metadata). ``load_adapters`` takes
B and R from there when present; a plain PEFT adapter loaded into an XS/SB layer
becomes B ← the file's B, R ← I.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..layers import LoRALinear
from ..multi_lora import MultiLoRALinear
from .inject import check_adapter_args
from .targets import (PEFT_PREFIX, freeze_all_but_adapters, hf_root, is_linear, is_peft_lora_layer, is_peft_model,
                      lora_layers, multi_lora_layers, replace)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FACTORS_NAME = "lorafast_adapter.safetensors"   # B and R of XS/SB layers, which PEFT has no place for
_A, _B, _R = ".lora_A.weight", ".lora_B.weight", ".lora_R.weight"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("saving and loading adapters needs safetensors: pip install safetensors") from e
    return st


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _number(x: float):
    """An int when the float is one, so that the JSON reads as people write configs."""
    return int(x) if float(x).is_integer() else float(x)


def _active_copy(wrapper: nn.Module) -> nn.Module:
    """The trained copy inside a PEFT ModulesToSaveWrapper."""
    return wrapper.modules_to_save[wrapper.active_adapters[0]]


def _is_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "ModulesToSaveWrapper" and hasattr(module, "modules_to_save")


def _trained_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of what trains besides the adapters: PEFT's modules_to_save (their
    active copies) and modules outside LoRALinear layers that own a trainable parameter."""
    root = hf_root(model)
    out = {n: _active_copy(m) for n, m in root.named_modules() if _is_wrapper(m) and m.active_adapters}
    skip = tuple(out) + tuple(n for n, m in root.named_modules() if isinstance(m, (LoRALinear, MultiLoRALinear)))
    for name, m in root.named_modules():
        if any(name == k or name.startswith(k + ".") for k in skip):
            continue
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            out[name] = m
    return out


def _config(model: nn.Module, layers: dict[str, LoRALinear], trained: dict[str, nn.Module]) -> dict:
    r = _most_common(m.r for m in layers.values())
    rslora = _most_common(m.use_rslora for m in layers.values())
    # each layer's alpha such that PEFT's formula gives exactly its scaling
    alphas = {n: m.scaling * (math.sqrt(m.r) if rslora else m.r) for n, m in layers.items()}
    alpha = _most_common(alphas.values())
    dropouts = {m.lora_dropout for m in layers.values()}
    if len(dropouts) > 1:
        warnings.warn(f"layers have different lora_dropout {sorted(dropouts)}; PEFT's config holds one, "
                      f"{max(dropouts)} is saved", stacklevel=3)
    task_type, name_or_path = None, getattr(getattr(hf_root(model), "config", None), "_name_or_path", None) or None
    if is_peft_model(model):
        cfg = model.peft_config.get(getattr(model, "active_adapter", "default"))
        task_type = getattr(cfg, "task_type", None)
        task_type = getattr(task_type, "value", task_type)
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": name_or_path, "revision": None,
        "r": r, "lora_alpha": _number(alpha), "lora_dropout": max(dropouts), "use_rslora": rslora,
        "target_modules": sorted(layers), "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "rank_pattern": {re.escape(n): m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {re.escape(n): _number(a) for n, a in alphas.items() if a != alpha},
        "bias": "none", "lora_bias": False, "use_dora": False, "modules_to_save": sorted(trained) or None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }


def _layers_to_save(model: nn.Module, client: Optional[int]) -> dict[str, LoRALinear]:
    """{name: LoRALinear} to save: the model's, or with ``client`` each MultiLoRALinear's
    adapter of that client (``MultiLoRALinear.client_layer``) beside any LoRALinear."""
    layers, multi = lora_layers(model), multi_lora_layers(model)
    if multi and client is None:
        raise ValueError(f"model's MultiLoRALinear layers ({next(iter(multi))}, ...) hold "
                         f"{next(iter(multi.values())).clients} clients' adapters: pass client=i to save client i's")
    if client is not None:
        if not multi:
            raise ValueError("client= is for models with MultiLoRALinear layers; this model has none")
        layers.update({n: m.client_layer(client) for n, m in multi.items()})
    if not layers:
        raise ValueError("model has no LoRALinear layers to save")
    return layers


def _adapter_tensors(layers: dict[str, LoRALinear]) -> tuple[dict, dict, dict]:
    """(PEFT's tensors, the XS/SB factors B and R, the XS/SB variants) of ``layers``."""
    tensors, factors, variants = {}, {}, {}
    for name, m in layers.items():
        key = PEFT_PREFIX + name
        tensors[key + _A] = m.lora_A.detach()
        B = m.lora_B.detach()
        if m.lora_R is not None:
            factors[key + _B], factors[key + _R] = B, m.lora_R.detach()
            variants[name] = m.variant
            B = B.float() @ m.lora_R.detach().float()
        tensors[key + _B] = B
    return tensors, factors, variants


def client_adapter(model: nn.Module, client: int) -> dict[str, torch.Tensor]:
    """Client ``client``'s adapter of a model with MultiLoRALinear layers, as the tensors of a
    PEFT adapter (``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
    (out, r), each client at its own rank): what ``get_peft_model_state_dict`` returns and
    ``set_peft_model_state_dict`` loads. ``save_adapters(model, dir, client=i)`` writes it with
    its config."""
    if not multi_lora_layers(model):
        raise ValueError("model has no MultiLoRALinear layers (inject_adapters(..., clients=k) makes them)")
    return _adapter_tensors(_layers_to_save(model, client))[0]


def save_adapters(model: nn.Module, directory: Union[str, Path], *, client: Optional[int] = None) -> Path:
    """Write every LoRALinear adapter of ``model`` in PEFT's format (see the module
    docstring) to ``directory``, which is created. Returns the directory. A model with
    MultiLoRALinear layers saves one client's adapter: ``client=i``."""
    layers = _layers_to_save(model, client)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        warnings.warn(f"saving adapters of merged layers {merged[:3]}: the saved base model must not be merged "
                      "too, or the update counts twice", stacklevel=2)
    st = _safetensors()
    tensors, factors, variants = _adapter_tensors(layers)
    trained = _trained_modules(model)
    for name, m in trained.items():
        tensors.update({f"{PEFT_PREFIX}{name}.{k}": v.detach() for k, v in m.state_dict(keep_vars=True).items()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    host = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    st.save_file(host, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if factors:
        st.save_file({k: v.to("cpu").contiguous() for k, v in factors.items()}, str(directory / FACTORS_NAME),
                     metadata={"format": "pt", "lorafast_variants": json.dumps(variants)})
    elif (directory / FACTORS_NAME).exists():
        (directory / FACTORS_NAME).unlink()      # a stale file from an earlier save would mislead a load
    (directory / CONFIG_NAME).write_text(json.dumps(_config(model, layers, trained), indent=2, sort_keys=True) + "\n")
    return directory


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: a key applies when the module name ends with it (as a regex) after a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read(directory: Path):
    if not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} does not exist")
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"directory {str(directory)!r} has no {CONFIG_NAME}")
    if not (directory / WEIGHTS_NAME).is_file():
        other = " (only safetensors is read; re-save with safe_serialization=True)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise ValueError(f"directory {str(directory)!r} has no {WEIGHTS_NAME}{other}")
    config = json.loads((directory / CONFIG_NAME).read_text())
    for key, ok, what in (("peft_type", lambda v: v == "LORA", "LORA"), ("use_dora", lambda v: not v, "false (DoRA)"),
                          ("lora_bias", lambda v: not v, "false"), ("bias", lambda v: v in (None, "none"), "'none'")):
        if key in config and not ok(config[key]):
            raise ValueError(f"{CONFIG_NAME}: {key}={config[key]!r} is not supported by lorafast (expected {what})")
    st = _safetensors()
    tensors = st.load_file(str(directory / WEIGHTS_NAME))
    factors, variants = {}, {}
    if (directory / FACTORS_NAME).is_file():
        from safetensors import safe_open
        with safe_open(str(directory / FACTORS_NAME), "pt") as f:
            variants = json.loads((f.metadata() or {}).get("lorafast_variants", "{}"))
        factors = st.load_file(str(directory / FACTORS_NAME))
    return config, tensors, factors, variants


def _split(tensors: dict, rest: Optional[dict] = None) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {suffix: tensor}} of the LoRA factors; other keys go to ``rest`` (without
    the prefix) when it is given, else they are an error."""
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in tensors.items():
        suffix = next((s for s in (_A, _B, _R) if key.endswith(s)), None)
        if not key.startswith(PEFT_PREFIX) or (suffix is None and rest is None):
            bad.append(key)
        elif suffix is None:
            rest[key[len(PEFT_PREFIX):]] = t
        else:
            per_module.setdefault(key[len(PEFT_PREFIX):-len(suffix)], {})[suffix] = t
    if bad:
        raise ValueError(f"adapter file has keys that are neither LoRA factors nor modules_to_save: {bad[:5]}")
    return per_module


def _module_targets(root: nn.Module, rest: dict[str, torch.Tensor], modules_to_save) -> list[tuple]:
    """(target tensor, value) for every saved modules_to_save entry, checked."""
    modules = dict(root.named_modules())
    out = []
    for key, value in rest.items():
        name, _, param = key.rpartition(".")
        m = modules.get(name)
        if m is None or not any(name == t or name.endswith("." + t) for t in (modules_to_save or ())):
            raise ValueError(f"{WEIGHTS_NAME}: {PEFT_PREFIX + key!r} is not a LoRA factor nor a tensor of a "
                             f"module in modules_to_save={modules_to_save}")
        target = (_active_copy(m) if _is_wrapper(m) else m).state_dict(keep_vars=True).get(param)
        if target is None or tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{WEIGHTS_NAME}: {PEFT_PREFIX + key!r} {tuple(value.shape)} does not fit module "
                             f"{name!r} ({None if target is None else tuple(target.shape)})")
        out.append((target, value))
    return out


def load_adapters(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Load PEFT-format adapters (saved by PEFT or by ``save_adapters``) into ``model``.

    A module that is already a LoRALinear gets the saved factors (same rank). A plain
    ``nn.Linear`` / ``Conv1D`` gets an adapter injected with the config's rank, alpha
    and dropout, as ``inject_adapters`` does (every other parameter is frozen then).
    Everything is checked before anything is written. Returns ``model``."""
    config, tensors, factors, variants = _read(Path(directory))
    rest: dict[str, torch.Tensor] = {}
    per_module, extra = _split(tensors, rest), _split(factors)
    root = hf_root(model)
    module_copies = _module_targets(root, rest, config.get("modules_to_save"))
    modules = dict(root.named_modules())
    plan = []
    for name, ts in per_module.items():
        if set(ts) != {_A, _B}:
            raise ValueError(f"{WEIGHTS_NAME}: module {name!r} needs lora_A and lora_B, has {sorted(ts)}")
        A, B = ts[_A], ts[_B]
        m = modules.get(name)
        if m is None:
            raise ValueError(f"{WEIGHTS_NAME} has an adapter for {name!r}, which is not a module of "
                             f"{type(root).__name__}")
        if is_peft_lora_layer(m):
            raise ValueError(f"{WEIGHTS_NAME} has an adapter for {name!r}, which is still a PEFT LoRA layer "
                             f"({type(m).__module__}.{type(m).__name__}): call lorafast.from_peft(model) first, "
                             "then load_adapters into the converted model")
        if not isinstance(m, LoRALinear) and not is_linear(m):
            raise ValueError(f"{WEIGHTS_NAME} has an adapter for {name!r}, a {type(m).__name__}, not a linear layer")
        # (a bitsandbytes layer is an nn.Linear whose weight is packed: its features say its shape)
        out_f, in_f = (m.out_features, m.in_features) if isinstance(m, (LoRALinear, nn.Linear)) else \
            (m.weight.shape[1], m.weight.shape[0])
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or tuple(B.shape) != (out_f, r):
            raise ValueError(f"{WEIGHTS_NAME}: {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                             f"the layer needs (r, {in_f}) and ({out_f}, r)")
        if isinstance(m, LoRALinear) and m.r != r:
            raise ValueError(f"{WEIGHTS_NAME}: {name!r} has rank {r} but the model's LoRALinear has r={m.r}")
        fac = extra.get(name, {})
        if fac and (set(fac) != {_B, _R} or tuple(fac[_B].shape) != (out_f, r) or tuple(fac[_R].shape) != (r, r)):
            raise ValueError(f"{FACTORS_NAME}: {name!r} needs lora_B ({out_f}, {r}) and lora_R ({r}, {r}), has "
                             f"{ {k: tuple(v.shape) for k, v in fac.items()} }")
        plan.append((name, m, A, B, fac))
    if not plan:
        raise ValueError(f"{WEIGHTS_NAME} holds no adapters")
    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    new = {}
    for name, m, A, *_ in plan:
        if isinstance(m, LoRALinear):
            continue
        r = _pattern_value(config.get("rank_pattern") or {}, name, A.shape[0])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        variant = variants.get(name, "lora")
        check_adapter_args(int(r), alpha, dropout, variant, rslora)
        new[name] = LoRALinear.from_linear(m, r=int(r), lora_alpha=alpha, lora_dropout=dropout,
                                           variant=variant, use_rslora=rslora)
    with torch.no_grad():
        for name, layer in new.items():
            replace(root, name, layer)
        for name, m, A, B, fac in plan:
            layer = new.get(name, m)
            layer.lora_A.copy_(A)
            if layer.lora_R is None:
                layer.lora_B.copy_(B)
            elif _B in fac and _R in fac:
                layer.lora_B.copy_(fac[_B])
                layer.lora_R.copy_(fac[_R])
            else:                             # a plain PEFT adapter in an XS/SB layer
                layer.lora_B.copy_(B)
                layer.lora_R.copy_(torch.eye(layer.r))
    if new:
        freeze_all_but_adapters(root)
    with torch.no_grad():
        for target, value in module_copies:
            target.copy_(value)
            if isinstance(target, nn.Parameter):
                target.requires_grad_(True)
    return model
