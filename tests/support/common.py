"""What every test area shares: the repository root, fresh seeds, the dtypes, which (backend,
device) pairs run here, and the relative-error comparison with its tolerance table."""
import os
from pathlib import Path

import torch

import lorafast
from lorafast import _backend

from . import cuda_emu

ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fresh_seed() -> int:
    """A new seed per test, printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input seed {seed}")
    torch.manual_seed(seed)
    return seed


HAS_CUDA = torch.cuda.is_available()
CUDA_EMULATED = ("cuda", "cpu")   # csrc/ kernels run on the CPU by support/cuda_emu.py


def backend_devices(op=None):
    """(backend, device) pairs that run here: the reference, Triton (interpreted on CPU), the
    CUDA kernels under the host emulation (("cuda", "cpu"), where a C++ compiler is), and on a
    GPU the CUDA extension (("cuda", "cuda"), when it is usable). ``op`` names the op as
    ``_backend.select`` does, for the CUDA pairs, and adds "hybrid" for the ops with base GEMMs."""
    from lorafast import _cuda
    pairs = [("torch", "cpu")]
    if "triton" in lorafast.available_backends():
        pairs.append(("triton", "cuda" if HAS_CUDA else "cpu"))
        if op in _backend.BASE_GEMM_OPS:   # the default GPU plan: torch.mm base GEMMs, Triton rank-r passes
            pairs.append(("hybrid", "cuda" if HAS_CUDA else "cpu"))
    if HAS_CUDA:
        pairs.append(("torch", "cuda"))
    has_kernel = op is None or op in _cuda.OPS
    if has_kernel and cuda_emu.available():
        pairs.append(CUDA_EMULATED)
    if has_kernel and "cuda" in lorafast.available_backends():
        pairs.append(("cuda", "cuda"))
    return pairs


def backend_ids(pair):
    return f"{pair[0]}-{pair[1]}"


# Relative-norm error allowed on top of 2× PyTorch's own error in the same dtype
# (README, "Tests"). fp32 on a GPU may use TF32 in the rank-r epilogue only. The fp32
# floor covers r = 1, where dR is one dot product over all rows that can nearly
# cancel: its relative error is then large for any summation order, and PyTorch's
# own order is only sometimes lucky (over 3000 random inputs the excess reached
# 2.6e-5, and exceeded 2e-6 in 0.7% of them). TF32 or a real bug sits far above.
ATOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
if HAS_CUDA:
    ATOL[torch.float32] = 1e-4


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name, got, ref64, baseline, dtype):
    """got's error against the float64 truth is at most 2× the baseline's (PyTorch in dtype) plus ATOL."""
    err, base = rel_err(got, ref64), rel_err(baseline, ref64)
    tol = 2 * base + ATOL[dtype]
    assert err <= tol, f"{name}: rel err {err:.3e} > tol {tol:.3e} (PyTorch's own error {base:.3e})"
