"""lorafast inside Hugging Face workflows: inject adapters into transformers models, take
over PEFT models, save and load PEFT-format adapters, merge for inference."""
from .from_peft import from_peft
from .inject import inject_adapters, merge_adapters, unmerge_adapters
from .peft_format import client_adapter, load_adapters, save_adapters

__all__ = ["inject_adapters", "from_peft", "save_adapters", "load_adapters", "merge_adapters", "unmerge_adapters",
           "client_adapter"]
