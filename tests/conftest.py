"""Shared fixtures: the (backend, device) pairs as a fixture, the interpreter's hardware-contract
checks, the CUDA emulation for the ("cuda", "cpu") pair, and the skip of GPU tests without a GPU.
The values and comparisons behind them are in support/common.py.

On a machine without CUDA, importing lorafast switches Triton to its interpreter,
so backend="triton" runs the real kernels on CPU tensors at tiny sizes. There every
test runs under interpreter_checks: each compiler hint is checked against the values
it promises about, and signed int32 index arithmetic must not wrap.
"""
import pytest

from lorafast import _backend
from support import cuda_emu, interpreter_checks
from support.common import CUDA_EMULATED, HAS_CUDA, backend_devices, backend_ids

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
