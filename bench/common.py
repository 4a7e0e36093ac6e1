"""Helpers shared by the benchmarks: timing, the CSV schema, machine info, roofline numbers.

Triton is imported lazily: on a machine without CUDA, lorafast must be imported
first so that it can switch Triton to its interpreter before Triton loads.
"""
from __future__ import annotations

import argparse
import csv
import gc
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value",
               "y_p50", "y_p20", "y_p80", "gpu_name", "torch_version", "triton_version", "commit")
QUANTILES = (0.5, 0.2, 0.8)  # the order of y_p50, y_p20, y_p80

try:
    from tqdm import tqdm as _tqdm
except ImportError:
    _tqdm = None


# ------------------------------------------------------------------ device housekeeping


def free(device: torch.device) -> None:
    """Release what the previous case left, so that the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ progress output


def progress(items: Sequence, desc: str) -> Iterable:
    """A progress bar over ``items`` when tqdm is installed, else the items as they are."""
    return _tqdm(items, desc=desc) if _tqdm is not None else items


def log(msg: str) -> None:
    """Print without breaking a running progress bar."""
    if _tqdm is not None:
        _tqdm.write(msg)
    else:
        print(msg, flush=True)


def banner(msg: str) -> None:
    """A message that must not be missed in a long log."""
    line = "=" * max(60, len(msg))
    log(f"{line}\n{msg}\n{line}")


def format_rows(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A left-aligned text table with a rule under the header."""
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*cells) for cells in lines])


def parse_cli(argv, doc: str, kernel: str, quick_help: str, providers: Sequence[str], providers_help: str,
              table: bool = False):
    """The options every benchmark script shares: --quick, --out, --device, --providers; with
    ``table``, also --table (where to record the measured backend choice, lorafast/_selection.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if table:
        ap.add_argument("--table", type=Path, default=None,
                        help="backend table to record the faster of triton/cuda into (default: the user's)")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"CSV path (default bench/results/{kernel}_<gpu>.csv)")
    ap.add_argument("--providers", nargs="+", choices=providers, default=None, help=providers_help)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a tiny smoke run with wall-clock timing, for testing the script")
    return ap.parse_args(argv)


def no_gpu_banner(device: str, what: str) -> bool:
    """True (after a banner) when CUDA was asked for and there is none."""
    if device == "cpu" or torch.cuda.is_available():
        return False
    banner("NO CUDA GPU IS PRESENT: nothing was timed.\n"
           f"Pass --device cpu for the CPU smoke mode ({what}, not a performance number).")
    return True


def default_providers(providers: Sequence[str], cuda_provider: str, device: torch.device) -> list[str]:
    """``providers`` as a default list: the CUDA-backend provider only on a GPU."""
    return [p for p in providers if device.type == "cuda" or p != cuda_provider]


def drop_unusable_cuda(wanted: list[str], cuda_provider: str, device: torch.device, lost: str) -> list[str]:
    """``wanted`` without ``cuda_provider`` (after a banner saying why and that ``lost`` is
    lost) when lorafast's CUDA backend cannot run on ``device``."""
    if cuda_provider not in wanted:
        return wanted
    from lorafast import _backend
    ok, why = _backend.cuda_status()
    if ok and device.type != "cuda":
        ok, why = False, f"--device {device.type}: backend='cuda' needs CUDA tensors"
    if ok:
        return wanted
    banner(f"THE CUDA BACKEND IS NOT AVAILABLE ({why}).\nProvider `{cuda_provider}` is skipped: {lost}.")
    return [p for p in wanted if p != cuda_provider]


def open_device(device: str, smoke_what: str, smoke_banner: str, one_thread: bool = True) -> Optional[torch.device]:
    """The device to run on, or None (after the no-GPU banner) when CUDA was asked for and there
    is none. On the CPU, the smoke-mode banner, and one thread when ``one_thread``: at these
    sizes more threads only add spinning, which on a shared machine turns ms into seconds."""
    if no_gpu_banner(device, smoke_what):
        return None
    if device == "cpu":
        banner(f"CPU SMOKE MODE: {smoke_banner}\nThese numbers say nothing about GPU performance.")
        if one_thread:
            torch.set_num_threads(1)
    return torch.device(device)


# ------------------------------------------------------------------ machine info


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _version(*dists: str) -> str:
    """The first installed distribution's version (PyTorch nightlies ship Triton as pytorch-triton)."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return "none"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def env_info(device: torch.device) -> dict:
    """The columns that are the same on every row of one run."""
    return {"gpu_name": device_name(device), "torch_version": torch.__version__,
            "triton_version": _version("triton", "pytorch-triton"), "commit": _git_commit()}


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', for file names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_out(kernel: str, device: torch.device) -> Path:
    return RESULTS_DIR / f"{kernel}_{slug(device_name(device))}.csv"


# ------------------------------------------------------------------ CSV


def row(kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str, x_value: str,
        q: Sequence[float], env: dict) -> dict:
    """One CSV row; ``q`` is (p50, p20, p80)."""
    p50, p20, p80 = q
    return {"kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
            "x_name": x_name, "x_value": x_value, "y_p50": f"{p50:.6g}", "y_p20": f"{p20:.6g}",
            "y_p80": f"{p80:.6g}", **env}


def write_csv(path: Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` under the shared schema; a row with missing or extra keys is an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="raise")
        writer.writeheader()
        for r in rows:
            missing = set(CSV_COLUMNS) - r.keys()
            if missing:
                raise ValueError(f"CSV row lacks {sorted(missing)}: {r}")
            writer.writerow(r)
    return path


# ------------------------------------------------------------------ timing


def _quantiles(times: Sequence[float], qs: Sequence[float] = QUANTILES) -> list[float]:
    """Linear-interpolation quantiles, as torch.quantile (and so do_bench) computes them."""
    return torch.quantile(torch.tensor(times, dtype=torch.float64),
                          torch.tensor(qs, dtype=torch.float64)).tolist()


def bench_cuda(fn: Callable[[], object], grad_to_none: Optional[list] = None,
               warmup_ms: int = 100, rep_ms: int = 500) -> list[float]:
    """(p50, p20, p80) ms of ``fn`` with CUDA events, L2 flushed before each run."""
    from triton.testing import do_bench
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES),
                         grad_to_none=grad_to_none))


def bench_cpu(fn: Callable[[], object], grad_to_none: Optional[list] = None,
              warmup: int = 3, reps: int = 25) -> list[float]:
    """(p50, p20, p80) ms of ``fn`` with a wall clock; for smoke runs, not for numbers to report."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def bench(fn: Callable[[], object], device: torch.device, grad_to_none: Optional[list] = None) -> list[float]:
    return bench_cuda(fn, grad_to_none) if device.type == "cuda" else bench_cpu(fn, grad_to_none)


def time_train_step(step: Callable[[], object], device: torch.device, quick: bool, *, max_rep_ms: int = 30_000,
                    cpu_warmup: int = 3, cpu_reps: int = 25) -> list[float]:
    """(p50, p20, p80) ms of a whole training step. On a GPU the repetitions are sized from a
    rough estimate, so that even a slow provider gets a few tens of timed steps (10 with quick)."""
    if device.type != "cuda":
        return bench_cpu(step, warmup=cpu_warmup, reps=cpu_reps)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync(device)
    est_ms = (time.perf_counter() - t0) * 1e3 / 3
    n = 10 if quick else 30
    return bench_cuda(step, warmup_ms=max(100, int(3 * est_ms)), rep_ms=min(max_rep_ms, max(1_000, int(n * est_ms))))


def cuda_peak_mb(step: Callable[[], object], device: torch.device, steps: int = 3) -> list[float]:
    """(p50, p20, p80) of torch.cuda.max_memory_allocated over one step, in MB (2**20 bytes)."""
    peaks = []
    for _ in range(steps):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        peaks.append(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    return _quantiles(peaks)


# ------------------------------------------------------------------ roofline


def _rate(q_ms: Sequence[float], amount: float) -> list[float]:
    """Time quantiles (p50, p20, p80) -> rate quantiles (p50, p20, p80) of amount/s.
    A slow run is a low rate, so the time's p80 gives the rate's p20."""
    p50, p20, p80 = q_ms
    return [amount / (t * 1e-3) for t in (p50, p80, p20)]


def _copy_ms(nbytes: int, device: torch.device) -> list[float]:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), device)


def _gemm_ms(n: int, device: torch.device) -> list[float]:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return bench(lambda: torch.mm(a, b), device)


def roofline(device: torch.device) -> dict:
    """Measured copy bandwidth (GB/s, bytes read + written) and bf16 GEMM rate (TFLOP/s).

    Each entry is {"unit", "x_value": what was run, "q": (p50, p20, p80)}. Measured in the
    same run as the kernels, so that their times can be read against this machine's ceilings.
    """
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (16 << 20)  # 1 GiB dwarfs any L2; CPU sizes are for smoke runs
    n = 8192 if cuda else 128
    return {
        "bandwidth": {"unit": "GB/s", "x_value": f"copy_bytes={nbytes}",
                      "q": [v / 1e9 for v in _rate(_copy_ms(nbytes, device), 2.0 * nbytes)]},
        "tflops": {"unit": "TFLOP/s", "x_value": f"M={n},N={n},K={n},dtype=bf16",
                   "q": [v / 1e12 for v in _rate(_gemm_ms(n, device), 2.0 * n ** 3)]},
    }


def roofline_rows(kernel: str, rl: dict, env: dict) -> list[dict]:
    return [row(kernel, "roofline", "-", metric, d["unit"], "shape", d["x_value"], d["q"], env)
            for metric, d in rl.items()]


def format_roofline(rl: dict) -> str:
    bw, tf = rl["bandwidth"]["q"][0], rl["tflops"]["q"][0]
    return f"roofline: copy bandwidth {bw:,.4g} GB/s, bf16 GEMM {tf:,.4g} TFLOP/s (p50)"
