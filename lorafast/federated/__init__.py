"""Exact federated aggregation of LoRA adapters (FedEx-LoRA, FFA-LoRA, Fed-SB, FLoRA).

    from lorafast.federated import aggregate, aggregate_r

See ``aggregate`` for the methods and which of them are exact; the Flower strategy
lives in ``lorafast.integrations.flower``.
"""
from .aggregate import METHODS, AggregateResult, aggregate, aggregate_r

__all__ = ["aggregate", "aggregate_r", "AggregateResult", "METHODS"]
