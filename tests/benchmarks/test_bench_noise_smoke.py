"""The noise-bandwidth benchmark runs end to end (CPU smoke mode) and writes the shared CSV schema."""
import math

from support.bench_runs import run_bench_cpu


def test_bench_noise_cpu_smoke(tmp_path):
    _, rows = run_bench_cpu("bench_noise.py", tmp_path / "noise.csv", timeout=120)
    timed = [r for r in rows if r["provider"] != "roofline"]
    assert {r["mode"] for r in timed} == {"element", "token"}
    assert {r["provider"] for r in timed} == {"copy", "torch_randn", "lorafast-torch"}
    assert {r["metric"] for r in timed} == {"time", "bandwidth", "pct_of_copy"}
    for r in rows:
        assert r["kernel"] == "noise" and math.isfinite(float(r["y_p50"])) and float(r["y_p50"]) > 0, r
    copy = [r for r in timed if r["provider"] == "copy" and r["metric"] == "pct_of_copy"]
    assert copy and all(float(r["y_p50"]) == 100.0 for r in copy)
