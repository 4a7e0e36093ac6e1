"""Run csrc/'s CUDA kernels on the CPU: a host build against a small emulated runtime
(tests/support/native/cuda_emu/), loaded with ctypes.

Each ``kernel<<<grid, block, smem, stream>>>(args)`` is rewritten into a call of
``emu::launch``, which runs every block's threads as fibers with real barriers for
``__syncthreads`` and warp shuffles. The kernels' indexing, masking, tiling, Philox streams
and reductions are then the code that runs on a GPU, on CPU tensors at tiny sizes. What the
emulation cannot show (speed, the memory model, the torch binding in bindings.cpp) is left to
the GPU tests.

``EmulatedOps`` mirrors the ``lorafast_cuda`` ops that lorafast/plans/cuda.py calls, so the
CUDA backend's LoRA plan runs end to end here.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "native" / "cuda_emu"
CXX = shutil.which("g++") or shutil.which("clang++")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CHUNK_WIDTH = 4096   # kChunkWidth in bindings.cpp
# name<T, ...><<<grid, block, smem, stream>>>(   →   ::emu::launch(grid, block, smem, stream, name<T, ...>,
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;<>()]*>)?)\s*<<<(.*?)>>>\s*\(")

_i64, _u64, _f32, _f64, _i32, _ptr = (ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_double,
                                      ctypes.c_int, ctypes.c_void_p)
_SIGNATURES = {
    "emu_privatize": [_ptr, _ptr, _ptr, _i64, _i64, _i32, _i32, _f32, _f32, _u64, _u64],
    "emu_grad_sample_sq_norms": [_ptr, _i64, _i64, _ptr, _i64, _ptr, _i64],
    "emu_clip_reduce_noise": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, ctypes.c_bool, _ptr, _ptr, _i32, _f32,
                              _u64, _u64, _f32, _ptr],
    "emu_fedex_merge": [_ptr, _i64, _i64, _i32, _ptr, _i64, _i64, _ptr, _i64, _i64],
    "emu_rank_reduce": [_ptr, _i64, _i64, _i64, _i64, _i32, _ptr, _i64, _i64, _ptr, _f32, _ptr, _f32, _ptr, _i64, _i64,
                        _i64, _i64, _ptr, _i32, _f64, _u64, _u64, _i32],
    "emu_rank_update": [_ptr, _i64, _i64, _i64, _i32, _ptr, _i32, _ptr, _i64, _i64, _ptr, _f32, _f64, _u64, _u64],
}


def rewrite_launches(source: str) -> str:
    """The CUDA source with every triple-chevron launch turned into an ``emu::launch`` call."""
    return _LAUNCH.sub(lambda m: f"::emu::launch({m.group(2)}, {m.group(1)}, ", source)


def build(workdir: Path) -> ctypes.CDLL:
    """Compile every csrc/*.cu for the host emulation into one shared library."""
    units = []
    for src in sorted(CSRC.glob("*.cu")):
        unit = workdir / (src.stem + ".cpp")
        unit.write_text(rewrite_launches(src.read_text()))
        units.append(str(unit))
    lib = workdir / "libcuda_emu.so"
    # the kernels' vector loads read half/bfloat16/float storage through Pack4 (as on the GPU)
    cmd = [CXX, "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-fPIC", "-shared", "-I", str(EMU),
           "-I", str(CSRC),
           *units, str(EMU / "api.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"host build of csrc/ failed:\n{proc.stderr[-4000:]}")
    dll = ctypes.CDLL(str(lib))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(dll, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return dll


def ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return t.data_ptr() if t is not None else None


def check(err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"{what}: emulated launch failed (cudaError {err})")


def chunk_rows(segments, width: int = CHUNK_WIDTH) -> list[tuple[int, int, int]]:
    """bindings.cpp's chunk table: (start, stop, parameter) rows of at most ``width`` columns,
    each inside one parameter; a chunk that starts inside a parameter starts at a multiple of 4,
    so no chunk touches more than width/4 of the Philox four-column groups."""
    rows = []
    for p, (start, stop) in enumerate(zip(segments, segments[1:])):
        a = start
        while a < stop:
            b = min(stop, (a & ~3) + width)
            rows.append((a, b, p))
            a = b
    return rows


class EmulatedOps:
    """The ``lorafast_cuda`` ops over the emulated kernels, with the binding's argument
    handling (bindings.cpp): pointers, strides, the dtype code, the multiprocessor count, and
    the device tables (chunk table, per-parameter bounds) built once per layout and cached."""

    CACHE_ENTRIES = 64   # kMaxEntries of DeviceTables in bindings.cpp

    def __init__(self, lib: ctypes.CDLL, sms: int = 2):
        self.lib, self.sms = lib, sms
        self._tables: dict = {}

    def rank_reduce(self, x, p, out, out_scale, l, dw, l_scale, rows_per_sample, dbias, dropout_p, seed, offset):
        r = p.shape[1] if p is not None else (l.shape[1] if l is not None else 1)   # dbias alone: r is moot
        for t in (out, l, dbias):
            assert t is None or (t.dtype == torch.float32 and t.is_contiguous())
        sds, sdk, sdr = (0, 0, 0)
        if dw is not None:
            sds, sdk, sdr = (dw.stride(0) if dw.dim() == 3 else 0), dw.stride(-2), dw.stride(-1)
        check(self.lib.emu_rank_reduce(
            ptr(x), x.stride(0), x.stride(1), x.shape[0], x.shape[1], DTYPES[x.dtype], ptr(p),
            p.stride(0) if p is not None else 0, p.stride(1) if p is not None else 0, ptr(out), out_scale, ptr(l),
            l_scale, ptr(dw), sds, sdk, sdr, rows_per_sample if dw is not None and dw.dim() == 3 else 0, ptr(dbias), r,
            dropout_p, seed, offset, self.sms), "rank_reduce")

    def rank_update_(self, y, h, u, bias, scale, dropout_p, seed, offset):
        assert y.stride(1) == 1 and h.is_contiguous() and h.dtype == torch.float32 and u.dtype == torch.float32
        check(self.lib.emu_rank_update(ptr(y), y.stride(0), y.shape[0], y.shape[1], DTYPES[y.dtype], ptr(h), h.shape[1],
                                       ptr(u), u.stride(0), u.stride(1), ptr(bias), scale, dropout_p, seed, offset),
              "rank_update_")

    # ---- the fused ops, with bindings.cpp's host-side steps in Python

    def privatize(self, h, clip_norm, noise_std, mode, seed, offset):
        from lorafast._layout import privatize_rows
        x = h.contiguous()
        rows, cols = privatize_rows(x, mode)
        y = torch.empty_like(x)
        sq = torch.empty(rows, dtype=torch.float32)   # zeroed by the launcher
        element = 1 if mode == "element" else 0
        check(self.lib.emu_privatize(ptr(x), ptr(y), ptr(sq), rows, cols, DTYPES[x.dtype], element, clip_norm,
                                     noise_std, seed, offset), "privatize")
        return y, sq

    def _table(self, key, make):
        """A cached table, oldest entry dropped past CACHE_ENTRIES (bindings.cpp's DeviceTables)."""
        if key not in self._tables:
            if len(self._tables) >= self.CACHE_ENTRIES:
                del self._tables[next(iter(self._tables))]
            self._tables[key] = make()
        return self._tables[key]

    def _chunks(self, segments, width=CHUNK_WIDTH):
        return self._table(("chunks", tuple(segments), width),
                           lambda: torch.tensor(chunk_rows(segments, width), dtype=torch.int64).reshape(-1, 3))

    def grad_sample_norms(self, grad_sample, segments):
        n, p = grad_sample.shape[0], len(segments) - 1
        sq = torch.zeros((n, p), dtype=torch.float32)
        chunks = self._chunks(segments)
        check(self.lib.emu_grad_sample_sq_norms(ptr(grad_sample), n, grad_sample.stride(0), ptr(chunks),
                                                chunks.shape[0], ptr(sq), p), "grad_sample_norms")
        return sq

    def clip_reduce_noise(self, grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std, seed,
                          offset, out_scale):
        sq = sq_norms.float()
        total = sq.sum(1, keepdim=True)
        if per_layer:
            def make():
                return torch.tensor(max_norms, dtype=torch.float64).to(torch.float32)
            nan = any(v != v for v in max_norms)   # not cached, as in bindings.cpp
            bound = make() if nan else self._table(("bound", tuple(max_norms)), make)
            coef = (bound / sq.sqrt()).clamp_max(1.0)
        else:
            coef = (max_norms[0] / total.sqrt()).clamp_max(1.0)
        coef = torch.where(torch.isfinite(total), coef, torch.zeros_like(coef)).contiguous()
        out = torch.empty(grad_sample.shape[1], dtype=torch.float32)
        chunks = self._chunks(segments)
        mode = 0 if noise_std == 0.0 else (2 if noise is not None else 1)
        acc_f = acc.float().contiguous() if acc is not None else None
        noise_f = noise.float().contiguous() if mode == 2 else None
        check(self.lib.emu_clip_reduce_noise(ptr(grad_sample), grad_sample.shape[0], grad_sample.stride(0), ptr(chunks),
                                             chunks.shape[0], CHUNK_WIDTH, ptr(coef), coef.shape[1], per_layer,
                                             ptr(acc_f), ptr(noise_f), mode, noise_std, seed, offset, out_scale,
                                             ptr(out)), "clip_reduce_noise")
        return out

    def fedex_merge_(self, weight, U, V, compensation):
        delta = (U.float() @ V.float()).contiguous()
        c = compensation
        check(self.lib.emu_fedex_merge(ptr(weight), weight.stride(0), weight.stride(1), DTYPES[weight.dtype], ptr(c),
                                       c.stride(0) if c is not None else 0, c.stride(1) if c is not None else 0,
                                       ptr(delta), weight.shape[0], weight.shape[1]), "fedex_merge_")


_built: Optional[EmulatedOps] = None


def available() -> bool:
    """Whether this machine can build the emulation (a C++20 compiler on Linux)."""
    import sys
    return CXX is not None and sys.platform.startswith("linux")


def emulated_ops() -> EmulatedOps:
    """The emulation, built once per test session."""
    global _built
    if _built is None:
        import tempfile
        _built = EmulatedOps(build(Path(tempfile.mkdtemp(prefix="lorafast-cuda-emu-"))))
    return _built


def activate(monkeypatch) -> EmulatedOps:
    """Route backend="cuda" to the emulation for one test, on CPU tensors too: the plan's
    lorafast_cuda ops become the emulated ones (``_backend.cuda_ops_standin``, undone at the
    test's end)."""
    from lorafast import _backend
    emu = emulated_ops()
    monkeypatch.setattr(_backend, "_cuda_ops_override", emu)
    return emu
