"""Per-sample losses from a transformers model's outputs: what DP-SGD clips.

A transformers model's own loss is a mean over the whole batch's tokens, so each sample's
share of it depends on how many tokens the other samples have: adding or removing one record
would rescale every other record's gradient, and the sensitivity would no longer be C. DP
needs ℓᵢ to depend on record i alone; here ℓᵢ is the mean loss over record i's own tokens
(labels ≠ -100) for language modelling and token tasks, and the usual per-example loss for
sequence classification and regression.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _is_causal_lm(root) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:      # pragma: no cover - transformers without its auto mappings
        causal = set()
    name = type(root).__name__
    return name in causal or name.endswith(("ForCausalLM", "LMHeadModel"))


def per_sample_losses(root, logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) losses ℓᵢ of a batch, from ``logits`` and ``labels`` of the model ``root``
    (the transformers model, not its PEFT wrapper), in fp32."""
    logits = logits.float()
    if labels.dim() == 2 and logits.dim() == 3 and logits.shape[:2] == labels.shape:   # one label per token
        if _is_causal_lm(root):   # predict token t+1 from tokens ≤ t
            logits, labels = logits[:, :-1], labels[:, 1:]
        tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return tok.sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1).to(tok.dtype)
    config = getattr(root, "config", None)
    problem = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", logits.shape[-1])
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int32, torch.int64):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(logits.reshape(labels.shape[0], -1), labels.float().reshape(labels.shape[0], -1),
                          reduction="none").mean(1)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1), reduction="none")
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)
