"""Compile every Triton kernel variant for real GPU targets, without a GPU (``lorafast check --compile``).

The interpreter proves the kernels' arithmetic but never runs Triton's compiler. This check does:

1. **Enumerate.** The launchers of lorafast.kernels are driven over every case a public call can
   reach: each op and pass (lora_linear_multi's included); fp32, fp16 and bf16 activations;
   fp32 adapters (PEFT's default) or adapters in the activations' dtype; every combination of
   the variant flags (lora_R, bias, dropout, which gradients are needed, per-sample gradients,
   TF32 on or off, DP and privatize modes); the launchers' own block-size choices (by batch
   size and rows per sample); and every autotune config of the GEMM. The tensors are meta
   tensors of training shapes (4096 features), so nothing is allocated, and launching is
   replaced by recording.
2. **Compile.** Each distinct launch is specialised by Triton's own binder as a real launch would
   be, and ``triton.compile`` builds it for a named target (sm_80, sm_90a). Triton's front end,
   its NVIDIA backend and its bundled ptxas need no driver and no GPU.
3. **Report.** ptxas -v gives registers, stack and spill bytes, Triton's metadata the shared
   memory per config. Any compile error fails the check.

Run ``python -m lorafast.compile_check --help`` for the options; ``lorafast check --compile``
runs it in a child process with the interpreter off.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ARCHS = {"sm_80": 80, "sm_90a": 90}
SMS = {"sm_80": 108, "sm_90a": 132}      # A100 and H100/H200: the launchers size blocks by SM count
SMEM_LIMIT = {"sm_80": 166912, "sm_90a": 232448}   # opt-in shared memory per block (A100, H100/H200)
TILE_NAMES = {"BM", "BN", "BK", "BD", "BL", "GROUP_M", "R_PAD"}
SEED, OFFSET = 123457, 7                 # neither 1 nor a multiple of 16: the common specialisation
FEATURES = 4096                          # in and out features of the enumerated layers
RANK = 16                                # R_PAD 16 (r ≤ 16) for the flag sweep; ranks up to 128 besides
BIG_RANKS = (32, 64, 128)
SWEEPS = ("full", "flags", "one")        # see select()
TUNED = {"_lora_gemm_kernel"}            # kernels launched through triton.autotune


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: what the launcher passed, and the public case it serves."""
    fn: Any                  # the JITFunction
    args: tuple
    kwargs: dict             # constexprs and launch options as passed (one autotune config applied)
    case: str

    @property
    def kernel(self) -> str:
        return f"{self.fn.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.fn.__name__}"

    @property
    def dtype(self) -> str:
        first = next(a for a in self.args if hasattr(a, "dtype"))
        return str(first.dtype).removeprefix("torch.")

    def switches(self) -> dict:
        """The constexprs that are not tile sizes: the variant's flags and modes."""
        return {k: v for k, v in self.kwargs.items()
                if k not in TILE_NAMES and k not in ("num_warps", "num_stages")}

    def labels(self) -> tuple[str, str]:
        """(flags, config): the variant's switches, and its tile sizes and launch options."""
        flags, config = [], []
        for name, value in self.kwargs.items():
            if name in TILE_NAMES:
                config.append(f"{name}={value}")
            elif name in ("num_warps", "num_stages"):
                config.append(f"{name.removeprefix('num_')[0]}{value}")
            elif isinstance(value, bool):
                if value:
                    flags.append(name)
            else:
                flags.append(f"{name}={value}")
        # pointer dtypes, and the unit strides Triton specialises into constants (the layouts)
        pointers = [f"{n}:{str(a.dtype).removeprefix('torch.')}" for n, a in zip(self.fn.arg_names, self.args)
                    if hasattr(a, "dtype")]
        units = [f"{n}=1" for n, a in zip(self.fn.arg_names, self.args)
                 if n.startswith("stride") and type(a) is int and a == 1]
        return compact_flags(flags + pointers + units), " ".join(config)


_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}


def compact_flags(tokens: list[str]) -> str:
    """``FLAG ... NAME:dtype ... stride_x=1 ...`` as ``FLAG ... fp32[A,B] bf16[X] unit[stride_x]``."""
    flags, by_dtype, units = [], {}, []
    for t in tokens:
        if ":" in t:
            name, dtype = t.split(":", 1)
            by_dtype.setdefault(_SHORT.get(dtype, dtype), []).append(name)
        elif t.startswith("stride") and t.endswith("=1"):
            units.append(t[:-2].removeprefix("stride_"))
        else:
            flags.append(t)
    parts = flags + [f"{d}[{','.join(names)}]" for d, names in by_dtype.items()]
    return " ".join(parts + ([f"unit-stride[{','.join(units)}]"] if units else []))


@dataclasses.dataclass
class Row:
    kernel: str
    dtype: str
    flags: str
    config: str
    case: str
    arch: str
    triton: str
    registers: int = -1
    stack_bytes: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared_bytes: int = -1
    notes: str = ""
    seconds: float = 0.0
    error: str = ""


# the committed table's columns (the public case, Triton version and timing stay out: the flags say
# which case, the file name which Triton)
CSV_FIELDS = ["arch", "kernel", "dtype", "config", "flags", "registers", "stack_bytes", "spill_stores",
              "spill_loads", "shared_bytes", "notes", "error"]


# ------------------------------------------------------------------ enumeration


class _Recorder:
    """The launches recorded so far, and the public case they serve (set by ``case``)."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.current = ""

    def case(self, label: str) -> None:
        self.current = label


@contextlib.contextmanager
def _recording(sms: int, smem: int) -> Iterator[_Recorder]:
    """Within this block, kernel launches are recorded instead of run (one per autotune config
    that the tuner's own pruning keeps), and the launchers see ``sms`` streaming
    multiprocessors and ``smem`` bytes of shared memory per block."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from .kernels import lora_linear
    rec = _Recorder()

    def run(self, *args, grid, warmup, **kwargs):
        rec.launches.append(Launch(self, args, dict(kwargs), rec.current))

    def tuned(self, *args, grid=None, warmup=False, **kwargs):
        configs = self.configs
        if getattr(self, "early_config_prune", None):
            configs = self.early_config_prune(configs, {**dict(zip(self.arg_names, args)), **kwargs})
        for cfg in configs:
            options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            rec.launches.append(Launch(self.fn, args, {**kwargs, **cfg.kwargs, **options}, rec.current))

    saved = (JITFunction.run, Autotuner.run, lora_linear.sm_count, lora_linear.smem_limit,
             torch.backends.cuda.matmul.allow_tf32)
    JITFunction.run, Autotuner.run = run, tuned
    lora_linear.sm_count = lambda device: sms
    lora_linear.smem_limit = lambda device: smem
    try:
        yield rec
    finally:
        JITFunction.run, Autotuner.run, lora_linear.sm_count, lora_linear.smem_limit = saved[:4]
        torch.backends.cuda.matmul.allow_tf32 = saved[4]


def _meta(*shape, dtype):
    import torch
    return torch.empty(shape, device="meta", dtype=dtype)


def _batch_sizes(sms: int) -> tuple[int, ...]:
    """Row counts M that make the projection launcher choose each of its block heights (16, 32, 64)."""
    return (512, 32 * sms + 32, 128 * sms + 64)


def _drive_lora(rec: _Recorder, dtype, adapter_dtype, sms: int) -> None:
    import torch
    from .plans import hybrid as H
    from .plans import triton as K
    n = FEATURES
    tag = f"{str(dtype).removeprefix('torch.')}, adapters {str(adapter_dtype).removeprefix('torch.')}"
    for r in (RANK, *BIG_RANKS):
        full = r == RANK          # every flag at r ≤ 16; the larger ranks on the default layer only
        A, B = _meta(r, n, dtype=adapter_dtype), _meta(n, r, dtype=adapter_dtype)
        W = _meta(n, n, dtype=dtype)
        for M in _batch_sizes(sms) if full else (_batch_sizes(sms)[-1],):
            x, gy = _meta(M, n, dtype=dtype), _meta(M, n, dtype=dtype)
            h = _meta(M, r, dtype=torch.float32)
            for has_R, has_bias, p in itertools.product((False, True), (False, True), (0.0, 0.1)):
                if not full and (has_R or not has_bias or p):
                    continue
                R = _meta(r, r, dtype=adapter_dtype) if has_R else None
                bias = _meta(n, dtype=dtype) if has_bias else None
                rec.case(f"lora_linear forward ({tag}, r={r}, R={has_R:d}, bias={has_bias:d}, dropout={p > 0:d})")
                K.lora_linear_forward(x, W, A, B, bias, R, 0.5, p, SEED, OFFSET)
                rec.case(f"lora_linear forward, hybrid ({tag}, r={r}, R={has_R:d}, bias={has_bias:d}, "
                         f"dropout={p > 0:d})")
                H.lora_linear_forward(x, W, A, B, bias, R, 0.5, p, SEED, OFFSET)
                for needs in itertools.product((False, True), repeat=5):
                    if not any(needs) or (needs[3] and not has_R) or (needs[4] and not has_bias):
                        continue
                    if not full and needs != (True, True, True, False, True):
                        continue
                    rec.case(f"lora_linear backward ({tag}, r={r}, R={has_R:d}, dropout={p > 0:d}, "
                             f"grads x,A,B,R,bias={''.join(str(int(k)) for k in needs)})")
                    K.lora_linear_backward(gy, x, W, A, B, R, h, 0.5, p, SEED, OFFSET, needs)
                    if needs[0]:   # the hybrid plan differs only in dx
                        rec.case(f"lora_linear backward, hybrid ({tag}, r={r}, R={has_R:d}, dropout={p > 0:d}, "
                                 f"grads x,A,B,R,bias={''.join(str(int(k)) for k in needs)})")
                        H.lora_linear_backward(gy, x, W, A, B, R, h, 0.5, p, SEED, OFFSET, needs)
                if not full or not has_bias:   # per-sample gradients never use the bias
                    continue
                for T in (16, 32, 128):
                    trainable = ("A", "B", "R") if has_R else ("A", "B")
                    for k in range(1, len(trainable) + 1):
                        for subset in itertools.combinations(trainable, k):
                            N = M // T
                            bufs = dict(A=_meta(N, r, n, dtype=torch.float32), B=_meta(N, n, r, dtype=torch.float32),
                                        R=_meta(N, r, r, dtype=torch.float32))
                            for need_x in (False, True):
                                rec.case(f"DP per-sample backward ({tag}, r={r}, R={has_R:d}, dropout={p > 0:d}, "
                                         f"T={T}, trains {'+'.join(subset)}, dx={need_x:d})")
                                K.lora_linear_per_sample_backward(
                                    gy, x, W, A, B, R, h, 0.5, p, SEED, OFFSET, batch=N, need_x=need_x,
                                    ps_A=bufs["A"] if "A" in subset else None,
                                    ps_B=bufs["B"] if "B" in subset else None,
                                    ps_R=bufs["R"] if "R" in subset else None, ps_scale=0.25)


def _drive_lora_multi(rec: _Recorder, dtype, adapter_dtype, sms: int) -> None:
    """lora_linear_multi: the same passes over 16 clients' stacked adapters in client order."""
    import torch
    from .plans import hybrid as H
    from .plans import triton as K
    n, r, k = FEATURES, RANK, 16
    M = _batch_sizes(sms)[1]
    tag = f"{str(dtype).removeprefix('torch.')}, adapters {str(adapter_dtype).removeprefix('torch.')}"
    A, B, W = _meta(k, r, n, dtype=adapter_dtype), _meta(k, n, r, dtype=adapter_dtype), _meta(n, n, dtype=dtype)
    x, gy, h = _meta(M, n, dtype=dtype), _meta(M, n, dtype=dtype), _meta(M, r, dtype=torch.float32)
    segments = (_meta(M, dtype=torch.int64), _meta(M, dtype=torch.int32), _meta(k, dtype=torch.float32))
    for has_R, has_bias, p in itertools.product((False, True), (False, True), (0.0, 0.1)):
        R = _meta(k, r, r, dtype=adapter_dtype) if has_R else None
        bias = _meta(n, dtype=dtype) if has_bias else None
        what = f"({tag}, k={k}, r={r}, R={has_R:d}, bias={has_bias:d}, dropout={p > 0:d})"
        for name, plan in (("", K), (", hybrid", H)):
            rec.case(f"lora_linear_multi forward{name} {what}")
            plan.lora_linear_forward(x, W, A, B, bias, R, 1.0, p, SEED, OFFSET, segments=segments)
        for needs in itertools.product((False, True), repeat=5):
            if not any(needs) or (needs[3] and not has_R) or (needs[4] and not has_bias):
                continue
            grads = "".join(str(int(q)) for q in needs)
            for name, plan in (("", K), (", hybrid", H)) if needs[0] else (("", K),):
                rec.case(f"lora_linear_multi backward{name} {what}, grads x,A,B,R,bias={grads}")
                plan.lora_linear_backward(gy, x, W, A, B, R, h, 1.0, p, SEED, OFFSET, needs, segments=segments)


def _quant_weights(n: int):
    """(label, QuantWeight) of each quantised-base layout, on the meta device: NF4/FP4 with and
    without double quantisation (the kernels do not tell NF4 from FP4: the codebook is data),
    and int8 row-wise."""
    import torch
    from .reference import QuantWeight
    blocks = n * n // 64
    u8, f32 = torch.uint8, torch.float32
    return [("4-bit, double quantisation", QuantWeight(_meta(n * n // 2, 1, dtype=u8), _meta(blocks, dtype=u8),
                                                       _meta(16, dtype=f32), _meta(blocks // 256, dtype=f32),
                                                       _meta(256, dtype=f32), _meta(1, dtype=f32), 4, 64, 256,
                                                       (n, n))),
            ("4-bit", QuantWeight(_meta(n * n // 2, 1, dtype=u8), _meta(blocks, dtype=f32), _meta(16, dtype=f32),
                                  None, None, None, 4, 64, 1, (n, n))),
            ("int8", QuantWeight(_meta(n, n, dtype=torch.int8), _meta(n, dtype=f32), None, None, None, None, 8, n, 1,
                                 (n, n)))]


def _drive_quant(rec: _Recorder, dtype, sms: int) -> None:
    """QLoRA: the dequantisation into the scratch buffer, and the fused path's GEMMs that decode
    the weight in their main loop (the forward's x·Wᵀ and the backward's dY·W)."""
    import torch
    from .kernels.lora_linear import QuantOperand
    from .plans import triton as K
    n, r = FEATURES, RANK
    tag = str(dtype).removeprefix("torch.")
    A, B = _meta(r, n, dtype=torch.float32), _meta(n, r, dtype=torch.float32)
    M = _batch_sizes(sms)[-1]
    x, gy, h = _meta(M, n, dtype=dtype), _meta(M, n, dtype=dtype), _meta(M, r, dtype=torch.float32)
    for label, qw in _quant_weights(n):
        rec.case(f"dequantize ({label}, to {tag})")
        K.dequantize_(qw, _meta(n, n, dtype=dtype))
        W = QuantOperand(qw, False)
        for p in (0.0, 0.1):
            rec.case(f"lora_linear_q fused forward ({label}, {tag}, r={r}, dropout={p > 0:d})")
            K.lora_linear_forward(x, W, A, B, _meta(n, dtype=dtype), None, 0.5, p, SEED, OFFSET)
            rec.case(f"lora_linear_q fused backward ({label}, {tag}, r={r}, dropout={p > 0:d}, grads x,A,B)")
            K.lora_linear_backward(gy, x, W, A, B, None, h, 0.5, p, SEED, OFFSET, (True, True, True, False, False))


def _drive_dp(rec: _Recorder) -> None:
    import torch
    from .plans import triton as D
    segments = [0, 65536, 65536 + 4096, 200000]
    g = _meta(64, segments[-1], dtype=torch.float32)
    sq = _meta(64, len(segments) - 1, dtype=torch.float32)
    rec.case("DP per-sample norms")
    D.grad_sample_norms(g, segments)
    for per_layer, has_acc, noise in itertools.product((False, True), (False, True), ("none", "philox", "given")):
        rec.case(f"DP clip-reduce-noise (per_layer={per_layer:d}, acc={has_acc:d}, noise={noise})")
        D.clip_reduce_noise(g, sq, segments, [1.0, 0.5, 2.0], per_layer,
                            _meta(segments[-1], dtype=torch.float32) if has_acc else None,
                            _meta(segments[-1], dtype=torch.float32) if noise == "given" else None,
                            0.0 if noise == "none" else 1.5, SEED, OFFSET, 0.1)


def _drive_fedex(rec: _Recorder, dtype) -> None:
    import torch
    from .plans import triton as F
    W = _meta(FEATURES, FEATURES, dtype=dtype)
    U, V = _meta(FEATURES, 8 * RANK, dtype=torch.float32), _meta(8 * RANK, FEATURES, dtype=torch.float32)
    for comp in (False, True):
        for transposed in (False, True):    # GPT-2 Conv1D weights merge through their transpose
            rec.case(f"fedex merge ({str(dtype).removeprefix('torch.')}, compensation={comp:d}, "
                     f"transposed={transposed:d})")
            w = W.T if transposed else W
            F.fedex_merge_(w, U, V, _meta(FEATURES, FEATURES, dtype=torch.float32) if comp else None)


def _drive_privatize(rec: _Recorder, dtype) -> None:
    from .plans import triton as S
    for mode, shape in (("sample", (8, 16, 64)), ("sample", (8, 64, 4096)), ("token", (8, 512, 4096)),
                        ("element", (8, 512, 4096))):
        for std in (0.0, 0.5):
            rec.case(f"privatize ({str(dtype).removeprefix('torch.')}, mode={mode}, row={shape[1] * shape[2]}, "
                     f"noise={std > 0:d})")
            S.privatize(_meta(*shape, dtype=dtype), 1.0, std, mode, SEED, OFFSET)


def enumerate_launches(sms: int = SMS["sm_90a"], smem: Optional[int] = None) -> list[Launch]:
    """Every distinct kernel launch the launchers make over the public cases, in a fixed order,
    on a GPU of ``sms`` SMs and ``smem`` bytes of shared memory per block (by default, that of
    the architecture in SMS with that many SMs)."""
    import torch
    from .kernels.common import interpreted
    if interpreted():
        raise RuntimeError("the compile check needs Triton's compiler, not its interpreter: run it with "
                           "TRITON_INTERPRET=0 (`lorafast check --compile` does)")
    if smem is None:
        smem = next((SMEM_LIMIT[arch] for arch, n in SMS.items() if n == sms), SMEM_LIMIT["sm_90a"])
    with _recording(sms, smem) as rec:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                for adapter_dtype in dict.fromkeys((torch.float32, dtype)):
                    _drive_lora(rec, dtype, adapter_dtype, sms)
                    _drive_lora_multi(rec, dtype, adapter_dtype, sms)
                _drive_fedex(rec, dtype)
            _drive_privatize(rec, dtype)
            _drive_quant(rec, dtype, sms)
        torch.backends.cuda.matmul.allow_tf32 = False
        _drive_dp(rec)
        launches = rec.launches
    seen, unique = set(), []
    for launch in launches:
        key = _key(launch)
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


def _key(launch: Launch) -> tuple:
    """Two launches compile to the same binary exactly when these agree: the kernel, Triton's
    specialisation of every argument, and the constexprs and options."""
    from triton.backends.compiler import GPUTarget
    spec = _specialise(launch, GPUTarget("cuda", 90, 32))[1]
    return (launch.kernel, repr(spec), tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items())))


_BINDERS: dict = {}


def _specialise(launch: Launch, target):
    """Triton's binder for this kernel and target, applied as ``JITFunction.run`` applies it."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    key = (id(launch.fn), target.arch)
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = (create_function_from_signature(launch.fn.signature, launch.fn.params, backend), backend)
    binder, backend = _BINDERS[key]
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    return bound, specialization, options, backend


def select(launches: list[Launch], sweep: str) -> list[Launch]:
    """The launches a sweep compiles: "full" every one; "flags" every flag combination of every
    kernel and dtype at its first block config, plus every autotune config of the fp16/bf16
    GEMM at its first flag combination; "one" the first launch of every kernel and dtype."""
    if sweep == "full":
        return launches
    keep: dict = {}
    first_flags: dict = {}
    for launch in launches:
        flags, config = launch.labels()
        group = (launch.kernel, launch.dtype)
        first_flags.setdefault(group, flags)
        if sweep == "one":
            keep.setdefault(group, launch)
            continue
        keep.setdefault((*group, flags), launch)
        if launch.fn.fn.__name__ in TUNED and launch.dtype in ("float16", "bfloat16") and flags == first_flags[group]:
            keep.setdefault((*group, flags, config), launch)
    chosen = {id(launch) for launch in keep.values()}
    return [launch for launch in launches if id(launch) in chosen]


# ------------------------------------------------------------------ compiling


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_log(kernel, arch: str) -> str:
    """ptxas -v on the kernel's PTX, for a binary that came from Triton's cache (no log then)."""
    import subprocess
    from triton import knobs
    from triton.backends.nvidia import compiler as nv
    tool = nv.get_ptxas(ARCHS[arch]) if hasattr(nv, "get_ptxas") else knobs.nvidia.ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        proc = subprocess.run([tool.path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                              capture_output=True, text=True, timeout=600)
        return proc.stderr + proc.stdout
    finally:
        os.unlink(f.name)


def compile_launch(launch: Launch, arch: str) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    flags, config = launch.labels()
    row = Row(launch.kernel, launch.dtype, flags, config, launch.case, arch, triton.__version__)
    t0 = time.perf_counter()
    try:
        target = GPUTarget("cuda", ARCHS[arch], 32)
        bound, specialization, options, backend = _specialise(launch, target)
        options, signature, constexprs, attrs = launch.fn._pack_args(backend, dict(launch.kwargs), bound,
                                                                     specialization, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):     # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        text = log.getvalue()
        if not _RE_REGS.search(text):
            text = _ptxas_log(kernel, arch)
        regs, spill = _RE_REGS.search(text), _RE_SPILL.search(text)
        row.registers = int(regs.group(1)) if regs else -1
        if spill:
            row.stack_bytes, row.spill_stores, row.spill_loads = map(int, spill.groups())
        row.shared_bytes = int(kernel.metadata.shared)
        notes = []
        if "serialized due to insufficient register" in text:
            notes.append("wgmma serialized (registers)")
        if row.shared_bytes > SMEM_LIMIT[arch]:
            if launch.fn.fn.__name__ not in TUNED:   # a plain launch would fail with out-of-resources
                raise RuntimeError(f"{row.shared_bytes} B of shared memory, over the {arch} limit of "
                                   f"{SMEM_LIMIT[arch]} B")
            notes.append(f"over the {SMEM_LIMIT[arch]} B shared memory of {arch}: autotune skips it")
        row.notes = "; ".join(notes)
    except Exception as e:   # a compile error is the finding: record it, fail the run at the end
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


# workers: each enumerates once, then compiles by index (launches hold live JIT functions)
_WORKER: dict = {}


def _worker_init(sms_by_arch: dict) -> None:
    _WORKER["launches"] = {arch: enumerate_launches(sms) for arch, sms in sms_by_arch.items()}


def _worker_compile(arch: str, index: int) -> Row:
    return compile_launch(_WORKER["launches"][arch][index], arch)


def run(plan: dict[str, str], jobs: int, progress: Optional[Callable[[int, int, Row], None]] = None,
        kernel: Optional[str] = None) -> list[Row]:
    """Compile ``plan`` = {arch: sweep} (the kernels whose name contains ``kernel``, if given);
    rows in enumeration order per arch."""
    import multiprocessing as mp
    sms = {arch: SMS[arch] for arch in plan}
    tasks = []
    for arch, sweep in plan.items():
        every = enumerate_launches(sms[arch])
        chosen = {id(launch) for launch in select(every, sweep) if not kernel or kernel in launch.kernel}
        tasks += [(arch, i) for i, launch in enumerate(every) if id(launch) in chosen]
    rows: dict[tuple[str, int], Row] = {}
    if jobs <= 1:
        _worker_init(sms)
        for n, (arch, i) in enumerate(tasks, 1):
            rows[arch, i] = _worker_compile(arch, i)
            if progress:
                progress(n, len(tasks), rows[arch, i])
    else:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(sms,)) as pool:
            futures = {pool.submit(_worker_compile, arch, i): (arch, i) for arch, i in tasks}
            for n, future in enumerate(as_completed(futures), 1):
                rows[futures[future]] = future.result()
                if progress:
                    progress(n, len(tasks), rows[futures[future]])
    return [rows[task] for task in tasks]


# ------------------------------------------------------------------ report


def summary(rows: list[Row]) -> list[dict]:
    """Per (arch, kernel): variants, compile errors, max registers, spilling variants, the largest
    spill and the largest shared memory of any config."""
    out = []
    for (arch, kernel), group in itertools.groupby(sorted(rows, key=lambda r: (r.arch, r.kernel)),
                                                   key=lambda r: (r.arch, r.kernel)):
        group = list(group)
        ok = [r for r in group if not r.error]
        spilling = [r for r in ok if r.spill_stores > 0 or r.spill_loads > 0]
        worst = max(ok, key=lambda r: r.spill_stores, default=None)
        out.append(dict(
            arch=arch, kernel=kernel, variants=len(group), errors=len(group) - len(ok),
            max_registers=max((r.registers for r in ok), default=-1),
            spilling=len(spilling), max_spill_stores=worst.spill_stores if worst else -1,
            worst_spill=f"{worst.dtype} {worst.config}" if worst and worst.spill_stores else "",
            max_shared_bytes=max((r.shared_bytes for r in ok), default=-1),
            serialized_wgmma=sum(1 for r in ok if "wgmma serialized" in r.notes),
            over_smem=sum(1 for r in ok if "shared memory" in r.notes)))
    return out


def format_summary(rows: list[Row], triton_version: str) -> str:
    head = ("arch", "kernel", "variants", "errors", "max regs", "spilling", "max spill B", "worst spill (dtype config)",
            "max smem B", "over smem limit", "wgmma serialized")
    lines = [f"Triton {triton_version}", " | ".join(head), " | ".join("---" for _ in head)]
    for s in summary(rows):
        lines.append(" | ".join(str(v) for v in (
            s["arch"], s["kernel"], s["variants"], s["errors"], s["max_registers"], s["spilling"],
            s["max_spill_stores"], s["worst_spill"] or "-", s["max_shared_bytes"], s["over_smem"],
            s["serialized_wgmma"])))
    return "\n".join(lines)


def format_configs(rows: list[Row]) -> str:
    """The autotuned kernels per dtype and config: shared memory, registers and spills at their
    worst over the flag combinations and ranks."""
    head = ("arch", "kernel", "dtype", "config", "variants", "max smem B", "max regs", "spilling", "max spill B")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    tuned = [r for r in rows if not r.error and r.kernel.rsplit(".", 1)[-1] in TUNED]
    strip = re.compile(r"R_PAD=\d+ ")
    key = lambda r: (r.arch, r.kernel, r.dtype, strip.sub("", r.config))   # noqa: E731
    for (arch, kernel, dtype, config), group in itertools.groupby(sorted(tuned, key=key), key=key):
        group = list(group)
        lines.append(" | ".join(str(v) for v in (
            arch, kernel, dtype, config, len(group), max(r.shared_bytes for r in group),
            max(r.registers for r in group), sum(1 for r in group if r.spill_stores or r.spill_loads),
            max(r.spill_stores for r in group))))
    return "\n".join(lines)


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write(rows: list[Row], out_dir: Path, triton_version: str, tag: str, commit: Optional[str] = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"compile_triton{triton_version}_{tag}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    md_path = out_dir / f"compile_triton{triton_version}_{tag}.md"
    md_path.write_text(
        f"# Compile check: Triton {triton_version} ({tag})\n\n"
        f"`lorafast check --compile` at commit {commit or _commit()}, {time.strftime('%Y-%m-%d')}: "
        f"{len(rows)} compiles with Triton's compiler and its ptxas -v, no GPU. Shared memory is Triton's "
        f"allocation per block; "
        f"the limits are {SMEM_LIMIT['sm_80']} B (A100) and {SMEM_LIMIT['sm_90a']} B (H100/H200).\n\n"
        f"## Per kernel\n\n" + "\n".join(format_summary(rows, triton_version).splitlines()[1:])
        + "\n\n## Autotune configs\n\n" + format_configs(rows) + "\n")
    return [csv_path, md_path]


def _progress(done: int, total: int, row: Row) -> None:
    bar = "#" * (30 * done // total)
    state = "ERROR" if row.error else f"{row.registers} regs"
    print(f"\r  [{bar:<30}] {done}/{total} {row.arch} {row.kernel} {row.dtype} {state}".ljust(100), end="",
          file=sys.stderr, flush=True)
    if done == total:
        print(file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lorafast check --compile", description=__doc__.split("\n\n")[0],
                                 epilog="`make compile-check` runs it with the newest Triton and with the Tritons "
                                        "pinned by CUDA torch; FULL=1 for every variant everywhere")
    ap.add_argument("--arch", action="append", metavar="ARCH[=SWEEP]",
                    help=f"a target ({', '.join(ARCHS)}) and its sweep ({', '.join(SWEEPS)}: every variant; every "
                         f"flag combination and GEMM config; one per kernel and dtype); repeatable; default: "
                         f"both archs, full")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    ap.add_argument("--out", metavar="DIR", help="write the rows (CSV) and the summary (Markdown) here")
    ap.add_argument("--tag", default=None, help="file name tag (default: the sweeps)")
    ap.add_argument("--kernel", metavar="TEXT", help="only the kernels whose name contains TEXT")
    ap.add_argument("--list", action="store_true", help="only list the variants, compile nothing")
    ap.add_argument("--json", action="store_true", help="with --list: one JSON object per variant")
    ap.add_argument("--require-triton", metavar="VERSION",
                    help="fail unless this Triton version is the one imported (a pinned environment took effect)")
    return ap


def parse_plan(specs: Optional[list[str]]) -> dict[str, str]:
    plan = {}
    for spec in specs or list(ARCHS):
        arch, _, sweep = spec.partition("=")
        sweep = sweep or "full"
        if arch not in ARCHS:
            raise ValueError(f"--arch must name one of {list(ARCHS)}, got {arch!r}")
        if sweep not in SWEEPS:
            raise ValueError(f"--arch {arch}=SWEEP: the sweep must be one of {SWEEPS}, got {sweep!r}")
        plan[arch] = sweep
    return plan


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        plan = parse_plan(args.arch)
    except ValueError as e:
        print(f"lorafast check --compile: {e}", file=sys.stderr)
        return 2
    import triton
    if args.require_triton and triton.__version__ != args.require_triton:
        print(f"lorafast check --compile: Triton {args.require_triton} was required but {triton.__version__} "
              f"was imported from {Path(triton.__file__).parent}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton's default; silences 3.9's notice
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    if args.list:
        for arch, sweep in plan.items():
            for launch in select(enumerate_launches(SMS[arch]), sweep):
                if args.kernel and args.kernel not in launch.kernel:
                    continue
                flags, config = launch.labels()
                if args.json:
                    print(json.dumps(dict(arch=arch, kernel=launch.kernel, dtype=launch.dtype, config=config,
                                          constexprs=launch.switches(), case=launch.case)))
                else:
                    print(f"{arch}\t{launch.kernel}\t{launch.dtype}\t{config}\t{flags}\t{launch.case}")
        return 0
    with tempfile.TemporaryDirectory(prefix="lorafast-compile-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache      # really compile: no binaries from an earlier run
        t0 = time.perf_counter()
        print(f"compile check: Triton {triton.__version__} ({Path(triton.__file__).parent}), "
              + ", ".join(f"{a} {s}" for a, s in plan.items()) + f", {args.jobs} jobs", flush=True)
        rows = run(plan, args.jobs, _progress, args.kernel)
        took = time.perf_counter() - t0
    print(format_summary(rows, triton.__version__))
    if args.out:
        tag = args.tag or "_".join(f"{a}-{s}" for a, s in plan.items())
        for path in write(rows, Path(args.out), triton.__version__, tag):
            print(f"wrote {path}")
    errors = [r for r in rows if r.error]
    for r in errors[:20]:
        print(f"COMPILE ERROR {r.arch} {r.kernel} {r.dtype} [{r.config}] {r.flags}: {r.error}", file=sys.stderr)
    print(f"\n{len(rows)} compiles in {took:.0f} s: " + ("all compiled" if not errors else f"{len(errors)} FAILED"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
