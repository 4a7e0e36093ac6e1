"""The benchmark suites' one skeleton (``Suite``) and the helpers it runs on.

A suite script (bench/bench_*.py) subclasses ``Suite`` and supplies only its sizes, providers,
inputs, builders and checks; ``Suite.main`` does the rest the same way for every suite:

  the command line   --quick, --out, --providers, --device (and --table where the suite
                     records a backend table), plus the suite's own flags
  providers          the default list for the device; a provider whose library or backend
                     is missing (``Needs``, lorafast's CUDA backend) is dropped, or stood in
                     for, after a banner that names why and what the run loses
  check, then time   each provider is built and checked against its reference once per size
                     before any of its modes is timed; a check that fails or a provider that
                     raises is skipped loudly, or fails the run (``Suite.fails_run``)
  one timer          ``bench``: triton.testing.do_bench (CUDA events, L2 flushed, medians
                     after warm-up) on a GPU, a wall clock on the CPU, for every CSV
  rows               time, plus peak memory, roofline fraction (least time the measured
                     roofline allows / measured time) and rates where the suite defines them
  report             the medians per size (with the ratio to the suite's baseline), the
                     ratios between providers with their targets, the CSV, and on a GPU the
                     measured backend table (lorafast/_selection.py)

Triton is imported lazily: on a machine without CUDA, lorafast must be imported
first so that it can switch Triton to its interpreter before Triton loads.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value",
               "y_p50", "y_p20", "y_p80", "gpu_name", "torch_version", "triton_version", "commit")
QUANTILES = (0.5, 0.2, 0.8)  # the order of y_p50, y_p20, y_p80
FORMATS = {"ms": "{:,.4f}", "MB": "{:,.1f}", "tokens/s": "{:,.0f}", "fraction": "{:.2f}", "GB/s": "{:,.4g}"}

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


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def positive(v: str) -> int:
    """An argparse type: a whole number >= 1."""
    if int(v) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return int(v)


def open_device(device: str, smoke_what: str, smoke_banner: str, one_thread: bool = True) -> Optional[torch.device]:
    """The device to run on, or None (after a banner) when CUDA was asked for and there is
    none. On the CPU, the smoke-mode banner, and one thread when ``one_thread``: at these
    sizes more threads only add spinning, which on a shared machine turns ms into seconds."""
    if device != "cpu" and not torch.cuda.is_available():
        banner("NO CUDA GPU IS PRESENT: nothing was timed.\n"
               f"Pass --device cpu for the CPU smoke mode ({smoke_what}, not a performance number).")
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


# ------------------------------------------------------------------ timing: the one timer of every CSV


def _quantiles(times: Sequence[float], qs: Sequence[float] = QUANTILES) -> list[float]:
    """Linear-interpolation quantiles, as torch.quantile (and so do_bench) computes them."""
    return torch.quantile(torch.tensor(times, dtype=torch.float64),
                          torch.tensor(qs, dtype=torch.float64)).tolist()


def bench(fn: Callable[[], object], device: torch.device, grad_to_none: Optional[list] = None, *,
          step: bool = False, quick: bool = False, max_rep_ms: int = 30_000, cpu_warmup: int = 3,
          cpu_reps: int = 25) -> list[float]:
    """(p50, p20, p80) ms of ``fn``, resetting the .grad of ``grad_to_none`` before each run.

    On a GPU: triton.testing.do_bench, CUDA events with the L2 flushed before each run, after
    100 ms of warm-up and over 500 ms; with ``step`` (a whole training step) both are sized
    from a rough estimate of one call, so that even a slow provider gets a few tens of timed
    steps (10 with ``quick``, at most ``max_rep_ms``). On the CPU: a wall clock over
    ``cpu_reps`` calls after ``cpu_warmup``, for smoke runs, not for numbers to report."""
    if device.type != "cuda":
        for _ in range(cpu_warmup):
            fn()
        times = []
        for _ in range(cpu_reps):
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return _quantiles(times)
    from triton.testing import do_bench
    warmup_ms, rep_ms = 100, 500
    if step:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync(device)
        est_ms = (time.perf_counter() - t0) * 1e3 / 3
        warmup_ms = max(100, int(3 * est_ms))
        rep_ms = min(max_rep_ms, max(1_000, int((10 if quick else 30) * est_ms)))
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES), grad_to_none=grad_to_none))


# ------------------------------------------------------------------ roofline


def _rate(q_ms: Sequence[float], amount: float) -> list[float]:
    """Time quantiles (p50, p20, p80) -> rate quantiles (p50, p20, p80) of amount/s.
    A slow run is a low rate, so the time's p80 gives the rate's p20."""
    p50, p20, p80 = q_ms
    return [amount / (t * 1e-3) for t in (p50, p80, p20)]


def fraction(least_ms: float, q_ms: Sequence[float]) -> list[float]:
    """Roofline fraction quantiles: least possible time over the measured one (a slow run is a low fraction)."""
    return [least_ms / t for t in (q_ms[0], q_ms[2], q_ms[1])]


def _copy_ms(nbytes: int, device: torch.device) -> list[float]:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), device)


def _gemm_ms(n: int, device: torch.device, dtype: torch.dtype) -> list[float]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return bench(lambda: torch.mm(a, b), device)


def roofline(device: torch.device, gemms: Sequence[str] = ("bf16",)) -> dict:
    """Measured copy bandwidth (GB/s, bytes read + written) and GEMM rates (TFLOP/s): bf16 under
    "tflops", any other of ``gemms`` (fp32, with torch's TF32 switch) under "tflops_<dtype>".

    Each entry is {"name", "metric", "unit", "x_value": what was run, "q": (p50, p20, p80)}.
    Measured in the same run as the kernels, so that their times can be read against this
    machine's ceilings."""
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (16 << 20)  # 1 GiB dwarfs any L2; CPU sizes are for smoke runs
    n = 8192 if cuda else 128
    rl = {"bandwidth": {"name": "copy bandwidth", "metric": "bandwidth", "unit": "GB/s",
                        "x_value": f"copy_bytes={nbytes}",
                        "q": [v / 1e9 for v in _rate(_copy_ms(nbytes, device), 2.0 * nbytes)]}}
    for dt in gemms:
        tf32 = dt == "fp32" and cuda and torch.backends.cuda.matmul.allow_tf32
        q = _gemm_ms(n, device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dt])
        rl["tflops" if dt == "bf16" else f"tflops_{dt}"] = {
            "name": f"{dt} GEMM", "metric": "tflops", "unit": "TFLOP/s",
            "x_value": f"M={n},N={n},K={n},dtype={dt}" + (",tf32=on" if tf32 else ""),
            "q": [v / 1e12 for v in _rate(q, 2.0 * n ** 3)]}
    return rl


def roofline_rows(kernel: str, rl: dict, env: dict) -> list[dict]:
    return [row(kernel, "roofline", "-", d["metric"], d["unit"], "shape", d["x_value"], d["q"], env)
            for d in rl.values()]


def format_roofline(rl: dict) -> str:
    return "roofline (p50): " + ", ".join(f"{d['name']} {d['q'][0]:,.4g} {d['unit']}" for d in rl.values())


# ------------------------------------------------------------------ the skeleton's parts


class CheckFailed(RuntimeError):
    """A provider's output disagrees with its reference: it is not timed."""


def check_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """The relative error of ``got`` against ``want``; CheckFailed above ``tol`` (or NaN)."""
    from lorafast.validate import rel_err
    err = rel_err(got, want)
    if not err <= tol:  # also catches NaN
        raise CheckFailed(f"rel. error {err:.3g} > {tol:g}")
    return err


def import_status(*modules: str) -> tuple[bool, str]:
    """(importable, the top-level modules' versions or why not) of ``modules``."""
    try:
        mods = [importlib.import_module(m) for m in modules]
    except Exception as e:  # a broken install raises more than ImportError
        return False, f"{type(e).__name__}: {e}"
    return True, ", ".join(f"{m.__name__} {getattr(m, '__version__', 'unknown version')}" for m in mods
                           if "." not in m.__name__) or "ok"


def cuda_status(device: torch.device) -> tuple[bool, str]:
    """(usable, why not) for lorafast's CUDA backend on ``device``."""
    from lorafast import _backend
    ok, why = _backend.cuda_status()
    if ok and device.type != "cuda":
        return False, f"--device {device.type}: backend='cuda' needs CUDA tensors"
    return ok, why


@dataclass(frozen=True)
class LayerShape:
    """One adapted linear layer's size: features in and out, rank, tokens N."""
    in_f: int
    out_f: int
    r: int
    n: int

    @property
    def label(self) -> str:
        return f"in={self.in_f},out={self.out_f},r={self.r},N={self.n}"


@dataclass(frozen=True)
class Needs:
    """Providers that need a library or backend. Where ``status()`` says it is missing they are
    dropped, or ``instead`` stands in for them, after a banner naming why and what is lost."""
    what: str                                 # as the banner names it, e.g. "THE CUDA BACKEND"
    providers: tuple[str, ...]
    status: Callable[[], tuple[bool, str]]    # (usable, version or why not)
    lost: str                                 # what a run without them lacks
    found: Optional[str] = None               # a banner where it is usable; {info} is the version
    instead: Optional[str] = None

    def apply(self, wanted: list[str]) -> list[str]:
        hit = [p for p in wanted if p in self.providers]
        if not hit:
            return wanted
        ok, info = self.status()
        if ok:
            if self.found:
                banner(self.found.format(info=info))
            return wanted
        names = ", ".join(f"`{p}`" for p in hit)
        whom = (f"`{self.instead}` stands in for {names}" if self.instead else
                f"Provider {names} is skipped" if len(hit) == 1 else f"Providers {names} are skipped")
        banner(f"{self.what} IS NOT AVAILABLE ({info}).\n{whom}: {self.lost}.")
        if self.instead:
            return list(dict.fromkeys(self.instead if p in hit else p for p in wanted))
        return [p for p in wanted if p not in hit]


@dataclass
class Case:
    """One provider built on one size. ``fn`` is its first, checked, call and what one timed
    run does, unless the suite's ``check`` and ``timed`` say otherwise."""
    provider: str
    fn: Callable
    grads: list = field(default_factory=list)  # leaves whose .grad is reset between timed runs
    state: Any = None                          # what the suite's own hooks read
    err: Optional[float] = None                # the check's relative error, where it measures one


@dataclass(frozen=True)
class Ratio:
    """``num``'s p50 of ``metric`` over ``den``'s (``den`` None: ``num``'s value itself), on every
    row of the medians; with a ``target``, judged (``at_most`` or at least) in the rows of
    ``mode`` at size ``at`` (None: all)."""
    num: str
    den: Optional[str] = None
    metric: str = "time"
    target: Optional[float] = None
    at_most: bool = True
    mode: Optional[str] = None
    at: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.num}/{self.den} {self.metric}" if self.den else f"{self.num} {self.metric}"

    def _bound(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.target:g}{'x' if self.den else ''}"

    @property
    def goal(self) -> str:
        return self._bound() + "".join(f" {w}" for w in (self.mode, self.at and f"at {self.at}") if w)

    def value(self, by: dict) -> Optional[float]:
        a = by.get(self.num, {}).get(self.metric)
        if self.den is None:
            return a
        b = by.get(self.den, {}).get(self.metric)
        return a / b if a is not None and b else None

    def judged(self, label: str, mode: str) -> bool:
        return self.target is not None and self.mode in (None, mode) and self.at in (None, label)

    def met(self, value: float) -> bool:
        return value <= self.target if self.at_most else value >= self.target

    def cell(self, value: Optional[float], judged: bool) -> str:
        if value is None:
            return "-"
        shown = f"{value:.3g}{'x' if self.den else ''}"
        return f"{shown} ({'met' if self.met(value) else 'MISSED'}: {self._bound()})" if judged else shown


_NO_INPUTS = object()  # the size's inputs did not fit: nothing runs on it


# ------------------------------------------------------------------ the skeleton


class Suite:
    """One benchmark suite: what a script declares (the capitalised attributes) and supplies
    (the hooks below ``run``), and the run that is the same for every suite (see the module
    docstring). ``x`` is one size (a shape or config) and ``label(x)`` its CSV x_value."""
    KERNEL: str = ""
    X_NAME = "shape"
    MODES: tuple[str, ...] = ("-",)
    PROVIDERS: tuple[str, ...] = ()                # every provider --providers accepts
    GPU_PROVIDERS: Optional[tuple[str, ...]] = None  # the GPU default (None: PROVIDERS)
    CPU_PROVIDERS: Optional[tuple[str, ...]] = None  # the CPU default (None: the GPU one less CUDA_PROVIDER)
    PROVIDERS_NOTE = ""
    CUDA_PROVIDER: Optional[str] = None            # on lorafast's CUDA backend: dropped loudly where it cannot run
    CUDA_LOST = "no CUDA rows"
    SIZES: dict = {}                               # "cpu", "quick", "full": the sizes each run times
    QUICK_HELP = ""
    SMOKE_WHAT, SMOKE = "tiny sizes", "tiny sizes, wall-clock timing."  # the CPU smoke mode, in the banners
    ONE_THREAD = True
    TIMING: dict = {}                              # bench()'s keywords
    ROOFLINE_GEMMS: tuple[str, ...] = ()           # measure the roofline (copy + these GEMMs) when set
    CELLS: tuple[str, ...] = ("time",)             # the metrics in the medians table
    BASELINE: Optional[str] = None                 # the provider each time cell is compared with
    PERCENT = False                                # that comparison as BASELINE's time in % of the cell's
    RECORD_OP: Optional[str] = None                # the backend table's op (--table), on a GPU
    RECORD_BACKENDS: tuple[str, ...] = ()
    OOM_HINT = ""

    def __init__(self, device: torch.device, args: Optional[argparse.Namespace] = None, sizes: Optional[str] = None):
        self.args = args if args is not None else self.parser().parse_args([])
        self.device, self.cpu, self.quick = device, device.type == "cpu", self.args.quick
        self.sizes = self.size_list(sizes or ("cpu" if self.cpu else "quick" if self.quick else "full"))
        self.env = env_info(device)
        self.providers = list(self.default_providers(self.cpu))
        self.rl: Optional[dict] = None
        self.rows: list[dict] = []
        self.p50: dict = {}       # (label, mode) -> provider -> metric -> p50
        self.unit_of: dict = {}   # metric -> unit
        self.xs: dict = {}        # label -> x
        self.failed: list[str] = []
        self._inputs_key, self._inputs_value = None, None

    # -------------------------------------------------------------- the command line

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        if cls.RECORD_OP:
            ap.add_argument("--table", type=Path, default=None,
                            help="backend table to record the fastest lorafast backend into (default: the user's)")
        ap.add_argument("--quick", action="store_true", help=cls.QUICK_HELP)
        ap.add_argument("--out", type=Path, default=None,
                        help=f"CSV path (default bench/results/{cls.KERNEL}_<gpu>.csv)")
        ap.add_argument("--providers", nargs="+", choices=cls.PROVIDERS, default=None,
                        help=f"default: {' '.join(cls.default_providers(False))} (with --device cpu: "
                             f"{' '.join(cls.default_providers(True))}){cls.PROVIDERS_NOTE}")
        ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a tiny smoke run with wall-clock timing, for testing the script")
        cls.add_arguments(ap)
        return ap

    @classmethod
    def default_providers(cls, cpu: bool) -> tuple[str, ...]:
        gpu = cls.GPU_PROVIDERS or cls.PROVIDERS
        return tuple(cls.CPU_PROVIDERS or [p for p in gpu if p != cls.CUDA_PROVIDER]) if cpu else tuple(gpu)

    @classmethod
    def main(cls, argv: Optional[list[str]] = None) -> int:
        args = cls.parser().parse_args(argv)
        device = open_device(args.device, cls.SMOKE_WHAT, cls.SMOKE, cls.ONE_THREAD)
        return 0 if device is None else cls(device, args).run()

    # -------------------------------------------------------------- providers

    def all_needs(self) -> list[Needs]:
        cuda = [Needs("THE CUDA BACKEND", (self.CUDA_PROVIDER,), lambda: cuda_status(self.device), self.CUDA_LOST)]
        return self.needs() + (cuda if self.CUDA_PROVIDER else [])

    def resolve_providers(self, requested: Optional[Sequence[str]] = None) -> list[str]:
        """The requested (or default) providers, less those that cannot run here (loudly)."""
        wanted = list(dict.fromkeys(requested or self.default_providers(self.cpu)))
        for need in self.all_needs():
            wanted = need.apply(wanted)
        return wanted

    def missing(self, provider: str) -> Optional[str]:
        """Why ``provider`` cannot run here (None: it can), without a banner."""
        for need in self.all_needs():
            if provider in need.providers:
                ok, info = need.status()
                if not ok:
                    return f"{need.what} IS NOT AVAILABLE ({info})"
        return None

    # -------------------------------------------------------------- the run

    def run(self) -> int:
        ok, why = self.requires()
        if not ok:
            banner(why)
            return 1
        self.providers = self.resolve_providers(self.args.providers)
        e = self.env
        import lorafast
        log(" | ".join([f"device {e['gpu_name']}", f"torch {e['torch_version']}", f"triton {e['triton_version']}",
                        f"lorafast {lorafast.__version__}", f"commit {e['commit']}", *self.header_extra(),
                        f"providers {' '.join(self.providers)}"]))
        code = self.prepare()
        if code is not None:
            return code
        if self.ROOFLINE_GEMMS:
            self.rl = roofline(self.device, self.ROOFLINE_GEMMS)
            log(format_roofline(self.rl))
            self.rows += roofline_rows(self.KERNEL, self.rl, self.env)
        work = [(x, p, modes) for x in self.sizes for p, modes in self.units(self.providers)]
        self._width = max(len(self.label(x)) for x in self.sizes)
        for x, provider, modes in progress(work, desc=self.KERNEL):
            self.run_unit(x, provider, modes)
        self._inputs_key = self._inputs_value = None
        free(self.device)
        self.rows += self.derived_rows()
        out = write_csv(self.args.out or default_out(self.KERNEL, self.device), self.rows)
        self.report()
        if self.RECORD_OP and not self.cpu:
            self.record_backends()
        if self.rl:
            print(format_roofline(self.rl))
        print(f"wrote {len(self.rows)} rows to {out}")
        if self.failed:
            banner("FAILED: " + "; ".join(self.failed))
            return 1
        return 0

    def inputs_for(self, x) -> Any:
        """The size's inputs, built once for all its providers (the previous size's are released)."""
        label = self.label(x)
        if self._inputs_key != label:
            self._inputs_value = None
            free(self.device)
            self.xs[label] = x
            try:
                self._inputs_value = self.inputs(x)
            except torch.cuda.OutOfMemoryError as e:
                banner(f"OUT OF MEMORY building {label}: no rows.\n{first_line(e)}")
                self._inputs_value = _NO_INPUTS
            self._inputs_key = label
        return self._inputs_value

    def ready(self, provider: str, x, inputs, modes: Sequence[str]) -> Case:
        """Build ``provider`` on ``x`` and check it (CheckFailed, or what it raised)."""
        case = self.build(provider, x, inputs, modes)
        case.err = self.check(case, x, inputs)
        return case

    def measure(self, case: Case, x, inputs, mode: str) -> list[tuple[str, str, list[float]]]:
        """(metric, unit, (p50, p20, p80)) of one mode: peak memory where the suite measures it,
        time, roofline fraction where there is a roofline time, and the suite's rates."""
        out = []
        q = self.memory(case, mode)
        if q is not None:
            out.append(("peak_memory", "MB", q))
        q = bench(self.timed(case, mode, inputs), self.device, case.grads or None, quick=self.quick, **self.TIMING)
        out.append(("time", "ms", q))
        least = self.roofline_ms(x, mode) if self.rl else None
        if least is not None:
            out.append(("roofline_fraction", "fraction", fraction(least, q)))
        return out + [(metric, unit, _rate(q, amount)) for metric, unit, amount in self.rates(x, mode, inputs)]

    def run_unit(self, x, provider: str, modes: Sequence[str]) -> None:
        """Check, then time, one provider on one size: its rows, its p50s and its log line."""
        label, inputs = self.label(x), self.inputs_for(x)
        if inputs is _NO_INPUTS:
            return
        done, case, err, phase = [], None, None, "failed to run"
        try:
            with self.context(provider):
                case = self.ready(provider, x, inputs, modes)
                err, phase = case.err, "timing failed"
                for mode in modes:
                    metrics = self.measure(case, x, inputs, mode)
                    for metric, unit, q in metrics:
                        self.rows.append(row(self.KERNEL, provider, mode, metric, unit, self.X_NAME, label, q,
                                             self.env))
                        self.p50.setdefault((label, mode), {}).setdefault(provider, {})[metric] = q[0]
                        self.unit_of[metric] = unit
                    done.append((mode, metrics))
        except torch.cuda.OutOfMemoryError as e:
            banner(f"OUT OF MEMORY: {provider} on {label}: no {'further ' if done else ''}row written"
                   f"{self.OOM_HINT}.\n{first_line(e)}")
        except CheckFailed as e:
            self.lost(provider, label, str(e), check=True)
        except Exception as e:
            self.lost(provider, label, f"{phase}: {type(e).__name__}: {e}")
        finally:
            if case is not None:
                self.release(case)
            case = None
            free(self.device)
        if done:
            parts = [("" if len(self.MODES) == 1 else f"{mode}: ")
                     + ", ".join(f"{metric} {self._fmt(q[0], unit)}" if unit == "fraction" else
                                 f"{self._fmt(q[0], unit)} {unit}"
                                 for metric, unit, q in sorted(metrics, key=lambda m: m[0] != "time"))
                     for mode, metrics in done]
            check = [] if err is None else [f"check rel. err {err:.2e}"]
            log(f"{label:<{self._width}}  {provider:<20} p50 " + "; ".join(parts + check))

    def lost(self, provider: str, label: str, why: str, check: bool = False) -> None:
        """A provider that failed its check or raised: skipped, or (fails_run) a failed run."""
        if self.fails_run(provider, check):
            banner(f"{'CHECK FAILED' if check else 'FAILED'}: {provider} on {label}: {why}\n"
                   "It is not timed there; the run exits 1.")
            self.failed.append(f"{'check of ' if check else ''}{provider} on {label}")
        else:
            banner(f"SKIP {provider} on {label}: {why}")

    # -------------------------------------------------------------- report

    def _fmt(self, value: float, unit: str) -> str:
        return FORMATS.get(unit, "{:.4g}").format(value)

    def _medians(self, lead: list[str], keys: list[list[str]]) -> tuple[list[str], list[list[str]]]:
        """The medians table: per row the size's columns, then per provider its CELLS metrics (time
        with its ratio to BASELINE's)."""
        cells = [m for m in self.CELLS if m in self.unit_of]
        base = self.BASELINE if self.BASELINE in self.providers else None
        note = "" if base is None else f" (% of {base})" if self.PERCENT else f" (x {base})"
        xcols = list(self.x_columns(self.xs[next(iter(self.p50))[0]]))
        head = lead + xcols + [f"{p} {' / '.join(self.unit_of[m] for m in cells)}{note}" for p in self.providers]
        lines = []
        for key, ((label, _), by) in zip(keys, self.p50.items()):
            line = key + list(self.x_columns(self.xs[label]).values())
            for p in self.providers:
                m, b = by.get(p, {}), by.get(base, {}).get("time")
                shown = [c for c in cells if c in m]
                parts = [self._fmt(m[c], self.unit_of[c]) for c in shown]
                if b and "time" in shown:
                    parts[shown.index("time")] += (f" ({100 * b / m['time']:.0f}%)" if self.PERCENT
                                                   else f" ({m['time'] / b:.2f}x)")
                line.append(" / ".join(parts) or "-")
            lines.append(line)
        return head, lines

    def report(self) -> None:
        """The medians per size (and mode), the ratios with their targets, and the targets' tally."""
        multi = len(self.MODES) > 1
        lead = [self.X_NAME] + (["mode"] if multi else [])
        keys = [[label] + ([mode] if multi else []) for label, mode in self.p50]
        print("\n" + (format_rows(*self._medians(lead, keys)) if self.p50 else "nothing was timed"))
        ratios = [r for r in self.ratios() if any(r.value(by) is not None for by in self.p50.values())]
        if ratios:
            lines = [key + [r.cell(r.value(by), r.judged(*lm)) for r in ratios]
                     for key, (lm, by) in zip(keys, self.p50.items())]
            print("\n" + format_rows(lead + [r.name for r in ratios], lines))
        targets = [r for r in self.ratios() if r.target is not None]
        if targets:
            judged = [r.met(v) for r in targets for lm, by in self.p50.items()
                      if r.judged(*lm) and (v := r.value(by)) is not None]
            unmeasured = [f"{r.name} {r.goal}" for r in targets
                          if not any(r.judged(*lm) and r.value(by) is not None for lm, by in self.p50.items())]
            tally = [f"{sum(judged)} met, {len(judged) - sum(judged)} MISSED"] if judged else []
            tally += [f"not measured here: {'; '.join(unmeasured)}"] if unmeasured else []
            print("targets: " + "; ".join(tally))
        if self.cpu:
            print("(CPU smoke mode: these numbers say nothing about GPU performance)")

    def record_backends(self) -> None:
        """Each size's medians of lorafast's kernel backends (at least two) into the table that
        automatic selection reads (lorafast/_selection.py; --table, or the user's)."""
        from lorafast import _selection
        path = None
        for (label, mode), by in self.p50.items():
            key = self.record_key(self.xs[label], mode)
            ms = {b: by[f"lorafast-{b}"]["time"] for b in self.RECORD_BACKENDS if "time" in by.get(f"lorafast-{b}", {})}
            if key is None or len(ms) < 2:
                continue
            path = _selection.record(self.env["gpu_name"], self.RECORD_OP, *key, ms, self.args.table)
            log(f"{label} {mode}: fastest backend {min(ms, key=ms.get)} ("
                + ", ".join(f"{b} {t:.4f} ms" for b, t in ms.items()) + ")")
        if path is not None:
            print(f"recorded the {self.RECORD_OP} backend choice per shape in {path}")

    # -------------------------------------------------------------- hooks: what a suite supplies

    @classmethod
    def add_arguments(cls, ap: argparse.ArgumentParser) -> None:
        """The suite's own flags."""

    def size_list(self, which: str) -> list:
        """The sizes of a "cpu", "quick" or "full" run."""
        return list(self.SIZES[which])

    def label(self, x) -> str:
        return x.label

    def requires(self) -> tuple[bool, str]:
        """(ok, the banner where not): what the suite cannot run without at all (exit status 1)."""
        return True, ""

    def needs(self) -> list[Needs]:
        """The libraries and backends some providers need (lorafast's CUDA backend is added)."""
        return []

    def header_extra(self) -> list[str]:
        return []

    def prepare(self) -> Optional[int]:
        """Checks of the whole run before any timing; an exit status ends the run there."""
        return None

    def units(self, providers: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
        """(provider, modes) built and checked together on each size."""
        return [(p, self.MODES) for p in providers]

    def inputs(self, x) -> Any:
        return None

    def context(self, provider: str):
        """Around building, checking and timing ``provider``."""
        return contextlib.nullcontext()

    def build(self, provider: str, x, inputs, modes: Sequence[str]) -> Case:
        raise NotImplementedError

    def check(self, case: Case, x, inputs) -> Optional[float]:
        """The first call, checked where the suite has a reference: its relative error, or
        CheckFailed. By default the call is only made (a warm-up)."""
        case.fn()
        return None

    def timed(self, case: Case, mode: str, inputs) -> Callable[[], object]:
        return case.fn

    def memory(self, case: Case, mode: str) -> Optional[list[float]]:
        """Peak memory (p50, p20, p80) in MB over one call, where the suite measures it."""
        return None

    def roofline_ms(self, x, mode: str) -> Optional[float]:
        """The least time the measured roofline allows, for the roofline_fraction rows."""
        return None

    def rates(self, x, mode: str, inputs) -> list[tuple[str, str, float]]:
        """(metric, unit, amount per call): rows of amount / time."""
        return []

    def derived_rows(self) -> list[dict]:
        """Rows computed from the medians of the whole run."""
        return []

    def release(self, case: Case) -> None:
        for t in case.grads:
            t.grad = None

    def fails_run(self, provider: str, check: bool) -> bool:
        """Whether ``provider`` failing its check (``check``) or raising fails the run."""
        return False

    def ratios(self) -> list[Ratio]:
        return []

    def x_columns(self, x) -> dict[str, str]:
        """Columns of the size itself in the medians table."""
        return {}

    def record_key(self, x, mode: str) -> Optional[tuple[str, tuple[int, ...]]]:
        """(dtype, shape features) under which the row's backend medians are recorded, or None."""
        return None

    def info(self, x, inputs) -> dict:
        """What the pytest-benchmark suites put in extra_info besides the row's labels."""
        return {}
