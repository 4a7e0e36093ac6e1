"""Benchmark scripts run in their CPU smoke mode, and the CSV schema they share."""
import csv
import subprocess
import sys
from pathlib import Path

from .common import ROOT

# Spelled out rather than imported, so that a change to the schema breaks the smoke tests.
BENCH_SCHEMA = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "y_p50", "y_p20", "y_p80",
                "gpu_name", "torch_version", "triton_version", "commit"]


def run_bench_cpu(script: str, out: Path, *args: str, timeout: int = 180):
    """Run ``bench/<script> --device cpu --out out [args]``; (the process, the CSV rows as dicts)."""
    proc = subprocess.run([sys.executable, f"bench/{script}", "--device", "cpu", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with out.open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == BENCH_SCHEMA
        rows = [dict(zip(BENCH_SCHEMA, r)) for r in reader]
    return proc, rows
