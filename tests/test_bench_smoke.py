"""The LoRA linear benchmark runs end to end (CPU smoke mode) and writes the shared CSV schema."""
import math

from helpers import run_bench_cpu


def test_bench_lora_linear_cpu_smoke(tmp_path):
    _, rows = run_bench_cpu("bench_lora_linear.py", tmp_path / "x.csv", timeout=120)

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
