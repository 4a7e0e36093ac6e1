"""Flower strategy for exact federated aggregation of LoRA adapters.

``FedExLoRA`` is Flower's message-based ``FedAvg`` (``flwr.serverapp.strategy``,
Flower ≥ 1.20) with the adapters aggregated by ``lorafast.federated.aggregate``:

| method   | server master base W          | global adapters sent            | exact |
|----------|-------------------------------|---------------------------------|-------|
| "fedavg" | unchanged                     | (Ā, B̄)                          | no    |
| "fedex"  | W += s·(Σ pᵢBᵢAᵢ − B̄Ā)         | (Ā, B̄) + the residual of W      | yes   |
| "ffa"    | unchanged (A shared, frozen)  | (A, B̄)                          | yes   |
| "flora"  | W += s·Σ pᵢBᵢAᵢ (merged)       | (Ā, 0) + the residual of W      | yes   |

pᵢ are the clients' example counts (the ``"num-examples"`` metric, as FedAvg),
normalised. The server holds an fp32 master copy of every adapted layer's base
weight; after a round the global model is ``W + s·B̄Ā`` and equals the weighted
average of the clients' models ``Σ pᵢ(W + s·BᵢAᵢ)`` for the exact methods. FLoRA
merges the stacked adapters into W and restarts the adapters from (Ā, B = 0), so
every client shares one rank per layer here (one global adapter is broadcast).

The parts, by job:

* ``records``: what travels (``P.lora_A``, ``P.lora_B``, ``P.weight``,
  ``P.residual_U``/``P.residual_V``, ``BASE_VERSION_KEY``) and the helpers that
  build records from a model: ``adapter_arrays``, ``base_arrays``, ``base_weights``;
* ``client``: ``apply_global_adapters``, which loads a server message into a model;
* ``strategy``: ``FedExLoRA`` and the base-version history that keeps the clients'
  frozen bases equal to its master copy, and what that costs in communication.

Clients reply with one ArrayRecord (``adapter_arrays(model)``) and one MetricRecord
holding ``"num-examples"`` and, to keep the base in sync, ``BASE_VERSION_KEY``. A node
may train many virtual clients at once in a model with MultiLoRALinear layers (one
batched step for all of them) and reply ``virtual_client_reply(model, counts)``: the
strategy aggregates it as that many clients.

Server side::

    strategy = FedExLoRA("fedex", scaling=layer.scaling, base_weights=base_weights(model))
    result = strategy.start(grid=grid, initial_arrays=adapter_arrays(model), num_rounds=3)

Client side (``context.state`` keeps the node's base and its version between
rounds; see examples/flower_fedex.py)::

    version = apply_global_adapters(model, msg.content["arrays"], base_version=version)
    ... train the adapters ...
    reply = RecordDict({"arrays": adapter_arrays(model),
                        "metrics": MetricRecord({"num-examples": n, BASE_VERSION_KEY: version})})
"""
from __future__ import annotations

from ...federated import METHODS
from .client import apply_global_adapters
from .records import (BASE_VERSION_KEY, SYNC_KEY, VIRTUAL_CLIENTS_KEY, ArraysLike, adapter_arrays,  # noqa: F401
                      base_arrays, base_weights, virtual_client_reply)
from .strategy import FedExLoRA

__all__ = ["FedExLoRA", "apply_global_adapters", "adapter_arrays", "base_arrays", "base_weights",
           "virtual_client_reply", "BASE_VERSION_KEY", "SYNC_KEY", "VIRTUAL_CLIENTS_KEY", "METHODS"]

# Names that the single-module ``flower.py`` this package replaced had at module level
# (its imports), kept importable from here for code that took them from it.
import math  # noqa: E402,F401  pylint: disable=wrong-import-position,wrong-import-order
import numbers  # noqa: E402,F401  pylint: disable=wrong-import-position,wrong-import-order
from collections.abc import Callable, Iterable, Mapping  # noqa: E402,F401
from logging import INFO  # noqa: E402,F401
from typing import Optional, Union  # noqa: E402,F401

import numpy as np  # noqa: E402,F401
import torch  # noqa: E402,F401
from torch import Tensor, nn  # noqa: E402,F401

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402,F401
from flwr.serverapp import Grid  # noqa: E402,F401
from flwr.serverapp.strategy import FedAvg  # noqa: E402,F401
from flwr.supercore import log  # noqa: E402,F401

from ... import reference  # noqa: E402,F401
from ...federated import aggregate  # noqa: E402,F401
from ...layers import LoRALinear  # noqa: E402,F401
