"""Integrations of lorafast with other frameworks; nothing here is imported by ``lorafast``.

``lorafast.integrations.flower``: the ``FedExLoRA`` strategy for Flower's ServerApp
(exact aggregation of LoRA adapters with FedEx-LoRA, FFA-LoRA or FLoRA, or plain
FedAvg of the adapters) and the client-side helpers ``apply_global_adapters``,
``adapter_arrays``, ``base_arrays`` and ``base_weights``. It needs the ``flower``
extra (``pip install lorafast[flower]``).

``lorafast.integrations.transformers``: ``DPTrainer`` and ``DPArguments`` (private LoRA
fine-tuning inside Hugging Face's Trainer; ``DPSFTTrainer`` for TRL's SFTTrainer) and
``fuse`` (fused layers in a Trainer's model). It needs the ``hf`` extra, and ``trl`` for
``DPSFTTrainer``.
"""
