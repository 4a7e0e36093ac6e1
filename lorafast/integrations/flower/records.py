"""What travels in Flower's records, and the conversions between arrays and tensors.

For a LoRALinear layer named ``P`` (its ``named_modules()`` name), adapters travel as
``P.lora_A`` (r, in) and ``P.lora_B`` (out, r) (and ``P.lora_R`` (r, r) for the XS/SB
variants), base weights as ``P.weight`` (out, in) (a GPT-2 Conv1D base too: it is
``LoRALinear.base_weight``, the (out, in) view of the (in, out) storage), and a base
update as ``P.residual_U`` (out, K) and ``P.residual_V`` (K, in) with
``W_new = W_old + U V``. Any other array names a parameter or buffer of the model
(a trainable head) and is averaged by the server as FedAvg does.

Virtual clients: one node may train m clients at once in a model with MultiLoRALinear
layers (k ≥ m clients' adapters over one base, one batched step). Its reply carries the
same keys with a leading client dimension, ``P.lora_A`` (m, r, in) and ``P.lora_B``
(m, out, r), and its MetricRecord ``VIRTUAL_CLIENTS_KEY`` = m and ``"num-examples"`` as a
list of m counts (``virtual_client_reply``); the strategy aggregates them as m replies.

``BASE_VERSION_KEY`` is the one key of the base version, in both directions: in the
server's ArrayRecord it is the int64 array [from, to] of the base update that the
payload carries (from = −1 when every layer is sent whole); in a client's
MetricRecord it is the version the client's base holds.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from ...layers import LoRALinear
from ...multi_lora import MultiLoRALinear

__all__ = ["BASE_VERSION_KEY", "SYNC_KEY", "VIRTUAL_CLIENTS_KEY", "ArraysLike", "adapter_arrays", "base_arrays",
           "base_weights", "virtual_client_reply"]

BASE_VERSION_KEY = "lorafast.base_version"
VIRTUAL_CLIENTS_KEY = "lorafast.virtual_clients"   # a reply's number of virtual clients
# The ArrayRecord key of a payload's [from, to]: the same key (it was always spelled so
# there; the MetricRecord key used to be "lorafast.base-version"), kept under this name.
SYNC_KEY = BASE_VERSION_KEY

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
RESIDUAL_SUFFIXES = (".residual_U", ".residual_V")
# every per-layer entry, in the order a key is matched against them
LAYER_SUFFIXES = ADAPTER_SUFFIXES + (".lora_R", ".weight") + RESIDUAL_SUFFIXES
BASE_SUFFIXES = (".weight",) + RESIDUAL_SUFFIXES

ArraysLike = Union[ArrayRecord, Mapping[str, Union[Array, np.ndarray, Tensor]]]


def to_tensor(value) -> Tensor:
    """A tensor of an Array, a numpy array or a tensor (detached, sharing memory where it can)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Array):
        return torch.from_numpy(value.numpy())
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise ValueError(f"expected an Array, numpy array or tensor, got {type(value).__name__}")


def to_array(t: Tensor) -> Array:
    """A Flower Array holding a host copy of ``t``."""
    return Array(np.ascontiguousarray(t.detach().cpu().numpy()))


def version_array(start: int, to: int) -> Array:
    """The ``BASE_VERSION_KEY`` entry of a server payload: int64 [from, to]."""
    return Array(np.array([start, to], dtype=np.int64))


def split_key(key: str, suffixes) -> Optional[tuple[str, str]]:
    """(prefix, suffix) for the first of ``suffixes`` that ``key`` ends with after a
    non-empty prefix, else None."""
    for suffix in suffixes:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def lora_layers(model: nn.Module) -> dict[str, Union[LoRALinear, MultiLoRALinear]]:
    """{P: layer} for every LoRALinear (or MultiLoRALinear) of ``model``, by ``named_modules()`` name."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, MultiLoRALinear))}


def virtual_client_reply(model: nn.Module, num_examples, *, clients: Optional[list[int]] = None,
                         metrics: Optional[Mapping] = None, base_version: Optional[int] = None) -> RecordDict:
    """The reply of a node that trained several virtual clients in one model (MultiLoRALinear
    layers): their stacked adapters (``P.lora_A`` (m, r, in), ...; ``clients`` picks and
    orders the slots, default all) and one MetricRecord with ``VIRTUAL_CLIENTS_KEY`` = m,
    ``"num-examples"`` (m counts), ``BASE_VERSION_KEY`` and ``metrics`` (numbers, or lists
    of m numbers). ``FedExLoRA`` aggregates it as m clients' replies."""
    layers = lora_layers(model)
    multi = {n: m for n, m in layers.items() if isinstance(m, MultiLoRALinear)}
    if not multi or len(multi) != len(layers):
        raise ValueError("model must have MultiLoRALinear layers only (inject_adapters(..., clients=k))")
    k = next(iter(multi.values())).clients
    slots = list(range(k)) if clients is None else list(clients)
    if not slots or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < k for c in slots):
        raise ValueError(f"clients must list slots in [0, {k}), got {clients!r}")
    counts = list(num_examples) if isinstance(num_examples, (list, tuple)) else None
    if counts is None or len(counts) != len(slots):
        raise ValueError(f"num_examples must be a list of {len(slots)} counts, one per virtual client")
    index = torch.tensor(slots)
    out = {}
    for name, layer in multi.items():
        for attr in ("lora_A", "lora_B", "lora_R"):
            p = getattr(layer, attr)
            if p is not None:
                out[f"{name}.{attr}"] = to_array(p.detach()[index.to(p.device)])
    record = {"num-examples": [float(n) for n in counts], VIRTUAL_CLIENTS_KEY: len(slots)}
    if base_version is not None:
        record[BASE_VERSION_KEY] = int(base_version)
    record.update(dict(metrics or {}))
    return RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord(record)})


def adapter_arrays(model: nn.Module) -> ArrayRecord:
    """The adapters of every LoRALinear in ``model`` as an ArrayRecord: ``P.lora_A``,
    ``P.lora_B`` (and ``P.lora_R`` for the XS/SB variants), what a client sends back."""
    out = {}
    for name, layer in lora_layers(model).items():
        for attr in ("lora_A", "lora_B", "lora_R"):
            p = getattr(layer, attr)
            if p is not None:
                out[f"{name}.{attr}"] = to_array(p)
    return ArrayRecord(out)


def base_arrays(model: nn.Module) -> ArrayRecord:
    """The frozen base weights of every LoRALinear in ``model`` as ``P.weight`` entries
    (``apply_global_adapters`` copies them back, e.g. to restore a client's base)."""
    return ArrayRecord({f"{name}.weight": to_array(layer.base_weight) for name, layer in lora_layers(model).items()})


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """{P: weight} for every LoRALinear in ``model``, for ``FedExLoRA(base_weights=...)``."""
    return {name: layer.base_weight.detach() for name, layer in lora_layers(model).items()}
