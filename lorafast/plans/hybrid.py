"""The "hybrid" backend, the default on a GPU without a measured table: the LoRA linear's base
GEMMs x·Wᵀ and dY·W on cuBLAS (torch.mm), as PEFT's are, and every rank-r pass in the Triton
kernels of plans/triton.py. The other ops have no base GEMM and are the "triton" ones."""
from __future__ import annotations

import functools

from . import lora, triton
from .triton import clip_reduce_noise, dequantize_, fedex_merge_, grad_sample_norms, privatize  # noqa: F401

_passes = functools.partial(triton.passes, blas=True)
lora_linear_forward = functools.partial(triton.lora_linear_forward, blas=True)
lora_linear_backward, lora_linear_per_sample_backward = lora.backward_functions(_passes)
