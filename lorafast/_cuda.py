"""The CUDA C++ backend: finding, building and loading the ``lorafast_cuda`` ops.

csrc/ holds the kernels (``*.cu``, CUDA runtime headers only) and their torch binding
(``bindings.cpp``). They are loaded, in order of preference, from:

1. the extension built ahead of time by setup.py (``lorafast/_C*.so``; needs torch with
   CUDA and nvcc at install time, ``pip install --no-build-isolation .``);
2. a just-in-time build of csrc/ with ninja through ``torch.utils.cpp_extension.load`` on
   first use, cached in ``$LORAFAST_CACHE_DIR`` or ``~/.cache/lorafast/cuda`` per torch
   version and source hash. ``LORAFAST_CUDA_ARCHS`` (e.g. ``"80;90a"``) picks the
   architectures, by default the current GPU's.

A missing toolchain is an error only when ``backend="cuda"`` is asked for; ``status()``
says what is missing.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

# the ops (their registered names, as _backend.select takes them) with lorafast_cuda kernels: all of them
OPS = frozenset({"lora_linear_fwd", "lora_linear_bwd", "lora_linear_bwd_ps", "privatize", "grad_sample_norms",
                 "clip_reduce_noise", "fedex_merge_"})   # _backend.OPS but lora_linear_multi's
_PACKAGE = Path(__file__).resolve().parent
_CSRC = _PACKAGE.parent / "csrc"        # a source checkout or editable install
_loaded: Optional[str] = None


def _prebuilt() -> Optional[str]:
    found = sorted(glob.glob(str(_PACKAGE / "_C*.so")) + glob.glob(str(_PACKAGE / "_C*.pyd")))
    return found[0] if found else None


def _sources() -> list[str]:
    return sorted(glob.glob(str(_CSRC / "*.cu")) + glob.glob(str(_CSRC / "*.cpp")))


def nvcc_path() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def status() -> tuple[bool, str]:
    """(usable, why) for backend="cuda" on this machine."""
    if _loaded is not None:
        return True, f"loaded ({_loaded})"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if _prebuilt():
        return True, "prebuilt extension (lorafast._C)"
    if not _sources():
        return False, "extension not built and csrc/ sources not found (install from a source checkout)"
    if nvcc_path() is None:
        return False, "extension not built and nvcc not found (set CUDA_HOME or install the CUDA toolkit)"
    if shutil.which("ninja") is None:
        return False, "extension not built and ninja not found (pip install ninja)"
    return True, "extension not built: csrc/ is compiled with nvcc on first use"


def _archs() -> list[str]:
    env = os.environ.get("LORAFAST_CUDA_ARCHS")
    if env:
        return [a for a in env.replace(",", ";").split(";") if a]
    major, minor = torch.cuda.get_device_capability()
    return [f"{major}{minor}"]


def _cache_dir(sources: list[str], archs: list[str]) -> Path:
    digest = hashlib.sha256()
    for src in sources + sorted(glob.glob(str(_CSRC / "*.h")) + glob.glob(str(_CSRC / "*.cuh"))):
        digest.update(Path(src).read_bytes())
    digest.update(";".join(archs).encode())
    root = Path(os.environ.get("LORAFAST_CACHE_DIR", Path.home() / ".cache" / "lorafast" / "cuda"))
    path = root / f"torch{torch.__version__.replace('+', '_')}-{digest.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load() -> None:
    """Load the lorafast_cuda ops (building them if needed); a clear RuntimeError if impossible."""
    global _loaded
    if _loaded is not None:
        return
    usable, why = status()
    if not usable:
        raise RuntimeError(f"backend='cuda' was requested but {why}")
    path = _prebuilt()
    if path is not None:
        torch.ops.load_library(path)
        _loaded = path
    else:
        from torch.utils.cpp_extension import load as jit_load
        sources, archs = _sources(), _archs()
        flags = ["-O3"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        build = _cache_dir(sources, archs)
        print(f"lorafast: compiling the CUDA extension for sm_{','.join(archs)} into {build} (once)", flush=True)
        jit_load(name="lorafast_cuda_ext", sources=sources, extra_cflags=["-O3"], extra_cuda_cflags=flags,
                 extra_include_paths=[str(_CSRC)], build_directory=str(build), is_python_module=False,
                 verbose=False)
        _loaded = str(build)
    _register_fakes()


def _register_fakes() -> None:
    @torch.library.register_fake("lorafast_cuda::privatize")
    def _(h, clip_norm, noise_std, mode, seed, offset):
        from ._layout import privatize_rows
        rows, _ = privatize_rows(h.shape, mode)
        return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty((rows,), dtype=torch.float32)

    @torch.library.register_fake("lorafast_cuda::grad_sample_norms")
    def _(grad_sample, segments):
        return grad_sample.new_empty((grad_sample.shape[0], len(segments) - 1), dtype=torch.float32)

    @torch.library.register_fake("lorafast_cuda::fedex_merge_")
    def _(weight, U, V, compensation):
        return None

    @torch.library.register_fake("lorafast_cuda::rank_reduce")
    def _(x, p, out, out_scale, l, dw, l_scale, rows_per_sample, dbias, dropout_p, seed, offset):
        return None

    @torch.library.register_fake("lorafast_cuda::rank_update_")
    def _(y, h, u, bias, scale, dropout_p, seed, offset):
        return None

    @torch.library.register_fake("lorafast_cuda::clip_reduce_noise")
    def _(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std, seed, offset, out_scale):
        return grad_sample.new_empty((grad_sample.shape[1],), dtype=torch.float32)
