"""Split learning (SplitLoRA, DP-CutMixSL): a client runs the first layers and sends its
activations ("smashed data") to a server; privacy comes from clipping them, adding
Gaussian noise (``privatize``) and mixing patches across clients (``cutmix``), with
the Rényi-DP accounting of both (``epsilon``)."""
from .accounting import epsilon, rdp
from .cutmix import cutmix, mix_labels
from .model import SplitModel
from .privatize import privatize

__all__ = ["privatize", "cutmix", "mix_labels", "SplitModel", "epsilon", "rdp"]
