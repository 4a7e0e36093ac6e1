"""lorafast: fused kernels for private and federated low-rank fine-tuning."""
from ._backend import available_backends, set_backend, use_backend
from ._version import __version__
from ._random import manual_seed
from ._ops import lora_linear, lora_linear_multi, lora_linear_q
from .layers import LoRALinear
from .multi_lora import MultiLoRALinear, clients
from .qlora import QLoRALinear
from .resample import resample_every
from . import init
from .interop import (client_adapter, from_peft, inject_adapters, load_adapters, merge_adapters, save_adapters,
                      unmerge_adapters)

__all__ = ["lora_linear", "LoRALinear", "lora_linear_multi", "MultiLoRALinear", "clients", "lora_linear_q",
           "QLoRALinear", "available_backends",
           "set_backend", "use_backend", "manual_seed",
           "inject_adapters", "from_peft", "save_adapters", "load_adapters", "merge_adapters", "unmerge_adapters",
           "client_adapter", "resample_every", "init", "__version__"]
