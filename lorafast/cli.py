"""The ``lorafast`` command (also ``python -m lorafast``).

    lorafast check [--json PATH]          every op on every usable backend against float64
    lorafast check --compile [--arch A]   every Triton kernel variant compiled for sm_80/sm_90a (no GPU)
    lorafast bench [SUITE ...] [--quick]  the GPU benchmark suites of a source checkout (bench/), CSVs and tables
    lorafast plot RESULTS.csv ...         speedup-vs-size charts (PNG), one per kernel
    lorafast env                          versions, the GPU, which backends work and why not
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

SUITES = {"lora": "bench_lora_linear.py", "dp": "bench_dp.py", "federated": "bench_federated.py",
          "model": "bench_model.py", "multi": "bench_multi.py", "noise": "bench_noise.py", "qlora": "bench_qlora.py"}
# The suites are a source-checkout tool: they live in the repository's bench/, beside an editable
# install, and are not part of the wheel. ``lorafast plot`` (lorafast/plot.py) ships and reads their CSVs.
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


# ------------------------------------------------------------------ check


def _progress(done: int, total: int, row) -> None:
    bar = "#" * (30 * done // total)
    print(f"\r  [{bar:<30}] {done}/{total} {row.op} {row.backend} {row.dtype}".ljust(90), end="",
          file=sys.stderr, flush=True)
    if done == total:
        print(file=sys.stderr)


def compile_check(argv: list[str]) -> int:
    """``lorafast check --compile [options]``: lorafast.compile_check in a child process with the
    interpreter off. On a CPU-only machine this process's kernels are interpreted, and Triton's
    compiler needs the real JIT functions. The options are compile_check's own (--help)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "lorafast.compile_check", *argv], env=env).returncode


def check(args: argparse.Namespace) -> int:
    from . import validate
    t0 = time.perf_counter()
    rows = validate.run_checks(None if args.json == "-" else _progress)
    failed = [r for r in rows if not r.ok]
    if args.json:
        payload = json.dumps([dict(dataclasses.asdict(r), verdict="ok" if r.ok else "FAIL") for r in rows], indent=1)
        if args.json == "-":
            print(payload)
            return 1 if failed else 0
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(payload + "\n")
    print(validate.format_table(rows))
    took = time.perf_counter() - t0
    if failed:
        print(f"\n{len(failed)} of {len(rows)} kernel checks FAILED ({took:.1f} s)", file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} kernel checks passed ({took:.1f} s) on backends "
          f"{', '.join(sorted({r.backend + '/' + r.device for r in rows}))}")
    return 0


# ------------------------------------------------------------------ env


def _nvcc_version() -> Optional[str]:
    from ._cuda import nvcc_path
    nvcc = nvcc_path()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{nvcc} (does not run)"
    release = next((line.split("release")[1].split(",")[0].strip() for line in out.splitlines()
                    if "release" in line), "?")
    return f"{release} at {nvcc}"


def _version(module: str) -> str:
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as e:   # a broken install raises more than ImportError
        return f"not importable ({type(e).__name__})"


def env_lines() -> list[str]:
    import lorafast
    from . import _backend, _selection
    lines = [f"lorafast {lorafast.__version__}, python {platform.python_version()} ({platform.platform()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {_version('triton')}"]
    for name in ("peft", "transformers", "opacus", "flwr", "dp_accounting"):
        lines.append(f"  {name}: {_version(name)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("GPU: none visible (torch.cuda.is_available() is False)")
    nvcc = _nvcc_version()
    lines.append(f"nvcc: {nvcc or 'not found (set CUDA_HOME or install the CUDA toolkit)'}; "
                 f"ninja: {'found' if shutil.which('ninja') else 'not found'}")
    lines.append("backends:")
    lines.append("  torch   available: the float64-capable reference (lorafast/reference.py)")
    for name in _backend.BACKENDS[1:]:
        usable, why = _backend.backend_status(name)
        lines.append(f"  {name:<7} {'available' if usable else 'unavailable'}: {why}")
    table = _selection.user_table_path()
    n = _selection.shape_count()
    lines.append(f"measured tables: {n} shape(s) from lorafast/tuning/ and {table}"
                 f"{'' if table.exists() else ' (absent)'}")
    lines += op_paths()
    return lines


# the ops and the size features their choice is made at (the LoRA linear: 4096², r=16, 8192 rows)
# (by registered name; the LoRA linear's backward ops follow its forward's choice)
OP_SHAPES = {"lora_linear_fwd": (8192, 4096, 4096, 16), "grad_sample_norms": None, "clip_reduce_noise": None,
             "fedex_merge_": None, "privatize": (2**24,)}


def op_paths() -> list[str]:
    """Which backend each op takes here (bf16 on the GPU when there is one) and why."""
    from . import _backend
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines = [f"each op's path ({str(dtype).removeprefix('torch.')} tensors on {device}; the LoRA linear at "
             f"(M, in, out, r) = {OP_SHAPES['lora_linear_fwd']}):"]
    for op, shape in OP_SHAPES.items():
        op_dtype = torch.float32 if op in ("grad_sample_norms", "clip_reduce_noise") else dtype
        try:
            name, why = _backend.choose(op, device, op_dtype, None, shape)
        except (ValueError, RuntimeError) as e:
            name, why = "error", str(e)
        lines.append(f"  {op:<18} {name:<7} {why}")
    return lines


def env(args: argparse.Namespace) -> int:
    print("\n".join(env_lines()))
    return 0


# ------------------------------------------------------------------ bench


def _load_suite(script: str):
    """The suite's script as a module. It is registered in sys.modules before it runs, as an
    import would do: dataclasses (and pickling) look a class's module up there."""
    name = f"lorafast_bench_{Path(script).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def bench(args: argparse.Namespace) -> int:
    if not BENCH_DIR.is_dir():
        print(f"lorafast bench: the benchmark suites ship with the source checkout (bench/), not found at "
              f"{BENCH_DIR}; clone the repository and install it with `pip install -e .`", file=sys.stderr)
        return 2
    suites = list(SUITES) if "all" in args.suites else list(dict.fromkeys(args.suites))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick
    if device == "cpu":
        quick = True
        print("=" * 78 + "\nNO CUDA GPU: running only the quick CPU sizes. These are CPU timings (smoke runs), "
              "not GPU performance.\n" + "=" * 78)
    status = 0
    for i, suite in enumerate(suites, 1):
        print(f"\n[{i}/{len(suites)}] lorafast bench {suite} ({SUITES[suite]}, device {device}"
              f"{', quick' if quick else ''})", flush=True)
        argv = ["--device", device] + (["--quick"] if quick else [])
        if args.out is not None:
            argv += ["--out", str(Path(args.out) / f"{suite}_{device}.csv")]
        code = _load_suite(SUITES[suite]).main(argv)
        if code:
            print(f"lorafast bench {suite}: exit status {code}", file=sys.stderr)
            status = status or code
    return status


# ------------------------------------------------------------------ plot


def plot(args: argparse.Namespace) -> int:
    from .plot import plot_results
    for path in plot_results(args.csv, args.out):
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------ entry point


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lorafast", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate every kernel on this machine against float64")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-': JSON only, to stdout)")
    p.add_argument("--compile", action="store_true",
                   help="instead, compile every Triton kernel variant for sm_80 and sm_90a with Triton's own "
                        "compiler (no GPU needed) and report registers, spills and shared memory; its options: "
                        "`lorafast check --compile --help`")
    p.set_defaults(func=check)
    p = sub.add_parser("bench", help="run the benchmark suites of a source checkout's bench/ (GPU; quick CPU "
                                     "smoke sizes without one; needs the bench extra)")
    p.add_argument("suites", nargs="*", default=["all"], choices=[*SUITES, "all"], metavar="SUITE",
                   help=f"{', '.join(SUITES)} or all (default)")
    p.add_argument("--quick", action="store_true", help="the smallest sizes only")
    p.add_argument("--out", metavar="DIR", help="directory for the CSVs (default bench/results/)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when a GPU is visible")
    p.set_defaults(func=bench)
    p = sub.add_parser("plot", help="speedup-vs-size charts (PNG) from benchmark CSVs")
    p.add_argument("csv", nargs="+", help="results CSV files")
    p.add_argument("--out", metavar="DIR", default=None, help="directory for the PNGs (default: the first CSV's)")
    p.set_defaults(func=plot)
    p = sub.add_parser("env", help="versions, the GPU, and which backends work here (and why not)")
    p.set_defaults(func=env)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"] and "--compile" in argv:
        return compile_check([a for a in argv[1:] if a != "--compile"])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as e:   # bad input, or an optional library missing: say which
        print(f"lorafast {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
