"""Differentially private fine-tuning of adapters (DP-SGD) with an Opacus-style API.

    from lorafast.dp import PrivacyEngine, compute_epsilon, get_noise_multiplier

Per-sample adapter gradients come out of the fused LoRA backward; one fused kernel clips,
sums, adds Philox Gaussian noise and writes ``.grad``; dp-accounting's PLD accountant
tracks ε. See ``PrivacyEngine``; ``PrivacyAudit`` (lorafast.dp.audit) measures a lower bound
on ε from one training run.
"""
from .accountant import Accountant, compute_epsilon, get_noise_multiplier
from .audit import AuditReport, PrivacyAudit, epsilon_lower_bound
from .data_loader import DPDataLoader, PoissonBatchSampler
from .ddp import DPDDP
from .engine import PrivacyEngine
from .grad_sample import detach, trainable_parameters
from .implicit_noise import ImplicitNoise, implicit_noise
from .optimizer import DPOptimizer

__all__ = ["PrivacyEngine", "compute_epsilon", "get_noise_multiplier", "Accountant", "DPOptimizer",
           "DPDataLoader", "PoissonBatchSampler", "DPDDP", "trainable_parameters", "detach", "PrivacyAudit",
           "AuditReport", "epsilon_lower_bound", "implicit_noise", "ImplicitNoise"]
