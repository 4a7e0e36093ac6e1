"""Speedup-vs-size charts (PNG) from the benchmark CSVs that bench/*.py write.

One figure per kernel, one subplot per mode, one line per (lorafast provider, baseline)
pair: speedup = baseline p50 time / lorafast p50 time at the same x_value.
"""
from __future__ import annotations

import csv
import datetime
import math
from pathlib import Path
from typing import Sequence

# The schema of bench/common.py (CSV_COLUMNS).
COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value",
           "y_p50", "y_p20", "y_p80", "gpu_name", "torch_version", "triton_version", "commit")
NOT_PROVIDERS = ("roofline",)   # rows of machine limits, not measured providers

Speedups = dict[str, dict[str, dict[tuple[str, str], dict[str, float]]]]


def read_rows(csv_paths: Sequence[str | Path]) -> list[dict]:
    """The rows of all ``csv_paths``, in file order; ValueError on a missing file or a bad header."""
    rows = []
    for path in map(Path, csv_paths):
        if not path.is_file():
            raise ValueError(f"csv_paths: no such file: {path}")
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"csv_paths: {path} is not a benchmark CSV, it lacks columns {missing}")
            rows.extend(reader)
    return rows


def _time(value: str) -> float | None:
    try:
        y = float(value)
    except ValueError:
        return None
    return y if math.isfinite(y) and y > 0 else None


def speedups(rows: Sequence[dict]) -> Speedups:
    """{kernel: {mode: {(lorafast provider, baseline): {x_value: baseline p50 / lorafast p50}}}},
    from the rows with metric "time"; every level keeps the order of first appearance."""
    p50: dict[tuple[str, str, str], dict[str, float]] = {}   # (kernel, mode, provider) -> {x: p50}
    x_order: dict[str, dict[str, None]] = {}                  # kernel -> x_values, as an ordered set
    for r in rows:
        y = _time(r["y_p50"])
        if r["metric"] != "time" or r["provider"] in NOT_PROVIDERS or y is None:
            continue
        p50.setdefault((r["kernel"], r["mode"], r["provider"]), {})[r["x_value"]] = y
        x_order.setdefault(r["kernel"], {})[r["x_value"]] = None
    out: Speedups = {}
    for (kernel, mode, fast), fast_y in p50.items():
        if not fast.startswith("lorafast"):
            continue
        for (k, m, base), base_y in p50.items():
            if (k, m) != (kernel, mode) or base.startswith("lorafast"):
                continue
            pts = {x: base_y[x] / fast_y[x] for x in x_order[kernel] if x in fast_y and x in base_y}
            if pts:
                out.setdefault(kernel, {}).setdefault(mode, {})[(fast, base)] = pts
    return out


def _joined(rows: Sequence[dict], kernel: str, key: str) -> str:
    """The distinct values of ``key`` among the kernel's rows, e.g. one GPU name."""
    return ", ".join(dict.fromkeys(r[key] for r in rows if r["kernel"] == kernel and r[key])) or "?"


def plot_results(csv_paths: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Draw ``<kernel>_speedup.png`` for each kernel of the benchmark CSVs ``csv_paths`` into
    ``out_dir`` (default: the first CSV's directory); returns the written paths."""
    try:
        # The Agg canvas directly: no global backend switch (safe inside notebooks).
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_results needs matplotlib: pip install matplotlib "
                          "(or pip install 'lorafast[bench]')") from e
    if isinstance(csv_paths, (str, Path)):
        csv_paths = [csv_paths]
    if not csv_paths:
        raise ValueError("csv_paths: no CSV given")
    rows = read_rows(csv_paths)
    data = speedups(rows)
    if not data:
        raise ValueError(f"csv_paths: nothing to plot in {[str(p) for p in csv_paths]}: no 'time' rows "
                         "with both a lorafast provider and a baseline at a common x_value")
    out_dir = Path(out_dir) if out_dir is not None else Path(csv_paths[0]).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()

    written = []
    for kernel, modes in data.items():
        fig = Figure(figsize=(6 * len(modes) + 3, 4.8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(modes), sharey=True, squeeze=False)[0]
        # A colour per baseline, a line style and marker per lorafast provider.
        pairs = [p for lines in modes.values() for p in lines]
        fasts = list(dict.fromkeys(f for f, _ in pairs))
        bases = list(dict.fromkeys(b for _, b in pairs))
        order = dict.fromkeys(r["x_value"] for r in rows if r["kernel"] == kernel)   # first appearance
        for ax, (mode, lines) in zip(axes, modes.items()):
            xs = [x for x in order if any(x in pts for pts in lines.values())]
            for (fast, base), pts in lines.items():
                i = fasts.index(fast)
                ax.plot([xs.index(x) for x in pts], list(pts.values()), label=f"{fast} vs {base}",
                        color=f"C{bases.index(base) % 10}", linestyle=("-", "--", ":", "-.")[i % 4],
                        marker="osD^v"[i % 5])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right", fontsize="small")
            ax.set_title(mode)
            ax.set_xlabel(_joined(rows, kernel, "x_name"))
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("speedup (×)")
        handles = {h.get_label(): h for ax in axes for h in ax.get_lines() if not h.get_label().startswith("_")}
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
        fig.suptitle(f"{kernel} speedup — {_joined(rows, kernel, 'gpu_name')}, "
                     f"torch {_joined(rows, kernel, 'torch_version')}, "
                     f"commit {_joined(rows, kernel, 'commit')}, {today}")
        path = out_dir / f"{kernel}_speedup.png"
        fig.savefig(path, dpi=120)
        written.append(path)
    return written
