"""Exact federated aggregation of LoRA adapters (FedEx-LoRA, FFA-LoRA, Fed-SB, FLoRA).

    from lorafast.federated import aggregate, aggregate_r, simulate

See ``aggregate`` for the methods and which of them are exact; ``simulate`` runs a whole
federated run of k clients in one process, their local steps batched over the shared base
(MultiLoRALinear); the Flower strategy lives in ``lorafast.integrations.flower``.
"""
from .aggregate import METHODS, AggregateResult, aggregate, aggregate_r
from .simulate import SimulationResult, causal_lm_loss, classification_loss, simulate

__all__ = ["aggregate", "aggregate_r", "AggregateResult", "METHODS", "simulate", "SimulationResult",
           "causal_lm_loss", "classification_loss"]
