"""The LoRA linear benchmark runs end to end (CPU smoke mode) and writes the shared CSV schema."""
import math

from support.bench_runs import run_bench_cpu


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
        assert (r["metric"], r["unit"], r["x_name"]) in {("time", "ms", "shape"),
                                                          ("roofline_fraction", "fraction", "shape")}
    # roofline time = fraction × measured time is one number per (shape, mode), whoever ran it
    time = {(r["provider"], r["mode"]): float(r["y_p50"]) for r in timed if r["metric"] == "time"}
    roof = {}
    for r in timed:
        if r["metric"] == "roofline_fraction":
            roof.setdefault(r["mode"], []).append(float(r["y_p50"]) * time[r["provider"], r["mode"]])
    assert set(roof) == {"forward", "backward", "full"}
    for mode, values in roof.items():
        assert max(values) <= min(values) * (1 + 1e-5), mode   # the CSV keeps ~9 digits
    assert roof["full"][0] > roof["forward"][0]
    assert {r["metric"] for r in rows if r["provider"] == "roofline"} == {"bandwidth", "tflops"}
