"""The LoRA linear as a function: ``lorafast.lora_linear``, defined with the op catalogue in
lorafast/_ops.py (every op's entry point lives there) and kept importable from here."""
from ._ops import lora_linear, lora_linear_multi, lora_linear_q, lora_shape

__all__ = ["lora_linear", "lora_linear_multi", "lora_linear_q", "lora_shape"]
