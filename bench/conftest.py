"""pytest-benchmark for the benchmark suites:

    pytest bench/ --benchmark-only [--benchmark-json out.json]

bench/test_suites.py times the benchmark scripts' own suites (each script's ``common.Suite``:
its sizes, providers, builders and correctness checks) through pytest-benchmark, so that the
scripts' CSV and pytest-benchmark's JSON come from one set of definitions.

Device and sizes (--bench-device, or LORAFAST_BENCH_DEVICE; default auto): CUDA when a GPU
is present, with the scripts' --quick sizes, or their full sizes with --bench-full (or
LORAFAST_BENCH_FULL=1); otherwise the CPU with the scripts' CPU smoke sizes and providers.

Timing (the ``bench`` fixture). pytest-benchmark times a wall clock, so on CUDA every timed
call ends with torch.cuda.synchronize(): a round is the work itself, not its launch. Before
each round, untimed, the given leaves' .grad are set to None and, on CUDA, the L2 cache is
flushed and the device synchronised, as triton.testing.do_bench does for the CSV. Being wall
clock, the times include the launch and synchronisation latency that do_bench's CUDA events
leave out (a few µs per call; it matters only for the smallest kernels). Rounds: on CUDA, enough
for --benchmark-max-time (at least --benchmark-min-rounds, at most MAX_GPU_ROUNDS) after
about a tenth of that in warm-up rounds; on the CPU, CPU_ROUNDS after CPU_WARMUP_ROUNDS (smoke runs).
Each benchmark's extra_info holds the CSV row it stands for: kernel, provider, mode,
metric, unit, x_name, x_value, y_p50/y_p20/y_p80 (ms), gpu_name, torch/triton versions,
commit; plus what a derived metric needs (bytes_moved, flops, tokens).
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # the scripts and `common`, however pytest imports this file
    sys.path.insert(0, str(BENCH_DIR))

import lorafast  # noqa: E402  (before triton: on a CPU-only machine it switches Triton to its interpreter)
import common  # noqa: E402

DEVICES = ("auto", "cuda", "cpu")
CPU_ROUNDS, CPU_WARMUP_ROUNDS = 3, 1  # smoke runs: the whole CPU suite stays well under a minute
MAX_GPU_ROUNDS = 10_000
GPU_WARMUP_FRACTION = 0.1             # of --benchmark-max-time
GPU_ESTIMATE_CALLS = 3                # untimed calls that size the rounds (first-call compilation included)
L2_FLUSH_BYTES = 256 * 10 ** 6        # what do_bench zeroes before each run


# ------------------------------------------------------------------ options: device and sizes


def pytest_addoption(parser):
    group = parser.getgroup("lorafast-bench", "lorafast benchmark suites (bench/test_suites.py)")
    group.addoption("--bench-device", default=os.environ.get("LORAFAST_BENCH_DEVICE", "auto"),
                    help="auto (CUDA when present, else the CPU smoke sizes), cuda or cpu; "
                         "default $LORAFAST_BENCH_DEVICE or auto")
    group.addoption("--bench-full", action="store_true", default=os.environ.get("LORAFAST_BENCH_FULL") == "1",
                    help="on CUDA, the scripts' full sizes instead of their --quick ones "
                         "(default: set when LORAFAST_BENCH_FULL=1)")


def pytest_configure(config):
    """Resolves --bench-device to cuda or cpu, and sets ``bench_sizes`` (cpu, quick or full),
    which bench/test_suites.py reads to pick each script's shape list."""
    want = config.getoption("bench_device")
    if want not in DEVICES:
        raise pytest.UsageError(f"--bench-device / LORAFAST_BENCH_DEVICE: {want!r} is not one of {DEVICES}")
    if want == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA GPU is present")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    config.option.bench_device = device
    config.option.bench_sizes = "cpu" if device == "cpu" else "full" if config.getoption("bench_full") else "quick"


def pytest_report_header(config):
    device, sizes = config.getoption("bench_device"), config.getoption("bench_sizes")
    name = common.device_name(torch.device(device))
    note = " (CPU smoke sizes: the numbers say nothing about GPU performance)" if device == "cpu" else ""
    return f"lorafast {lorafast.__version__} bench: device {device} ({name}), sizes {sizes}{note}"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return torch.device(pytestconfig.getoption("bench_device"))


@pytest.fixture(scope="session")
def bench_env(bench_device) -> dict:
    """The CSV's per-run columns: gpu_name, torch_version, triton_version, commit."""
    return common.env_info(bench_device)


@pytest.fixture
def one_cpu_thread(bench_device):
    """One CPU thread for the test, as the scripts' CPU smoke mode sets (common.open_device)."""
    if bench_device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(device: str) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)


class SyncedBenchmark:
    """pytest-benchmark's ``benchmark`` with CUDA-synchronised rounds, .grad reset between
    rounds, and the CSV row's labels and quantiles in ``extra_info`` (see the module docstring)."""

    def __init__(self, benchmark, device: torch.device, env: dict, config):
        self.benchmark, self.device, self.env, self.config = benchmark, device, env, config

    def __call__(self, fn: Callable[[], object], *, kernel: str, provider: str, mode: str, x_value: str,
                 x_name: str = "shape", grads: Iterable[torch.Tensor] = (), **extra):
        bm = self.benchmark
        cuda = self.device.type == "cuda"
        grads = list(grads)
        flush = _l2_flush_buffer(str(self.device)) if cuda else None
        bm.group = f"{kernel} {mode} {x_value}"  # the providers of one case side by side
        bm.extra_info.update(kernel=kernel, provider=provider, mode=mode, x_name=x_name, x_value=x_value,
                             gpu_name=self.env["gpu_name"],
                             timing="wall clock, torch.cuda.synchronize() after each call" if cuda
                             else "wall clock (CPU smoke sizes)", **extra)

        def setup():
            for t in grads:
                t.grad = None
            if cuda:
                flush.zero_()
                torch.cuda.synchronize(self.device)

        def timed():
            out = fn()
            if cuda:
                torch.cuda.synchronize(self.device)
            return out

        if cuda and bm.enabled:
            rounds, warmup = self._gpu_rounds(setup, timed)
        else:
            rounds, warmup = CPU_ROUNDS, CPU_WARMUP_ROUNDS
        result = bm.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
        if bm.stats:  # None or empty with --benchmark-disable
            q = common._quantiles([t * 1e3 for t in bm.stats.stats.data])
            row = common.row(kernel, provider, mode, "time", "ms", x_name, x_value, q, self.env)
            bm.extra_info.update({k: float(v) if k.startswith("y_") else v for k, v in row.items()})
        return result

    def _gpu_rounds(self, setup, timed) -> tuple[int, int]:
        """(rounds, warm-up rounds) for --benchmark-max-time, from a few untimed calls."""
        times = []
        for _ in range(GPU_ESTIMATE_CALLS):
            setup()
            t0 = time.perf_counter()
            timed()
            times.append(time.perf_counter() - t0)
        per_call = max(min(times), 1e-7)
        max_time = float(self.config.getoption("benchmark_max_time"))
        min_rounds = int(self.config.getoption("benchmark_min_rounds"))
        rounds = max(min_rounds, min(MAX_GPU_ROUNDS, math.ceil(max_time / per_call)))
        warmup = max(1, min(math.ceil(GPU_WARMUP_FRACTION * max_time / per_call),
                            math.ceil(GPU_WARMUP_FRACTION * rounds)))
        return rounds, warmup


@pytest.fixture
def bench(benchmark, bench_device, bench_env, pytestconfig) -> SyncedBenchmark:
    """``bench(fn, kernel=..., provider=..., mode=..., x_value=..., grads=[...])`` times ``fn``
    (see SyncedBenchmark) and returns its last result."""
    return SyncedBenchmark(benchmark, bench_device, bench_env, pytestconfig)
