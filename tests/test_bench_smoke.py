"""The LoRA linear benchmark runs end to end (CPU smoke mode) and writes the shared CSV schema."""
import csv
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Spelled out rather than imported, so that a change to the schema breaks this test.
SCHEMA = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "y_p50", "y_p20", "y_p80",
          "gpu_name", "torch_version", "triton_version", "commit"]


def test_bench_lora_linear_cpu_smoke(tmp_path):
    out = tmp_path / "x.csv"
    proc = subprocess.run([sys.executable, "bench/bench_lora_linear.py", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    with out.open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == SCHEMA
        rows = [dict(zip(SCHEMA, r)) for r in reader]

    timed = [r for r in rows if r["provider"] != "roofline"]
    assert {r["mode"] for r in timed} == {"forward", "backward", "full"}
    assert {r["provider"] for r in timed} >= {"frozen_linear", "lorafast-torch"}
    for r in rows:
        assert r["kernel"] == "lora_linear" and r["gpu_name"] == "cpu"
        p50 = float(r["y_p50"])
        assert math.isfinite(p50) and p50 > 0, r
    for r in timed:
        assert (r["metric"], r["unit"], r["x_name"]) == ("time", "ms", "shape")
    assert {r["metric"] for r in rows if r["provider"] == "roofline"} == {"bandwidth", "tflops"}
