"""Integrations of lorafast with federated-learning frameworks.

``lorafast.integrations.flower``: the ``FedExLoRA`` strategy for Flower's ServerApp
(exact aggregation of LoRA adapters with FedEx-LoRA, FFA-LoRA or FLoRA, or plain
FedAvg of the adapters) and the client-side helpers ``apply_global_adapters``,
``adapter_arrays``, ``base_arrays`` and ``base_weights``. It needs the ``flower``
extra (``pip install lorafast[flower]``); nothing here is imported by ``lorafast``.
"""
