"""Shared fixtures: which (backend, device) pairs run here, tolerances, and comparisons.

On a machine without CUDA, importing lorafast switches Triton to its interpreter,
so backend="triton" runs the real kernels on CPU tensors at tiny sizes. There every
test runs under interpreter_checks: each compiler hint is checked against the values
it promises about, and signed int32 index arithmetic must not wrap.
"""
import pytest
import torch

import cuda_emu
import interpreter_checks
import lorafast
from lorafast import _backend

HAS_CUDA = torch.cuda.is_available()
CUDA_EMULATED = ("cuda", "cpu")   # csrc/ kernels run on the CPU by tests/cuda_emu.py


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


BACKEND_FIXTURES = ("backend_device", "lora_backend_device")   # the parameter names of (backend, device) pairs


@pytest.fixture(params=backend_devices(), ids=backend_ids)
def backend_device(request):
    return request.param


@pytest.fixture(autouse=True)
def _hardware_contract(request):
    """Interpreted kernels keep their compiler hints true and their int32 indices in range
    (``@pytest.mark.no_contract_checks`` opts a test out, for probes of the checks themselves)."""
    if not _backend._INTERPRETER or request.node.get_closest_marker("no_contract_checks"):
        yield
        return
    with interpreter_checks.checking():
        yield


@pytest.fixture(autouse=True)
def _cuda_emulation(request, monkeypatch):
    """Tests parametrized with the ("cuda", "cpu") pair run the CUDA kernels under emulation."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and CUDA_EMULATED in (callspec.params.get(name) for name in BACKEND_FIXTURES):
        cuda_emu.activate(monkeypatch)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
