"""Which backends exist here and which one an op uses.

Backends: "torch" (the reference), "triton" (lorafast's Triton kernels, the LoRA linear's
base GEMMs included: fully fused), "hybrid" (the LoRA linear's base GEMMs x·Wᵀ and dY·W
on cuBLAS through torch.mm, every rank-r pass in the Triton kernels; for the other ops,
which have no base GEMM, the same as "triton") and "cuda" (the CUDA C++ kernels, around
cuBLAS GEMMs).

Order of precedence: the op's ``backend=`` argument, then ``set_backend`` /
``use_backend``, then the ``LORAFAST_BACKEND`` environment variable, then
automatic selection. Automatic selection never picks the Triton interpreter: on CPU
it picks "torch". On a GPU it picks the fastest kernel backend measured for that GPU
at the nearest recorded shape (lorafast._selection: tables shipped in lorafast/tuning/
and the user's own). Without a measurement, the LoRA linear takes "hybrid": its base
GEMMs are then cuBLAS, as PEFT's are, so it cannot lose to PEFT on the work that
dominates a step; the fully fused "triton" plan and "cuda" are chosen only when asked
for or measured faster. The other ops take "triton".
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch

# the dispatch table: each backend's plan, a module of lorafast/plans/ with the same functions
PLANS = {"torch": "lorafast.plans.reference", "triton": "lorafast.plans.triton",
         "hybrid": "lorafast.plans.hybrid", "cuda": "lorafast.plans.cuda"}
BACKENDS = tuple(PLANS)
# the registered ops (lorafast::<name>), by the names select takes
OPS = ("lora_linear_fwd", "lora_linear_bwd", "lora_linear_bwd_ps", "lora_linear_multi_fwd", "lora_linear_multi_bwd",
       "lora_linear_multi_bwd_ps", "grad_sample_norms", "clip_reduce_noise", "fedex_merge_", "privatize",
       "dequantize_", "lora_linear_q_fwd", "lora_linear_q_bwd")
LORA_LINEAR_OPS = frozenset({"lora_linear_fwd", "lora_linear_bwd", "lora_linear_bwd_ps", "lora_linear_multi_fwd",
                             "lora_linear_multi_bwd", "lora_linear_multi_bwd_ps", "lora_linear_q_fwd",
                             "lora_linear_q_bwd"})
BASE_GEMM_OPS = LORA_LINEAR_OPS   # the ops with base GEMMs for "hybrid" to hand to cuBLAS
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_override: Optional[str] = None
_cuda_ops_override = None   # a stand-in for torch.ops.lorafast_cuda (tests' CPU emulation of csrc/)


def _prepare_interpreter() -> bool:
    """On a machine without CUDA, Triton can only interpret. It decides that when a function is
    jit-decorated: its own standard library when triton is first imported, lorafast's kernels
    when their modules are. So import triton and the kernels here with the interpreter on,
    then keep it on for this process only (Triton's ``knobs.runtime.interpret``) and take
    ``TRITON_INTERPRET`` back out of the environment: child processes (Ray or Flower
    workers, subprocesses) may have a GPU and must not inherit it. A TRITON_INTERPRET set by
    the user is theirs and stays; ``TRITON_INTERPRET=0`` keeps the interpreter off (the
    compile check relies on that). Returns whether the interpreter is on."""
    setting = os.environ.get("TRITON_INTERPRET", "")
    if setting not in ("", "0"):
        return True
    if setting == "0" or "triton" in sys.modules or torch.cuda.is_available():
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
        knobs = getattr(triton, "knobs", None)      # Triton >= 3.4
        if knobs is not None:
            knobs.runtime.interpret = True          # sets the environment too: removed below
        import pkgutil
        from . import kernels                       # older Triton reads only the environment:
        for module in pkgutil.iter_modules(kernels.__path__):   # decorate every kernel module now
            importlib.import_module(f"lorafast.kernels.{module.name}")
    except Exception as e:   # a broken Triton install must not break `import lorafast`
        warnings.warn(f"lorafast: the Triton interpreter could not be set up ({type(e).__name__}: {e}); "
                      f"the Triton backend is unavailable on CPU tensors", RuntimeWarning, stacklevel=2)
        return False
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
    return True


_INTERPRETER = _prepare_interpreter()


def _check_name(name: Optional[str], what: str) -> Optional[str]:
    if name is None or name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS} or None/'auto', got {name!r}")
    return name


def triton_status() -> tuple[bool, str]:
    """(usable, why) for the Triton backend on this machine."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if torch.cuda.is_available():
        return True, "GPU"
    return True, "CPU tensors only, through the Triton interpreter (TRITON_INTERPRET=1)"


def cuda_status() -> tuple[bool, str]:
    """(usable, why) for the CUDA C++ backend (see lorafast._cuda)."""
    from . import _cuda
    return _cuda.status()


def backend_status(name: str) -> tuple[bool, str]:
    """(usable, why) for a backend of BACKENDS other than "torch"."""
    if name == "cuda":
        return cuda_status()
    usable, why = triton_status()
    if name == "hybrid" and usable:
        why = "the LoRA linear's base GEMMs on cuBLAS (torch.mm), its rank-r work in the Triton kernels"
    return usable, why


def available_backends() -> list[str]:
    """The kernel families usable here: always "torch", and "triton", "cuda" where usable.
    "hybrid" (the Triton kernels around cuBLAS base GEMMs) is usable wherever "triton" is."""
    out = ["torch"]
    if triton_status()[0]:
        out.append("triton")
    if cuda_status()[0]:
        out.append("cuda")
    return out


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every op (None or "auto" restores automatic selection)."""
    global _override
    _override = _check_name(name, "backend")


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager form of ``set_backend``."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def _requested(backend: Optional[str]) -> tuple[Optional[str], str]:
    """(the backend asked for, by what): argument, override or environment; None means automatic."""
    name = _check_name(backend, "backend")
    if name is not None:
        return name, "backend= argument"
    if _override is not None:
        return _override, "set_backend / use_backend"
    return _check_name(os.environ.get("LORAFAST_BACKEND"), "LORAFAST_BACKEND"), "LORAFAST_BACKEND"


def requested(backend: Optional[str] = None) -> Optional[str]:
    """The backend asked for by argument, override or environment; None means automatic."""
    return _requested(backend)[0]


def _triton_supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if Triton kernels are correct for this device and dtype, else the reason."""
    usable, why = triton_status()
    if not usable:
        return why
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16 activations, not {dtype}"
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 7 or (dtype == torch.bfloat16 and major < 8):
            return f"compute capability {major}.x is too old for {dtype} Triton kernels"
        return None
    if device.type == "cpu":
        return None
    return f"no Triton kernels for device type {device.type!r}"


@functools.lru_cache(maxsize=None)
def _gpu_name(index: Optional[int]) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _cuda_usable() -> bool:
    return cuda_status()[0]


def _measured_choice(op: str, device: torch.device, dtype: torch.dtype, shape: Sequence[int],
                     triton_ok: bool) -> Optional[tuple[str, Callable[[], str]]]:
    """(backend, why) of the faster GPU backend for this shape by the recorded timings, or
    None without any."""
    from . import _cuda, _selection
    candidates = (["triton"] if triton_ok else []) + (["hybrid"] if triton_ok and op in BASE_GEMM_OPS else []) \
        + (["cuda"] if op in _cuda.OPS and dtype in KERNEL_DTYPES else [])
    if not candidates:
        return None
    gpu = _gpu_name(device.index)
    # a measured choice must have beaten the default it replaces ("hybrid" for the LoRA linear)
    must = ["hybrid"] if "hybrid" in candidates else []
    table = "lora_linear_fwd" if op in LORA_LINEAR_OPS else op   # the backward follows the forward's choice
    found = _selection.nearest(gpu, table, str(dtype).removeprefix("torch."), shape, candidates, must)
    if found is None:
        return None
    near, ms = found
    best = min(ms, key=ms.get)
    if best == "cuda" and not _cuda_usable():
        return None
    return best, lambda: (f"measured fastest on {gpu} at the nearest recorded shape {tuple(near)}: "
                          + ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(ms.items(), key=lambda kv: kv[1])))


def _decide(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str],
            shape: Optional[Sequence[int]]) -> tuple[str, Callable[[], str]]:
    """(backend, why): the reason is a function, so that ``select``, which every op call makes,
    never formats it."""
    if op not in OPS:
        raise ValueError(f"op must be one of the registered ops {OPS}, got {op!r}")
    name, source = _requested(backend)
    asked = lambda: f"asked for ({source})"  # noqa: E731
    if name == "torch":
        return name, asked
    if name in ("triton", "hybrid"):
        why = _triton_supports(device, dtype)
        if why is not None:
            raise ValueError(f"{op}: backend={name!r} cannot run here: {why}")
        if name == "hybrid" and op not in BASE_GEMM_OPS:
            return "triton", lambda: f"asked for hybrid ({source}); {op} has no base GEMM, so its Triton kernel"
        return name, asked
    if name == "cuda" and _cuda_ops_override is not None:
        return name, lambda: f"asked for ({source}); the lorafast_cuda ops are a stand-in"
    if name == "cuda":
        from . import _cuda
        usable, why = cuda_status()
        if not usable:
            raise RuntimeError(f"{op}: backend='cuda' was requested but {why}")
        if op not in _cuda.OPS:
            raise RuntimeError(f"{op}: the CUDA backend has no kernel for this op yet (it has "
                               f"{sorted(_cuda.OPS)}); use backend='triton' or 'torch'")
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got {device.type}")
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"{op}: the CUDA kernels take float32, float16 or bfloat16, not {dtype}")
        return name, asked
    # automatic: the interpreter is for testing, never picked on its own
    if device.type != "cuda":
        return "torch", lambda: (f"{device.type} tensors: the reference "
                                 "(Triton on CPU is only its interpreter, for tests)")
    why_not = _triton_supports(device, dtype)
    triton_ok = why_not is None
    if shape is not None:
        best = _measured_choice(op, device, dtype, shape, triton_ok)
        if best is not None:
            return best
    if not triton_ok:
        return "torch", lambda: f"the reference: Triton cannot run here ({why_not})"
    if op in BASE_GEMM_OPS:
        return "hybrid", lambda: (f"no measured table for {_gpu_name(device.index)}: base GEMMs on cuBLAS "
                                  f"(as PEFT's), rank-r work in the Triton kernels")
    return "triton", lambda: "the Triton kernel (the default GPU backend for ops without base GEMMs)"


def choose(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None,
           shape: Optional[Sequence[int]] = None) -> tuple[str, str]:
    """(backend, why): ``select``'s answer and the reason for it, as ``lorafast env`` shows."""
    name, why = _decide(op, device, dtype, backend, shape)
    return name, why()


def select(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None,
           shape: Optional[Sequence[int]] = None) -> str:
    """Resolve the backend for ``op`` on tensors of this device and dtype; ``shape`` (the op's
    size features, e.g. (M, in, out, r) for the LoRA linear) lets automatic selection use
    the timings recorded for the nearest shape. See ``choose`` for the reasons."""
    return _decide(op, device, dtype, backend, shape)[0]


def cuda_ops():
    """The lorafast_cuda op namespace, loading (or building) the extension on first use; or the
    stand-in set by ``cuda_ops_standin``."""
    if _cuda_ops_override is not None:
        return _cuda_ops_override
    from . import _cuda
    _cuda.load()
    return torch.ops.lorafast_cuda


@contextlib.contextmanager
def cuda_ops_standin(ops) -> Iterator[None]:
    """Route backend="cuda" to ``ops`` (an object with the lorafast_cuda ops' functions) on any
    device, for tests that run csrc/'s kernels under a CPU emulation."""
    global _cuda_ops_override
    previous = _cuda_ops_override
    _cuda_ops_override = ops
    try:
        yield
    finally:
        _cuda_ops_override = previous


def plan(backend: str, device: torch.device):
    """The plan module of ``backend`` (see lorafast/plans/): Triton's on CPU tensors only under
    the interpreter; CUDA's with the extension loaded."""
    if backend in ("triton", "hybrid") and device.type == "cpu" and not _INTERPRETER:
        raise RuntimeError(
            "backend='triton' on CPU tensors runs only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment, or import lorafast before triton")
    if backend == "cuda":
        cuda_ops()
    module = _PLAN_MODULES.get(backend)
    if module is None:
        module = _PLAN_MODULES[backend] = importlib.import_module(PLANS[backend])
    return module


_PLAN_MODULES: dict = {}
