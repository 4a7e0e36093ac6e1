"""lorafast: fused kernels for private and federated low-rank fine-tuning."""
from ._backend import available_backends, set_backend, use_backend
from ._random import manual_seed
from .functional import lora_linear
from .layers import LoRALinear

__all__ = ["lora_linear", "LoRALinear", "available_backends", "set_backend", "use_backend", "manual_seed"]
__version__ = "0.1.0"
